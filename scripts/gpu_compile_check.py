#!/usr/bin/env python3
"""Native compile check of every Triton kernel in kernels/, without a GPU.

Every module kernels/*.py that defines ``compile_configs()`` joins (no list here): each dict it
yields (name, fn, signature, constexprs, num_warps, num_stages; see kernels/contrastive.py) is
compiled ahead of time with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
for each arch (default sm_90 and sm_80), and the cubin's resources are read with the
cuobjdump that ships with Triton. Prints one row per kernel instance and arch: registers,
stack (for Triton kernels: spills) and shared memory. Exits 1 when a compile fails, when shared
memory passes the arch's limit per block (sm_90: 227 KB, sm_80: 163 KB) or when a kernel
spills more than gpu_limits.SPILL_BUDGET_BYTES per thread.

    gpu_compile_check.py [--arch 90 --arch 80 | --arch native] [--jobs N] [--only SUBSTRING]

``--arch native`` compiles for the GPU of this machine (benchmarks/gpu_check.sh). Pointer
arguments are compiled as 16-byte aligned, as torch's allocations are when the launcher runs,
and the integer arguments a config lists under the optional key ``divisible`` as multiples of
16 (integers equal to 1, which Triton also specialises, are given as constexprs).
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_limits  # noqa: E402

# Versions whose ASTSource takes (fn, signature-with-"constexpr"-entries, constexprs by name,
# attrs {(index,): [[name, value]]}). pyproject.toml's triton extra states the same range.
MIN_TRITON = (3, 6)

_CONFIGS: list[dict] = []  # filled before the worker pool forks, read by index in the workers


def discover(root: Path = ROOT) -> list[dict]:
    """compile_configs() of every kernels/*.py that defines one, in file order."""
    # Under TRITON_INTERPRET=1, @triton.jit makes interpreter functions that cannot be compiled.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("gpu_compile_check: unset TRITON_INTERPRET (native compiles need @triton.jit functions)")
    sys.path.insert(0, str(root))
    configs = []
    for path in sorted((root / "kernels").glob("*.py")):
        if path.name.startswith("_") or not re.search(r"^def compile_configs\(", path.read_text(), re.M):
            continue
        module = importlib.import_module(f"kernels.{path.stem}")
        for cfg in module.compile_configs():
            configs.append(validate(cfg, path.name))
    return configs


def validate(cfg: dict, where: str) -> dict:
    """The convention's keys, and every argument of fn typed or given exactly once."""
    missing = {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} - set(cfg)
    if missing:
        raise SystemExit(f"{where}: compile_configs() entry {cfg.get('name', '?')!r} lacks {sorted(missing)}")
    args = list(cfg["fn"].arg_names)
    given = list(cfg["signature"]) + list(cfg["constexprs"])
    if sorted(given) != sorted(args):
        raise SystemExit(f"{where}: {cfg['name']}: signature + constexprs name {sorted(given)}, "
                         f"the kernel takes {args}")
    if list(cfg["signature"]) != [a for a in args if a in cfg["signature"]]:
        raise SystemExit(f"{where}: {cfg['name']}: signature is not in the kernel's argument order")
    return dict(cfg, module=where)


def triton_version() -> tuple[int, int]:
    import triton
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
    return major, minor


def _source(cfg: dict):
    """ASTSource for one config, in the form this Triton takes (checked against MIN_TRITON)."""
    from triton.compiler import ASTSource
    fn = cfg["fn"]
    constexprs = cfg["constexprs"]
    signature = {a: ("constexpr" if a in constexprs else cfg["signature"][a]) for a in fn.arg_names}
    # Pointers 16-byte aligned (torch's allocations), and the integers a config names in
    # "divisible" multiples of 16: what Triton's launcher specialises on at run time.
    divisible = set(cfg.get("divisible", ()))
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if a in cfg["signature"] and (cfg["signature"][a].startswith("*") or a in divisible)}
    return ASTSource(fn, signature, constexprs=dict(constexprs), attrs=aligned)


def cuobjdump() -> str:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for cand in (os.environ.get("CUOBJDUMP"), str(bundled), "/usr/local/cuda/bin/cuobjdump"):
        if cand and Path(cand).is_file():
            return cand
    raise SystemExit("cuobjdump not found (Triton's third_party copy, /usr/local/cuda/bin, or $CUOBJDUMP)")


def compile_one(job: tuple[int, int]) -> dict:
    """Compile config `index` for sm_`cc`; its resources, or the error."""
    index, cc = job
    cfg = _CONFIGS[index]
    row = {"index": index, "cc": cc, "error": None}
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Triton 3.9's notice on its fp-fusion default
            k = triton.compile(_source(cfg), target=GPUTarget("cuda", cc, 32),
                               options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        if m is None:
            raise RuntimeError(f"no resource line in cuobjdump's output:\n{out}")
        regs, stack, static_smem, local = map(int, m.groups())
        row.update(regs=regs, stack=stack, local=local, smem=int(k.metadata.shared) + static_smem)
    except Exception as e:  # noqa: BLE001 - a failed compile is a result of the check
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    row["seconds"] = time.perf_counter() - t0
    return row


def judge(row: dict, lim: gpu_limits.Arch, spill_budget: int) -> list[str]:
    """What is wrong with one compiled kernel (resources from compile_one) on arch `lim`."""
    problems = []
    if row["smem"] > lim.smem_per_block:
        problems.append(f"shared memory {gpu_limits.fmt_kb(row['smem'])} above {gpu_limits.fmt_kb(lim.smem_per_block)}")
    spill = max(row["stack"], row["local"])
    if spill > spill_budget:
        problems.append(f"spills {spill} B > {spill_budget} B")
    return problems


def describe(cfg: dict) -> str:
    """dtype / precision, and the launch shape, for the table."""
    ptrs = [t[1:] for t in cfg["signature"].values() if t.startswith("*")]
    prec = cfg["constexprs"].get("PRECISION")
    return f"{ptrs[0] if ptrs else '-'}" + (f"/{prec}" if prec else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", help="90, 80 or native (repeatable; default 90 and 80)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    ap.add_argument("--only", default="", help="only configs whose name contains this")
    ap.add_argument("--spill-budget", type=int, default=gpu_limits.SPILL_BUDGET_BYTES, help="bytes per thread")
    ap.add_argument("--root", type=Path, default=ROOT, help="the tree whose kernels/ to check (default: this one)")
    args = ap.parse_args(argv)
    archs = [gpu_limits.native_arch() if a == "native" else int(a) for a in (args.arch or ["90", "80"])]
    limits = {cc: gpu_limits.arch(cc) for cc in archs}

    import triton
    if triton_version() < MIN_TRITON:
        raise SystemExit(f"triton {triton.__version__} is older than this check supports "
                         f"({'.'.join(map(str, MIN_TRITON))}+, as pyproject.toml states)")
    t0 = time.perf_counter()
    _CONFIGS.extend(c for c in discover(args.root) if args.only in c["name"])
    if not _CONFIGS:
        print("gpu_compile_check: no compile_configs() found in kernels/*.py", file=sys.stderr)
        return 1
    jobs = [(i, cc) for i in range(len(_CONFIGS)) for cc in archs]
    print(f"triton {triton.__version__}: {len(_CONFIGS)} kernel configurations from "
          f"{sorted({c['module'] for c in _CONFIGS})}, {len(jobs)} compiles on {args.jobs} processes", flush=True)
    # fork: the workers inherit _CONFIGS (the @triton.jit functions) instead of re-importing.
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(compile_one, jobs))

    errors = []
    print(f"{'kernel':58s} {'arch':5s} {'dtype':9s} {'warps':>5s} {'regs':>4s} {'stack':>6s} {'smem':>9s}  status")
    for row in sorted(rows, key=lambda r: (_CONFIGS[r["index"]]["name"], -r["cc"])):
        cfg, lim = _CONFIGS[row["index"]], limits[row["cc"]]
        head = f"{cfg['name']:58s} sm_{row['cc']:<2d} {describe(cfg):9s} {cfg['num_warps']:3d}/{cfg['num_stages']}"
        if row["error"]:
            print(f"{head} {'':>4s} {'':>6s} {'':>9s}  COMPILE FAILED")
            errors.append(f"{cfg['name']} sm_{row['cc']}: compile failed: {row['error']}")
            continue
        status = judge(row, lim, args.spill_budget)
        print(f"{head} {row['regs']:4d} {row['stack']:6d} {gpu_limits.fmt_kb(row['smem']):>9s}  "
              f"{'; '.join(status) or 'ok'}")
        errors += [f"{cfg['name']} sm_{row['cc']}: {s}" for s in status]
    wall = time.perf_counter() - t0
    print(f"{len(rows)} compiles in {wall:.0f} s (triton {triton.__version__}); spill budget {args.spill_budget} B "
          f"per thread; shared memory limits: " + ", ".join(f"sm_{cc} {gpu_limits.fmt_kb(limits[cc].smem_per_block)}"
                                                           for cc in archs))
    for e in errors:
        print("FAIL:", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
