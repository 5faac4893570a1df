"""Sinkhorn-Knopp: SwAV/SEER equipartition and general entropic optimal transport.

Both run the same iteration (``csrc/include/pym4/sinkhorn.h``): the plan is
``P_ij = exp(alpha * x_ij + g_j + f_i)`` with a column potential ``g`` and a row
potential ``f``, so one iteration is one read of the matrix. On the CPU it runs in the
kernel (scaling) form, one exponential per entry, when the spread of ``alpha * x`` keeps
those normal, and in the log domain otherwise, so no exponential overflows whatever
epsilon is.
"""
from __future__ import annotations

import math
import sys
import threading
import warnings
from typing import Optional

import numpy as np
import torch

from . import _backend
from ._arrays import (check_finite, check_float, check_int_at_least, check_ndim, check_positive_scalar,
                      from_tensor, to_tensor)

__all__ = ["sinkhorn", "sinkhorn_ot", "ConvergenceWarning"]

_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class ConvergenceWarning(UserWarning):
    """A solver stopped at its iteration limit before reaching its tolerance."""


def sinkhorn(scores, epsilon: float = 0.05, n_iters: int = 3, *, prototypes=None, chunk: Optional[int] = None,
             group=None, out=None, backend: Optional[str] = None):
    """SwAV's Sinkhorn-Knopp equipartition of a batch over prototypes.

    Computes the codes of SwAV (Caron et al., 2020; `distributed_sinkhorn`) and SEER
    (Goyal et al., 2021): with ``P = exp(scores / epsilon)`` normalised to total mass 1,
    ``n_iters`` times give every prototype (column) mass 1/K, then every sample (row) mass
    1/B; return ``B * P``.

    Parameters
    ----------
    scores : array (B, K), float32/float16/bfloat16 (float64 accepted)
        Similarities of B samples to K prototypes (numpy array or torch tensor, CPU or CUDA).
        With ``prototypes``, this is instead the (B, D) feature matrix z.
    epsilon : float, default 0.05
        Entropic regularisation; 0.01 to 0.1 with scores in [-1, 1] is the usual range.
    n_iters : int, default 3
        Number of (column, row) normalisation pairs.
    prototypes : array (K, D), optional
        Features form: the scores ``z @ prototypes.T`` are computed ``chunk`` rows at a time
        in every pass and never stored, so only the (B, K) result is materialised.
    chunk : int, optional
        Rows per block in the features form (default: about 16 MB of scores per block).
    group : torch.distributed.ProcessGroup, optional
        When given, the batch is split across the group's ranks: B is the global batch and
        the prototype sums are all-reduced every iteration, as SwAV does.
    out : array (B, K), optional
        Where to write Q: the same array type, dtype and device as ``scores``, C-contiguous,
        not overlapping ``scores``. A training loop that passes last step's buffer saves
        allocating (and the kernel zeroing) a fresh B x K result every step.
    backend : {"cpu", "cuda", "torch"}, optional
        Force an implementation (default: the best available; see ``pym4._backend``).

    Returns
    -------
    Q : array (B, K), the type, dtype and device of ``scores`` (``out`` when given)
        Soft assignments: every row sums to 1; each column sums to about B/K over the
        global batch (exactly after the last column step, which the final row step follows).

    Computed in float32 (on the CPU, float64 for float64 input), in the log domain wherever
    the kernel form could overflow, so epsilon down to 0.01 and float16 inputs stay finite. Raises ValueError on NaN/Inf scores.
    """
    t, origin = to_tensor(scores, "scores")
    check_float(t, "scores")
    what = " (batch, features)" if prototypes is not None else " (batch, prototypes)"
    check_ndim(t, 2, "scores", what)
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"scores: expected a non-empty{what} matrix, got shape {tuple(t.shape)}")
    eps = check_positive_scalar(epsilon, "epsilon")
    n_iters = check_int_at_least(n_iters, 1, "n_iters")
    alpha = 1.0 / eps
    out_t = None if out is None else _check_out(out, t, origin, prototypes)
    if prototypes is not None:
        q = _sinkhorn_features(t, prototypes, alpha, n_iters, chunk, group, backend, out_t)
        return out if q is out_t is not None else _deliver(q, origin, out, out_t)
    if chunk is not None:
        raise ValueError("chunk: only used with prototypes= (the features form)")
    name = _backend.choose("sinkhorn" if group is None else "sinkhorn_distributed", t.device.type, backend)

    if name == "cpu" and group is None and out_t is not None and out_t.dtype == _compute_dtype(t.dtype):
        _swav_cpu(t, alpha, n_iters, out=out_t)  # written in place: no allocation at all
        return out
    if group is not None:
        b_global = _global_batch(t.shape[0], t.shape[1], bool(torch.isfinite(t).all()), group, t.device)
        if name == "cuda":  # the CUDA kernel, pass by pass, all-reducing between passes
            passes = _CudaPasses(t if t.dtype in _CUDA_DTYPE_CODES else t.float(), alpha)
        else:
            x = t.to(_compute_dtype(t.dtype))
            passes = _CorePasses(x, alpha) if name == "cpu" else _TorchPasses(x, alpha)
        q = _swav_iterate(passes, t.shape[1], b_global, n_iters, t.device, group)
    elif name == "cpu":
        q = _swav_cpu(t, alpha, n_iters)
    elif name == "cuda":
        q = _swav_cuda(t, alpha, n_iters)
    elif name == "triton":
        q = _swav_triton(t, alpha, n_iters, out_t)
        if q is out_t:
            return out
    else:
        x = t.to(_compute_dtype(t.dtype))
        dest = out_t if out_t is not None and out_t.dtype == x.dtype else None
        q = _swav_torch_kernel_form(x, alpha, n_iters, dest)
        if q is dest is not None:
            return out
        if q is None:  # the spread of scores/epsilon needs the log domain (or the input is not finite)
            check_finite(t, "scores")
            q = _swav_iterate(_TorchPasses(x, alpha), t.shape[1], t.shape[0], n_iters, t.device)
    return _deliver(q, origin, out, out_t)


