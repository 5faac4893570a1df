"""The M4 problem and its report, from weighted counts alone.

Everything a report needs is in the weighted counts of the data,
``[sum w | sum w s_k (m) | sum w y_r (c) | sum w s_k y_r (m c)]`` (the core's layout), once
with w = 1 (the data) and once with w = q (the kept data): the constraint values, the
violations, the biases, the infeasibility certificate of an empty group, the status and
the message. So a caller that streams the data in passes (the CLI, a cluster job) adds
per-batch counts and gets the same report as :func:`pym4.m4.balance` on the data in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import _backend
from . import _inputs


@dataclass(frozen=True)
class Problem:
    """pi (m,) target proportions in (0, 1), eta the budget, eps_rep and eps_assoc the
    tolerances (relative to eta)."""
    target: np.ndarray
    budget: float
    eps_rep: float
    eps_assoc: float

    @property
    def m(self) -> int:
        return int(self.target.shape[0])

    def tolerances(self, c: int) -> np.ndarray:
        """lambda (m (c + 1),): eta eps_rep for representation constraint k (c + 1), eta
        eps_assoc for association k (c + 1) + 1 + r; the layout of include/pym4/m4.h."""
        rep = np.arange(self.m * (c + 1)) % (c + 1) == 0
        return np.where(rep, self.budget * self.eps_rep, self.budget * self.eps_assoc)

    def core(self):
        """The core's problem argument: (pi, eta, eps_rep, eps_assoc)."""
        return (self.target, self.budget, self.eps_rep, self.eps_assoc)


def make_problem(target, m: int, s8: Optional[np.ndarray], budget, eps_rep, eps_assoc) -> Problem:
    """A checked :class:`Problem` (target None: the default of s8)."""
    eta = _inputs.scalar(budget, "budget", 0.0, 1.0, lo_open=True)
    er = _inputs.scalar(eps_rep, "eps_rep", 0.0, float("inf"), hi_open=True)
    ea = _inputs.scalar(eps_assoc, "eps_assoc", 0.0, float("inf"), hi_open=True)
    return Problem(_inputs.target(target, m, s8), eta, er, ea)


# ----- counts -----------------------------------------------------------------------------------

def counts_size(m: int, c: int) -> int:
    return 1 + m + c + m * c


def counts(s8: np.ndarray, lab: _inputs.Labels, q: Optional[np.ndarray]) -> np.ndarray:
    """Weighted counts (float64, :func:`counts_size`) of checked inputs; q None: weight 1."""
    m, c = s8.shape[1], lab.c
    out = np.zeros(counts_size(m, c))
    if _backend.choose("m4_counts", "cpu") == "cpu":
        _backend.core().m4_weighted_counts(_inputs.data_tuple(s8, lab, None), q, out)
        return out
    import torch  # the reference: float64 matrix products

    w = torch.ones(s8.shape[0], dtype=torch.float64) if q is None else torch.from_numpy(q)
    y = torch.from_numpy(lab.to_dense()).to(torch.float64)
    sf = torch.from_numpy(s8).to(torch.float64)
    out[0] = float(w.sum())
    out[1:1 + m] = (w @ sf).numpy()
    out[1 + m:1 + m + c] = (w @ y).numpy()
    out[1 + m + c:] = ((sf * w[:, None]).T @ y).reshape(-1).numpy()
    return out


def weighted_counts(s, y=None, weights=None) -> np.ndarray:
    """``[sum w | sum w s_k (m) | sum w y_r (c) | sum w s_k y_r (m c)]``, float64.

    s : (N, m) 0/1; y : (N, c) 0/1 or scipy CSR, optional; weights : (N,) >= 0 (default 1).
    Counts of disjoint parts of a dataset add up to the counts of the whole, which is what
    :func:`report` takes.
    """
    s8 = _inputs.group_matrix(s)
    w = _inputs.weights(weights, s8.shape[0])
    if w is not None:
        with np.errstate(over="ignore"):
            total = float(w.sum())
        if not np.isfinite(total):  # every count is at most the total: only it can overflow
            raise ValueError(f"weights: their sum overflows float64 (largest {w.max():g}); scale them down "
                             "(shares and biases do not change when every weight is scaled)")
    return counts(s8, _inputs.as_labels(y, s8.shape[0]), w)


