"""M4 benchmark: pym4 stream and exact vs cvxpy (CLARABEL) and a plain numpy implementation
of the same streaming algorithm, on the same instances. Writes m4_<device>.csv and .png.

Dense: m = 2 groups, c = 32 labels, N = 1e4 ... 1e7. Sparse: N = 1e5 with c = 256 and 1024
labels given as a CSR matrix (about 8 labels per example). Every method reports wall time,
examples/s, the objective (1/N) sum 1/2 (q - eta)^2 and the largest constraint violation
max(|constraint| - bound, 0) including the budget. cvxpy runs only up to --cvxpy-max
examples (default 1e5: one solve there takes about a minute on a 2-core machine); the numpy
stream up to --numpy-max. Times are medians over interleaved rounds (benchmarks/_harness.py:
3 rounds up to N = 1e6, 1 above; cvxpy and the numpy stream run once); plot.py draws m4_<device>.png
from m4_<device>.csv.

    python benchmarks/bench_m4.py [--sizes 1e4,1e5,1e6,1e7] [--out DIR] [--device cpu|cuda]

Targets (2-core CPU): pym4 stream >= 5 million examples/s at m=2, c=32; exact at N = 1e5
at least 100x faster than cvxpy at equal objective (1e-4 relative).

"pym4-stream" is balance(method="stream", shuffle=False) (the stream's pass over the rows in
their order, two Newton passes, the pass that writes q and sets the budget);
"pym4-stream-pass" the same with refine=0 (the stream's pass and the writing pass only);
"pym4-stream-shuffled" balance(method="stream") with every default (the rows streamed in a
shuffled order); "pym4-stream-core" the core's pass alone (M4Solver.partial_fit). --accuracy-n runs the stream's accuracy study on the
class of issue 9 (m = 2 overlapping groups, c = 16, budget 0.8, eps 0.01): objective vs
the exact one, largest violation and the duality-gap bound, for refine = 0, 1, 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from pym4 import m4

# _harness.py lies beside this file; put it on the path explicitly, as under PYTHONSAFEPATH
# (gpu_check.sh) the script's folder is not. The repository root is not added: the installed
# pym4 (editable, or the GPU check's build) must not be shadowed by the source tree.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import Case, references, time_interleaved, write_results  # noqa: E402

ETA, EPS_REP, EPS_ASSOC = 0.7, 0.01, 0.05
REF = references()  # the numpy stream and the constraint values from q, shared with the tests


def make_dense(n, c=32, seed=0, chunk=1_000_000):
    """Two overlapping groups tied to a latent factor; labels associated with the groups."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.05, 0.4, size=c)
    coef = rng.normal(scale=0.6, size=(2, c))
    s = np.empty((n, 2), np.uint8)
    y = np.empty((n, c), np.uint8)
    for b in range(0, n, chunk):
        e = min(n, b + chunk)
        z = rng.normal(size=e - b)
        s[b:e] = rng.random((e - b, 2)) < np.array([0.3, 0.4]) * (1 + 0.5 * np.tanh(z))[:, None]
        logit = np.log(base / (1 - base)) + s[b:e] @ coef
        y[b:e] = rng.random((e - b, c), dtype=np.float32) < 1 / (1 + np.exp(-logit))
    return s, y


def make_sparse(n, c, seed=0, per_example=8):
    """CSR labels: about `per_example` labels each, a fifth drawn from a group-specific set."""
    import scipy.sparse as sp
    rng = np.random.default_rng(seed)
    s = (rng.random((n, 2)) < np.array([0.35, 0.4])).astype(np.uint8)
    k = rng.poisson(per_example - 1, size=n) + 1
    rows = np.repeat(np.arange(n), k)
    cols = rng.integers(0, c, size=rows.size)
    # Group members draw part of their labels from the first 5 % of labels: an association.
    biased = (rng.random(rows.size) < 0.2) & (s[rows, 0] == 1)
    cols[biased] = rng.integers(0, max(1, c // 20), size=int(biased.sum()))
    y = sp.csr_matrix((np.ones(rows.size, np.uint8), (rows, cols)), shape=(n, c))
    y.sum_duplicates()
    y.data[:] = 1
    return s, y


def violation(s, y, q, pi):
    """max over constraints of (|value| - bound)_+, and the budget error, from q (numpy)."""
    return REF.m4_max_violation(s, y, q, pi, ETA, EPS_REP, EPS_ASSOC)


def objective(q):
    return float(np.mean(0.5 * (q - ETA) ** 2))


def numpy_stream(s, y, pi):
    """The streaming algorithm of M4Solver in plain numpy (dense labels): one pass, then q."""
    _, _, w, mu = REF.m4_stream(s, y, pi, ETA, EPS_REP, EPS_ASSOC, lr=0.1, gamma=3.0, batch=256)
    return REF.m4_keep_probability(s, y, pi, ETA, w, mu)


def cvxpy_solve(s, y, pi):
    import cvxpy as cp
    import scipy.sparse as sp
    n, m = s.shape
    ysp = sp.csr_matrix(y) if not sp.issparse(y) else y
    d = (s - pi).astype(np.float64)
    blocks = []
    for k in range(m):
        dk = sp.diags(d[:, k])
        blocks += [sp.csr_matrix(d[:, [k]]), dk @ ysp]
    A = sp.hstack(blocks).tocsc()
    lam = np.where(np.arange(A.shape[1]) % (ysp.shape[1] + 1) == 0, ETA * EPS_REP, ETA * EPS_ASSOC)
    q = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(q - ETA) / n),
                      [cp.sum(q) / n == ETA, cp.abs(A.T @ q / n) <= lam, q >= 0, q <= 1])
    t0 = time.perf_counter()
    prob.solve(solver="CLARABEL")
    return time.perf_counter() - t0, prob.status, (None if q.value is None else np.clip(q.value, 0, 1))


