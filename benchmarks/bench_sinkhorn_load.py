#!/usr/bin/env python
"""Sinkhorn-Knopp on a loaded machine: pym4's CPU solve at the small shapes (where a pass
lasts tens of microseconds and a join can wait a scheduler slice) with N busy processes
sharing the cores, a torch op between solves as in a training loop.

The core's contention back-off (csrc/sinkhorn.cpp, ``Team``) is what this measures: without
it, SEER's 16 x 16000 solve took a median 100 ms at load 2 on two cores, against 8 ms with it.

    python benchmarks/bench_sinkhorn_load.py                 # loads 0 and 2
    python benchmarks/bench_sinkhorn_load.py --loads 0 1 2 4 --solves 161
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

import pym4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import write_results  # noqa: E402

# (label, B, K, n_iters, epsilon): the shapes whose solve is under a millisecond
SHAPES = [("SwAV B=256", 256, 3000, 3, 0.05), ("SEER B=16 K=16000", 16, 16000, 10, 0.03)]


def measure(load: int, solves: int):
    """Median and 90th percentile of ``solves`` calls per shape, with ``load`` spinning processes."""
    # (separate interpreters, not forks of this one: it holds torch's threads)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    rows = []
    try:
        time.sleep(0.5 if load else 0.0)  # the spinners running before the first solve
        for label, b, k, n_iters, eps in SHAPES:
            scores = torch.randn(b, k, generator=torch.Generator().manual_seed(0)).mul_(0.3).clamp_(-1, 1)
            out = torch.empty_like(scores)
            times = []
            for _ in range(solves):
                t0 = time.perf_counter()
                pym4.sinkhorn(scores, eps, n_iters, out=out)
                scores.sum()  # a torch op (two threads) between solves, as a training step has
                times.append(time.perf_counter() - t0)
            rows.append({"shape": label, "B": b, "K": k, "n_iters": n_iters, "load": load, "busy": f"{load} busy",
                         "solves": solves,
                         "median_s": float(np.median(times)), "p90_s": float(np.percentile(times, 90))})
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 2], help="busy processes per run")
    parser.add_argument("--solves", type=int, default=81)
    parser.add_argument("--out", default="bench_out", help="folder for sinkhorn_load.csv and .png")
    args = parser.parse_args(argv)
    if any(n < 0 for n in args.loads) or args.solves < 1:
        parser.error("--loads: counts >= 0; --solves: >= 1")
    print(f"pym4 {pym4.__version__}  cores={os.cpu_count()}  threads={torch.get_num_threads()}")
    rows = []
    for load in args.loads:
        for row in measure(load, args.solves):
            rows.append(row)
            print(f"load {load:<3d} {row['shape']:<20} median {row['median_s'] * 1e3:8.3f} ms   "
                  f"p90 {row['p90_s'] * 1e3:8.3f} ms")
    csv_path, png_path = write_results(args.out, "sinkhorn_load", rows)
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