def _parts(cnt: np.ndarray, m: int, c: int):
    cnt = np.asarray(cnt, dtype=np.float64)
    if cnt.shape != (counts_size(m, c),):
        raise ValueError(f"counts: expected {counts_size(m, c)} values for m={m} groups and c={c} labels, "
                         f"got shape {cnt.shape}")
    return cnt[0], cnt[1:1 + m], cnt[1 + m:1 + m + c], cnt[1 + m + c:].reshape(m, c)


def checked_counts(cnt: Any, m: int, c: int, name: str = "counts") -> np.ndarray:
    """Weighted counts as float64 (:func:`weighted_counts`' layout) after the checks that
    counts of non-negative weights pass: finite, non-negative, and no part larger than the
    whole it is part of (a group's or a label's count at most the total, a (group, label)
    count at most both), up to the rounding of sums. ValueError naming ``name`` otherwise."""
    for v, what, low in ((m, "m", 1), (c, "c", 0)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{what}: expected an integer, got {v!r}")
        if v < low:
            raise ValueError(f"{what}: must be >= {low}, got {v}")
    size = _vector_length(cnt, name)
    arr = np.asarray(cnt, dtype=np.float64)
    if size != counts_size(m, c):
        raise ValueError(f"{name}: expected {counts_size(m, c)} values for m={m} groups and c={c} labels, "
                         f"got {size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or Inf (at {int(np.argmin(np.isfinite(arr)))})")
    if np.any(arr < 0):
        raise ValueError(f"{name}: weighted counts cannot be negative (value {arr.min():g} at {int(np.argmin(arr))})")
    total, qs, qy, qsy = arr[0], arr[1:1 + m], arr[1 + m:1 + m + c], arr[1 + m + c:].reshape(m, c)
    slack = 1e-9 * total  # the rounding of sums (relative: counts of tiny weights are tiny)
    for part, whole, what in ((qs, total, "a group's count exceeds the total"),
                              (qy, total, "a label's count exceeds the total"),
                              (qsy, np.minimum(qs[:, None], qy[None, :]),
                               "a (group, label) count exceeds its group's or its label's count")):
        over = part - whole - slack
        if np.any(over > 0):
            j = int(np.argmax(over.reshape(-1)))
            offset = 1 if part is qs else 1 + m if part is qy else 1 + m + c
            raise ValueError(f"{name}: {what} at {offset + j} ({part.reshape(-1)[j]:g}); "
                             "these are not the counts of non-negative weights")
    return arr


def _vector_length(cnt: Any, name: str) -> int:
    """The length of a 1-D array of numbers; TypeError or ValueError naming ``name`` else
    (a 2-D array was flattened, so counts of several datasets read as one)."""
    try:
        arr = np.asarray(cnt, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected numbers (weighted counts), got {type(cnt).__name__}"
                        + (f" of {np.asarray(cnt).dtype}" if isinstance(cnt, (np.ndarray, list, tuple)) else "")) from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of weighted counts, got shape {arr.shape}")
    return int(arr.shape[0])


def group_shares(cnt: np.ndarray, m: int, c: int = 0) -> np.ndarray:
    """(m,) E_w[s_k] / E_w[1]; NaN when the total weight is 0."""
    total, qs, _, _ = _parts(checked_counts(cnt, m, c), m, c)
    return qs / total if total > 0 else np.full(m, np.nan)


def target_from_counts(cnt: np.ndarray, m: int, c: int = 0) -> np.ndarray:
    """The default target (see :func:`pym4.m4.default_target`) from unweighted counts."""
    cnt = checked_counts(cnt, m, c)
    if cnt[0] <= 0:
        raise ValueError("counts: no examples")
    return _inputs.default_target_of_shares(group_shares(cnt, m, c), "counts")


def constraint_values(cnt: np.ndarray, m: int, c: int, pi: np.ndarray, n: float) -> np.ndarray:
    """g (m (c + 1),): ``(1/n) sum_i w_i (s_ik - pi_k) [1; y_i]`` in the layout of lambda."""
    total, qs, qy, qsy = _parts(cnt, m, c)
    g = np.empty((m, c + 1))
    g[:, 0] = qs - pi * total
    g[:, 1:] = qsy - pi[:, None] * qy[None, :]
    return g.reshape(-1) / n


def association_gaps(cnt: np.ndarray, m: int, c: int) -> np.ndarray:
    """(m, c) ``P_w(y_r | s_k = 1) - P_w(y_r | s_k = 0)``; a row is NaN where group k holds
    no weight or all of it (the difference is undefined there)."""
    total, qs, qy, qsy = _parts(checked_counts(cnt, m, c), m, c)
    out = np.full((m, c), np.nan)
    for k in range(m):
        n1, n0 = qs[k], total - qs[k]
        if n1 > 0 and n0 > 0:
            out[k] = qsy[k] / n1 - (qy - qsy[k]) / n0
    return out


def representation_bias_from_counts(cnt: np.ndarray, m: int, pi: np.ndarray, c: int = 0) -> float:
    """RB = max_k |E_w[s_k] / E_w[1] - pi_k|; NaN when the total weight is 0."""
    shares = group_shares(cnt, m, c)
    return float(np.max(np.abs(shares - pi))) if np.all(np.isfinite(shares)) else float("nan")


def association_bias_from_counts(cnt: np.ndarray, m: int, c: int) -> float:
    """AB = max over defined (k, r) of |association_gaps|; 0 when none is defined."""
    gaps = np.abs(association_gaps(cnt, m, c))
    return float(np.nanmax(gaps)) if c and np.isfinite(gaps).any() else 0.0


def representation_bias(s, weights=None, target=None) -> float:
    """Representation bias ``RB = max_k |E_q[s_k] / E_q[1] - pi_k|`` (DESIGN.md §3).

    s : (N, m) 0/1 sensitive groups; weights : (N,) non-negative (default uniform);
    target : scalar or (m,) proportions (default: the mean of the unweighted group shares).
    Like :func:`association_bias`, refuses an empty selection (N = 0, or every weight 0),
    where the bias is undefined, with a ValueError.
    """
    s8 = _inputs.group_matrix(s)
    q = _inputs.selection_weights(weights, s8.shape[0])
    pi = _inputs.target(target, s8.shape[1], s8)
    return representation_bias_from_counts(counts(s8, _inputs.Labels.none(s8.shape[0]), q), s8.shape[1], pi)


def association_bias(s, y, weights=None) -> float:
    """Association bias ``AB = max_{k,r} |P_q(y_r | s_k = 1) - P_q(y_r | s_k = 0)|``.

    s : (N, m) 0/1; y : (N, c) 0/1 (or scipy CSR); weights : (N,) non-negative (default uniform).
    Groups that contain every example or none are skipped (the difference is undefined);
    0 when no group is left. An empty selection (N = 0, or every weight 0) is refused with a
    ValueError, as by :func:`representation_bias`.
    """
    s8 = _inputs.group_matrix(s)
    lab = _inputs.as_labels(y, s8.shape[0])
    q = _inputs.selection_weights(weights, s8.shape[0])
    return association_bias_from_counts(counts(s8, lab, q), s8.shape[1], lab.c)


# ----- the report -------------------------------------------------------------------------------

def constraint_name(j: int, c: int, groups: Sequence[str], labels: Sequence[str]) -> str:
    k, r = divmod(j, c + 1)
    if r == 0:
        return f"representation[{groups[k]}]"
    return f"association[{groups[k]}, {labels[r - 1]}]"


def empty_groups(before: np.ndarray, problem: Problem, c: int) -> List[int]:
    """Groups whose target no q can reach: with no example (or every example) the kept
    share is 0 (or 1) whatever q is, farther than eps_rep from the target."""
    total, qs, _, _ = _parts(before, problem.m, c)
    pi, er = problem.target, problem.eps_rep
    return [k for k in range(problem.m) if (qs[k] == 0 and pi[k] > er) or (qs[k] == total and 1 - pi[k] > er)]


@dataclass
class Report:
    """What a solve achieved, from counts: see :func:`report`.

    violations: ``budget`` |kept fraction - eta|, ``representation`` (m,) and
    ``association`` (m, c), each max(|constraint value| - bound, 0).
    """
    status: str
    message: str
    method: str
    iterations: int
    violations: Dict[str, Any]
    max_violation: float
    kept_fraction: float
    rb_before: float
    rb_after: float
    ab_before: float
    ab_after: float
    target: np.ndarray
    infeasible_constraints: List[str]
    counts_before: np.ndarray = field(repr=False)
    counts_after: np.ndarray = field(repr=False)
    group_names: List[str] = field(repr=False)
    label_names: List[str] = field(repr=False)
    # Set when it was searched for (an infeasible problem, or budget="max"); None: none >= 1e-3.
    largest_feasible_budget: Optional[float] = None
    # P(q) - D(w, mu): the duality gap at the duals q came from, given only when q holds every
    # constraint ("optimal"): then its objective is at most this much above the optimum (weak
    # duality). None otherwise, and objective_gap_note says why (no duals given; q misses a
    # constraint, so it is no candidate and the gap, often negative, bounds nothing; infeasible).
    objective_gap_bound: Optional[float] = None
    objective_gap_note: str = ""
    # Passes the solve made over the rows (over the table of distinct (s, y) patterns when
    # ``compressed``); None where the caller did not say (a report built from counts).
    passes: Optional[int] = None
    compressed: Optional[bool] = None

    def summary(self) -> Dict[str, Any]:
        """JSON-serialisable summary (no per-example arrays) with no NaN or Inf
        (``json.dumps(allow_nan=False)`` takes it): a bias that is undefined (no weight kept,
        a group holding no example) is None, and ``undefined`` says why."""
        out = {"status": self.status, "message": self.message, "method": self.method,
               "iterations": self.iterations, "passes": self.passes, "compressed": self.compressed,
               "max_violation": self.max_violation,
               "budget_error": self.violations["budget"], "kept_fraction": self.kept_fraction,
               "rb_before": self.rb_before, "rb_after": self.rb_after,
               "ab_before": self.ab_before, "ab_after": self.ab_after,
               "target": self.target.tolist(), "infeasible_constraints": list(self.infeasible_constraints),
               "largest_feasible_budget": self.largest_feasible_budget}
        undefined = {}
        for key, counts in (("rb_before", self.counts_before), ("rb_after", self.counts_after)):
            if not _finite(out[key]):
                out[key] = None
                undefined[key] = ("no weight kept (every q is 0)" if counts[0] <= 0
                                  else "a group holds no example")
        for key, value in out.items():
            if isinstance(value, float) and not _finite(value):  # never expected; never written as NaN
                out[key] = None
                undefined[key] = "not a finite number"
        out["undefined"] = undefined
        return out

    def details(self, top: int = 10) -> Dict[str, Any]:
        """Group shares before/after (by name) and the ``top`` strongest associations of
        the data, before and after; undefined ones (a group with no example) are left out."""
        m, c = len(self.group_names), len(self.label_names)
        gaps0 = association_gaps(self.counts_before, m, c).reshape(-1)
        gaps1 = association_gaps(self.counts_after, m, c).reshape(-1)
        defined = np.flatnonzero(np.isfinite(gaps0))
        order = defined[np.argsort(-np.abs(gaps0[defined]), kind="stable")][:top]
        # Undefined values (no weight kept) are None: the details go into JSON reports.
        return {"group_shares_before": dict(zip(self.group_names, _json_floats(group_shares(self.counts_before, m, c)))),
                "group_shares_after": dict(zip(self.group_names, _json_floats(group_shares(self.counts_after, m, c)))),
                "strongest_associations": [
                    {"group": self.group_names[j // c], "label": self.label_names[j % c],
                     "before": float(gaps0[j]), "after": _json_floats(gaps1[j:j + 1])[0]} for j in order]}


def _finite(x) -> bool:
    return x is not None and bool(np.isfinite(x))


def _json_floats(values) -> List[Optional[float]]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def evaluate(problem: Problem, before: np.ndarray, after: np.ndarray, c: int, *, method: str, iterations: int,
             status: str = "optimal", infeasible: Sequence[str] = (),
             group_names: Optional[Sequence[str]] = None, label_names: Optional[Sequence[str]] = None,
             slack: float = 1e-9, duals=None, max_iter: Optional[int] = None) -> Report:
    """The report of keep probabilities q from the counts of the data (``before``, w = 1)
    and of the kept data (``after``, w = q). ``max_iter``: the exact solve's limit, when
    known (its message then says whether the solve ran to it).

    ``status`` is the solver's ("optimal", "infeasible" with the dual's ``infeasible``
    constraint names, or "max_iter"). Here it becomes "infeasible" when a group is empty
    (the certificate of :func:`empty_groups`), and the same rule decides every method's
    status from q's constraint values, the budget included: "optimal" only when every
    constraint holds within its tolerance and the budget within ``slack`` (rounding, or
    the solver's tolerance); "approximate" when each holds within twice its tolerance
    and the budget within 1 %; "max_iter" otherwise. ``duals`` (w (p,), mu): the duals q is
    the closed form of; they give the report's ``objective_gap_bound``.
    """
    m = problem.m
    gnames, lnames = _inputs.names(group_names, m, "group"), _inputs.names(label_names, c, "label")
    n = float(_parts(before, m, c)[0])
    if n <= 0:
        raise ValueError("counts: no examples")
    lam = problem.tolerances(c)
    g = constraint_values(after, m, c, problem.target, n)
    viol = np.maximum(np.abs(g) - lam, 0.0)
    kept = float(after[0] / n)
    budget_err = abs(kept - problem.budget)
    max_viol = float(max(viol.max(initial=0.0), budget_err))
    names = list(infeasible)
    empty = empty_groups(before, problem, c)
    if empty:
        status = "infeasible"
        for k in reversed(empty):
            name = f"representation[{gnames[k]}]"
            if name not in names:
                names.insert(0, name)
    downgraded = status == "optimal" and (bool(np.any(np.abs(g) > lam + slack)) or budget_err > slack)
    if downgraded:
        near = not np.any(np.abs(g) > 2 * lam + slack) and budget_err <= 0.01 * problem.budget
        status = "approximate" if near else "max_iter"
    gap, gap_note = None, "no duals given"
    if duals is not None and status == "optimal":
        w, mu = np.asarray(duals[0], dtype=np.float64).reshape(-1), float(duals[1])
        gap, gap_note = float(lam @ np.abs(w) - w @ g - mu * (kept - problem.budget)), ""
    elif duals is not None and status == "infeasible":
        gap_note = "the problem is infeasible: there is no optimum to be near"
    elif duals is not None:
        # Weak duality bounds P(q) - P* by P(q) - D for a feasible q only; q off a constraint
        # can have an objective below the optimum, and the gap is then negative or meaningless.
        gap_note = (f"q misses a constraint (status {status!r}, max violation {max_viol:.2e}): "
                    f"no bound on its distance to the optimum")
    shares = group_shares(before, m, c)
    message = _message(status, method, names, [(gnames[k], shares[k], problem.target[k]) for k in empty],
                       problem.budget, max_viol, iterations, _worst(g, lam, budget_err, c, gnames, lnames), downgraded,
                       max_iter)
    violations = {"budget": float(budget_err), "representation": viol.reshape(m, c + 1)[:, 0].copy(),
                  "association": viol.reshape(m, c + 1)[:, 1:].copy()}
    return Report(status=status, message=message, method=method, iterations=int(iterations), violations=violations,
                  max_violation=max_viol, kept_fraction=kept,
                  rb_before=representation_bias_from_counts(before, m, problem.target, c),
                  rb_after=representation_bias_from_counts(after, m, problem.target, c),
                  ab_before=association_bias_from_counts(before, m, c),
                  ab_after=association_bias_from_counts(after, m, c), target=problem.target,
                  infeasible_constraints=names, counts_before=np.asarray(before, dtype=np.float64),
                  counts_after=np.asarray(after, dtype=np.float64), group_names=gnames, label_names=lnames,
                  objective_gap_bound=gap, objective_gap_note=gap_note)


def _worst(g, lam, budget_err, c, gnames, lnames) -> str:
    """The constraint farthest beyond its bound, in words (for the messages)."""
    excess = np.abs(g) - lam
    j = int(np.argmax(excess)) if excess.size else 0
    if excess.size == 0 or budget_err >= excess[j]:
        return f"the budget (kept fraction off by {budget_err:.2e})"
    return f"{constraint_name(j, c, gnames, lnames)} (|value| {abs(g[j]):.3e}, bound {lam[j]:.3e})"


def _message(status, method, infeasible, empty, eta, max_viol, iterations, worst="", downgraded=False,
             max_iter=None) -> str:
    if status == "optimal":
        return f"{method}: solved in {iterations} iterations (max constraint violation {max_viol:.2e})"
    if status == "infeasible":
        parts = [f"group {name!r} has {'no' if share == 0 else 'every'} example but its target proportion is {pi:g}"
                 for name, share, pi in empty]
        names = ", ".join(infeasible[:8]) + (f" and {len(infeasible) - 8} more" if len(infeasible) > 8 else "")
        why = "; ".join(parts) + ("; " if parts else "")
        return (f"infeasible: {why}no keep probabilities in [0, 1] with budget {eta:g} satisfy together: {names} "
                f"(loosen eps_rep/eps_assoc, change the target, or lower the budget)")
    if status == "approximate":
        return (f"{method}: approximate: every constraint holds within twice its tolerance and the budget within 1 %, "
                f"but not within the tolerances (max violation {max_viol:.2e}, worst: {worst}); "
                + ("stream more data, or use method='exact'" if method == "stream" else "lower tol"))
    if method == "stream":
        return (f"stream: after one pass ({iterations} steps) a constraint is off by more than twice its tolerance "
                f"(max violation {max_viol:.2e}, worst: {worst}); stream more data, or use method='exact'")
    if downgraded:  # the solver's test passed, yet q (recomputed here) misses a constraint
        return f"exact: after {iterations} iterations q misses a constraint beyond its tolerance (max violation {max_viol:.2e}, worst: {worst})"
    if max_iter is not None and iterations < max_iter:  # the solver stopped early: no further progress
        return (f"exact: stopped after {iterations} of max_iter={max_iter} iterations, making no further progress, "
                f"short of the tolerance (max constraint violation {max_viol:.2e}, worst: {worst}): loosen tol, "
                f"or bring a large utility to the scale of q (about 1)")
    return (f"exact: stopped at {'max_iter=' if max_iter is not None else ''}{iterations} iterations short of the "
            f"tolerance (max constraint violation {max_viol:.2e}); raise max_iter")


def report(counts_before, counts_after, *, target, budget: float, eps_rep: float = 0.01, eps_assoc: float = 0.01,
           method: str = "stream", iterations: int = 0, group_names: Optional[Sequence[str]] = None,
           label_names: Optional[Sequence[str]] = None, duals=None) -> Report:
    """The report of a solve from weighted counts (see :func:`weighted_counts`): the counts
    of the data (weights 1) and of the kept data (weights q), summed over any number of
    batches. ``target`` is a scalar or (m,) proportions; m and c follow from
    ``group_names``/``label_names``, or from ``target`` and the counts' length.
    Same rules and wording as :func:`pym4.m4.balance`. ``duals`` (w (m (c + 1),), mu), the
    duals q came from, give ``objective_gap_bound``.
    """
    if group_names is not None:
        m = len(group_names)
    elif np.ndim(target) == 1:
        m = len(target)
    elif np.ndim(target) > 1:
        raise ValueError(f"target: expected a scalar or a 1-D array of proportions, got shape {np.shape(target)}")
    else:
        raise ValueError("group_names: required with a scalar target (it gives the number of groups)")
    # 1 + m + c (1 + m) values: c from the length.
    size = _vector_length(counts_before, "counts_before")
    c, rest = divmod(size - 1 - m, 1 + m)
    if rest or c < 0 or (label_names is not None and len(label_names) != c):
        raise ValueError(f"counts_before: {size} values do not fit m={m} groups"
                         + ("" if label_names is None else f" and c={len(label_names)} labels"))
    if _vector_length(counts_after, "counts_after") != size:
        raise ValueError(f"counts_after: expected {size} values like counts_before, got "
                         f"{_vector_length(counts_after, 'counts_after')}")
    before = checked_counts(counts_before, m, c, "counts_before")
    after = checked_counts(counts_after, m, c, "counts_after")
    if not before[0] > 0:
        raise ValueError("counts_before: its first value (the number of examples) must be > 0")
    # q in [0, 1]: every kept count is at most the data's, up to the rounding of sums of q
    # (relative: counts of weights of 1e-12 are not all within an absolute 1e-9).
    over = after - before * (1 + 1e-9) - 1e-12 * before[0]
    if np.any(over > 0):
        j = int(np.argmax(over))
        raise ValueError(f"counts_after: value {after[j]:g} at {j} exceeds counts_before's {before[j]:g} "
                         f"(the kept data's counts, weights q in [0, 1], cannot exceed the data's)")
    if method not in ("exact", "stream"):
        raise ValueError(f"method: expected 'exact' or 'stream', got {method!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations: must be an integer >= 0, got {iterations!r}")
    if duals is not None:
        p = m * (c + 1)
        if not isinstance(duals, (tuple, list)) or len(duals) != 2:
            raise TypeError("duals: expected a pair (w, mu)")
        w = np.asarray(duals[0], dtype=np.float64).reshape(-1)
        if w.shape != (p,):
            raise ValueError(f"duals: w must have {p} values (m (c + 1) = {m} x {c + 1}), got {w.shape[0]}")
        if not (np.all(np.isfinite(w)) and np.isfinite(float(duals[1]))):
            raise ValueError("duals: contains NaN or Inf")
    problem = make_problem(target, m, None, budget, eps_rep, eps_assoc)
    return evaluate(problem, before, after, c, method=method, iterations=iterations,
                    group_names=group_names, label_names=label_names, duals=duals)
