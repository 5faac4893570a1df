#!/usr/bin/env python3
"""Registers, spills and shared memory of every CUDA kernel in kernels/cuda/, from ptxas -v.

Usage:
    cuda_resources.py --log BUILD_LOG            parse a build's output (make cuda-check)
    cuda_resources.py --nvcc 90 [--nvcc 80 ...]  compile kernels/cuda/*.cu itself
    cuda_resources.py --nvcc native               ... for the GPU of this machine (gpu_check.sh)

Every kernel ptxas reports is listed (no fixed list): arch, registers, stack frame, spill
stores/loads and static shared memory. Exits 1 when a kernel spills more than
gpu_limits.SPILL_BUDGET_BYTES per thread, or when the cooperative Sinkhorn kernel could be
asked for more blocks than fit on the GPU at once.

Co-residency (the one-launch Sinkhorn kernel, ``sinkhorn_fused_kernel``): a cooperative launch
of more blocks than are resident at once fails at run time. The launch geometry is read from
``pym4::cuda::sinkhorn_launch`` in csrc/include/pym4/cuda.h; the resident blocks per SM follow
from the registers and static shared memory ptxas reports, the dynamic shared memory the
launcher gives each block (8 bytes per column when that fits, else none) and the GPU's limits
(H100/H200: 132 SMs, A100: 108). For every column count the fused path takes, the check
computes the grid the launcher asks for and asserts it is at most the co-resident blocks.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_limits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "include" / "pym4" / "cuda.h"
FUSED = "sinkhorn_fused_kernel"


@dataclass
class Kernel:
    mangled: str
    arch: int
    name: str = ""
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> list[Kernel]:
    """Kernels from ptxas -v output (any number of files and archs, in any order)."""
    kernels: list[Kernel] = []
    current = None
    props_of = None  # the function whose "Function properties" block is being read
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = Kernel(m.group(1), int(m.group(2)))
            kernels.append(current)
            props_of = None
        elif m := _PROPS.search(line):
            props_of = m.group(1)
        elif (m := _FRAME.search(line)) and current is not None and props_of == current.mangled:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif (m := _USED.search(line)) and current is not None:
            current.regs = int(m.group(1))
            if s := _SMEM.search(line):
                current.smem = int(s.group(1))
    names = demangle([k.mangled for k in kernels])
    for k, n in zip(kernels, names):
        k.name = n
    # nvcc runs ptxas once per arch and file; a rebuilt file would repeat its kernels.
    unique = {(k.mangled, k.arch): k for k in kernels}
    return sorted(unique.values(), key=lambda k: (k.name, k.arch))


def demangle(mangled: list[str]) -> list[str]:
    """Short readable names: 'sinkhorn_fused_kernel<__half>' without namespaces or parameters."""
    if not mangled:
        return []
    try:
        out = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True).stdout
        full = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    short = []
    for name in full:
        name = re.sub(r"^void\s+", "", name)
        depth, cut = 0, len(name)
        for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside <>
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
                cut = i
                break
        name = name[:cut]
        name = re.sub(r"(\w+::|\(anonymous namespace\)::)+(?=\w)", "", name)
        short.append(re.sub(r"pym4::cuda::(\(anonymous namespace\)::)?", "", name))
    return short


def run_nvcc(archs: list[int], nvcc: str) -> str:
    """ptxas -v output of every kernels/cuda/*.cu for each arch, with the build's flags (CMakeLists.txt)."""
    jobs = [(src, cc) for src in sorted((ROOT / "kernels" / "cuda").glob("*.cu")) for cc in archs]

    def one(job):
        src, cc = job
        cmd = [nvcc, "-cubin", "-o", "/dev/null", f"-arch=sm_{cc}", "-O3", "-DNDEBUG", "--use_fast_math", "-lineinfo",
               "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", "-Xptxas", "-v", str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"nvcc failed on {src.name} for sm_{cc}:\n{r.stderr}")
        return r.stdout + r.stderr

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), 8))) as pool:
        return "\n".join(pool.map(one, jobs))


# ----- the cooperative launch -----------------------------------------------------------------

_CONST = re.compile(r"constexpr\s+\w+\s+(k\w+)\s*=\s*([^;]+);")


def _value(expr: str) -> int:
    """An integer constant expression of the header: 512, int64_t(1) << 25."""
    expr = re.sub(r"\b(?:int64_t|int|size_t)\s*\(([^()]*)\)", r"(\1)", expr)
    if not re.fullmatch(r"[\d\s()<>*+\-]+", expr):
        raise ValueError(f"cannot evaluate the constant expression {expr!r}")
    return int(eval(expr, {"__builtins__": {}}))  # digits and operators only, checked above


def launch_constants(header: Path = HEADER) -> dict[str, int]:
    """The constants of namespace sinkhorn_launch in cuda.h: the launcher's geometry, stated once."""
    text = header.read_text()
    m = re.search(r"namespace\s+sinkhorn_launch\s*\{(.*?)\}\s*//\s*namespace\s+sinkhorn_launch", text, re.S)
    if m is None:
        raise SystemExit(f"{header}: namespace sinkhorn_launch not found")
    return {name: _value(expr) for name, expr in _CONST.findall(m.group(1))}


