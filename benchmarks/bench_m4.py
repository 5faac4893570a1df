"""M4 benchmark: pym4 stream and exact vs cvxpy (CLARABEL) and a plain numpy implementation
of the same streaming algorithm, on the same instances. Writes bench_m4.csv and bench_m4.png.

Dense: m = 2 groups, c = 32 labels, N = 1e4 ... 1e7. Sparse: N = 1e5 with c = 256 and 1024
labels given as a CSR matrix (about 8 labels per example). Every method reports wall time,
examples/s, the objective (1/N) sum 1/2 (q - eta)^2 and the largest constraint violation
max(|constraint| - bound, 0) including the budget. cvxpy runs only up to --cvxpy-max
examples (default 1e5: one solve there takes about a minute on a 2-core machine); the numpy
stream up to --numpy-max.

    python benchmarks/bench_m4.py [--sizes 1e4,1e5,1e6,1e7] [--out DIR] [--device cpu|cuda]

Targets (2-core CPU): pym4 stream >= 5 million examples/s at m=2, c=32; exact at N = 1e5
at least 100x faster than cvxpy at equal objective (1e-4 relative).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pym4 import m4  # noqa: E402
from pym4._io import atomic_output  # noqa: E402

ETA, EPS_REP, EPS_ASSOC = 0.7, 0.01, 0.05


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
    """max over constraints of (|value| - bound)_+, and the budget error, from q."""
    return m4.report(m4.weighted_counts(s, y), m4.weighted_counts(s, y, q), target=pi, budget=ETA,
                     eps_rep=EPS_REP, eps_assoc=EPS_ASSOC).max_violation


def objective(q):
    return float(np.mean(0.5 * (q - ETA) ** 2))


def numpy_stream(s, y, pi, batch=256, lr=0.1, gamma=3.0):
    """The streaming algorithm of M4Solver in plain numpy (dense labels), one pass."""
    n, m = s.shape
    c = y.shape[1]
    p = m * (c + 1)
    lam = np.where(np.arange(p) % (c + 1) == 0, ETA * EPS_REP, ETA * EPS_ASSOC)
    vp, vm, curv, avg = np.zeros(p), np.zeros(p), np.zeros(p), np.zeros(p)
    mu = amu = seen = 0.0
    for t, b in enumerate(range(0, n, batch), start=1):
        d = s[b:b + batch] - pi
        yt = np.concatenate([np.ones((d.shape[0], 1)), y[b:b + batch]], axis=1)
        a = (d[:, :, None] * yt[:, None, :]).reshape(d.shape[0], p)
        q = np.clip(ETA - a @ (vp - vm) - mu, 0, 1)
        curv += (a * a).sum(0)
        seen += d.shape[0]
        h = curv / seen + 1e-6
        g = q @ a / d.shape[0]
        vp = np.maximum(0, vp + lr * (g - lam) / h)
        vm = np.maximum(0, vm + lr * (-g - lam) / h)
        mu += lr * (q.mean() - ETA)
        r = (gamma + 1) / (t + gamma)
        avg = (1 - r) * avg + r * (vp - vm)
        amu = (1 - r) * amu + r * mu
    n_all = s.shape[0]
    q = np.empty(n_all)
    for b in range(0, n_all, 1 << 16):  # the closed form, in chunks
        d = s[b:b + (1 << 16)] - pi
        yt = np.concatenate([np.ones((d.shape[0], 1)), y[b:b + (1 << 16)]], axis=1)
        q[b:b + (1 << 16)] = np.clip(ETA - ((yt @ avg.reshape(m, c + 1).T) * d).sum(1) - amu, 0, 1)
    return q


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


def timed(fn, repeat=1):
    """Best wall time of `repeat` runs (the machine may be shared), and the last output."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_cpu(args, rows):
    sizes = [int(float(x)) for x in args.sizes.split(",") if x]
    for n in sizes:
        s, y = make_dense(n, seed=n % 97)
        pi = m4.default_target(s)
        instance = dict(kind="dense", n=n, m=2, c=32)
        m4.balance(s[:2000], y[:2000], target=pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC)  # warm-up
        rep = 3 if n <= 1_000_000 else 1
        t, res = timed(lambda: m4.balance(s, y, target=pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC), rep)
        exact_obj = res.objective
        rows.append(dict(instance, method="pym4-exact", time_s=t, objective=res.objective,
                         max_violation=violation(s, y, np.asarray(res.q), pi), status=res.status))
        t, res = timed(lambda: m4.balance(s, y, target=pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC,
                                          method="stream", shuffle=False), rep)
        rows.append(dict(instance, method="pym4-stream", time_s=t, objective=res.objective,
                         max_violation=violation(s, y, np.asarray(res.q), pi), status=res.status))
        # The streaming core alone (data already bytes, no closed-form pass): the throughput figure.
        lab = m4._inputs.as_labels(y, n)
        t, _ = timed(lambda: m4.M4Solver(pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC)._fit_core(s, lab, None),
                     rep)
        rows.append(dict(instance, method="pym4-stream-core", time_s=t, objective=float("nan"),
                         max_violation=float("nan"), status="fit only"))
        if n <= args.numpy_max:
            t, q = timed(lambda: numpy_stream(s, y, pi))
            rows.append(dict(instance, method="numpy-stream", time_s=t, objective=objective(q),
                             max_violation=violation(s, y, q, pi), status="one pass"))
        if n <= args.cvxpy_max:
            t, (solve_t, status, q) = timed(lambda: cvxpy_solve(s, y, pi))
            rows.append(dict(instance, method="cvxpy-clarabel", time_s=t,
                             objective=objective(q) if q is not None else float("nan"),
                             max_violation=violation(s, y, q, pi) if q is not None else float("nan"), status=status))
        for r in rows:
            if r["n"] == n and r["kind"] == "dense" and np.isfinite(r["objective"]):
                r["objective_rel_to_exact"] = (r["objective"] - exact_obj) / abs(exact_obj)
        report(rows, n, "dense")
        del s, y
    for c in [int(x) for x in args.sparse_c.split(",") if x]:
        n = args.sparse_n
        s, y = make_sparse(n, c, seed=c)
        pi = m4.default_target(s)
        instance = dict(kind="sparse", n=n, m=2, c=c)
        t, res = timed(lambda: m4.balance(s, y, target=pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC))
        exact_obj = res.objective
        rows.append(dict(instance, method="pym4-exact", time_s=t, objective=res.objective,
                         max_violation=violation(s, y, np.asarray(res.q), pi), status=res.status,
                         objective_rel_to_exact=0.0))
        t, res = timed(lambda: m4.balance(s, y, target=pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC,
                                          method="stream", shuffle=False))
        rows.append(dict(instance, method="pym4-stream", time_s=t, objective=res.objective,
                         max_violation=violation(s, y, np.asarray(res.q), pi), status=res.status,
                         objective_rel_to_exact=(res.objective - exact_obj) / abs(exact_obj)))
        if args.sparse_cvxpy_n > 0:
            k = args.sparse_cvxpy_n
            t_e, r_e = timed(lambda: m4.balance(s[:k], y[:k], target=pi, budget=ETA, eps_rep=EPS_REP,
                                                eps_assoc=EPS_ASSOC))
            t, (solve_t, status, q) = timed(lambda: cvxpy_solve(s[:k], y[:k], pi))
            sub = dict(kind="sparse", n=k, m=2, c=c)
            rows.append(dict(sub, method="pym4-exact", time_s=t_e, objective=r_e.objective,
                             max_violation=violation(s[:k], y[:k], np.asarray(r_e.q), pi), status=r_e.status,
                             objective_rel_to_exact=0.0))
            rows.append(dict(sub, method="cvxpy-clarabel", time_s=t,
                             objective=objective(q) if q is not None else float("nan"),
                             max_violation=violation(s[:k], y[:k], q, pi) if q is not None else float("nan"),
                             status=status, objective_rel_to_exact=(objective(q) - r_e.objective) / abs(r_e.objective)
                             if q is not None else float("nan")))
            report(rows, k, "sparse", c)
        report(rows, n, "sparse", c)


