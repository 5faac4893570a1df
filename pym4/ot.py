"""Entropic optimal transport: :func:`sinkhorn_ot`, and POT's ``ot.sinkhorn`` for code
written for POT (``from pym4 import ot``).

``sinkhorn_ot`` solves general OT (any marginals, any cost) by the same iteration as
``pym4.sinkhorn`` (the passes of ``pym4._sinkhorn_passes``, or the core's ``sinkhorn_solve``).
``ot.sinkhorn`` has the signature, defaults, return values, log dict and warnings of POT's
``ot.sinkhorn`` (PythonOT/POT, ``ot/bregman/_sinkhorn.py``) for ``method="sinkhorn"`` and
``method="sinkhorn_log"``, over the same solve.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Optional

import numpy as np
import torch

from . import _backend
from ._arrays import (check_finite, check_float, check_int_at_least, check_ndim, check_positive_scalar,
                      from_tensor, to_tensor)
from ._sinkhorn_passes import _FLOAT32_MAX_EXPONENT, _TorchPasses, _iterate

__all__ = ["sinkhorn", "sinkhorn_ot", "ConvergenceWarning"]


class ConvergenceWarning(UserWarning):
    """A solver stopped at its iteration limit before reaching its tolerance."""


def sinkhorn_ot(a, b, cost, reg: float, *, n_iters: int = 1000, tol: float = 1e-9, log: bool = False,
                warmstart=None, warn: bool = True, backend: Optional[str] = None):
    """Entropic optimal transport by Sinkhorn-Knopp, the plan of POT's ``ot.sinkhorn``.

    Solves ``min_P <P, C> + reg * sum P (log P - 1)`` subject to ``P 1 = a``, ``P^T 1 = b``,
    ``P >= 0`` (Cuturi, 2013), whose solution is ``diag(u) exp(-C/reg) diag(v)``; here it is
    computed in the log domain, so small ``reg`` does not underflow.

    Parameters
    ----------
    a : array (n,), b : array (m,) or (m, h)
        Non-negative marginals with equal total mass; ``None`` for uniform. A 2-D ``b``
        holds h target histograms, solved one after the other against the same ``a``
        (POT's "multi b"); the result is then the h transport costs ``<P_k, C>``.
    cost : array (n, m)
        Cost matrix, float32/float64 (float16/bfloat16 accepted; their plan comes back in
        float32, which alone holds its marginals); a list is taken as float64. The plan is
        computed in the cost's precision, in float64 where float32 cannot hold max|cost|/reg
        (beyond 4096); a max|cost|/reg beyond 1e13, which float64 cannot resolve either, is
        refused (ValueError naming reg).
    reg : float
        Entropic regularisation, > 0.
    n_iters : int, default 1000
        Maximum number of (column, row) iterations (POT's ``numItermax``).
    tol : float, default 1e-9
        Stop once the column marginals are within ``tol`` of ``b`` in l2 norm (POT's
        ``stopThr``), measured after every iteration; 0 runs exactly ``n_iters`` iterations.
    log : bool, default False
        Also return a dict as POT's: ``err`` (the measured marginal errors), ``niter`` (index
        of the last iteration, from 0), ``u`` and ``v`` (the scalings, ``P = diag(u) K diag(v)``
        with ``K = exp(-C/reg)``) and ``log_u``, ``log_v`` (their logarithms; in POT only
        ``method="sinkhorn_log"`` has these). With a 2-D ``b`` they have a column per histogram.
    warmstart : (log_u (n,), log_v (m,)), optional
        Initial dual potentials (POT's ``warmstart``): the first column step starts from
        ``log_u`` (``log_v`` is replaced by it, as in POT). With a 2-D ``b``, (n, h) and (m, h).
    warn : bool, default True
        Emit a ``ConvergenceWarning`` when ``n_iters`` is reached without the error falling
        below ``tol`` (with ``tol=0`` that is every call, as in POT).

    Returns
    -------
    plan : array (n, m), same type, dtype and device as ``cost`` (for a 2-D ``b``: the
    costs, (h,)), and the log dict when ``log``. Rows of a plan sum to ``a`` exactly; its
    columns to ``b`` within ``tol``.
    """
    res, info = _sinkhorn_ot(a, b, cost, reg, n_iters, tol, warmstart, backend, check_every=1, gauge="ones",
                             potentials=log)
    if warn and not info["converged"]:
        warnings.warn(f"sinkhorn_ot: stopped after n_iters={n_iters} iterations with marginal error "
                      f"{info['last_err']:.3g}, not below tol={tol:g}; raise n_iters or reg", ConvergenceWarning,
                      stacklevel=2)
    if not log:
        return res
    return res, {k: info[k] for k in ("err", "niter", "u", "v", "log_u", "log_v")}


def _sinkhorn_ot(a, b, cost, reg, n_iters, tol, warmstart, backend, *, check_every: int, gauge: str,
                 potentials: bool, names=("cost", "n_iters", "tol")):
    """The OT solve behind ``sinkhorn_ot`` and ``pym4.ot.sinkhorn``: checks the input, solves
    each target histogram, returns (plan or costs, info). ``check_every``: measure the error
    every that many iterations (POT: 10). ``gauge``: "ones" puts POT's ``method="sinkhorn"``
    constant into u and v (its u starts at 1/n), "zeros" that of ``method="sinkhorn_log"``.
    ``potentials``: also compute u, v, log_u, log_v into info (one more pass over the cost).
    ``names``: what the caller calls the cost, n_iters and tol (POT: M, numItermax, stopThr)."""
    cost_name, n_iters_name, tol_name = names
    c, origin = to_tensor(_from_sequence(cost, cost_name), cost_name)
    c = c.detach()
    check_float(c, cost_name)
    check_ndim(c, 2, cost_name, " (n, m)")
    n, m = c.shape
    if n == 0 or m == 0:
        raise ValueError(f"{cost_name}: expected a non-empty matrix, got shape {tuple(c.shape)}")
    reg = check_positive_scalar(reg, "reg")
    n_iters = check_int_at_least(n_iters, 1, n_iters_name)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"{tol_name}: expected a number, got {tol!r}")
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"{tol_name}: must be a finite number >= 0, got {tol!r}")
    tol = float(tol)
    if c.dtype in (torch.float16, torch.bfloat16):
        # A half-precision plan cannot carry its marginals: rounding each entry to 11 (8) bits
        # leaves rows and columns off by ~1e-4 (1e-3), far beyond tol. The plan is computed
        # in float32 and returned in float32.
        origin = dataclasses.replace(origin, dtype=torch.float32)
    lo, hi = torch.aminmax(c)  # one read: finiteness and the size of the exponents cost/reg
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(f"{cost_name}: contains NaN or Inf")
    exponent = max(-float(lo), float(hi)) / reg
    if exponent > _FLOAT64_MAX_EXPONENT:
        raise ValueError(f"reg: too small for this cost: max |{cost_name}| / reg = {exponent:.3g} exceeds "
                         f"{_FLOAT64_MAX_EXPONENT:.0e}, beyond which float64 cannot resolve exp(-cost / reg); "
                         f"raise reg or rescale the cost")
    # float32 holds exp(-cost/reg) only while cost/reg stays small (as in pym4.sinkhorn).
    dtype = torch.float64 if c.dtype == torch.float64 or exponent > _FLOAT32_MAX_EXPONENT else torch.float32
    a_t = _marginal(_from_sequence(a, "a"), n, "a", c.device)
    b = _from_sequence(b, "b")
    b_t = _marginals(b, m, "b", c.device)  # (m, h)
    hists = b_t.shape[1]
    mass_a = float(a_t.sum())
    for k in range(hists):
        mass_b = float(b_t[:, k].sum())
        if abs(mass_a - mass_b) > 1e-6 * max(mass_a, mass_b):
            which = "b" if hists == 1 else f"b[:, {k}]"
            raise ValueError(f"a, b: marginals must have the same total mass, got sum(a)={mass_a:.9g} and "
                             f"sum({which})={mass_b:.9g}")
    f0 = _warmstart(warmstart, n, m, hists, c.device)
    log_a = torch.log(a_t)
    name = _backend.choose("sinkhorn_ot", c.device.type, backend)
    x = c.to(dtype).contiguous()
    alpha = -1.0 / reg
    plans, gs, infos = [], [], []
    for k in range(hists):
        log_b = torch.log(b_t[:, k].contiguous())
        g_init = None
        if f0 is not None:  # the first column step from the given row potentials, in float64
            g_init = log_b - torch.logsumexp(alpha * x.double() + f0[:, k:k + 1], dim=0)
            g_init = torch.where(torch.isinf(log_b), log_b, g_init).contiguous()
        if name == "cpu":
            out = torch.empty_like(x)
            iters, err, g, _, converged, errors = _backend.core().sinkhorn_solve(
                x.numpy(), alpha, log_b.numpy(), log_a.numpy(), n_iters, float(tol), 0.0, out.numpy(),
                None if g_init is None else g_init.numpy(), check_every)
            g = torch.from_numpy(g)
        else:
            out, iters, err, g, converged, errors = _iterate(_TorchPasses(x, alpha), log_b, log_a, n_iters,
                                                            float(tol), 0.0, g_init=g_init, check_every=check_every)
        if math.isnan(err) or bool((torch.isnan(g) | (g == math.inf)).any()):
            # A column's mass underflowed to 0 (its only mass-carrying rows are far away in
            # cost/reg: zero marginals elsewhere, small reg), so log(0) made its potential
            # +inf and the plan NaN. Redo it with every sum in the log domain, in float64.
            out, iters, err, g, converged, errors = _solve_log_sums(x.double(), alpha, log_b, log_a, n_iters,
                                                                   float(tol), g_init, check_every)
            out = out.to(x.dtype)
        plans.append(out)
        gs.append(g)
        infos.append((iters, err, converged, list(errors)))
    info = {"converged": all(i[2] for i in infos), "last_err": max(i[1] for i in infos),
            "niter": max(i[0] for i in infos) - 1, "err": infos[0][3] if hists == 1 else [i[3] for i in infos]}
    if potentials:
        info.update(_potentials(x, alpha, log_a, gs, math.log(n) if (gauge == "ones" and f0 is None) else 0.0,
                                _is_2d(b), origin))
    if not _is_2d(b):
        return from_tensor(plans[0], origin), info
    costs = torch.stack([(p.double() * x.double()).sum() for p in plans])
    return from_tensor(costs, origin), info


def _solve_log_sums(x: torch.Tensor, alpha: float, log_b: torch.Tensor, log_a: torch.Tensor, n_iters: int,
                    tol: float, g_init: Optional[torch.Tensor], check_every: int):
    """The iteration of ``_iterate`` (same steps, same measurements, same return values) with
    the column step taken as a log-sum-exp, ``g_j = log b_j - LSE_i(alpha x_ij + f_i)``, instead
    of from the column masses (``g_j + log b_j - log mass_j``), which underflow to 0 when every
    row carrying mass is far from a column. POT's ``method="sinkhorn_log"``; float64 x.
    Zero-mass rows and columns keep -inf potentials and get exact zeros in the plan."""
    every = check_every if check_every > 0 else (1 if tol > 0 else 0)
    b = torch.exp(log_b)
    rows_zero, cols_zero = torch.isinf(log_a), torch.isinf(log_b)
    k = alpha * x

    def row_potential(g):
        return torch.where(rows_zero, log_a, log_a - torch.logsumexp(k + g[None, :], dim=1))

    def column_masses(g, f):
        return torch.exp(torch.logsumexp(k + f[:, None], dim=0) + g)

    def column_potential(f):
        return torch.where(cols_zero, log_b, log_b - torch.logsumexp(k + f[:, None], dim=0))

    g = g_init.double() if g_init is not None else column_potential(torch.zeros_like(log_a))
    errors, converged, err, iters = [], False, 0.0, 1
    for iters in range(1, n_iters + 1):
        if iters == n_iters:
            break
        f = row_potential(g)
        if every > 0 and (iters - 1) % every == 0:
            err = float(torch.linalg.vector_norm(column_masses(g, f) - b))
            errors.append(err)
            converged = tol > 0 and err < tol
            if converged:
                break
        g = column_potential(f)
    f = row_potential(g)
    plan = torch.exp(k + g[None, :] + f[:, None])
    if every > 0:
        err = float(torch.linalg.vector_norm(plan.sum(dim=0) - b))
        if not converged and (iters - 1) % every == 0:
            errors.append(err)
            converged = tol > 0 and err < tol
    return plan, iters, err, g, converged, errors


def _from_sequence(v, name: str):
    """POT takes lists: a (nested) list or tuple of numbers becomes a float64 numpy array."""
    if isinstance(v, (list, tuple)):
        try:
            return np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected an array or a (nested) list of numbers") from None
    return v


def _potentials(x, alpha, log_a, gs, shift, multi, origin) -> dict:
    """POT's u, v, log_u, log_v from the column potentials g of each histogram's solve."""
    # POT's gauge: its u starts at 1/n ("ones") or exp(0) ("zeros"); ours at exp(0); a warm
    # start fixes it for both. The constant (shift) moves between u and v, not the plan.
    log_v = torch.stack([g.to(torch.float64) for g in gs], dim=1) + shift  # (m, h)
    # log u_i = log a_i - LSE_j(alpha C_ij + log v_j): the row step that wrote the plan.
    log_u = torch.stack([torch.where(torch.isinf(log_a), log_a,
                                     log_a - torch.logsumexp(alpha * x.double() + log_v[:, k], dim=1))
                         for k in range(len(gs))], dim=1)
    squeeze = (lambda t: t) if multi else (lambda t: t[:, 0])
    return {key: from_tensor(squeeze(t).contiguous(), origin)
            for key, t in (("log_u", log_u), ("log_v", log_v), ("u", torch.exp(log_u)), ("v", torch.exp(log_v)))}


def _is_2d(v) -> bool:
    return v is not None and np.ndim(v) == 2


def _marginal(v, n: int, name: str, device) -> torch.Tensor:
    if v is None or (hasattr(v, "__len__") and getattr(v, "ndim", 1) != 0 and len(v) == 0):  # (0-d: refused below)
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    t, _ = to_tensor(v, name)
    t = t.detach()
    check_float(t, name)
    check_ndim(t, 1, name)
    if t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries to match cost, got {t.shape[0]}")
    t = t.to(device=device, dtype=torch.float64)
    check_finite(t, name)
    if bool((t < 0).any()):
        raise ValueError(f"{name}: marginals must be non-negative")
    total = float(t.sum())
    if not total > 0:
        raise ValueError(f"{name}: marginals must have positive total mass")
    if total == math.inf:  # (two such sums compared equal: inf == inf, and the plan was inf)
        raise ValueError(f"{name}: the total mass overflows float64 (entries up to {float(t.max()):.3g}); "
                         "rescale the marginals")
    return t.contiguous()


def _marginals(v, n: int, name: str, device) -> torch.Tensor:
    """Column marginals as an (n, h) float64 matrix: one column for a vector (or None), h for
    an (n, h) array of h histograms."""
    if _is_2d(v):
        t, _ = to_tensor(v, name)
        check_float(t, name)
        if t.shape[0] != n or t.shape[1] == 0:
            raise ValueError(f"{name}: expected shape ({n}, h >= 1) to match cost, got {tuple(t.shape)}")
        return torch.stack([_marginal(t[:, k], n, name, device) for k in range(t.shape[1])], dim=1)
    return _marginal(v, n, name, device).reshape(n, 1)


def _warmstart(warmstart, n: int, m: int, hists: int, device) -> Optional[torch.Tensor]:
    """The row potentials log_u of a warm start, as (n, h) float64 (log_v is not needed: the
    first column step replaces it, as in POT)."""
    if warmstart is None:
        return None
    if not isinstance(warmstart, (tuple, list)) or len(warmstart) != 2:
        raise TypeError("warmstart: expected a pair (log_u, log_v) of dual potentials")
    shapes = ((n,), (m,)) if hists == 1 else ((n, hists), (m, hists))
    parts = []
    for part, shape, what in zip(warmstart, shapes, ("log_u", "log_v")):
        t, _ = to_tensor(_from_sequence(part, f"warmstart {what}"), f"warmstart {what}")
        t = t.detach()
        check_float(t, f"warmstart {what}")
        if tuple(t.shape) != shape:
            raise ValueError(f"warmstart: {what} must have shape {shape}, got {tuple(t.shape)}")
        t = t.to(device=device, dtype=torch.float64)
        if bool(torch.isnan(t).any()) or bool((t == math.inf).any()):
            raise ValueError(f"warmstart: {what} contains NaN or +Inf")
        parts.append(t)
    log_u = parts[0].reshape(n, hists)
    # -inf marks a row with no mass (u_i = 0, as POT's log_u has for a_i = 0): the first
    # column step sums over the others, so at least one must be finite, or every column's
    # potential is +inf and the plan NaN.
    if not bool(torch.isfinite(log_u).any(dim=0).all()):
        raise ValueError("warmstart: log_u is -inf in every row" + (" of some histogram" if hists > 1 else "")
                         + " (no mass anywhere): nothing to start from; pass warmstart=None")
    return log_u


# Largest max |cost| / reg solved: float64 rounds an exponent v by v * 2^-53, 1e-3 here. Beyond
# it the plan would be noise, so it is refused (naming reg). float32 costs are solved in
# float64 beyond pym4.sinkhorn's bound for float32.
_FLOAT64_MAX_EXPONENT = 1e13
_FLOAT32_MAX_EXPONENT = 4096.0

_METHODS = ("sinkhorn", "sinkhorn_log")


def sinkhorn(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
             warmstart=None, **kwargs):
    r"""Entropic regularised optimal transport plan, as POT's ``ot.sinkhorn``.

    .. math::
        \gamma = \arg\min_\gamma \langle \gamma, M \rangle_F + \mathrm{reg} \sum_{ij} \gamma_{ij}
        (\log \gamma_{ij} - 1) \quad \text{s.t.} \quad \gamma 1 = a,\ \gamma^T 1 = b,\ \gamma \ge 0

    (Cuturi, 2013). Both methods run the same log-domain-safe solver, so
    ``method="sinkhorn"`` does not underflow at small ``reg`` as POT's does; they differ
    only in what the log dict holds, as in POT.

    Parameters
    ----------
    a : array (n,)  — source histogram (empty or None: uniform)
    b : array (m,) or (m, h)  — target histogram(s); with h columns the result is the h
        transport costs (POT's "multi b")
    M : array (n, m)  — cost matrix (numpy or torch, float32/float64; half precision is
        solved and returned in float32, see gamma)
    reg : float  — regularisation, > 0
    method : {"sinkhorn", "sinkhorn_log"}
    numItermax : int, default 1000  — maximum number of iterations
    stopThr : float, default 1e-9  — stop when the l2 error of the column marginals is below
        it, measured every 10 iterations as POT does
    verbose : bool  — print the measured errors
    log : bool  — also return a dict: ``err``, ``niter``, ``u``, ``v`` (and ``log_u``,
        ``log_v`` for ``method="sinkhorn_log"``)
    warn : bool, default True  — warn when ``numItermax`` is reached without convergence
    warmstart : (log_u, log_v), optional  — initial dual potentials

    Returns
    -------
    gamma : array (n, m) of M's type and dtype (for a 2-D b: the costs, (h,)); float32 for
    a float16/bfloat16 M, where POT answers in M's dtype: rounded to half precision, a plan's
    rows and columns are off its marginals by ~1e-4 (1e-3), far beyond stopThr. And the log
    dict when ``log``.
    """
    if kwargs:
        raise TypeError(f"sinkhorn: unexpected keyword argument(s) {sorted(kwargs)} (pym4.ot.sinkhorn supports "
                        f"method='sinkhorn' and 'sinkhorn_log' without extra options)")
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(f"method: pym4.ot.sinkhorn supports {_METHODS}, got {method!r}")
    method = method.lower()
    res, info = _sinkhorn_ot(a, b, M, reg, numItermax, stopThr, warmstart, None, check_every=10,
                             gauge="ones" if method == "sinkhorn" else "zeros", potentials=bool(log),
                             names=("M", "numItermax", "stopThr"))
    if verbose:
        for k, err in enumerate(info["err"] if not info["err"] or not isinstance(info["err"][0], list)
                                else info["err"][0]):
            if k % 20 == 0:
                print("{:5s}|{:12s}".format("It.", "Err") + "\n" + "-" * 19)
            print("{:5d}|{:8e}|".format(10 * k, err))
    if warn and not info["converged"]:
        warnings.warn("Sinkhorn did not converge. You might want to increase the number of iterations `numItermax` "
                      "or the regularization parameter `reg`.", ConvergenceWarning, stacklevel=2)
    if not log:
        return res
    keys = ("err", "niter", "u", "v") if method == "sinkhorn" else ("err", "niter", "log_u", "log_v", "u", "v")
    if method == "sinkhorn_log" and getattr(b, "ndim", 1) == 2:
        keys = keys[2:]  # POT's multi-b sinkhorn_log keeps only the potentials
    return res, {k: info[k] for k in keys}