def _solved(instance, method, timing, s, y, pi, exact_obj=None):
    """A CSV row for one method's timing and its output (a BalanceResult, q, or cvxpy's triple)."""
    out = timing.output
    if isinstance(out, tuple):  # cvxpy_solve: (solve seconds, status, q or None)
        status, q = out[1], out[2]
    elif isinstance(out, np.ndarray):
        status, q = "one pass", out
    else:
        status, q = out.status, np.asarray(out.q)
    obj = objective(q) if q is not None else float("nan")
    row = dict(instance, method=method, **timing.row(), objective=obj,
               max_violation=violation(s, y, q, pi) if q is not None else float("nan"), status=status)
    if exact_obj is not None:
        row["objective_rel_to_exact"] = (obj - exact_obj) / abs(exact_obj)
    return row


def _balance_cases(s, y, pi):
    opts = dict(target=pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC)
    return {"pym4-exact": lambda: m4.balance(s, y, **opts),
            "pym4-stream": lambda: m4.balance(s, y, method="stream", shuffle=False, **opts),
            "pym4-stream-pass": lambda: m4.balance(s, y, method="stream", shuffle=False, refine=0, **opts),
            # As called with every default (shuffled order, refine=2); target=pi is the default target.
            "pym4-stream-shuffled": lambda: m4.balance(s, y, method="stream", **opts)}