def run_cuda(args, rows):
    import torch
    dev = torch.device("cuda")
    for n in [int(float(x)) for x in args.sizes.split(",") if x]:
        s, y = make_dense(n, seed=n % 97)
        pi = m4.default_target(s)
        st, yt = torch.from_numpy(s).to(dev), torch.from_numpy(y).to(dev)
        warm = m4.M4Solver(pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC)
        warm.partial_fit(st[:4096], yt[:4096])
        torch.cuda.synchronize()
        for batch in (256, 4096):
            solver = m4.M4Solver(pi, budget=ETA, eps_rep=EPS_REP, eps_assoc=EPS_ASSOC, batch_size=batch)
            t0 = time.perf_counter()
            solver.partial_fit(st, yt)
            torch.cuda.synchronize()
            t_fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            q = solver.keep_probability(st, yt)
            torch.cuda.synchronize()
            t_q = time.perf_counter() - t0
            qn = q.cpu().numpy()
            rows.append(dict(kind="dense", n=n, m=2, c=32, method=f"cuda-stream-b{batch}", time_s=t_fit,
                             objective=objective(qn), max_violation=violation(s, y, qn, pi), status="one pass"))
            rows.append(dict(kind="dense", n=n, m=2, c=32, method="cuda-keep-probability", time_s=t_q,
                             objective=objective(qn), max_violation=float("nan"), status="closed form"))
        report(rows, n, "dense")


