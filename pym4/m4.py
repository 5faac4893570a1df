"""M4 data balancing: per-example keep probabilities that remove representation and
association biases (Alabdulmohsin, Wang, Steiner, Goyal, D'Amour, Zhai, "CLIP the Bias:
How Useful is Balancing Data in Multimodal Learning?", ICLR 2024).

For N examples with sensitive groups ``s`` (N, m) in {0,1}, labels or proxies ``y`` (N, c)
in {0,1} and utilities ``u`` (N,), the keep probabilities ``q`` solve (DESIGN.md §3)::

    minimise    (1/N) sum_i [ 1/2 (q_i - eta)^2 - u_i q_i ]
    subject to  (1/N) sum_i q_i = eta                                   (budget)
                |(1/N) sum_i q_i (s_ik - pi_k)|         <= eta eps_rep     (representation)
                |(1/N) sum_i q_i (s_ik - pi_k) y_ir|    <= eta eps_assoc   (association)
                0 <= q_i <= 1

and are ``q_i = clip(eta + u_i - a_i^T (v+ - v-) - mu, 0, 1)`` with
``a_i = (s_i - pi) (x) [1; y_i]`` and the duals ``v+, v- >= 0``, ``mu``. ``method="exact"``
solves the dual to convergence (proximal Newton in the C++ core); ``method="stream"`` and
:class:`M4Solver` run the paper's one-pass stochastic dual ascent with bounded memory.
No N x m(c+1) matrix is ever built.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _backend
from ._arrays import to_tensor

__all__ = ["balance", "BalanceResult", "M4Solver", "representation_bias", "association_bias", "sample",
           "default_target"]

_STATUS = {0: "optimal", 1: "infeasible", 2: "max_iter"}


# ----- inputs -----------------------------------------------------------------------------------

@dataclass
class _Labels:
    """Labels in the form the core reads: dense uint8 rows, or CSR index lists."""
    c: int
    dense: Optional[np.ndarray] = None        # (n, c) uint8
    indptr: Optional[np.ndarray] = None       # (n + 1,) int64
    indices: Optional[np.ndarray] = None      # (nnz,) int32

    def take(self, idx: np.ndarray) -> "_Labels":
        if self.dense is not None:
            return _Labels(self.c, dense=np.ascontiguousarray(self.dense[idx]))
        starts, ends = self.indptr[idx], self.indptr[idx + 1]
        lengths = ends - starts
        indptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        gather = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return _Labels(self.c, indptr=indptr, indices=np.ascontiguousarray(self.indices[gather]))

    def slice(self, b: int, e: int) -> "_Labels":
        if self.dense is not None:
            return _Labels(self.c, dense=self.dense[b:e])
        ip = self.indptr[b:e + 1]
        return _Labels(self.c, indptr=ip - ip[0], indices=self.indices[ip[0]:ip[-1]])

    def to_dense(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense
        n = len(self.indptr) - 1
        out = np.zeros((n, self.c), dtype=np.uint8)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        out[rows, self.indices] = 1
        return out


# Dense label rows are read as bytes; beyond this many labels, index lists are cheaper.
_SPARSE_FROM = 128


def _binary_matrix(x: Any, name: str, n: Optional[int] = None) -> np.ndarray:
    """A (n, k) uint8 0/1 array from a bool/int/float array or tensor; checks values."""
    if isinstance(x, np.ndarray) and x.dtype in (np.uint8, np.bool_) and x.ndim == 2 and \
            (n is None or x.shape[0] == n):
        # The common case (bytes already): one max() instead of elementwise comparisons.
        out = np.ascontiguousarray(x).view(np.uint8) if x.dtype == np.bool_ else np.ascontiguousarray(x)
        if out.size and out.max() > 1:
            i, col = (int(v) for v in np.argwhere(out > 1)[0])
            raise ValueError(f"{name}: values must be 0 or 1 (binary), got {out[i, col]!r} in column {col} (row {i})")
        return out
    t, _ = to_tensor(x, name)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 1-D or 2-D array (examples, columns), got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} rows (one per example), got {t.shape[0]}")
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        return np.ascontiguousarray(t.numpy().astype(np.uint8))
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            col = int(torch.nonzero(bad)[0, 1])
            raise ValueError(f"{name}: column {col} has missing values (NaN) or Inf; expected 0 or 1")
    nonbin = (t != 0) & (t != 1)
    if bool(nonbin.any()):
        i, col = (int(v) for v in torch.nonzero(nonbin)[0])
        raise ValueError(f"{name}: values must be 0 or 1 (binary), got {t[i, col].item()!r} in column {col} (row {i})")
    return np.ascontiguousarray(t.numpy().astype(np.uint8))


def _labels(y: Any, n: int) -> _Labels:
    if y is None:
        return _Labels(0, dense=np.zeros((n, 0), dtype=np.uint8))
    if hasattr(y, "indptr") and hasattr(y, "indices") and hasattr(y, "shape"):  # scipy.sparse CSR
        if getattr(y, "format", "csr") != "csr":
            y = y.tocsr()
        if y.shape[0] != n:
            raise ValueError(f"y: expected {n} rows (one per example), got {y.shape[0]}")
        # scipy does not check a CSR built from raw arrays; the core indexes with these directly.
        indptr = np.asarray(y.indptr, dtype=np.int64)
        if indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] > len(y.indices) or np.any(np.diff(indptr) < 0):
            raise ValueError("y: sparse labels have an inconsistent indptr")
        indices = np.asarray(y.indices)[:indptr[-1]]
        if indices.size and (indices.min() < 0 or indices.max() >= y.shape[1]):
            raise ValueError(f"y: sparse label indices must be in [0, {y.shape[1]}), got "
                             f"{int(indices.min())}..{int(indices.max())}")
        y = y.copy()
        y.sum_duplicates()
        data = np.asarray(y.data)
        if data.size and not np.all(data == 1):
            raise ValueError("y: sparse labels must have stored values 1 (binary)")
        return _Labels(int(y.shape[1]), indptr=np.asarray(y.indptr, dtype=np.int64),
                       indices=np.asarray(y.indices, dtype=np.int32))
    dense = _binary_matrix(y, "y", n)
    lab = _Labels(dense.shape[1], dense=dense)
    if lab.c >= _SPARSE_FROM:
        rows, cols = np.nonzero(dense)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        lab = _Labels(lab.c, indptr=indptr, indices=cols.astype(np.int32))
    return lab


def _utility(u: Any, n: int) -> Optional[np.ndarray]:
    if u is None:
        return None
    t, _ = to_tensor(u, "utility")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"utility: expected shape ({n},), got {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise TypeError(f"utility: expected a numeric array, got {t.dtype}")
    arr = np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float64))
    if not np.all(np.isfinite(arr)):
        raise ValueError("utility: contains NaN or Inf")
    return arr


def _scalar(v: Any, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {v!r}") from None
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name}: must be in {lb}{lo:g}, {hi:g}{rb}, got {v!r}")
    return x


def default_target(s) -> np.ndarray:
    """The default target: every group at the mean of the observed group shares, (m,) float64."""
    s8 = _binary_matrix(s, "s")
    if s8.shape[0] == 0:
        raise ValueError("s: no examples")
    shares = s8.mean(axis=0, dtype=np.float64)
    return np.full(s8.shape[1], float(shares.mean()))


def _target(target: Any, m: int, s8: Optional[np.ndarray]) -> np.ndarray:
    if target is None:
        if s8 is None:
            raise ValueError("target: required (a scalar or one proportion per group)")
        return np.full(m, float(s8.mean(axis=0, dtype=np.float64).mean()))
    if isinstance(target, (int, float, np.floating, np.integer)) and not isinstance(target, bool):
        pi = np.full(m, float(target))
    else:
        t, _ = to_tensor(target, "target") if not isinstance(target, (list, tuple)) else (torch.tensor(target), None)
        pi = np.asarray(t.detach().cpu().numpy(), dtype=np.float64).reshape(-1)
        if pi.shape[0] != m:
            raise ValueError(f"target: expected a scalar or {m} proportions (one per group), got {pi.shape[0]}")
    if not np.all(np.isfinite(pi)) or np.any(pi <= 0) or np.any(pi >= 1):
        raise ValueError(f"target: proportions must be in (0, 1), got {pi.tolist()}")
    return pi


def _data_tuple(s8: np.ndarray, lab: _Labels, u: Optional[np.ndarray]):
    if lab.dense is not None:
        return (s8, np.ascontiguousarray(lab.dense), None, None, lab.c, u)
    return (s8, None, lab.indptr, lab.indices, lab.c, u)


# ----- names of constraints -------------------------------------------------------------------

def _constraint_name(j: int, c: int, groups: Sequence[str], labels: Sequence[str]) -> str:
    k, r = divmod(j, c + 1)
    if r == 0:
        return f"representation[{groups[k]}]"
    return f"association[{groups[k]}, {labels[r - 1]}]"


def _names(names: Optional[Sequence[str]], n: int, prefix: str) -> List[str]:
    if names is None:
        return [f"{prefix} {i}" for i in range(n)]
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"{prefix}_names: expected {n} names, got {len(names)}")
    return names


# ----- metrics --------------------------------------------------------------------------------

def _counts(s8: np.ndarray, lab: _Labels, q: Optional[np.ndarray]) -> np.ndarray:
    m, c = s8.shape[1], lab.c
    out = np.zeros(1 + m + c + m * c)
    core = _backend.core()
    if core is not None:
        core.m4_weighted_counts(_data_tuple(s8, lab, None), q, out)
        return out
    w = np.ones(s8.shape[0]) if q is None else q
    y = lab.to_dense().astype(np.float64)
    sf = s8.astype(np.float64)
    out[0] = w.sum()
    out[1:1 + m] = w @ sf
    out[1 + m:1 + m + c] = w @ y
    out[1 + m + c:] = ((sf * w[:, None]).T @ y).reshape(-1)
    return out


def _rb_from_counts(counts: np.ndarray, m: int, pi: np.ndarray) -> float:
    total = counts[0]
    if total <= 0:
        return float("nan")
    return float(np.max(np.abs(counts[1:1 + m] / total - pi)))


def _ab_from_counts(counts: np.ndarray, m: int, c: int) -> float:
    if c == 0:
        return 0.0
    total, qs = counts[0], counts[1:1 + m]
    qy, qsy = counts[1 + m:1 + m + c], counts[1 + m + c:].reshape(m, c)
    best = 0.0
    for k in range(m):
        n1, n0 = qs[k], total - qs[k]
        if n1 <= 0 or n0 <= 0:  # one side is empty: no association is defined
            continue
        best = max(best, float(np.max(np.abs(qsy[k] / n1 - (qy - qsy[k]) / n0))))
    return best


def representation_bias(s, weights=None, target=None) -> float:
    """Representation bias ``RB = max_k |E_q[s_k] / E_q[1] - pi_k|`` (DESIGN.md §3).

    s : (N, m) 0/1 sensitive groups; weights : (N,) non-negative (default uniform);
    target : scalar or (m,) proportions (default: the mean of the unweighted group shares).
    """
    s8 = _binary_matrix(s, "s")
    q = _weights(weights, s8.shape[0])
    pi = _target(target, s8.shape[1], s8)
    return _rb_from_counts(_counts(s8, _Labels(0, dense=np.zeros((s8.shape[0], 0), np.uint8)), q), s8.shape[1], pi)


def association_bias(s, y, weights=None) -> float:
    """Association bias ``AB = max_{k,r} |P_q(y_r | s_k = 1) - P_q(y_r | s_k = 0)|``.

    s : (N, m) 0/1; y : (N, c) 0/1 (or scipy CSR); weights : (N,) non-negative (default uniform).
    Groups that contain every example or none are skipped (the difference is undefined).
    """
    s8 = _binary_matrix(s, "s")
    lab = _labels(y, s8.shape[0])
    q = _weights(weights, s8.shape[0])
    return _ab_from_counts(_counts(s8, lab, q), s8.shape[1], lab.c)


def _weights(w, n: int) -> Optional[np.ndarray]:
    if w is None:
        return None
    t, _ = to_tensor(w, "weights")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"weights: expected shape ({n},), got {tuple(t.shape)}")
    arr = np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float64))
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("weights: must be finite and non-negative")
    return arr


def sample(q, seed: int = 0):
    """Keep mask: ``keep_i ~ Bernoulli(q_i)`` independently, reproducible from ``seed``.

    q : (N,) probabilities in [0, 1] (numpy array or tensor); returns a bool mask of the same type.
    """
    t, origin = to_tensor(q, "q")
    if t.dim() != 1:
        raise ValueError(f"q: expected a 1-D array, got shape {tuple(t.shape)}")
    arr = t.detach().cpu().double().numpy()
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError("q: probabilities must be finite and in [0, 1]")
    keep = np.random.default_rng(seed).random(arr.shape[0]) < arr
    return keep if origin.is_numpy else torch.from_numpy(keep).to(origin.device)


# ----- balance ----------------------------------------------------------------------------------

@dataclass
class BalanceResult:
    """The output of :func:`balance`.

    q : (N,) keep probabilities (float64, the caller's array type).
    v_plus, v_minus : (m, c + 1) duals of the upper/lower bias constraints; column 0 is the
        representation constraint of each group, column 1 + r the association with label r.
    mu : dual of the budget.
    status : "optimal", "infeasible" or "max_iter"; ``message`` says why (naming constraints).
    violations : per constraint, how far it is exceeded: ``budget`` |mean q - eta|,
        ``representation`` (m,) and ``association`` (m, c), each max(|value| - bound, 0).
    rb_before/rb_after, ab_before/ab_after: representation and association bias of the
        data, uniform and weighted by q.
    """
    q: Any
    v_plus: np.ndarray
    v_minus: np.ndarray
    mu: float
    status: str
    message: str
    objective: float
    violations: Dict[str, Any]
    max_violation: float
    rb_before: float
    rb_after: float
    ab_before: float
    ab_after: float
    target: np.ndarray
    method: str
    iterations: int
    infeasible_constraints: List[str] = field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        """JSON-serialisable summary (no per-example arrays)."""
        return {"status": self.status, "message": self.message, "method": self.method,
                "iterations": self.iterations, "objective": self.objective, "mu": self.mu,
                "max_violation": self.max_violation, "budget_error": self.violations["budget"],
                "kept_fraction": float(np.mean(np.asarray(self.q))) if np.asarray(self.q).size else float("nan"),
                "rb_before": self.rb_before, "rb_after": self.rb_after,
                "ab_before": self.ab_before, "ab_after": self.ab_after,
                "target": self.target.tolist(), "infeasible_constraints": self.infeasible_constraints}


def balance(s, y=None, *, target=None, budget: float = 0.9, eps_rep: float = 0.01, eps_assoc: float = 0.01,
            utility=None, method: str = "exact", seed: int = 0, max_iter: int = 100, tol: float = 1e-10,
            batch_size: int = 256, lr: float = 0.1, shuffle: bool = True,
            group_names: Optional[Sequence[str]] = None, label_names: Optional[Sequence[str]] = None
            ) -> BalanceResult:
    """Keep probabilities that balance a dataset (M4; see the module docstring for the problem).

    Parameters
    ----------
    s : (N, m) array, bool/uint8 or 0/1 floats
        Sensitive-group indicators; groups may overlap, rows may be all zero (unknown).
    y : (N, c) array (0/1) or scipy.sparse CSR matrix, optional
        Labels or proxies whose association with the groups is removed. c in the hundreds
        or thousands is handled through index lists.
    target : None, float or (m,) array in (0, 1)
        Target proportions pi. None: every group at the mean of the observed group shares.
    budget : float in (0, 1]
        eta, the expected fraction of data kept.
    eps_rep, eps_assoc : float >= 0
        Tolerances of the representation and association constraints (relative to eta).
    utility : (N,) array, optional
        u_i, a bonus for keeping example i.
    method : "exact" or "stream"
        "exact": the dual solved to ``tol`` (proximal Newton, C++/OpenMP). "stream": one
        pass of stochastic dual ascent over the examples in an order shuffled with ``seed``
        (``batch_size``, ``lr``), as :class:`M4Solver` does on data that does not fit in memory.

    Returns
    -------
    BalanceResult; an infeasible problem gives ``status="infeasible"`` and a message naming
    the constraints that cannot hold together (a certificate of the dual's recession). Any
    status other than "optimal" also emits a RuntimeWarning carrying ``message``.
    """
    s8 = _binary_matrix(s, "s")
    n, m = s8.shape
    if n == 0:
        raise ValueError("s: no examples")
    lab = _labels(y, n)
    u = _utility(utility, n)
    t_in, origin = to_tensor(s, "s")
    eta = _scalar(budget, "budget", 0.0, 1.0, lo_open=True)
    er = _scalar(eps_rep, "eps_rep", 0.0, math.inf)
    ea = _scalar(eps_assoc, "eps_assoc", 0.0, math.inf)
    pi = _target(target, m, s8)
    if method not in ("exact", "stream"):
        raise ValueError(f"method: expected 'exact' or 'stream', got {method!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter: must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol: must be a positive number, got {tol!r}")
    gnames, lnames = _names(group_names, m, "group"), _names(label_names, lab.c, "label")
    p = m * (lab.c + 1)
    problem = (pi, eta, er, ea)
    core = _backend.core()
    if core is None:
        raise RuntimeError("balance: pym4._core is not built; M4 needs the compiled core")

    lam = np.where(np.arange(p) % (lab.c + 1) == 0, eta * er, eta * ea)
    infeasible: List[str] = []
    if method == "exact":
        w = np.zeros(p)
        q = np.empty(n)
        info = core.m4_solve_exact(_data_tuple(s8, lab, u), problem, int(max_iter), float(tol), 1e6, w, q)
        status, iterations, mu = _STATUS[info["status"]], int(info["iterations"]), float(info["mu"])
        if status == "infeasible":
            big = np.abs(w) >= 1e-3 * np.abs(w).max()
            order = np.argsort(-np.abs(w))
            infeasible = [_constraint_name(int(j), lab.c, gnames, lnames) for j in order if big[j]]
    else:
        solver = M4Solver(pi, budget=eta, eps_rep=er, eps_assoc=ea, lr=lr, batch_size=batch_size)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        ss, ll = s8[order], lab.take(order)
        uu = None if u is None else u[order]
        solver._fit_core(ss, ll, uu)
        w, mu = solver._avg_w.copy(), float(solver._scalars[1])
        q = np.empty(n)
        core.m4_keep_probability(_data_tuple(s8, lab, u), problem, w, mu, q)
        iterations = int(solver._scalars[3])
        status = "optimal"

    # Constraint values from weighted counts: (1/N) sum q (s_k - pi_k) [1; y].
    cq = _counts(s8, lab, q)
    c0 = _counts(s8, lab, None)
    g = _constraint_values(cq, m, lab.c, pi, n)
    viol = np.maximum(np.abs(g) - lam, 0.0)
    budget_err = abs(cq[0] / n - eta)
    violations = {"budget": float(budget_err), "representation": viol.reshape(m, lab.c + 1)[:, 0].copy(),
                  "association": viol.reshape(m, lab.c + 1)[:, 1:].copy()}
    max_viol = float(max(viol.max(initial=0.0), budget_err))

    empty = [k for k in range(m) if (s8[:, k].sum() == 0 and pi[k] > er) or (s8[:, k].sum() == n and 1 - pi[k] > er)]
    if empty:
        status = "infeasible"
        for k in empty:
            name = f"representation[{gnames[k]}]"
            if name not in infeasible:
                infeasible.insert(0, name)
    if method == "stream" and status == "optimal":
        # One pass is an estimate: accept it when every constraint holds within its own
        # tolerance once more and the budget within 1 %.
        if np.any(np.abs(g) > 2 * lam + 1e-12) or budget_err > 0.01 * eta:
            status = "max_iter"
    message = _message(status, method, infeasible, empty, gnames, pi, s8, eta, max_viol, iterations)
    objective = float(np.mean(0.5 * (q - eta) ** 2 - (0.0 if u is None else u) * q))
    vp, vm = np.maximum(w, 0.0), np.maximum(-w, 0.0)
    if status != "optimal":  # q does not solve the problem: say so even to callers who skip .status
        warnings.warn(f"pym4.m4.balance: {message}", RuntimeWarning, stacklevel=2)
    q_out = q if origin.is_numpy else torch.from_numpy(q).to(t_in.device)
    return BalanceResult(
        q=q_out, v_plus=vp.reshape(m, lab.c + 1), v_minus=vm.reshape(m, lab.c + 1), mu=mu, status=status,
        message=message, objective=objective, violations=violations, max_violation=max_viol,
        rb_before=_rb_from_counts(c0, m, pi), rb_after=_rb_from_counts(cq, m, pi),
        ab_before=_ab_from_counts(c0, m, lab.c), ab_after=_ab_from_counts(cq, m, lab.c), target=pi,
        method=method, iterations=iterations, infeasible_constraints=infeasible)


def _constraint_values(counts: np.ndarray, m: int, c: int, pi: np.ndarray, n: int) -> np.ndarray:
    total, qs = counts[0], counts[1:1 + m]
    qy, qsy = counts[1 + m:1 + m + c], counts[1 + m + c:].reshape(m, c)
    g = np.empty((m, c + 1))
    g[:, 0] = qs - pi * total
    g[:, 1:] = qsy - pi[:, None] * qy[None, :]
    return g.reshape(-1) / n


def _message(status, method, infeasible, empty, gnames, pi, s8, eta, max_viol, iterations) -> str:
    if status == "optimal":
        return f"{method}: solved in {iterations} iterations (max constraint violation {max_viol:.2e})"
    if status == "infeasible":
        parts = []
        for k in empty:
            share = s8[:, k].mean()
            parts.append(f"group {gnames[k]!r} has {'no' if share == 0 else 'every'} example but its target "
                         f"proportion is {pi[k]:g}")
        names = ", ".join(infeasible[:8]) + (f" and {len(infeasible) - 8} more" if len(infeasible) > 8 else "")
        why = "; ".join(parts) + ("; " if parts else "")
        return (f"infeasible: {why}no keep probabilities in [0, 1] with budget {eta:g} satisfy together: {names} "
                f"(loosen eps_rep/eps_assoc, change the target, or lower the budget)")
    if method == "stream":
        return (f"stream: after one pass ({iterations} steps) a constraint is still off by more than its tolerance "
                f"(max violation {max_viol:.2e}); stream more data, or use method='exact'")
    return f"exact: stopped at max_iter={iterations} (max constraint violation {max_viol:.2e}); raise max_iter"


# ----- streaming solver -------------------------------------------------------------------------

class M4Solver:
    """Streaming M4: one-pass stochastic projected dual ascent with bounded memory.

    Each mini-batch of ``batch_size`` examples gives ``g = mean q_i a_i`` and
    ``g_mu = mean q_i - eta`` at the current duals; then
    ``v+ <- max(0, v+ + lr (g - lambda) / h)``, ``v- <- max(0, v- + lr (-g - lambda) / h)``,
    ``mu <- mu + lr g_mu`` with ``h`` the running mean of ``a_ij^2`` (a diagonal
    preconditioner), and the duals used by :meth:`keep_probability` are the polynomial-decay
    average of the iterates (Shamir & Zhang, 2013). Memory is O(m (c + 1)), whatever N.

    Parameters
    ----------
    target : float or (m,) array in (0, 1)
        Target group proportions (a stream has no data to take a default from).
    budget, eps_rep, eps_assoc : as in :func:`balance`.
    lr, gamma, batch_size : step size, averaging parameter, mini-batch size.
    group : torch.distributed.ProcessGroup, optional
        Every rank calls :meth:`partial_fit` with its own shard; the mini-batch statistics
        are all-reduced, so all ranks hold the same duals: those of one process streaming
        the union of the ranks' i-th mini-batches as its i-th mini-batch.
    """

    def __init__(self, target, *, budget: float = 0.9, eps_rep: float = 0.01, eps_assoc: float = 0.01,
                 lr: float = 0.1, gamma: float = 3.0, batch_size: int = 256, group=None):
        self.budget = _scalar(budget, "budget", 0.0, 1.0, lo_open=True)
        self.eps_rep = _scalar(eps_rep, "eps_rep", 0.0, math.inf)
        self.eps_assoc = _scalar(eps_assoc, "eps_assoc", 0.0, math.inf)
        self.lr = _scalar(lr, "lr", 0.0, math.inf, lo_open=True)
        self.gamma = _scalar(gamma, "gamma", 0.0, math.inf)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.group = group
        self._target_arg = target
        if target is None:
            raise ValueError("target: required for streaming (a scalar or one proportion per group)")
        self.m: Optional[int] = None
        self.c: Optional[int] = None

    # state ------------------------------------------------------------------------------------
    def _init(self, m: int, c: int) -> None:
        if self.m is None:
            self.pi = _target(self._target_arg, m, None)
            self.m, self.c = m, c
            p = m * (c + 1)
            self._v_plus, self._v_minus = np.zeros(p), np.zeros(p)
            self._avg_w, self._curv = np.zeros(p), np.zeros(p)
            self._scalars = np.zeros(4)  # mu, averaged mu, examples seen, steps
        elif (m, c) != (self.m, self.c):
            raise ValueError(f"s, y: this solver was fitted with m={self.m} groups and c={self.c} labels, "
                             f"got m={m}, c={c}")

    @property
    def problem(self):
        return (self.pi, self.budget, self.eps_rep, self.eps_assoc)

    @property
    def n_seen(self) -> int:
        return 0 if self.m is None else int(self._scalars[2])

    @property
    def steps(self) -> int:
        return 0 if self.m is None else int(self._scalars[3])

    @property
    def v_plus(self) -> np.ndarray:
        """Averaged duals of the upper constraints, (m, c + 1)."""
        self._check_fitted()
        return np.maximum(self._avg_w, 0).reshape(self.m, self.c + 1)

    @property
    def v_minus(self) -> np.ndarray:
        self._check_fitted()
        return np.maximum(-self._avg_w, 0).reshape(self.m, self.c + 1)

    @property
    def mu(self) -> float:
        self._check_fitted()
        return float(self._scalars[1])

    def _check_fitted(self) -> None:
        if self.m is None:
            raise RuntimeError("M4Solver: call partial_fit (or load_state_dict) first")

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: configuration and dual state (numpy arrays, copies)."""
        self._check_fitted()
        return {"m": self.m, "c": self.c, "target": self.pi.copy(), "budget": self.budget, "eps_rep": self.eps_rep,
                "eps_assoc": self.eps_assoc, "lr": self.lr, "gamma": self.gamma, "batch_size": self.batch_size,
                "v_plus": self._v_plus.copy(), "v_minus": self._v_minus.copy(), "avg_w": self._avg_w.copy(),
                "curv": self._curv.copy(), "scalars": self._scalars.copy()}

    def load_state_dict(self, state: Dict[str, Any]) -> "M4Solver":
        need = {"m", "c", "target", "budget", "eps_rep", "eps_assoc", "lr", "gamma", "batch_size", "v_plus",
                "v_minus", "avg_w", "curv", "scalars"}
        missing = need - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        m, c = int(state["m"]), int(state["c"])
        p = m * (c + 1)
        arrays = {}
        for key, size in (("v_plus", p), ("v_minus", p), ("avg_w", p), ("curv", p), ("scalars", 4), ("target", m)):
            a = np.array(torch.as_tensor(state[key]).cpu().numpy(), dtype=np.float64).reshape(-1)
            if a.shape[0] != size or not np.all(np.isfinite(a)):
                raise ValueError(f"state[{key!r}]: expected {size} finite values")
            arrays[key] = a
        self.m, self.c = m, c
        self.pi = arrays["target"]
        self.budget, self.eps_rep, self.eps_assoc = float(state["budget"]), float(state["eps_rep"]), float(state["eps_assoc"])
        self.lr, self.gamma, self.batch_size = float(state["lr"]), float(state["gamma"]), int(state["batch_size"])
        self._v_plus, self._v_minus = arrays["v_plus"], arrays["v_minus"]
        self._avg_w, self._curv, self._scalars = arrays["avg_w"], arrays["curv"], arrays["scalars"]
        return self

    # fitting ----------------------------------------------------------------------------------
    def partial_fit(self, s, y=None, utility=None) -> "M4Solver":
        """One batch of the stream: consecutive mini-batches of ``batch_size`` (the last may
        be shorter), one dual-ascent step each. s (n, m), y (n, c) or CSR, utility (n,).

        CUDA tensors run on the GPU (the CUDA kernel of the core when built with it, else torch).
        """
        t, _ = to_tensor(s, "s")
        if t.device.type == "cuda":
            self._fit_torch(s, y, utility)
            return self
        s8 = _binary_matrix(s, "s")
        lab = _labels(y, s8.shape[0])
        u = _utility(utility, s8.shape[0])
        self._fit_core(s8, lab, u)
        return self

    def _fit_core(self, s8: np.ndarray, lab: _Labels, u: Optional[np.ndarray]) -> None:
        n, m = s8.shape
        self._init(m, lab.c)
        core = _backend.core()
        if self.group is None:
            if n:
                core.m4_stream_fit(_data_tuple(s8, lab, u), self.problem, self.lr, self.gamma, self.batch_size,
                                   self._v_plus, self._v_minus, self._avg_w, self._curv, self._scalars)
            return
        import torch.distributed as dist
        B = self.batch_size
        steps = torch.tensor([float(-(-n // B))], dtype=torch.float64)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=self.group)
        p = m * (lab.c + 1)
        for j in range(int(steps.item())):
            b, e = min(j * B, n), min((j + 1) * B, n)
            if e > b:
                sub = lab.slice(b, e)
                stats = core.m4_batch_stats(_data_tuple(s8[b:e], sub, None if u is None else u[b:e]), self.problem,
                                            self._v_plus - self._v_minus, float(self._scalars[0]))
            else:
                stats = np.zeros(2 * p + 2)
            st = torch.from_numpy(stats)
            dist.all_reduce(st, op=dist.ReduceOp.SUM, group=self.group)
            core.m4_apply_update(m, lab.c, self.problem, self.lr, self.gamma, self._v_plus, self._v_minus,
                                 self._avg_w, self._curv, self._scalars, st.numpy())

    def _fit_torch(self, s, y, utility) -> None:
        """GPU path: mini-batch statistics on the device, the same update in torch."""
        st, _ = to_tensor(s, "s")
        s_t = (st[:, None] if st.dim() == 1 else st).to(torch.float64)
        n, m = s_t.shape
        if y is None:
            y_t = torch.zeros((n, 0), dtype=torch.float64, device=st.device)
        else:
            yt, _ = to_tensor(y, "y")
            y_t = (yt[:, None] if yt.dim() == 1 else yt).to(device=st.device, dtype=torch.float64)
        u_t = None
        if utility is not None:
            u_t = to_tensor(utility, "utility")[0].to(device=st.device, dtype=torch.float64)
        _check_torch_inputs(s_t, y_t, u_t)
        self._init(m, y_t.shape[1])
        dev = st.device
        state = {k: torch.from_numpy(getattr(self, "_" + k)).to(dev) for k in ("v_plus", "v_minus", "avg_w", "curv", "scalars")}
        pi = torch.from_numpy(self.pi).to(dev)
        core = _backend.core()
        use_kernel = dev.type == "cuda" and _backend.core_has_cuda()
        if use_kernel:
            s8 = s_t.to(torch.uint8).contiguous()
            y8 = y_t.to(torch.uint8).contiguous()
            if u_t is not None:
                u_t = u_t.contiguous()
        B = self.batch_size
        steps = -(-n // B)
        if self.group is not None:
            import torch.distributed as dist
            t_steps = torch.tensor([float(steps)], dtype=torch.float64, device=dev)
            dist.all_reduce(t_steps, op=dist.ReduceOp.MAX, group=self.group)
            steps = int(t_steps.item())
        for j in range(steps):
            b, e = min(j * B, n), min((j + 1) * B, n)
            w = state["v_plus"] - state["v_minus"]
            if use_kernel:
                stats = torch.zeros(2 * self.m * (self.c + 1) + 2, dtype=torch.float64, device=dev)
                with torch.cuda.device(dev):  # the kernel launches on the current device: the data's
                    core.m4_batch_cuda(s8.data_ptr() + b * m, y8.data_ptr() + b * y8.shape[1],
                                       0 if u_t is None else u_t.data_ptr() + 8 * b, e - b, m, self.c,
                                       pi.data_ptr(), self.budget, w.data_ptr(), state["scalars"].data_ptr(), 0,
                                       stats.data_ptr(), torch.cuda.current_stream(dev).cuda_stream)
            else:
                stats = _batch_stats_torch(s_t[b:e], y_t[b:e], None if u_t is None else u_t[b:e], pi,
                                           self.budget, w, state["scalars"][0])
            if self.group is not None:
                import torch.distributed as dist
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
            _apply_update_torch(state, stats, self.m, self.c, self.budget, self.eps_rep, self.eps_assoc,
                                self.lr, self.gamma)
        for k, v in state.items():
            setattr(self, "_" + k, v.cpu().numpy().copy())

    # inference --------------------------------------------------------------------------------
    def keep_probability(self, s, y=None, utility=None):
        """q_i = clip(eta + u_i - a_i^T (v+ - v-) - mu, 0, 1) with the averaged duals: a pure
        function of the state and the example, (n,) float64 in the caller's array type."""
        self._check_fitted()
        t, origin = to_tensor(s, "s")
        if t.device.type == "cuda":
            st = (t[:, None] if t.dim() == 1 else t).to(torch.float64)
            yt = torch.zeros((st.shape[0], 0), dtype=torch.float64, device=t.device) if y is None else \
                to_tensor(y, "y")[0].to(device=t.device, dtype=torch.float64)
            yt = yt[:, None] if yt.dim() == 1 else yt
            u_t = None if utility is None else to_tensor(utility, "utility")[0].to(device=t.device, dtype=torch.float64)
            _check_torch_inputs(st, yt, u_t)
            self._init(st.shape[1], yt.shape[1])
            w = torch.from_numpy(self._avg_w).to(t.device)
            pi = torch.from_numpy(self.pi).to(t.device)
            if _backend.core_has_cuda():
                q = torch.empty(st.shape[0], dtype=torch.float64, device=t.device)
                mu = torch.tensor([float(self._scalars[1])], dtype=torch.float64, device=t.device)
                s8, y8 = st.to(torch.uint8).contiguous(), yt.to(torch.uint8).contiguous()
                u_c = None if u_t is None else u_t.contiguous()
                with torch.cuda.device(t.device):  # the kernel launches on the current device: the data's
                    _backend.core().m4_batch_cuda(s8.data_ptr(), y8.data_ptr(),
                                                  0 if u_c is None else u_c.data_ptr(), st.shape[0], st.shape[1],
                                                  yt.shape[1], pi.data_ptr(), self.budget, w.data_ptr(),
                                                  mu.data_ptr(), q.data_ptr(), 0,
                                                  torch.cuda.current_stream(t.device).cuda_stream)
                return q
            return _keep_torch(st, yt, u_t, torch.from_numpy(self.pi).to(t.device), self.budget, w,
                               float(self._scalars[1]))
        s8 = _binary_matrix(s, "s")
        lab = _labels(y, s8.shape[0])
        u = _utility(utility, s8.shape[0])
        self._init(s8.shape[1], lab.c)
        q = np.empty(s8.shape[0])
        if s8.shape[0]:
            _backend.core().m4_keep_probability(_data_tuple(s8, lab, u), self.problem, self._avg_w,
                                                float(self._scalars[1]), q)
        return q if origin.is_numpy else torch.from_numpy(q).to(t.device)


# ----- torch implementation (GPU path and reference) -------------------------------------------

def _check_torch_inputs(s, y, u) -> None:
    """Shapes and values of the device path, checked before the kernel reads raw pointers."""
    if s.dim() != 2:
        raise ValueError(f"s: expected a 1-D or 2-D array (examples, columns), got shape {tuple(s.shape)}")
    n = s.shape[0]
    if y.dim() != 2 or y.shape[0] != n:
        raise ValueError(f"y: expected {n} rows (one per example), got shape {tuple(y.shape)}")
    if u is not None and (u.dim() != 1 or u.shape[0] != n):
        raise ValueError(f"utility: expected shape ({n},), got {tuple(u.shape)}")
    for name, t in (("s", s), ("y", y)):
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name}: values must be 0 or 1 (binary)")
    if u is not None and not bool(torch.isfinite(u).all()):
        raise ValueError("utility: contains NaN or Inf")


def _margins_torch(s, y, pi, w):
    m, L = s.shape[1], y.shape[1] + 1
    d = s - pi
    ytil = torch.cat([torch.ones_like(y[:, :1]), y], dim=1)
    return ((ytil @ w.view(m, L).T) * d).sum(dim=1), d, ytil


def _keep_torch(s, y, u, pi, eta, w, mu):
    t, _, _ = _margins_torch(s, y, pi, w)
    return (eta + (0 if u is None else u) - t - mu).clamp(0.0, 1.0)


def _batch_stats_torch(s, y, u, pi, eta, w, mu):
    """[sum q a | sum a^2 | sum q | count] of a mini-batch (float64 torch, any device)."""
    t, d, ytil = _margins_torch(s, y, pi, w)
    q = (eta + (0 if u is None else u) - t - mu).clamp(0.0, 1.0)
    qa = ((q[:, None] * d).T @ ytil).reshape(-1)
    a2 = ((d * d).T @ ytil).reshape(-1)
    tail = torch.stack([q.sum(), torch.tensor(float(s.shape[0]), dtype=torch.float64, device=s.device)])
    return torch.cat([qa, a2, tail])


def _apply_update_torch(state, stats, m, c, eta, eps_rep, eps_assoc, lr, gamma):
    p = m * (c + 1)
    # No host sync here: every mini-batch of the loop holds at least one example globally
    # (the step count is the largest over the ranks), so count > 0.
    count = stats[2 * p + 1]
    sc = state["scalars"]
    sc[2] += count
    sc[3] += 1.0
    r = (gamma + 1.0) / (sc[3] + gamma)
    state["curv"] += stats[p:2 * p]
    h = state["curv"] / sc[2] + 1e-6
    g = stats[:p] / count
    j = torch.arange(p, device=stats.device)
    lam = torch.where(j % (c + 1) == 0, eta * eps_rep, eta * eps_assoc).to(torch.float64)
    state["v_plus"].copy_(torch.clamp(state["v_plus"] + lr * (g - lam) / h, min=0.0))
    state["v_minus"].copy_(torch.clamp(state["v_minus"] + lr * (-g - lam) / h, min=0.0))
    state["avg_w"].copy_((1.0 - r) * state["avg_w"] + r * (state["v_plus"] - state["v_minus"]))
    sc[0] += lr * (stats[2 * p] / count - eta)
    sc[1] = (1.0 - r) * sc[1] + r * sc[0]
