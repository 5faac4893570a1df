"""balance(): validate, solve (exact or one stream pass), report; and sample()."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .. import _backend
from .._arrays import to_tensor
from . import _inputs, _problem
from . import _solver
from ._solver import M4Solver

_STATUS = {0: "optimal", 1: "infeasible", 2: "max_iter"}


@dataclass
class BalanceResult:
    """The output of :func:`balance`.

    q : (N,) keep probabilities (float64, the caller's array type).
    v_plus, v_minus : (m, c + 1) duals of the upper/lower bias constraints; column 0 is the
        representation constraint of each group, column 1 + r the association with label r.
    mu : dual of the budget.
    status : decided from q's own constraint values, the budget included, the same way for
        every method: "optimal" (every constraint within its tolerance, the budget to
        rounding or ``tol``), "approximate" (each within twice its tolerance, the budget within
        1 %), "max_iter" (farther: the exact solve stopped, or the stream's passes were not
        enough) or "infeasible"; ``message`` says why (naming the worst constraint, and for
        "infeasible" the largest feasible budget, also in ``report.largest_feasible_budget``).
    violations : per constraint, how far it is exceeded: ``budget`` |mean q - eta|,
        ``representation`` (m,) and ``association`` (m, c), each max(|value| - bound, 0).
    rb_before/rb_after, ab_before/ab_after: representation and association bias of the
        data, uniform and weighted by q.
    report : the :class:`~pym4.m4.Report` these fields come from (also its ``details()``).
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
    report: Optional[_problem.Report] = field(default=None, repr=False)

    def summary(self) -> Dict[str, Any]:
        """JSON-serialisable summary (no per-example arrays, no NaN): the report's, with the
        objective, the budget's dual and ``objective_gap_bound`` (the duality gap at the
        returned duals: q's objective is at most that far above the optimum), given only when
        q holds every constraint ("optimal"); else None, and ``objective_gap_note`` says why."""
        return {**self.report.summary(), "objective": self.objective, "mu": self.mu,
                "objective_gap_bound": self.report.objective_gap_bound,
                "objective_gap_note": self.report.objective_gap_note}


def balance(s, y=None, *, target=None, budget: float = 0.9, eps_rep: float = 0.01, eps_assoc: float = 0.01,
            utility=None, method: Optional[str] = None, seed: int = 0, max_iter: int = 100, tol: float = 1e-10,
            batch_size: int = 256, lr: float = 0.1, shuffle: bool = True, refine: int = 2,
            group_names: Optional[Sequence[str]] = None, label_names: Optional[Sequence[str]] = None,
            backend: Optional[str] = None) -> BalanceResult:
    """Keep probabilities that balance a dataset (M4; see :mod:`pym4.m4` for the problem).

    Parameters
    ----------
    s : (N, m) array, bool/uint8 or 0/1 floats
        Sensitive-group indicators; groups may overlap, rows may be all zero (unknown).
    y : (N, c) array (0/1) or scipy.sparse CSR matrix, optional
        Labels or proxies whose association with the groups is removed. c in the hundreds
        or thousands is handled through index lists.
    target : None, float or (m,) array in (0, 1)
        Target proportions pi. None: every group at the mean of the observed group shares.
    budget : float in (0, 1], or "max"
        eta, the expected fraction of data kept; "max": the largest budget at which the
        problem is feasible (to 1e-3, see :func:`pym4.m4.largest_feasible_budget`).
    eps_rep, eps_assoc : float >= 0
        Tolerances of the representation and association constraints (relative to eta).
    utility : (N,) array, optional
        u_i, a bonus for keeping example i. Only its differences matter: a constant added
        to every u_i is absorbed by mu (the budget fixes sum q), so the solvers see u less
        the mu of the problem without constraints, its far values clamped
        (:func:`center_utility`; a constant utility is no utility); ``mu`` is reported for
        u as given.
    method : None, "exact" or "stream"
        "exact": the dual solved to ``tol`` (proximal Newton, C++/OpenMP; the compiled core
        only). "stream": one pass of stochastic dual ascent over the examples in an order
        shuffled with ``seed`` (:func:`shuffled_order`; ``batch_size``, ``lr``), as :class:`M4Solver` does on data
        that does not fit in memory (the core, or torch); then ``refine`` Newton passes
        (:func:`~pym4.m4._solver.newton_model`: each re-linearises the dual at the current
        duals on every example and takes the model's maximiser), and the pass that writes q
        sets mu so that the budget holds exactly. None: "exact" where the core can run it,
        else "stream" (a pure-Python install, or ``backend="torch"``).
    refine : int >= 0
        Newton passes after the stream's pass (method="stream"), plus up to 3 more over
        every example while q is still past a bound (``iterations`` counts them); 0: the
        stream's duals as they are (its status then says how close they came).
    backend : {"cpu", "torch"}, optional
        Force an implementation (``pym4._backend``; PYM4_BACKEND when None).

    Returns
    -------
    BalanceResult (its ``report.objective_gap_bound``: the duality gap at the returned duals,
    so q's objective is at most that far above the optimum; None, with the reason in
    ``report.objective_gap_note``, unless the status is "optimal"); an infeasible problem gives ``status="infeasible"`` and a message naming
    the constraints that cannot hold together (a certificate of the dual's recession). Any
    status other than "optimal" also emits a RuntimeWarning carrying ``message``.
    """
    s8 = _inputs.group_matrix(s)
    n, m = s8.shape
    if n == 0:
        raise ValueError("s: no examples")
    lab = _inputs.as_labels(y, n)
    u_given = _inputs.utility(utility, n)
    t_in, origin = to_tensor(_inputs.dense_input(s), "s")
    largest, searched = None, False
    if isinstance(budget, str) and budget == "max":
        from ._feasibility import largest_feasible_budget
        largest, searched = largest_feasible_budget(s8, lab, target=target, eps_rep=eps_rep, eps_assoc=eps_assoc), True
        if largest is None:
            raise ValueError("budget='max': the problem is infeasible at every budget >= 0.001 "
                             "(change the target or the tolerances)")
        budget = largest
    problem = _problem.make_problem(target, m, s8, budget, eps_rep, eps_assoc)
    if method not in (None, "exact", "stream"):
        raise ValueError(f"method: expected 'exact', 'stream' or None, got {method!r}")
    max_iter = _inputs.positive_int(max_iter, "max_iter")
    seed = _inputs.seed(seed)
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 0:
        raise ValueError(f"refine: must be an integer >= 0, got {refine!r}")
    tol = _inputs.positive_number(tol, "tol")
    if not isinstance(shuffle, (bool, np.bool_)):  # shuffle="no" is truthy: it shuffled
        raise TypeError(f"shuffle: expected True or False, got {shuffle!r}")
    gnames, lnames = _inputs.names(group_names, m, "group"), _inputs.names(label_names, lab.c, "label")
    p = m * (lab.c + 1)
    u, u_shift, clamp = center_utility(u_given, problem.budget)

    if method is None:  # an automatic choice: the exact solve where it can run
        try:
            _backend.choose("m4_exact", "cpu", backend)
            method = "exact"
        except (RuntimeError, ValueError):
            method = "stream"
    elif method == "exact":
        try:
            _backend.choose("m4_exact", "cpu", backend)
        except RuntimeError as e:
            raise RuntimeError(f"balance: method='exact' runs in the compiled core ({e}); "
                               f"method='stream' runs without it") from None

    def solve(u):
        """(w, mu, q, before, after, status, iterations, passes, compressed, infeasible) for
        the centred utility u, by ``method``."""
        data = _inputs.data_tuple(s8, lab, u)
        infeasible: List[str] = []
        before = after = None
        if method == "exact":
            w, q = np.zeros(p), np.empty(n)
            core = _backend.core()
            info = core.m4_solve_exact(data, problem.core(), max_iter, float(tol), 1e6, w, q)
            status, iterations, mu = _STATUS[info["status"]], int(info["iterations"]), float(info["mu"])
            passes, compressed = int(info["passes"]), bool(info["compressed"])
            # The report's counts of q and of the data: one pass over the rows for both.
            K = _problem.counts_size(m, lab.c)
            after, before = np.zeros(K), np.zeros(K)
            core.m4_weighted_counts(_inputs.data_tuple(s8, lab, None), q, after, before)
            if status == "infeasible":
                big = np.abs(w) >= 1e-3 * np.abs(w).max()
                order = np.argsort(-np.abs(w))
                infeasible = [_problem.constraint_name(int(j), lab.c, gnames, lnames) for j in order if big[j]]
        else:
            solver = M4Solver(problem.target, budget=problem.budget, eps_rep=problem.eps_rep,
                              eps_assoc=problem.eps_assoc, lr=lr, batch_size=batch_size, backend=backend)
            solver._start_mu_at_budget = False  # u is centred at the budget's mu (center_utility)
            on_core = solver._backend_for("m4_fit", s8) == "cpu"
            # The core visits the rows in shuffled_order(n, seed) itself (seeds below 2^64).
            order = shuffled_order(n, seed) if shuffle and not (on_core and seed < 1 << 64) else None
            if on_core:  # the core gathers each mini-batch itself
                # The pass also counts the data (the report's counts, independent of the duals).
                before = np.zeros(_problem.counts_size(m, lab.c))
                solver._fit_core(s8, lab, u, order, counts_data=before,
                                 shuffle_seed=seed if shuffle and order is None else None)
            elif order is None:
                solver.partial_fit(s8, lab, u)
            else:
                solver.partial_fit(s8[order], lab.take(order), None if u is None else u[order])
            w, mu = solver.state.avg_w.copy(), float(solver.state.mu_avg)
            w, mu, before = _solver.refine_duals(s8, lab, u, problem, w, mu, refine, before=before)
            q, mu, after, counted = _solver.keep_probability_at_budget(s8, lab, u, problem, w, mu,
                                                                       want_before=before is None)
            before = counted if before is None else before
            iterations, status = solver.steps + refine, "optimal"
            passes, compressed = 1 + refine + 1, False  # the stream's pass, the refinement, the pass writing q
            # The sampled refinement's last step can end a hair past a bound (seen on rows sorted by
            # group or by label: 1e-5 on a bound of 8e-3). Up to EXTRA_NEWTON_PASSES more Newton
            # passes over every row, from duals by then near the optimum, each only while some
            # constraint is still past its bound (on an infeasible problem all of them run).
            for _ in range(EXTRA_NEWTON_PASSES if refine > 0 else 0):
                if not _past_a_bound(problem, before, after, lab.c):
                    break
                w, mu, _ = _solver.refine_duals(s8, lab, u, problem, w, mu, 1, before=before)
                q, mu, after, _ = _solver.keep_probability_at_budget(s8, lab, u, problem, w, mu)
                iterations += 1
                passes += 2  # the Newton pass and the pass writing q again

        return w, mu, q, before, after, status, iterations, passes, compressed, infeasible

    while True:
        w, mu, q, before, after, status, iterations, passes, compressed, infeasible = solve(u)
        # A clamped utility pins its rows at q = 1 (u at +clamp) or 0 (at -clamp); where the
        # duals leave them there, q solves the problem of the utility as given too (farther
        # values only pin them harder). Else the clamp was too tight: widen it, solve again.
        if clamp is None or clamp >= 1e300 or _pins_hold(u, clamp, q):
            break
        u, u_shift, clamp = center_utility(u_given, problem.budget, clamp * 1e6)

    if before is None:
        before = _problem.counts(s8, lab, None)
    if after is None:
        after = _problem.counts(s8, lab, q)
    rep = _problem.evaluate(problem, before, after, lab.c,
                            method=method, iterations=iterations, status=status, infeasible=infeasible,
                            group_names=gnames, label_names=lnames, duals=(w, mu), max_iter=max_iter,
                            slack=max(float(tol), 1e-9) if method == "exact" else 1e-9)
    rep.passes, rep.compressed = passes, compressed
    if rep.status == "infeasible" and _backend.core() is not None:  # the search needs the exact solver
        from ._feasibility import budget_text, largest_feasible_budget
        if not searched:
            largest = largest_feasible_budget(s8, lab, target=problem.target, eps_rep=problem.eps_rep,
                                              eps_assoc=problem.eps_assoc)
        rep.largest_feasible_budget = largest
        rep.message = f"{rep.message}; {budget_text(largest)}"
    elif searched:
        rep.largest_feasible_budget = largest
    # (1/N) sum 1/2 (q - eta)^2 - u q, as dot products: no N-sized temporaries but one.
    dq = q - problem.budget
    utility_term = _utility_term(u_given, u, u_shift, clamp, q)
    objective = 0.5 * float(dq @ dq) / n - utility_term
    mu += u_shift  # the budget's dual for the utility as given
    if rep.status != "optimal":  # q does not solve the problem: say so even to callers who skip .status
        warnings.warn(f"pym4.m4.balance: {rep.message}", RuntimeWarning, stacklevel=2)
    q_out = q if origin.is_numpy else torch.from_numpy(q).to(t_in.device)
    vp, vm = np.maximum(w, 0.0), np.maximum(-w, 0.0)
    return BalanceResult(
        q=q_out, v_plus=vp.reshape(m, lab.c + 1), v_minus=vm.reshape(m, lab.c + 1), mu=mu, status=rep.status,
        message=rep.message, objective=objective, violations=rep.violations, max_violation=rep.max_violation,
        rb_before=rep.rb_before, rb_after=rep.rb_after, ab_before=rep.ab_before, ab_after=rep.ab_after,
        target=problem.target, method=method, iterations=iterations,
        infeasible_constraints=rep.infeasible_constraints, report=rep)



def _pins_hold(u: np.ndarray, clamp: float, q: np.ndarray) -> bool:
    """Whether the rows of the centred utility u clamped at +-clamp have q = 1 (+) and 0 (-)."""
    return bool(np.all(q[u >= clamp] == 1.0) and np.all(q[u <= -clamp] == 0.0))


def _utility_term(u_given, u, shift: float, clamp, q: np.ndarray) -> float:
    """(1/N) sum u_i q_i for the utility as given, from its centred form u = u_given - shift:
    sum u q / N + shift mean q, and the clamped rows from u_given / N, so that a utility near
    float64's limit (1e308) gives a finite value, not u . q = inf."""
    if u_given is None:
        return 0.0
    n = q.shape[0]
    if u is None:  # a constant utility
        return shift * float(q.mean())
    free = slice(None) if clamp is None else (np.abs(u) < clamp)
    value = float(u[free] @ q[free]) / n + shift * (float(q[free].sum()) / n)
    if clamp is not None:
        value += float((u_given[~free] / n) @ q[~free])
    return value


# At most this many Newton passes over every row after ``refine`` ones, while q is past a bound.
EXTRA_NEWTON_PASSES = 3


def _past_a_bound(problem, before: np.ndarray, after: np.ndarray, c: int) -> bool:
    """Whether keep probabilities with weighted counts ``after`` (of data with counts
    ``before``) carry some constraint past its bound (by more than rounding)."""
    n = float(before[0])
    g = _problem.constraint_values(after, problem.m, c, problem.target, n)
    return bool(np.any(np.abs(g) > problem.tolerances(c) + 1e-12))


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """(n,) int64, a uniformly random permutation of range(n) drawn from ``seed``: the core's
    (``m4_shuffled_order``: shuffled in cache-sized buckets, several times faster than
    numpy's Fisher-Yates at n = 1e7), or numpy's ``default_rng(seed).permutation`` without the core
    or for seeds of 2^64 and above (a different permutation of the same distribution)."""
    core = _backend.core()
    if core is not None and seed < 1 << 64:
        return core.m4_shuffled_order(n, seed)
    return np.random.default_rng(seed).permutation(n)


# A centred utility is clamped to +-UTILITY_CLAMP (1 + its 99th percentile of |u|): farther
# values only pin q at 0 or 1, and left as they are they swamp the dual's value (one u = 1e300
# made every line search compare numbers at 1e300). balance() checks the pins and widens it.
UTILITY_CLAMP = 1e6


def center_utility(u: Optional[np.ndarray], budget: float, clamp: Optional[float] = None):
    """(centred u, shift, clamp), or (None, shift, None) for a constant utility and (None, 0,
    None) for none: the one place where both methods drop the part of u that cannot change q
    (sum q = N eta is fixed, so adding a constant to every u_i only shifts mu; without it
    u = 1e16 swamps eta in eta + u_i - a_i^T w - mu and rounds every q to 0 or 1).

    The shift is the mu of the problem without constraints, sum clip(eta + u_i - mu, 0, 1) =
    N eta (:func:`~pym4.m4._solver.budget_mu`), so that the solvers start from mu = 0 with q
    already at the budget. The midrange it replaces put a single outlier's half-range between
    the bulk and mu: one u = 1e3 among values in [0, 1] left the exact solve with every q
    at 0 and no step to take. The centred values are clamped to +-``clamp`` (default:
    :data:`UTILITY_CLAMP` times 1 + the 99th percentile of |u - median|, both of at most
    2^20 evenly spaced rows); a constant utility drops out entirely, and nothing overflows
    even at float64's limit (the mean of 1e308s did, making every q 0)."""
    if u is None:
        return None, 0.0, None
    lo, hi = float(u.min()), float(u.max())
    if lo == hi:
        return None, lo, None
    # The median and the spread only need to find the bulk (budget_mu places the shift, on
    # every row): from at most 2^20 evenly spaced rows, not copies of all N.
    few = u[::max(1, u.shape[0] >> 20)]
    center = float(np.median(few))
    with np.errstate(over="ignore"):  # 1e308 - (-1e308) is inf: the clamp takes it
        r = u - center
        if clamp is None:
            clamp = UTILITY_CLAMP * (1.0 + float(np.quantile(np.abs(few - center), 0.99)))
    clamp = min(clamp, 1e300)  # centred values stay finite (their sums too, divided by N)
    np.clip(r, -clamp, clamp, out=r)
    mu0 = _solver.budget_mu(budget + r, u.shape[0] * budget)
    r -= mu0
    np.clip(r, -clamp, clamp, out=r)
    return r, center + mu0, clamp


def sample(q, seed: int = 0):
    """Keep mask: ``keep_i ~ Bernoulli(q_i)`` independently, reproducible from ``seed``.

    q : (N,) probabilities in [0, 1] (numpy array or tensor); returns a bool mask of the same type.
    """
    seed = _inputs.seed(seed)
    t, origin = to_tensor(q, "q")
    if t.dim() != 1:
        raise ValueError(f"q: expected a 1-D array, got shape {tuple(t.shape)}")
    arr = t.detach().cpu().double().numpy()
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError("q: probabilities must be finite and in [0, 1]")
    keep = np.random.default_rng(seed).random(arr.shape[0]) < arr
    return keep if origin.is_numpy else torch.from_numpy(keep).to(origin.device)