def report(rows, n, kind, c=32):
    by = {r["method"]: r for r in rows if r["n"] == n and r["kind"] == kind and r["c"] == c}
    for r in by.values():
        r["examples_per_s"] = r["n"] / r["time_s"] if r["time_s"] > 0 else float("nan")
        print(f"{kind:6s} N={n:>9,d} c={c:<5d} {r['method']:22s} {r['time_s']:9.3f} s  "
              f"{r['examples_per_s'] / 1e6:8.2f} M ex/s  obj={r['objective']:.6g}  "
              f"max_viol={r['max_violation']:.2e}  [{r['status']}]", flush=True)
    if "pym4-stream-core" in by:
        print(f"RATIO stream throughput N={n:,d}: {by['pym4-stream-core']['examples_per_s'] / 1e6:.2f} M examples/s "
              f"(core; target >= 5), end-to-end balance(method='stream') "
              f"{by['pym4-stream']['examples_per_s'] / 1e6:.2f} M/s; objective vs exact "
              f"{100 * by['pym4-stream'].get('objective_rel_to_exact', float('nan')):+.2f} %")
    if "numpy-stream" in by and "pym4-stream-core" in by:
        print(f"RATIO numpy stream / pym4 stream core N={n:,d}: "
              f"{by['numpy-stream']['time_s'] / by['pym4-stream-core']['time_s']:.1f}x")
    if "cvxpy-clarabel" in by and "pym4-exact" in by:
        rel = abs(by["cvxpy-clarabel"]["objective"] - by["pym4-exact"]["objective"]) / abs(by["pym4-exact"]["objective"])
        print(f"RATIO cvxpy / pym4 exact {kind} N={n:,d} c={c}: {by['cvxpy-clarabel']['time_s'] / by['pym4-exact']['time_s']:.0f}x "
              f"faster (target >= 100x at N=1e5) at objective rel. diff {rel:.1e} (target <= 1e-4)")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = [r for r in rows if r["kind"] == "dense"]
    for method in sorted({r["method"] for r in dense}):
        pts = sorted((r["n"], r["time_s"]) for r in dense if r["method"] == method)
        axes[0].loglog(*zip(*pts), marker="o", label=method)
        objs = sorted((r["n"], abs(r.get("objective_rel_to_exact", float("nan")))) for r in dense
                      if r["method"] == method and np.isfinite(r.get("objective_rel_to_exact", float("nan")))
                      and method != "pym4-exact")
        if objs:
            axes[1].loglog(*zip(*objs), marker="o", label=method)
    axes[0].set_xlabel("examples N (m=2, c=32)")
    axes[0].set_ylabel("wall time (s)")
    axes[0].set_title("M4 solve time")
    axes[0].legend(fontsize=8)
    axes[1].axhline(0.02, color="k", ls="--", lw=0.8, label="2 %")
    axes[1].set_xlabel("examples N")
    axes[1].set_ylabel("|objective / exact - 1|")
    axes[1].set_title("Objective vs pym4 exact")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
    ap.add_argument("--sparse-c", default="256,1024", help="label counts of the sparse instances ('' to skip)")
    ap.add_argument("--sparse-n", type=int, default=100_000)
    ap.add_argument("--sparse-cvxpy-n", type=int, default=10_000, help="cvxpy on the first N sparse rows (0: skip)")
    ap.add_argument("--cvxpy-max", type=float, default=1e5, help="largest N given to cvxpy (0: skip)")
    ap.add_argument("--numpy-max", type=float, default=1e7, help="largest N given to the numpy stream")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
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
    keys = ["kind", "n", "m", "c", "method", "time_s", "examples_per_s", "objective", "objective_rel_to_exact",
            "max_violation", "status"]
    with atomic_output(os.path.join(args.out, f"bench_m4_{args.device}.csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    plot(rows, os.path.join(args.out, f"bench_m4_{args.device}.png"))
    print(f"wrote {args.out}/bench_m4_{args.device}.csv and .png")


if __name__ == "__main__":
    main()