def _check_out(out, t: torch.Tensor, origin, prototypes) -> torch.Tensor:
    """Validate a caller's output buffer before any work; returns its torch view."""
    o, o_origin = to_tensor(out, "out")
    k = to_tensor(prototypes, "prototypes")[0].shape[0] if prototypes is not None else t.shape[1]
    if o_origin.is_numpy != origin.is_numpy:
        raise TypeError(f"out: must be a {'numpy array' if origin.is_numpy else 'torch tensor'} like scores")
    if tuple(o.shape) != (t.shape[0], k):
        raise ValueError(f"out: expected shape {(t.shape[0], k)}, got {tuple(o.shape)}")
    if o.dtype != origin.dtype or o.device != origin.device:
        raise ValueError(f"out: expected dtype {origin.dtype} on {origin.device} like scores, "
                         f"got {o.dtype} on {o.device}")
    if not o.is_contiguous():
        raise ValueError("out: must be C-contiguous")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out: is read-only")
    if o.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        raise ValueError("out: must not share memory with scores")
    return o


def _deliver(q: torch.Tensor, origin, out, out_t):
    """The result in the caller's type, or copied into their ``out`` buffer."""
    if out_t is None:
        return from_tensor(q, origin)
    out_t.copy_(q)
    return out


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
        Cost matrix; float32 or float64 (the plan is computed in the cost's precision).
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
                 potentials: bool):
    """The OT solve behind ``sinkhorn_ot`` and ``pym4.ot.sinkhorn``: checks the input, solves
    each target histogram, returns (plan or costs, info). ``check_every``: measure the error
    every that many iterations (POT: 10). ``gauge``: "ones" puts POT's ``method="sinkhorn"``
    constant into u and v (its u starts at 1/n), "zeros" that of ``method="sinkhorn_log"``.
    ``potentials``: also compute u, v, log_u, log_v into info (one more pass over the cost)."""
    c, origin = to_tensor(cost, "cost")
    check_float(c, "cost")
    check_ndim(c, 2, "cost", " (n, m)")
    n, m = c.shape
    if n == 0 or m == 0:
        raise ValueError(f"cost: expected a non-empty matrix, got shape {tuple(c.shape)}")
    reg = check_positive_scalar(reg, "reg")
    n_iters = check_int_at_least(n_iters, 1, "n_iters")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol: must be a finite number >= 0, got {tol!r}")
    check_finite(c, "cost")
    dtype = _compute_dtype(c.dtype)
    a_t = _marginal(a, n, "a", c.device)
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


