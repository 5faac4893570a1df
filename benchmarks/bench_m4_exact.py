"""The exact M4 solver's memory and time cliffs (issue 11, item 10), before/after.

Each case runs in a fresh child process; the child reports the wall time of the core's
in-memory exact solve (``m4_solve_exact``), its status and passes, the largest constraint
violation recomputed from q (budget included), and the memory the solve added on top of its
input (the peak RSS, VmHWM, reset just before the solve, minus the RSS then).
With ``--old-core PATH`` (a ``_core*.so`` built from an earlier commit, e.g. 973a38d) every
case also runs on that core, and RATIO lines compare the two on the same machine.

Cases:
- ``wide``: m = 2 groups, c = 5000 labels (about 5 % set, tied to the groups), N = 20,000,
  target the group frequencies, eps_assoc 0.1 (feasible; p = 10,002: the dense Hessian is
  4 blocks of 5001^2 doubles and a p x p model);
- ``groups``: m = 60 groups, c = 200 labels, N = 200 (p = 12,060, 1831 pair blocks);
- ``tiny-budget``: m = 2, c = 8, N = 20,000 at budget 1e-6;
- ``n1e7``: N = 1e7, m = 2, c = 32, the data of bench_m4.py (issue 9's 2 s target for
  balance(method="exact"); here the core's solve alone).

    python benchmarks/bench_m4_exact.py [--cases wide,groups,tiny-budget,n1e7] [--old-core PATH] [--out DIR]

Writes bench_m4_exact.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("wide", "groups", "tiny-budget", "n1e7")


def make_case(name):
    """(s, y, target, budget, eps_rep, eps_assoc) of a case, generated in row chunks so that
    the generator's float temporaries stay small next to the solve's own memory."""
    import numpy as np
    if name == "n1e7":
        sys.path.insert(0, HERE)
        from bench_m4 import EPS_ASSOC, EPS_REP, ETA, make_dense
        from pym4 import m4
        s, y = make_dense(10_000_000, seed=10_000_000 % 97)
        return s, y, m4.default_target(s), ETA, EPS_REP, EPS_ASSOC
    n, m, c, dens, eta = {"wide": (20_000, 2, 5000, 0.05, 0.7), "groups": (200, 60, 200, 0.1, 0.7),
                          "tiny-budget": (20_000, 2, 8, 0.2, 1e-6)}[name]
    rng = np.random.default_rng(11)
    s = (rng.random((n, m)) < rng.uniform(0.2, 0.5, m)).astype(np.uint8)
    coef = rng.normal(scale=0.8, size=(m, c))
    y = np.empty((n, c), np.uint8)
    for b in range(0, n, 1000):
        e = min(n, b + 1000)
        logit = np.log(dens / (1 - dens)) + s[b:e] @ coef
        y[b:e] = rng.random((e - b, c)) < 1 / (1 + np.exp(-logit))
    target = np.full(m, 0.4) if name == "tiny-budget" else s.mean(0).clip(0.01, 0.99)
    return s, y, target, eta, 0.01, 0.1 if name == "wide" else 0.02


def child(name, core_path):
    """Runs one case in this process and prints its JSON row."""
    import importlib.util
    import time

    import numpy as np
    if core_path:
        spec = importlib.util.spec_from_file_location("_core", core_path)
        core = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(core)
    else:
        from pym4 import _backend
        core = _backend.core()
    s, y, pi, eta, er, ea = make_case(name)
    n, m = s.shape
    c = y.shape[1]
    w, q = np.zeros(m * (c + 1)), np.empty(n)
    def proc_status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    # The peak (VmHWM) reset to the current RSS, so that the data generator's temporaries
    # do not count: the solve's own peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss_before = proc_status("VmRSS:")
    t0 = time.perf_counter()
    info = core.m4_solve_exact((s, y, None, None, c, None), (pi, eta, er, ea), 100, 1e-10, 1e6, w, q)
    dt = time.perf_counter() - t0
    peak = proc_status("VmHWM:")
    # Constraints from q (float64, independent of the solver): the budget and every bias entry.
    yt = np.concatenate([np.ones((n, 1)), y.astype(np.float64)], axis=1)
    d = s.astype(np.float64) - pi
    g = (d * q[:, None]).T @ yt / n
    lam = np.full((m, c + 1), eta * ea)
    lam[:, 0] = eta * er
    viol = max(abs(q.mean() - eta), float((np.abs(g) - lam).max()))
    print(json.dumps(dict(case=name, n=n, m=m, c=c, budget=eta, time_s=dt, status=int(info["status"]),
                          iterations=int(info["iterations"]), passes=int(info["passes"]),
                          product_passes=int(info.get("product_passes", 0)), hessian=info.get("hessian", "dense"),
                          compressed=bool(info["compressed"]), max_violation=viol,
                          solve_extra_mb=max(0, peak - rss_before) / 2**20, peak_rss_mb=peak / 2**20)))


def run_case(name, core_path=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + (["--core", core_path] if core_path else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return dict(case=name, error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--old-core", default=None, help="a _core*.so of an earlier commit, run on the same cases")
    ap.add_argument("--out", default=".")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--core", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.core)
        return
    rows = []
    for name in [x for x in args.cases.split(",") if x]:
        if name not in CASES:
            raise SystemExit(f"--cases: unknown case {name!r} (expected some of {', '.join(CASES)})")
        new = dict(run_case(name), solver="new")
        rows.append(new)
        print(json.dumps(new))
        if args.old_core:
            old = dict(run_case(name, args.old_core), solver="old")
            rows.append(old)
            print(json.dumps(old))
            if "error" not in old and "error" not in new:
                print(f"RATIO exact {name}: time old/new {old['time_s'] / new['time_s']:.1f}x "
                      f"({old['time_s']:.2f} s -> {new['time_s']:.2f} s), solve memory "
                      f"{old['solve_extra_mb']:.0f} MB -> {new['solve_extra_mb']:.0f} MB, status "
                      f"{old['status']} -> {new['status']}, passes {old['passes']} -> {new['passes']}")
    keys = sorted({k for r in rows for k in r})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_m4_exact.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
