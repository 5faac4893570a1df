"""The largest feasible budget, and the error that names it.

Feasibility is monotone in the budget (DESIGN.md §3b): if q is feasible at eta, then
(eta'/eta) q is feasible at every eta' < eta (every constraint is homogeneous in (q, eta)
and q stays in [0, 1]). So the feasible budgets are an interval (0, eta*] and bisection
finds eta* from any test "feasible at eta?". The test is the exact solver's own verdict:
"optimal" is feasible (every constraint within 1e-9), "infeasible" is certified by the
dual's recession, and a solve that stops at its iteration limit counts as not feasible, so
the budget returned is always one the solver met. A budget does not depend on utilities,
so the test runs on the pattern table (or on the data in memory) whenever one fits.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .. import _backend

__all__ = ["InfeasibleError", "bisect_budget", "largest_feasible_budget", "budget_text", "LOWEST", "RESOLUTION"]

LOWEST = 1e-3      # budgets below this are not searched (keeping < 0.1 % of the data is no balance)
RESOLUTION = 5e-4  # bisection stops when the bracket is this narrow: the result is within 1e-3


class InfeasibleError(ValueError):
    """The problem has no solution at the requested budget. ``report`` is the
    :class:`pym4.m4.Report` of the attempt (status "infeasible", the constraints named) and
    ``largest_budget`` the largest feasible budget (None: none >= 1e-3)."""

    def __init__(self, message: str, report=None, largest_budget: Optional[float] = None):
        super().__init__(message)
        self.report = report
        self.largest_budget = largest_budget


def bisect_budget(feasible: Callable[[float], bool], hi: float = 1.0) -> Optional[float]:
    """The largest eta in [LOWEST, hi] with ``feasible(eta)``, to within 1e-3 from below
    (None when LOWEST is not feasible): the feasible budgets are an interval (0, eta*]."""
    if feasible(hi):
        return float(hi)
    lo = LOWEST
    if not feasible(lo):
        return None
    while hi - lo > RESOLUTION:
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return float(lo)


def budget_text(largest: Optional[float]) -> str:
    """The sentence an infeasible report ends with."""
    if largest is None:
        return f"no budget >= {LOWEST:g} is feasible either (change the target or the tolerances)"
    # Rounded down, so that the printed budget is itself feasible.
    return (f"the largest feasible budget is {np.floor(largest * 1000) / 1000:.3f} "
            f"(budget='max', or --budget max, solves there)")


def solver_feasible(data, counts, target: np.ndarray, eps_rep: float, eps_assoc: float, m: int, c: int,
                    tol: float = 1e-9, max_iter: int = 100) -> Callable[[float], bool]:
    """feasible(eta) by the exact passes solver on one in-memory shard (a pattern table
    with its counts, or the rows), utilities dropped."""
    from . import _passes
    data = tuple(data[:5]) + (None,)

    def feasible(eta: float) -> bool:
        res = _passes.solve(lambda: [(data, counts)], (target, float(eta), eps_rep, eps_assoc), m, c,
                            tol=tol, max_iter=max_iter)
        return res.status == "optimal"
    return feasible


def largest_feasible_budget(s, y=None, *, target=None, eps_rep: float = 0.01, eps_assoc: float = 0.01) -> Optional[float]:
    """The largest budget eta in [1e-3, 1] at which the M4 problem of ``s`` (N, m) and ``y``
    (N, c) (0/1; y may be scipy CSR) with ``target`` (default: the mean group share) and the
    tolerances is feasible, to within 1e-3 from below; None when even 1e-3 is not.
    The exact solver decides at each budget, on the pattern table of the data when it fits
    (one hash aggregate; the solves then cost nothing in N)."""
    from . import _inputs, _passes
    s8 = _inputs.group_matrix(s)
    if s8.shape[0] == 0:
        raise ValueError("s: no examples")
    lab = _inputs.as_labels(y, s8.shape[0])
    pi = _inputs.target(target, s8.shape[1], s8)
    er = _inputs.scalar(eps_rep, "eps_rep", 0.0, float("inf"))
    ea = _inputs.scalar(eps_assoc, "eps_assoc", 0.0, float("inf"))
    if _backend.core() is None:
        raise RuntimeError("largest_feasible_budget: needs the compiled core (the exact solver)")
    data = _inputs.data_tuple(s8, lab, None)
    table = _passes.pattern_table([data], max_patterns=max(1, s8.shape[0] // 2))
    shard = table if table is not None else (data, None)
    return bisect_budget(solver_feasible(shard[0], shard[1], pi, er, ea, s8.shape[1], lab.c))