# ----- helpers -------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _marginal(v, n: int, name: str, device) -> torch.Tensor:
    if v is None or (hasattr(v, "__len__") and len(v) == 0):
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    t, _ = to_tensor(v, name)
    check_float(t, name)
    check_ndim(t, 1, name)
    if t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries to match cost, got {t.shape[0]}")
    t = t.to(device=device, dtype=torch.float64)
    check_finite(t, name)
    if bool((t < 0).any()):
        raise ValueError(f"{name}: marginals must be non-negative")
    if not float(t.sum()) > 0:
        raise ValueError(f"{name}: marginals must have positive total mass")
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
        t, _ = to_tensor(part, f"warmstart {what}")
        check_float(t, f"warmstart {what}")
        if tuple(t.shape) != shape:
            raise ValueError(f"warmstart: {what} must have shape {shape}, got {tuple(t.shape)}")
        t = t.to(device=device, dtype=torch.float64)
        if bool(torch.isnan(t).any()) or bool((t == math.inf).any()):
            raise ValueError(f"warmstart: {what} contains NaN or +Inf")
        parts.append(t)
    return parts[0].reshape(n, hists)


class _ResultPool:
    """Memory for fresh CPU results, reused once the caller has dropped them.

    A fresh B x K result from the system allocator is new pages that the kernel zeroes on
    first touch (49 MB at SwAV's 4096 x 3000: a fifth of the whole solve). A training loop
    drops each step's codes before the next step, so the pool hands out a buffer only
    when nothing outside it refers to it any more (numpy's reference count: a tensor made by
    torch.from_numpy, its views and its .numpy() all keep the array alive); the result is
    still a new tensor sharing memory with nothing alive. Only large results are pooled, at
    most ``keep`` buffers (SwAV's two crops hold two codes at once).
    """

    min_bytes = 1 << 22
    keep = 2

    def __init__(self):
        self._arrays = []
        self._lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        if nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            for i in range(len(self._arrays)):  # (enumerate's reused tuple would hold one more reference)
                arr = self._arrays[i]
                # 3 references: the list, `arr` and getrefcount's argument; more: still in use.
                if arr.dtype == np_dtype and arr.size == int(np.prod(shape)) and sys.getrefcount(arr) == 3:
                    self._arrays.append(self._arrays.pop(i))  # most recently used last
                    return torch.from_numpy(arr.reshape(shape))
            arr = None
            arr = np.empty(shape, dtype=np_dtype)
            self._arrays.append(arr)
            if len(self._arrays) > self.keep:
                self._arrays.pop(0)  # the least recently used leaves the pool (its user keeps it)
            return torch.from_numpy(arr)


_RESULTS = _ResultPool()


