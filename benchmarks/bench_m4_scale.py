"""M4 at scale, first part: the exact solver as passes, in memory (DESIGN.md §3b).

For N = 1e6 and 1e7 (m = 2 groups, c = 32 labels, the random data of bench_m4.py, uint8
numpy input) it times ``balance(method="exact")`` end to end and the core's exact solve
(``m4_solve_exact``), and reports the passes over the full data, the warm-start sample's
passes, the passes that built the Hessian, whether the pattern table was used, and the
largest constraint violation (budget included) measured from q. With ``--old-core PATH``
(a ``_core*.so`` built from an earlier commit, e.g. aaa38b7, whose m4_solve_exact had the
same signature) the earlier solver runs on the same instances in the same process, so the
two times are a ratio on the same (possibly shared) machine. A second instance family with
few distinct patterns (c = 8) times the solve over the pattern table against passes over
the rows. Writes bench_m4_scale.csv.

    python benchmarks/bench_m4_scale.py [--sizes 1e6,1e7] [--old-core PATH] [--out DIR]

Targets (2-core CPU): balance(method="exact") at N = 1e7 in <= 2 s; <= 30 passes at
tolerance 1e-9; the same q as the earlier solver (1e-9).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_m4 import ETA, EPS_ASSOC, EPS_REP, make_dense, violation  # noqa: E402
from pym4 import _backend, m4
from pym4.m4 import _passes as passes  # noqa: E402
from pym4._io import atomic_output  # noqa: E402

TOL = 1e-9


def load_core(path):
    """An extension module built from another commit, loaded beside the current one."""
    spec = importlib.util.spec_from_file_location("_core", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def core_solve(core, s, y, pi):
    n, c = s.shape[0], y.shape[1]
    w, q = np.zeros(2 * (c + 1)), np.empty(n)
    t0 = time.perf_counter()
    info = core.m4_solve_exact((s, y, None, None, c, None), (pi, ETA, EPS_REP, EPS_ASSOC), 100, TOL, 1e6, w, q)
    return time.perf_counter() - t0, info, q


def run_dense(args, rows):
    old = load_core(args.old_core) if args.old_core else None
    for n in [int(float(x)) for x in args.sizes.split(",") if x]:
        s, y = make_dense(n, seed=n % 97)
        pi = m4.default_target(s)
        base = dict(kind="dense", n=n, m=2, c=32)
        t0 = time.perf_counter()
        res = m4.balance(s, y, target=pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC, tol=TOL)
        t_bal = time.perf_counter() - t0
        t_new, info, q_new = core_solve(_backend.core(), s, y, pi)
        rows.append(dict(base, solver="balance(exact)", time_s=t_bal, status=res.status,
                         max_violation=res.max_violation, objective=res.objective))
        rows.append(dict(base, solver="passes (core)", time_s=t_new, status=m4._STATUS[info["status"]],
                         passes=info["passes"], sample_passes=info["sample_passes"],
                         hessian_passes=info["hessian_passes"], compressed=info["compressed"],
                         max_violation=violation(s, y, q_new, pi), objective=float(np.mean(0.5 * (q_new - ETA) ** 2))))
        if old is not None:
            t_old, info_old, q_old = core_solve(old, s, y, pi)
            rows.append(dict(base, solver="old proximal Newton (core)", time_s=t_old,
                             status=m4._STATUS[info_old["status"]], iterations=info_old["iterations"],
                             max_violation=violation(s, y, q_old, pi),
                             objective=float(np.mean(0.5 * (q_old - ETA) ** 2)),
                             max_abs_q_diff=float(np.abs(q_old - q_new).max())))
        for r in rows[-3 if old is not None else -2:]:
            print_row(r)


def run_patterns(args, rows):
    """Few distinct patterns (c = 8): the solve over the table against passes over the rows."""
    for n in [int(float(x)) for x in args.sizes.split(",") if x]:
        s, y32 = make_dense(n, seed=n % 89)
        y = np.ascontiguousarray(y32[:, :8])
        pi = m4.default_target(s)
        problem = (pi, ETA, EPS_REP, EPS_ASSOC)
        data = passes.shard_data(s, y)
        base = dict(kind="patterns", n=n, m=2, c=8)
        t0 = time.perf_counter()
        table = passes.pattern_table([data], max_patterns=n // 2)
        t_table = time.perf_counter() - t0
        on_table = passes.solve(lambda: [table], problem, 2, 8, tol=TOL)
        q_t = np.empty(n)
        _backend.core().m4_keep_probability(data, problem, on_table.w, on_table.mu, q_t)
        t_c = time.perf_counter() - t0
        t0 = time.perf_counter()
        on_rows = passes.solve(lambda: [data], problem, 2, 8, tol=TOL)
        q_r = np.empty(n)
        _backend.core().m4_keep_probability(data, problem, on_rows.w, on_rows.mu, q_r)
        t_r = time.perf_counter() - t0
        rows.append(dict(base, solver=f"passes over the table ({len(table[1])} patterns)", time_s=t_c,
                         table_s=t_table, status=on_table.status, passes=on_table.passes,
                         sample_passes=on_table.sample_passes, hessian_passes=on_table.hessian_passes,
                         compressed=True, max_violation=violation(s, y, q_t, pi),
                         max_abs_q_diff=float(np.abs(q_t - q_r).max())))
        rows.append(dict(base, solver="passes over the rows", time_s=t_r, status=on_rows.status,
                         passes=on_rows.passes, sample_passes=on_rows.sample_passes,
                         hessian_passes=on_rows.hessian_passes, compressed=False,
                         max_violation=violation(s, y, q_r, pi)))
        for r in rows[-2:]:
            print_row(r)


def print_row(r):
    keys = ("passes", "iterations", "sample_passes", "hessian_passes", "compressed", "max_violation", "max_abs_q_diff")
    extra = " ".join(f"{k}={r[k]:.2e}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r)
    print(f"{r['kind']:8s} N={r['n']:>9,d} {r['solver']:38s} {r['time_s']:8.3f} s  {r['status']:9s} {extra}",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6,1e7")
    ap.add_argument("--old-core", default=None, help="a _core*.so built from an earlier commit")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    rows = []
    run_dense(args, rows)
    run_patterns(args, rows)
    os.makedirs(args.out, exist_ok=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("kind", "n", "solver", "time_s"), k))
    with atomic_output(os.path.join(args.out, "bench_m4_scale.csv")) as tmp, open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