def check_source_agrees(consts: dict[str, int]) -> list[str]:
    """sinkhorn.cu's own copies of the launch constants, where it still states them as numbers
    instead of taking cuda.h's, must equal cuda.h's; so must the fused kernel's launch bounds."""
    errors = []
    src = (ROOT / "kernels" / "cuda" / "sinkhorn.cu").read_text()
    for name, expr in _CONST.findall(src):
        try:
            value = _value(expr)
        except ValueError:
            continue  # e.g. `= sinkhorn_launch::kThreads`: the header's value by construction
        if name in consts and value != consts[name]:
            errors.append(f"sinkhorn.cu: {name} = {value} but cuda.h's sinkhorn_launch::{name} = {consts[name]}")
    m = re.search(r"__launch_bounds__\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*" + FUSED, src)
    if m and m.group(2).isdigit() and int(m.group(2)) != consts["kMinBlocksPerSm"]:
        errors.append(f"sinkhorn.cu: {FUSED} has __launch_bounds__(..., {m.group(2)}) but cuda.h's "
                      f"sinkhorn_launch::kMinBlocksPerSm = {consts['kMinBlocksPerSm']}")
    return errors


def fused_request(rows: int, cols: int, resident: int, c: dict[str, int]) -> int:
    """Blocks the launcher asks for (sinkhorn.cu: max_parts, then set_parts of min(cap, resident))."""
    by_rows = -(-rows // c["kMinRowsPerPart"])
    by_mem = max(1, c["kMaxPartialEntries"] // cols)
    parts = max(1, min(c["kMaxParts"], by_rows, by_mem, resident))
    parts = min(parts, rows)
    per_part = -(-rows // parts)
    return -(-rows // per_part)


def launcher_clamps() -> bool:
    """Whether sinkhorn.cu's fused path caps its grid at the occupancy query's answer
    (set_parts(f, min(cap, resident_blocks(...)))). Without that clamp the launcher asks for
    max_parts() blocks whatever fits, and the check below models it so."""
    src = (ROOT / "kernels" / "cuda" / "sinkhorn.cu").read_text()
    return re.search(r"set_parts\(\s*f\s*,[^;]*resident_blocks\(", src) is not None


def coresidency(kernels: list[Kernel], c: dict[str, int]) -> tuple[list[str], list[str]]:
    """(report lines, errors) of the cooperative Sinkhorn kernel on each GPU of gpu_limits."""
    clamped = launcher_clamps()
    lines = [f"  launcher caps the grid at the occupancy query: {'yes' if clamped else 'NO'}"]
    errors = []
    threads = c["kThreads"]
    fused = [k for k in kernels if k.name.startswith(FUSED)]
    if not fused:
        errors.append(f"no {FUSED} in the ptxas output: the co-residency check has nothing to check")
    for k in fused:
        try:
            a = gpu_limits.arch(k.arch)
        except ValueError:
            continue
        # Launch bounds promise: kMinBlocksPerSm blocks of kThreads fit by registers.
        by_regs = a.blocks_per_sm(threads, k.regs, 0)
        if by_regs < c["kMinBlocksPerSm"]:
            errors.append(f"{k.name} sm_{k.arch}: {k.regs} registers allow {by_regs} blocks of {threads} per SM, "
                          f"the launch bounds promise {c['kMinBlocksPerSm']}")
        budget = a.smem_per_block - k.smem - 1024  # the launcher's shared-memory budget for its columns
        samples = sorted({1, 64, 3000, 16000, budget // 8, budget // 8 + 1, 65536, 1 << 20})
        worst = None
        for cols in samples:
            dyn = 8 * cols if 8 * cols <= budget else 0
            per_sm = a.blocks_per_sm(threads, k.regs, k.smem + dyn)
            fit = per_sm * a.sms
            if fit < 1:
                errors.append(f"{k.name} sm_{k.arch} cols={cols}: not one block fits ({k.smem + dyn} B shared)")
                continue
            rows = max(1, c["kFusedMaxElements"] // cols)  # the most rows the fused path takes at this width
            for r in sorted({1, 2, 3, 1000, rows}):
                if r > rows:
                    continue
                asked = fused_request(r, cols, fit if clamped else 1 << 62, c)
                if asked > fit:
                    errors.append(f"{k.name} sm_{k.arch}: rows={r} cols={cols}: the launcher asks for {asked} "
                                  f"blocks, {fit} are co-resident on {a.gpu}")
            if worst is None or fit < worst[1]:
                worst = (cols, fit)
            if cols in (64, 3000, 16000):
                lines.append(f"  {k.name:37s} sm_{k.arch} {a.gpu:9s} cols={cols:6d}: {per_sm} blocks/SM x {a.sms} SMs "
                             f"= {fit:4d} co-resident; asked at most {fused_request(rows, cols, fit if clamped else 1 << 62, c):4d} "
                             f"(cap kMaxParts={c['kMaxParts']})")
        if worst is not None:
            lines.append(f"  {k.name:37s} sm_{k.arch} {a.gpu:9s} fewest co-resident: {worst[1]} (cols={worst[0]})")
    return lines, errors


def report(kernels: list[Kernel], budget: int) -> list[str]:
    """Prints the table; returns the spill errors."""
    print(f"{'kernel':42s} {'arch':6s} {'regs':>4s} {'stack':>6s} {'spill st/ld':>12s} {'smem':>9s}")
    errors = []
    for k in kernels:
        flag = ""
        if k.spill_stores > budget or k.spill_loads > budget:
            flag = "  <- spills beyond budget"
            errors.append(f"{k.name} sm_{k.arch}: spills {k.spill_stores} B stores / {k.spill_loads} B loads per "
                          f"thread, budget {budget} B")
        print(f"{k.name:42s} sm_{k.arch:<3d} {k.regs:4d} {k.stack:6d} {k.spill_stores:5d}/{k.spill_loads:<6d} "
              f"{gpu_limits.fmt_kb(k.smem):>9s}{flag}")
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--log", type=Path, help="a build log holding nvcc's ptxas -v output")
    src.add_argument("--nvcc", action="append", metavar="CC", help="compile for sm_CC, or the GPU here: native (repeatable)")
    ap.add_argument("--nvcc-path", default="nvcc", help="the nvcc to run with --nvcc")
    ap.add_argument("--spill-budget", type=int, default=gpu_limits.SPILL_BUDGET_BYTES, help="bytes per thread")
    args = ap.parse_args(argv)
    if args.log:
        text = args.log.read_text(errors="replace")
    else:
        text = run_nvcc([gpu_limits.native_arch() if a == "native" else int(a) for a in args.nvcc], args.nvcc_path)
    kernels = parse_ptxas(text)
    if not kernels:
        print("cuda_resources: no ptxas -v output found (was the build run with -Xptxas -v and the .cu files "
              "recompiled?)", file=sys.stderr)
        return 1
    errors = report(kernels, args.spill_budget)
    consts = launch_constants()
    errors += check_source_agrees(consts)
    lines, co_errors = coresidency(kernels, consts)
    print(f"cooperative launch of {FUSED} ({consts['kThreads']} threads per block):")
    print("\n".join(lines))
    errors += co_errors
    print(f"{len(kernels)} kernel instances; spill budget {args.spill_budget} B per thread")
    for e in errors:
        print("FAIL:", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
