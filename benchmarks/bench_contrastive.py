"""Benchmark: CLIP/SigLIP loss forward+backward, pym4 against open_clip (and Inf-CL on GPU).

For B = 1024 ... 65536 at D = 512: time of one forward+backward (loss and gradients of both
features and logit_scale/logit_bias) and peak memory above the inputs, side by side:

- ``pym4.clip_loss`` / ``pym4.siglip_loss`` (chunked CPU backend, or the Triton kernels on CUDA);
- open_clip's ``ClipLoss`` / ``SigLipLoss`` (its loss.py, loaded by path: it needs only torch);
- on CUDA, Inf-CL's ``cal_inf_loss`` when the ``inf_cl`` package is installed.

On the CPU every point runs in a fresh subprocess, and memory is the growth of the peak
resident set (VmHWM, reset through /proc/self/clear_refs after the inputs are made). On CUDA
all points run in this process and memory is torch's peak allocation above the inputs.
An anchor whose estimated need exceeds ``--max-anchor-gb`` is not run and is reported as
out of memory ("oom"), as are real OOMs. Time is the median of ``--repeats`` calls
(benchmarks/_harness.py; on CUDA triton's do_bench). Writes ``contrastive_<device>.csv`` and
the PNG plot.py draws from it (log-log time and memory against B) under ``--out``; prints one
line per point and ratio lines (pym4 vs open_clip).

    python benchmarks/bench_contrastive.py --out bench_out            # CPU, about 10 min on 2 cores
    python benchmarks/bench_contrastive.py --device cuda --out DIR     # GPU, < 2 min
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

# _harness.py lies beside this file; put it on the path explicitly, as under PYTHONSAFEPATH
# (gpu_check.sh) the script's folder is not.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import Case, references, time_interleaved, write_results  # noqa: E402

METHODS = ("pym4-clip", "open_clip-clip", "pym4-siglip", "open_clip-siglip", "inf_cl-clip")
# Bytes per B^2 logit element that open_clip needs in float32 forward+backward (measured here:
# ClipLoss ~4.6 GB at B = 16384 is ~4.3 x 4 B^2; SigLipLoss holds logits, labels, products and
# their gradients).
_ANCHOR_BYTES_PER_ELEMENT = {"open_clip-clip": 4.5 * 4, "open_clip-siglip": 7 * 4}


def make_step(method, device, dtype_name):
    """A function (x, y, log_scale, bias) -> loss for one method, or None when unavailable."""
    if method.startswith("pym4"):
        import pym4
        if method == "pym4-clip":
            return lambda x, y, ls, b: pym4.clip_loss(x, y, ls.exp(), None)
        return lambda x, y, ls, b: pym4.siglip_loss(x, y, ls.exp(), b)
    if method.startswith("open_clip"):
        oc = references().open_clip_loss_module()
        if oc is None:
            return None
        if method == "open_clip-clip":
            mod = oc.ClipLoss()
            return lambda x, y, ls, b: mod(x, y, ls.exp())
        mod = oc.SigLipLoss()
        return lambda x, y, ls, b: mod(x, y, ls.exp(), b)
    if method == "inf_cl-clip":
        if device != "cuda" or importlib.util.find_spec("inf_cl") is None:
            return None
        from inf_cl import cal_inf_loss
        # scale= would route logit_scale's gradient through inf_cl's GradientGather, whose backward
        # all-reduces without a process group (ValueError): scale q ourselves, as cal_inf_loss does.
        return lambda x, y, ls, b: (cal_inf_loss(ls.exp() * x, y) + cal_inf_loss(ls.exp() * y, x)) / 2
    raise ValueError(method)


def inputs(n, d, device, dtype_name):
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, dtype_name)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g) + x.float().cpu(), dim=1).to(device=device,
                                                                                                   dtype=dtype)
    x.requires_grad_()
    y.requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return x, y, log_scale, bias


def _vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _forward_backward(step, x, y, ls, b):
    """One timed call: fresh gradients (no accumulation into the last call's), loss, backward."""
    def call():
        for t in (x, y, ls, b):
            t.grad = None
        step(x, y, ls, b).backward()
    return call


def cpu_point(method, n, d, dtype_name, repeats):
    """Runs in a fresh subprocess: time and peak RSS growth of forward+backward."""
    step = make_step(method, "cpu", dtype_name)
    if step is None:
        return {"status": "missing"}
    x, y, ls, b = inputs(n, d, "cpu", dtype_name)
    base = _vm_kib("VmRSS")
    try:  # reset the peak RSS to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    # No untimed warm-up, and one sample only of a point slower than 5 s: the first run of a
    # long point is representative, and a second would double the benchmark's time.
    timing = time_interleaved({method: Case(_forward_backward(step, x, y, ls, b), max_seconds=5)},
                              rounds=repeats, warmup=0)[method]
    peak = _vm_kib("VmHWM")
    return {"status": "ok", **timing.row(), "peak_mb": max(peak - base, 0) / 1024}


def cuda_point(method, n, d, dtype_name, repeats):
    import torch
    step = make_step(method, "cuda", dtype_name)
    if step is None:
        return {"status": "missing"}
    x, y, ls, b = inputs(n, d, "cuda", dtype_name)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call = _forward_backward(step, x, y, ls, b)
    try:
        call()  # warm-up (Triton compiles here) and the memory figure
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        timing = time_interleaved({method: call}, rounds=repeats, warmup=0, device="cuda")[method]
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom"}
    except Exception as e:  # one failing point (a first GPU run's bug) must not lose the others' figures
        return {"status": "failed", "error": [repr(e)[:300]]}
    finally:
        del x, y, call
        torch.cuda.empty_cache()
    return {"status": "ok", **timing.row(), "peak_mb": peak / 2**20}


def anchor_fits(method, n, limit_gb):
    need = _ANCHOR_BYTES_PER_ELEMENT.get(method)
    return need is None or need * n * n <= limit_gb * 2**30


def run_cpu_subprocess(method, n, d, dtype_name, repeats, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--_point", method, str(n), str(d), dtype_name, str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode != 0:
        oom = proc.returncode in (-9, 137) or "MemoryError" in proc.stderr
        return {"status": "oom" if oom else "failed", "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (default 3 on CPU, 5 on CUDA)")
    p.add_argument("--max-anchor-gb", type=float, default=None,
                   help="skip an anchor point needing more (default 12 on CPU, 90%% of the GPU on CUDA)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--timeout", type=float, default=900, help="seconds per CPU point")
    p.add_argument("--_point", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._point:
        method, n, d, dtype_name, repeats = args._point
        print(json.dumps(cpu_point(method, int(n), int(d), dtype_name, int(repeats))))
        return 0

    from tqdm import tqdm
    dtype_name = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    repeats = args.repeats or (3 if args.device == "cpu" else 5)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device", file=sys.stderr)
            return 2
        limit = args.max_anchor_gb or 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
        device_name = torch.cuda.get_device_name(0)
    else:
        limit = args.max_anchor_gb or 12.0
        device_name = f"CPU ({os.cpu_count()} cores)"
    os.makedirs(args.out, exist_ok=True)
    rows = []
    points = [(n, m) for n in args.sizes for m in args.methods]
    for n, method in tqdm(points, desc="bench_contrastive", file=sys.stderr):
        row = {"device": args.device, "method": method, "B": n, "D": args.dim, "dtype": dtype_name}
        if method.startswith("open_clip") and not anchor_fits(method, n, limit):
            result = {"status": "oom"}  # not run: would exceed the memory limit
        elif args.device == "cpu":
            result = run_cpu_subprocess(method, n, args.dim, dtype_name, repeats, args.timeout)
        else:
            result = cuda_point(method, n, args.dim, dtype_name, repeats)
        row.update(result)
        rows.append(row)
        if result["status"] == "ok":
            tqdm.write(f"{method:17s} B={n:6d} D={args.dim} {dtype_name}: {result['median_s']:9.4f} s  "
                       f"peak {result['peak_mb']:10.1f} MB", file=sys.stdout)
        elif result["status"] != "missing":
            tqdm.write(f"{method:17s} B={n:6d} D={args.dim} {dtype_name}: {result['status']}"
                       + (f" {result.get('error')}" if result.get("error") else ""), file=sys.stdout)
    print(f"== contrastive on {device_name}, D={args.dim}, {dtype_name}")
    by = {(r["method"], r["B"]): r for r in rows}
    for kind in ("clip", "siglip"):
        for n in args.sizes:
            ours, theirs = by.get((f"pym4-{kind}", n)), by.get((f"open_clip-{kind}", n))
            if not ours or ours["status"] != "ok":
                continue
            if theirs and theirs["status"] == "ok":
                print(f"ratio {kind} B={n}: pym4 {theirs['median_s'] / ours['median_s']:.2f}x faster than open_clip, "
                      f"memory 1/{theirs['peak_mb'] / max(ours['peak_mb'], 1e-3):.1f} of open_clip "
                      f"({ours['peak_mb']:.0f} MB vs {theirs['peak_mb']:.0f} MB)")
            elif theirs:
                print(f"ratio {kind} B={n}: open_clip {theirs['status']}; pym4 {ours['median_s']:.2f} s, "
                      f"{ours['peak_mb']:.0f} MB above inputs")
    fields = ["device", "method", "B", "D", "dtype", "status", "median_s", "q25_s", "q75_s", "samples", "peak_mb"]
    csv_path, png_path = write_results(args.out, f"contrastive_{args.device}", rows, fields,
                                       title=f"contrastive loss fwd+bwd, D={args.dim}, {dtype_name}, {device_name}")
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