def _swav_cpu(t: torch.Tensor, alpha: float, n_iters: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    x = t.to(_compute_dtype(t.dtype))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = _RESULTS.empty(tuple(x.shape), x.dtype)
    b = x.shape[0]
    # Rows carry mass 1/B during the iterations; the plan is written times B (rows sum to 1).
    _backend.core().sinkhorn_solve(x.numpy(), alpha, None, -math.log(b), n_iters, 0.0, math.log(b), out.numpy())
    return out


def _swav_triton(t: torch.Tensor, alpha: float, n_iters: int,
                 out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The Triton kernels (kernels/sinkhorn.py); writes into ``out`` when its dtype is one
    Triton stores (float32/16, bfloat16), which may be ``t`` itself (in place: None when
    the kernel form declined, the input then overwritten)."""
    from pym4.kernels import sinkhorn as kernels  # lazily: triton is optional

    x = t if t.dtype in _CUDA_DTYPE_CODES else t.float()
    b, k = x.shape
    if out is not None and out.dtype not in _CUDA_DTYPE_CODES:
        out = None
    log_a = torch.full((b,), -math.log(b), dtype=torch.float32, device=x.device)
    log_b = torch.full((k,), -math.log(k), dtype=torch.float32, device=x.device)
    result = kernels.sinkhorn(x, alpha, n_iters, log_a, log_b, math.log(b), out)
    return None if result is None else result[0]  # None: an in-place solve declined (see kernels)


def _swav_cuda(t: torch.Tensor, alpha: float, n_iters: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The CUDA kernel of the core; ``out`` (dtype of the input) may be ``t`` itself: every
    element is read and then written by the same thread, never read again."""
    core = _backend.core()
    x = t if t.dtype in _CUDA_DTYPE_CODES else t.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, k = x.shape
    if out is None:
        out = torch.empty((b, k), dtype=x.dtype, device=x.device)
    workspace = torch.empty(core.sinkhorn_workspace_bytes_cuda(b, k), dtype=torch.uint8, device=x.device)
    non_finite = torch.zeros(1, dtype=torch.int32, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        core.sinkhorn_solve_cuda(x.data_ptr(), _CUDA_DTYPE_CODES[x.dtype], b, k, x.stride(0), alpha, 0,
                                 -math.log(b), n_iters, math.log(b), out.data_ptr(), workspace.data_ptr(),
                                 non_finite.data_ptr(), stream)
    if int(non_finite.item()):
        raise ValueError("scores: contains NaN or Inf (or overflows once divided by epsilon)")
    return out


# Largest spread (max - min) of alpha * x for which the kernel form is exact: every entry of
# exp(alpha x - shift) is then a normal number (float32: e^-80 > 1.2e-38), as in the core.
_KERNEL_FORM_SPREAD = {torch.float32: 80.0, torch.float64: 650.0}


def _swav_torch_kernel_form(x: torch.Tensor, alpha: float, n_iters: int, dest: Optional[torch.Tensor] = None,
                            in_place: bool = False) -> Optional[torch.Tensor]:
    """SwAV's iteration in the kernel (scaling) form, in plain torch on any device.

    With E = exp(alpha x - c) (B, K) formed once, the plan is P = diag(s) E diag(w), and an
    iteration is two matrix-vector products instead of SwAV's four full passes that read
    and write the matrix: the column step w = 1/(E^T s), the row step s = 1/(E w). With
    uniform marginals (every column 1/K, every row 1/B) the constants 1/K and 1/B cancel
    out of B * P, so they are never applied. E lives in ``dest`` (or ``x`` itself when
    ``in_place``, or a fresh tensor) and is scaled into B * P in place at the end.

    Returns None, with ``dest`` unspecified (and ``x`` too when ``in_place``), when the
    spread of alpha * x is too large for this form (or x is not finite) or a scaling
    vector left the floating-point range: the caller then runs the log domain.
    """
    limit = _KERNEL_FORM_SPREAD[x.dtype]
    lo, hi = torch.aminmax(x)  # NaN propagates, so a non-finite input fails the test below
    lo, hi = alpha * float(lo), alpha * float(hi)
    if not (hi - lo <= limit):
        return None
    e = x if in_place else (dest if dest is not None else torch.empty_like(x, memory_format=torch.contiguous_format))
    torch.mul(x, alpha, out=e)
    # Shift only when exp(alpha x) itself could leave the range (or its column sums overflow).
    if hi > limit / 2 or lo < -limit / 2:
        e.sub_(hi)
    e.exp_()
    w = e.sum(dim=0).reciprocal_()
    for _ in range(n_iters - 1):
        s = torch.mv(e, w).reciprocal_()
        w = torch.mv(e.t(), s).reciprocal_()
    s = torch.mv(e, w).reciprocal_()
    # Every entry of E is positive, so an overflow or underflow anywhere in the iteration
    # ends in a zero, infinite or NaN entry of the last s or w.
    s_lo, s_hi = torch.aminmax(s)
    w_lo, w_hi = torch.aminmax(w)
    if not (float(s_lo) > 0 and float(w_lo) > 0 and float(s_hi) < math.inf and float(w_hi) < math.inf):
        return None
    return e.mul_(w).mul_(s.unsqueeze(1))


class _TorchPasses:
    """The three passes of the log-domain iteration in plain torch (reference and fallback)."""

    def __init__(self, x: torch.Tensor, alpha: float):
        self.x, self.alpha = x, alpha

    # Every pass allocates one B x K temporary and works on it in place: a fresh 50 MB
    # tensor costs more in page faults than the arithmetic on it.
    def column_logsumexp(self):
        t = self.x * self.alpha
        col_max = t.amax(dim=0)
        col_sum = t.sub_(col_max).exp_().sum(dim=0)
        return col_max.double(), col_sum.double()

    def _row_step(self, g, log_a):
        # Row i of the plan is a_i * softmax_j(alpha x_ij + g_j), shifted by the row maximum.
        t = (self.x * self.alpha).add_(g.to(self.x.dtype))
        t.sub_(t.amax(dim=1, keepdim=True)).exp_()
        scale = torch.exp(torch.as_tensor(log_a, dtype=torch.float64, device=t.device))
        scale = (scale.reshape(-1, 1) if scale.dim() else scale) / t.sum(dim=1, keepdim=True).double()
        return t.mul_(scale.to(t.dtype))

    def row_pass(self, g, log_a):
        return self._row_step(g, log_a).sum(dim=0).double()

    def write_plan(self, g, log_a):
        return self._row_step(g, log_a)


class _CorePasses:
    """The same passes through the C++ core (used by the distributed CPU path)."""

    def __init__(self, x: torch.Tensor, alpha: float):
        self.x = x.contiguous()
        self.alpha = alpha
        self.core = _backend.core()

    @staticmethod
    def _log_a(log_a):
        return float(log_a) if not isinstance(log_a, torch.Tensor) else log_a.double().contiguous().numpy()

    def column_logsumexp(self):
        col_max, col_sum = self.core.sinkhorn_column_logsumexp(self.x.numpy(), self.alpha)
        return torch.from_numpy(col_max), torch.from_numpy(col_sum)

    def row_pass(self, g, log_a):
        return torch.from_numpy(self.core.sinkhorn_row_pass(self.x.numpy(), self.alpha, g.numpy(), self._log_a(log_a)))

    def write_plan(self, g, log_a):
        out = torch.empty_like(self.x)
        self.core.sinkhorn_write_plan(self.x.numpy(), self.alpha, g.numpy(), self._log_a(log_a), out.numpy())
        return out


class _CudaPasses:
    """The passes through the core's CUDA kernel (``sinkhorn_pass_cuda``), for ``group=``:
    each is one or two launches on the current stream with no host synchronisation, and the
    column statistics they return (device float64) are all-reduced in between by NCCL. Rows
    carry one mass each (``log_a`` a number, as in SwAV)."""

    def __init__(self, x: torch.Tensor, alpha: float, in_place: bool = False):
        self.x = x if x.stride(-1) == 1 else x.contiguous()
        self.alpha, self.in_place = alpha, in_place  # in_place: the plan overwrites x (x is ours)
        self.core = _backend.core()
        b, k = self.x.shape
        self.workspace = torch.empty(self.core.sinkhorn_workspace_bytes_cuda(b, k), dtype=torch.uint8,
                                     device=x.device)
        self.non_finite = torch.zeros(1, dtype=torch.int32, device=x.device)  # checked before (_global_batch)

    def _pass(self, kind: int, g, log_a: float, out=None, stats=None):
        x = self.x
        b, k = x.shape
        g32 = None if g is None else g.to(torch.float32).contiguous()
        with torch.cuda.device(x.device):
            self.core.sinkhorn_pass_cuda(kind, x.data_ptr(), _CUDA_DTYPE_CODES[x.dtype], b, k, x.stride(0), self.alpha,
                                         0 if g32 is None else g32.data_ptr(), float(log_a),
                                         0 if out is None else out.data_ptr(), 0 if stats is None else stats.data_ptr(),
                                         self.workspace.data_ptr(), self.non_finite.data_ptr(),
                                         torch.cuda.current_stream(x.device).cuda_stream)

    def column_logsumexp(self):
        k = self.x.shape[1]
        stats = torch.empty(2 * k, dtype=torch.float64, device=self.x.device)
        self._pass(0, None, 0.0, stats=stats)
        return stats[:k], stats[k:]

    def row_pass(self, g, log_a):
        stats = torch.empty(self.x.shape[1], dtype=torch.float64, device=self.x.device)
        self._pass(1, g, log_a, stats=stats)
        return stats

    def write_plan(self, g, log_a):
        out = self.x if self.in_place else torch.empty(self.x.shape, dtype=self.x.dtype, device=self.x.device)
        self._pass(2, g, log_a, out=out)
        return out


def _iterate(passes, log_b: torch.Tensor, log_a, n_iters: int, tol: float, log_out_scale: float, group=None,
             g_init: Optional[torch.Tensor] = None, check_every: int = 0):
    """The loop of ``sinkhorn::solve`` over any passes object, with optional all-reduces.

    Returns (plan, iterations, marginal_error, g, converged, errors), as the core's solve
    (``g_init`` and ``check_every`` as its Options). With ``group``, column statistics are
    all-reduced over the ranks (the row marginals ``log_a`` are already global).
    """
    every = check_every if check_every > 0 else (1 if tol > 0 else 0)
    at = (lambda it: every > 0 and (it - 1) % every == 0)
    errors, converged = [], False

    def measure(col_mass):
        return float(torch.linalg.vector_norm(col_mass - torch.exp(log_b)))

    if g_init is not None:
        g = g_init.to(log_b.dtype)
    else:
        col_max, col_sum = passes.column_logsumexp()
        if group is not None:
            global_max = col_max.clone()
            _all_reduce(global_max, group, "max")
            col_sum = col_sum * torch.exp(col_max - global_max).nan_to_num(0.0)
            _all_reduce(col_sum, group, "sum")
            col_max = global_max
        g = log_b - (col_max + torch.log(col_sum))
    err = 0.0
    iters = 1
    for iters in range(1, n_iters + 1):
        if iters == n_iters:
            break
        col_mass = passes.row_pass(g, log_a)
        if group is not None:
            _all_reduce(col_mass, group, "sum")
        if at(iters):
            err = measure(col_mass)
            errors.append(err)
            converged = tol > 0 and err < tol
            if converged:
                break
        g = _column_step(g, log_b, col_mass)
    out = passes.write_plan(g, log_a + log_out_scale)
    if every > 0:
        col_mass = out.sum(dim=0, dtype=torch.float64) * math.exp(-log_out_scale)
        if group is not None:
            _all_reduce(col_mass, group, "sum")
        err = measure(col_mass)
        if not converged and at(iters):
            errors.append(err)
            converged = tol > 0 and err < tol
    return out, iters, err, g, converged, errors


def _column_step(g: torch.Tensor, log_b: torch.Tensor, col_mass: torch.Tensor) -> torch.Tensor:
    # Columns with zero target mass stay at -inf instead of becoming -inf - (-inf) = NaN.
    return torch.where(torch.isinf(log_b), log_b, g + log_b - torch.log(col_mass))


def _all_reduce(t: torch.Tensor, group, op: str) -> None:
    import torch.distributed as dist
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)


def _swav_iterate(passes, k: int, b_global: int, n_iters: int, device, group=None) -> torch.Tensor:
    """SwAV through the generic loop: columns get mass 1/K, rows 1/B; the plan comes back times B."""
    log_b = torch.full((k,), -math.log(k), dtype=torch.float64, device=device)
    return _iterate(passes, log_b, -math.log(b_global), n_iters, 0.0, math.log(b_global), group=group)[0]


def _global_batch(b_local: int, k: int, finite: bool, group, device) -> int:
    """Check every rank's shard and learn the global batch size, before any work: a bad
    shard raises on all ranks instead of leaving the others blocked in a collective."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised")
    comm_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    stats = torch.tensor([float(b_local), 0.0 if finite else 1.0, float(k)], dtype=torch.float64, device=comm_device)
    _all_reduce(stats, group, "sum")
    if float(stats[1]) > 0:
        raise ValueError("scores: contains NaN or Inf on at least one rank")
    if float(stats[2]) != float(k) * dist.get_world_size(group):
        raise ValueError("scores: every rank must hold the same number of prototypes (columns)")
    return int(stats[0])


class _FeaturePasses:
    """Passes over scores = z @ prototypes.T computed block by block and never stored: each
    pass recomputes a block's scores (a matmul) and runs the dense passes on it."""

    def __init__(self, z: torch.Tensor, prototypes: torch.Tensor, alpha: float, chunk: int, dense):
        self.z, self.c, self.alpha, self.chunk, self.dense = z, prototypes, alpha, chunk, dense

    def _blocks(self):
        for start in range(0, self.z.shape[0], self.chunk):
            block = self.z[start:start + self.chunk] @ self.c.t()
            yield start, self.dense(block, self.alpha)

    def column_logsumexp(self):
        col_max = col_sum = None
        for _, passes in self._blocks():
            m, s = passes.column_logsumexp()
            if col_max is None:
                col_max, col_sum = m, s
            else:  # merge two (max, sum) pairs of log-sum-exp
                new_max = torch.maximum(col_max, m)
                col_sum = col_sum * torch.exp(col_max - new_max) + s * torch.exp(m - new_max)
                col_max = new_max
        return col_max, col_sum

    def row_pass(self, g, log_a):
        return sum(passes.row_pass(g, log_a) for _, passes in self._blocks())

    def write_plan(self, g, log_a):
        out = torch.empty(self.z.shape[0], self.c.shape[0], dtype=self.z.dtype, device=self.z.device)
        for start, passes in self._blocks():
            out[start:start + self.chunk] = passes.write_plan(g, log_a)
        return out


def _sinkhorn_features(z: torch.Tensor, prototypes, alpha: float, n_iters: int, chunk, group, backend,
                       out_t: Optional[torch.Tensor] = None):
    c, _ = to_tensor(prototypes, "prototypes")
    check_float(c, "prototypes")
    check_ndim(c, 2, "prototypes", " (prototypes, features)")
    if c.shape[0] == 0 or c.shape[1] != z.shape[1]:
        raise ValueError(f"prototypes: expected shape (K >= 1, {z.shape[1]}) to match scores (features), "
                         f"got {tuple(c.shape)}")
    if c.device != z.device:
        raise ValueError(f"prototypes: on {c.device}, but scores (features) are on {z.device}")
    b, k = z.shape[0], c.shape[0]
    if chunk is None:
        chunk = max(1, (1 << 22) // k)  # about 16 MB of float32 scores per block
    chunk = check_int_at_least(chunk, 1, "chunk")
    # The core serves CPU tensors; elsewhere the torch passes run on the tensors' device.
    name = _backend.choose("sinkhorn_features" if group is None else "sinkhorn_distributed", z.device.type, backend)
    dtype = _compute_dtype(z.dtype)
    zc, cc = z.to(dtype), c.to(dtype)

    def check_finite_features():
        if not bool(torch.isfinite(zc).all()):
            raise ValueError("scores: contains NaN or Inf")
        if not bool(torch.isfinite(cc).all()):
            raise ValueError("prototypes: contains NaN or Inf")

    if group is not None:
        finite = bool(torch.isfinite(zc).all()) and bool(torch.isfinite(cc).all())
        b_global = _global_batch(b, k, finite, group, z.device)
        if name == "cuda":  # this rank's scores in the result buffer; the plan overwrites them
            q = torch.mm(zc, cc.t())
            return _swav_iterate(_CudaPasses(q, alpha, in_place=True), k, b_global, n_iters, z.device, group)
    else:
        # The result buffer is B x K anyway: form the scores in it with one matmul and solve
        # there in place (kernel form), with no other B x K memory. Only when the spread
        # needs the log domain are the scores recomputed block by block below. NaN or Inf
        # in z or C always reaches the scores (an infinite term makes every dot product
        # with it non-finite), so the solvers' own check on them replaces a pass over z and C.
        if out_t is not None and out_t.dtype == dtype:
            q = out_t
        elif name == "cpu":
            q = _RESULTS.empty((b, k), dtype)
        else:
            q = torch.empty(b, k, dtype=dtype, device=z.device)
        torch.mm(zc, cc.t(), out=q)
        try:
            if name == "cpu":
                form = _backend.core().sinkhorn_solve(q.numpy(), alpha, None, -math.log(b), n_iters, 0.0,
                                                      math.log(b), q.numpy())[3]
                if form == "kernel":
                    return q
            elif name == "cuda":
                return _swav_cuda(q, alpha, n_iters, out=q)
            elif name == "triton":
                if _swav_triton(q, alpha, n_iters, out=q) is not None:
                    return q
            elif _swav_torch_kernel_form(q, alpha, n_iters, in_place=True) is not None:
                return q
        except ValueError:
            check_finite_features()  # name the argument at fault
            raise  # finite features whose scores overflow once divided by epsilon
        check_finite_features()
        b_global = b
    passes = _FeaturePasses(zc, cc, alpha, chunk, _CorePasses if name == "cpu" else _TorchPasses)
    return _swav_iterate(passes, k, b_global, n_iters, z.device, group)