def make_overlapping(n, c=16, seed=12, coupling=0.2):
    """Issue 9's accuracy class: two overlapping groups (shares ~0.3-0.45, tied to a latent
    factor), c labels whose rates depend on the groups (logit coefficients ~ N(0, coupling))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    s = (rng.random((n, 2)) < np.array([0.3, 0.45]) * (1 + 0.5 * np.tanh(z))[:, None]).astype(np.uint8)
    base = rng.uniform(0.05, 0.4, size=c)
    logit = np.log(base / (1 - base)) + s @ rng.normal(scale=coupling, size=(2, c))
    y = (rng.random((n, c)) < 1 / (1 + np.exp(-logit))).astype(np.uint8)
    return s, y


def run_accuracy(n, rows):
    """The stream against the exact solve on issue 9's class; one CSV row per variant."""
    import warnings
    s, y = make_overlapping(n)
    opts = dict(budget=0.8, eps_rep=0.01, eps_assoc=0.01)
    exact = m4.balance(s, y, **opts)
    print(f"accuracy N={n:,d} m=2 c=16 budget 0.8 eps 0.01: exact {exact.status}, objective {exact.objective:.6g}")
    for refine in (0, 1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t0 = time.perf_counter()
            res = m4.balance(s, y, method="stream", refine=refine, **opts)
            dt = time.perf_counter() - t0
        # An infeasible instance (exact says so) has no optimum: its "objective vs exact" is no distance.
        rel = (res.objective - exact.objective) / exact.objective if exact.status == "optimal" else float("nan")
        summary = res.summary()
        bound = summary["objective_gap_bound"]
        # No bound unless q holds every constraint (the summary's note says why).
        gap = f"{100 * bound / res.objective:.3f} %" if bound is not None else f"none ({summary['objective_gap_note']})"
        print(f"RATIO stream accuracy N={n:,d} refine={refine}: objective {100 * rel:+.3f} % vs exact, "
              f"max violation {res.max_violation:.2e} (bound 8e-3), gap bound {gap}, "
              f"[{res.status}] {dt:.2f} s", flush=True)
        rows.append(dict(kind="accuracy", n=n, m=2, c=16, method=f"pym4-stream-refine{refine}", median_s=dt,
                         q25_s=dt, q75_s=dt, samples=1, objective=res.objective, objective_rel_to_exact=rel,
                         max_violation=res.max_violation, status=res.status))


def run_cpu(args, rows):
    sizes = [int(float(x)) for x in args.sizes.split(",") if x]
    for n in sizes:
        s, y = make_dense(n, seed=n % 97)
        pi = m4.default_target(s)
        instance = dict(kind="dense", n=n, m=2, c=32)
        m4.balance(s[:2000], y[:2000], target=pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC)  # warm-up
        cases = _balance_cases(s, y, pi)
        # The streaming fit alone (no closed-form pass over the data): the throughput figure.
        cases["pym4-stream-core"] = lambda: m4.M4Solver(pi, budget=ETA, eps_rep=EPS_REP,
                                                        eps_assoc=EPS_ASSOC).partial_fit(s, y)
        if n <= args.numpy_max:
            cases["numpy-stream"] = Case(lambda: numpy_stream(s, y, pi), max_rounds=1)
        if n <= args.cvxpy_max:
            cases["cvxpy-clarabel"] = Case(lambda: cvxpy_solve(s, y, pi), max_rounds=1)
        times = time_interleaved(cases, rounds=3 if n <= 1_000_000 else 1, warmup=0)
        exact_obj = objective(np.asarray(times["pym4-exact"].output.q))
        for method, timing in times.items():
            if method == "pym4-stream-core":
                rows.append(dict(instance, method=method, **timing.row(), objective=float("nan"),
                                 max_violation=float("nan"), status="fit only"))
            else:
                rows.append(_solved(instance, method, timing, s, y, pi, exact_obj))
        report(rows, n, "dense")
        del s, y, times, cases
    # --sparse-n 0 (or --sparse-c '') skips the sparse instances.
    for c in ([int(x) for x in args.sparse_c.split(",") if x] if args.sparse_n > 0 else []):
        n = args.sparse_n
        s, y = make_sparse(n, c, seed=c)
        pi = m4.default_target(s)
        times = time_interleaved(_balance_cases(s, y, pi), rounds=1, warmup=0)
        exact_obj = objective(np.asarray(times["pym4-exact"].output.q))
        for method, timing in times.items():
            rows.append(_solved(dict(kind="sparse", n=n, m=2, c=c), method, timing, s, y, pi, exact_obj))
        if args.sparse_cvxpy_n > 0:
            k = args.sparse_cvxpy_n
            sk, yk = s[:k], y[:k]
            cases = {"pym4-exact": _balance_cases(sk, yk, pi)["pym4-exact"],
                     "cvxpy-clarabel": lambda: cvxpy_solve(sk, yk, pi)}
            times = time_interleaved(cases, rounds=1, warmup=0)
            exact_obj = objective(np.asarray(times["pym4-exact"].output.q))
            for method, timing in times.items():
                rows.append(_solved(dict(kind="sparse", n=k, m=2, c=c), method, timing, sk, yk, pi, exact_obj))
            report(rows, k, "sparse", c)
        report(rows, n, "sparse", c)


def run_cuda(args, rows):
    import torch
    dev = torch.device("cuda")
    for n in [int(float(x)) for x in args.sizes.split(",") if x]:
        s, y = make_dense(n, seed=n % 97)
        pi = m4.default_target(s)
        st, yt = torch.from_numpy(s).to(dev), torch.from_numpy(y).to(dev)

        def solver(batch=256):
            return m4.M4Solver(pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC, batch_size=batch)

        solver().partial_fit(st[:4096], yt[:4096])  # warm-up
        torch.cuda.synchronize()
        # One pass over the data per call, each on a fresh solver (made untimed by setup).
        cases = {f"cuda-stream-b{b}": Case(lambda sv: sv.partial_fit(st, yt), setup=lambda b=b: (solver(b),),
                                           max_rounds=3 if n <= 1_000_000 else 1) for b in (256, 4096)}
        times = time_interleaved(cases, rounds=3, warmup=0, device="cuda")
        fitted = times["cuda-stream-b4096"].output
        times.update(time_interleaved({"cuda-keep-probability": lambda: fitted.keep_probability(st, yt)},
                                      rounds=5, device="cuda"))
        for method, timing in times.items():
            fit = timing.output if method != "cuda-keep-probability" else fitted
            qn = fit.keep_probability(st, yt).cpu().numpy()
            rows.append(dict(kind="dense", n=n, m=2, c=32, method=method, **timing.row(), objective=objective(qn),
                             max_violation=violation(s, y, qn, pi) if method != "cuda-keep-probability"
                             else float("nan"), status="one pass" if fit is timing.output else "closed form"))
        report(rows, n, "dense")


def report(rows, n, kind, c=32):
    by = {r["method"]: r for r in rows if r["n"] == n and r["kind"] == kind and r["c"] == c}
    for r in by.values():
        r["examples_per_s"] = r["n"] / r["median_s"] if r["median_s"] > 0 else float("nan")
        print(f"{kind:6s} N={n:>9,d} c={c:<5d} {r['method']:22s} {r['median_s']:9.3f} s  "
              f"{r['examples_per_s'] / 1e6:8.2f} M ex/s  obj={r['objective']:.6g}  "
              f"max_viol={r['max_violation']:.2e}  [{r['status']}]", flush=True)
    if "pym4-stream-core" in by:
        core = by["pym4-stream-core"]
        print(f"RATIO stream throughput N={n:,d}: {core['examples_per_s'] / 1e6:.2f} M examples/s "
              f"(core; target >= 5), end-to-end balance(method='stream') "
              f"{by['pym4-stream']['examples_per_s'] / 1e6:.2f} M/s "
              f"({by['pym4-stream']['median_s'] / core['median_s']:.2f}x the core's time), refine=0 "
              f"{by['pym4-stream-pass']['examples_per_s'] / 1e6:.2f} M/s "
              f"({by['pym4-stream-pass']['median_s'] / core['median_s']:.2f}x), shuffled (every default) "
              f"{by['pym4-stream-shuffled']['examples_per_s'] / 1e6:.2f} M/s; objective vs exact "
              f"{100 * by['pym4-stream'].get('objective_rel_to_exact', float('nan')):+.2f} % "
              f"(refine=0: {100 * by['pym4-stream-pass'].get('objective_rel_to_exact', float('nan')):+.2f} %)")
    if "numpy-stream" in by and "pym4-stream-core" in by:
        print(f"RATIO numpy stream / pym4 stream core N={n:,d}: "
              f"{by['numpy-stream']['median_s'] / by['pym4-stream-core']['median_s']:.1f}x")
    if "cvxpy-clarabel" in by and "pym4-exact" in by:
        rel = abs(by["cvxpy-clarabel"]["objective"] - by["pym4-exact"]["objective"]) / abs(by["pym4-exact"]["objective"])
        print(f"RATIO cvxpy / pym4 exact {kind} N={n:,d} c={c}: {by['cvxpy-clarabel']['median_s'] / by['pym4-exact']['median_s']:.0f}x "
              f"faster (target >= 100x at N=1e5) at objective rel. diff {rel:.1e} (target <= 1e-4)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
    ap.add_argument("--sparse-c", default="256,1024", help="label counts of the sparse instances ('' to skip)")
    ap.add_argument("--sparse-n", type=int, default=100_000, help="N of the sparse instances (0: skip them)")
    ap.add_argument("--sparse-cvxpy-n", type=int, default=10_000, help="cvxpy on the first N sparse rows (0: skip)")
    ap.add_argument("--cvxpy-max", type=float, default=1e5, help="largest N given to cvxpy (0: skip)")
    ap.add_argument("--numpy-max", type=float, default=1e7, help="largest N given to the numpy stream")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--accuracy-n", type=float, default=1e6, help="N of the stream accuracy study (0: skip)")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(f"pym4 M4 benchmark on {args.device}: eta={ETA}, eps_rep={EPS_REP}, eps_assoc={EPS_ASSOC}; "
          f"cvxpy (CLARABEL) capped at N <= {int(args.cvxpy_max):,d} (dense) and {args.sparse_cvxpy_n:,d} (sparse) "
          f"to keep the run short on a small machine", flush=True)
    rows = []
    if args.device == "cuda":
        run_cuda(args, rows)
    else:
        run_cpu(args, rows)
        if args.accuracy_n > 0:
            run_accuracy(int(args.accuracy_n), rows)
    keys = ["kind", "n", "m", "c", "method", "median_s", "q25_s", "q75_s", "samples", "examples_per_s", "objective",
            "objective_rel_to_exact", "max_violation", "status"]
    csv_path, png_path = write_results(args.out, f"m4_{args.device}", rows, keys)
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))


if __name__ == "__main__":
    main()
