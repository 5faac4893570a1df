"""Sinkhorn-Knopp: SwAV/SEER equipartition (``sinkhorn``); general entropic OT
(``sinkhorn_ot``) lives in :mod:`pym4.ot` and is re-exported here.

Both run the same iteration (``csrc/include/pym4/sinkhorn.h``): the plan is
``P_ij = exp(alpha * x_ij + g_j + f_i)`` with a column potential ``g`` and a row
potential ``f``, so one iteration is one read of the matrix. On the CPU it runs in the
kernel (scaling) form, one exponential per entry, when the spread of ``alpha * x`` keeps
those normal, and in the log domain otherwise (the passes of :mod:`pym4._sinkhorn_passes`),
so no exponential overflows whatever epsilon is.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

from . import _backend
from ._arrays import (INT64_MAX, check_finite, check_float, check_int_at_least, check_ndim, check_positive_scalar,
                      from_tensor, to_tensor)
from ._sinkhorn_passes import (_CUDA_DTYPE_CODES, _FLOAT32_MAX_EXPONENT, _RESULTS, _CorePasses, _CudaPasses,
                               _FeaturePasses, _TorchPasses, _beyond_cuda_kernel, _compute_dtype, _global_batch,
                               _not_finite, _swav_iterate)
from .ot import ConvergenceWarning, sinkhorn_ot

__all__ = ["sinkhorn", "sinkhorn_ot", "ConvergenceWarning"]

# What the CUDA kernel cannot take (it computes alpha * x in float32), as its errors say it.
_CUDA_REFUSES = "contains NaN or Inf (or overflows once divided by epsilon)"


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
        sharing no memory with ``scores`` or ``prototypes`` (ValueError before any work). A
        training loop that passes last step's buffer saves allocating (and the kernel
        zeroing) a fresh B x K result every step. A solve stopped by Ctrl-C
        (KeyboardInterrupt), or one whose error is known only once the kernel ran (the CUDA
        kernel's NaN/Inf flag), leaves unspecified values in it.
    backend : {"cpu", "cuda", "triton", "torch"}, optional
        Force an implementation (default: the best available; see ``pym4._backend``). On
        CUDA the default is the core's CUDA kernel, else (a core built without CUDA) the
        Triton kernel, else torch; ``group=`` takes the CUDA kernel's passes or torch's.

    Returns
    -------
    Q : array (B, K), the type, dtype and device of ``scores`` (``out`` when given)
        Soft assignments: every row sums to 1; each column sums to about B/K over the
        global batch (exactly after the last column step, which the final row step follows).

    Computed in float32 (on the CPU, float64 for float64 input), in the log domain wherever
    the kernel form could overflow, so epsilon down to 0.01 and float16 inputs stay finite;
    in float64 where max |scores| / epsilon exceeds 4096, beyond which float32 exponents lose
    the answer (every backend but ``cuda``). Raises ValueError on NaN/Inf scores. Tensors
    that require grad are read as their values (the codes are a target, not differentiated).
    """
    # backend="cpu" takes the fast path too: it is the core either way (the fast path gives
    # the full path's result to the bit), and a caller who forces the core is the one who
    # cares about its cost (the full path's checks: ~0.2-0.3 ms with cold caches, as much as
    # SwAV's 256 x 3000 solve itself, measured in the benchmark's interleaved runs).
    forced_cpu = type(backend) is str and backend == "cpu"
    if (prototypes is None and chunk is None and group is None and (backend is None or forced_cpu)
            and type(scores) is torch.Tensor and scores.dtype is torch.float32 and scores.is_cpu):
        q = _fast_cpu(scores, epsilon, n_iters, out, forced_cpu)
        if q is not None:
            return q
    elif (prototypes is not None and chunk is None and group is None and (backend is None or forced_cpu)
            and type(scores) is torch.Tensor and type(prototypes) is torch.Tensor and scores.dtype is torch.float32
            and prototypes.dtype is torch.float32 and scores.is_cpu and prototypes.is_cpu):
        q = _fast_cpu_features(scores, prototypes, epsilon, n_iters, out, forced_cpu)
        if q is not None:
            return q
    t, origin = to_tensor(scores, "scores")
    t = t.detach()  # the codes are a target, never differentiated (SwAV computes them under no_grad)
    check_float(t, "scores")
    what = " (batch, features)" if prototypes is not None else " (batch, prototypes)"
    check_ndim(t, 2, "scores", what)
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"scores: expected a non-empty{what} matrix, got shape {tuple(t.shape)}")
    eps = check_positive_scalar(epsilon, "epsilon")
    n_iters = check_int_at_least(n_iters, 1, "n_iters")
    alpha = 1.0 / eps
    out_t = None if out is None else _check_out(out, scores, t, origin, prototypes)
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
        if name == "cuda":  # the CUDA kernel, pass by pass, all-reducing between passes
            x = t if t.dtype in _CUDA_DTYPE_CODES else t.float()
            b_global = _global_batch(t.shape[0], t.shape[1], _beyond_cuda_kernel(x, alpha), group, t.device,
                                     _CUDA_REFUSES)
            passes = _CudaPasses(x, alpha)
        else:
            b_global = _global_batch(t.shape[0], t.shape[1], _not_finite(t), group, t.device)
            x = _precise(t.to(_compute_dtype(t.dtype)), alpha)
            passes = _CorePasses(x, alpha) if name == "cpu" else _TorchPasses(x, alpha)
        q = _swav_iterate(passes, t.shape[1], b_global, n_iters, t.device, group)
    elif name == "cpu":
        q = _swav_cpu(t, alpha, n_iters)
    elif name == "cuda":
        q = _swav_cuda(t, alpha, n_iters, out_t)  # into the caller's buffer: no B x K allocation, no copy
        if q is out_t is not None:
            return out
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
            x64 = _precise(x, alpha)
            q = None if x64 is x else _swav_torch_kernel_form(x64, alpha, n_iters)
            if q is None:
                q = _swav_iterate(_TorchPasses(x64, alpha), t.shape[1], t.shape[0], n_iters, t.device)
    return _deliver(q, origin, out, out_t)


def _fast_cpu_options(epsilon, n_iters, forced_cpu: bool):
    """The core, when the short paths may take a call with these options (else None)."""
    if not (type(epsilon) is float and 0.0 < epsilon < math.inf and type(n_iters) is int and 1 <= n_iters <= INT64_MAX):
        return None
    if not forced_cpu and os.environ.get("PYM4_BACKEND"):
        return None
    return _backend.core()


def _fast_cpu_result(out, b: int, k: int, inputs) -> Optional[torch.Tensor]:
    """Where a short path writes its (b, k) float32 result: a block of the result pool, or
    ``out`` when it is a plain float32 CPU buffer whose bytes are apart from every input's
    (``inputs``: CPU tensors with unit column stride); None for any other ``out`` (the full
    path's exact test, or its error)."""
    if out is None:
        return _RESULTS.empty((b, k), torch.float32)
    if not (type(out) is torch.Tensor and out.dtype is torch.float32 and out.is_cpu and out.shape == (b, k)
            and out.is_contiguous() and not out.requires_grad):
        return None
    # out's bytes [o, o + 4bk) and those an input can touch [s, s + item ((rows-1) ld + cols))
    o = out.data_ptr()
    for x in inputs:
        s = x.data_ptr()
        if o < s + x.element_size() * ((x.shape[0] - 1) * x.stride(0) + x.shape[1]) and s < o + 4 * b * k:
            return None
    return out


def _fast_cpu_features(z: torch.Tensor, c: torch.Tensor, epsilon, n_iters, out,
                       forced_cpu: bool = False) -> Optional[torch.Tensor]:
    """The features form's short path, as ``_fast_cpu`` for the scores: float32 CPU features
    and prototypes with no option but ``out``. The full path's own steps (one matmul into the
    result, the core's in-place kernel-form solve) with only the checks they need: the full
    path's checks, with the caches cold from the matmul, cost 0.1-0.15 ms, which made SEER's
    16 x 16000 features call 8-10% slower than the matmul plus a plain scores call (whose
    short path skips them). The result is the full path's, to the bit. Returns None for any
    other case, and for every solve the kernel form does not finish (NaN/Inf, a spread that
    needs the log domain, float32 too coarse): the full path then starts again from z and
    C, with its error messages (``out``, when given, may have been written)."""
    core = _fast_cpu_options(epsilon, n_iters, forced_cpu)
    if core is None or not (z.dim() == 2 and c.dim() == 2 and z.stride(1) == 1 and c.stride(1) == 1):
        return None
    (b, d), k = z.shape, c.shape[0]
    if b == 0 or k == 0 or d == 0 or c.shape[1] != d or z.stride(0) < d or c.stride(0) < d:
        return None
    q = _fast_cpu_result(out, b, k, (z, c))
    if q is None:
        return None
    z = z.detach() if z.requires_grad else z
    c = c.detach() if c.requires_grad else c
    torch.mm(z, c.t(), out=q)
    try:
        form, max_exponent = core.sinkhorn_swav(q.numpy(), 1.0 / epsilon, n_iters, q.numpy())
    except ValueError:
        return None
    return q if form == "kernel" and max_exponent <= _FLOAT32_MAX_EXPONENT else None


def _fast_cpu(t: torch.Tensor, epsilon, n_iters, out, forced_cpu: bool = False) -> Optional[torch.Tensor]:
    """The call a training loop makes, float32 CPU scores and nothing but ``out`` (a float32
    CPU tensor) among the options, with only the checks it needs: on a small solve the full
    path's checks cost as much as a tenth of it (SEER's 16 x 16000: 0.05-0.3 ms of Python with
    the caches cold from the training step, against a 0.3 ms solve). The result is the full
    path's, to the bit. Returns None, having done nothing, for any other case (an argument
    the full path rejects, PYM4_BACKEND set without ``forced_cpu`` (backend="cpu", which wins
    over it), an ``out`` it must inspect further), which the full path then takes, with its
    error messages."""
    core = _fast_cpu_options(epsilon, n_iters, forced_cpu)
    if core is None or not (t.dim() == 2 and t.stride(1) == 1):
        return None
    b, k = t.shape
    if b == 0 or k == 0 or t.stride(0) < k:
        return None
    q = _fast_cpu_result(out, b, k, (t,))
    if q is None:
        return None
    x = t.detach() if t.requires_grad else t
    alpha = 1.0 / epsilon
    try:
        form, max_exponent = core.sinkhorn_swav(x.numpy(), alpha, n_iters, q.numpy())
    except ValueError:
        check_finite(x, "scores")
        form = max_exponent = None  # finite scores whose scores/epsilon overflow float32: float64 below
    if not (form == "kernel" and max_exponent <= _FLOAT32_MAX_EXPONENT) and _float32_too_coarse(
            x, alpha, form, max_exponent):
        q.copy_(_swav_cpu(x.double(), alpha, n_iters))
    return q


def _check_out(out, scores, t: torch.Tensor, origin, prototypes) -> torch.Tensor:
    """Validate a caller's output buffer before any work; returns its torch view."""
    o, o_origin = to_tensor(out, "out")
    if isinstance(out, torch.Tensor) and out.requires_grad:
        # (torch refuses in-place writes to such a tensor; writing through a detached view
        # would change a leaf of someone's graph behind autograd's back)
        raise ValueError("out: requires grad; the codes are a target, never differentiated: "
                         "pass a buffer without requires_grad")
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
    if isinstance(out, np.ndarray) and not out.flags.c_contiguous:
        # (to_tensor copies an array with negative strides: the result would go to the copy)
        raise ValueError("out: must be C-contiguous")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out: is read-only")
    for other, name in ((scores, "scores"), (prototypes, "prototypes")):
        if other is not None and _shares_memory(out, other):
            raise ValueError(f"out: must not share memory with {name}")
    return o.detach()


def _byte_range(t):
    """[first, last + 1) byte addresses a strided tensor or numpy array can touch (None when
    empty)."""
    if isinstance(t, np.ndarray):
        if t.size == 0:
            return None
        low = sum((n - 1) * s for n, s in zip(t.shape, t.strides) if s < 0)  # (numpy strides are in bytes)
        high = sum((n - 1) * s for n, s in zip(t.shape, t.strides) if s > 0)
        start = t.__array_interface__["data"][0]
        return start + low, start + high + t.itemsize
    if t.numel() == 0:
        return None
    low = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    high = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr() + low * t.element_size(), t.data_ptr() + (high + 1) * t.element_size()


def _shares_memory(x, y) -> bool:
    """Whether two arrays (numpy, or torch on any device) have an element in common.

    Memory ranges decide, not start pointers (``buf[1:]`` and ``buf[:-1]`` start apart and
    overlap). On the CPU numpy's exact test runs (it checks the bounds first), which tells
    interleaved views such as ``buf[:, ::2]`` and ``buf[:, 1::2]`` apart; a problem too hard
    for it counts as shared. On a GPU the ranges alone decide.
    """
    devices = {"cpu" if isinstance(v, np.ndarray) else str(v.device) for v in (x, y)}
    if len(devices) > 1:
        return False
    rx, ry = _byte_range(x), _byte_range(y)
    if devices != {"cpu"} or rx is None or ry is None or not (rx[0] < ry[1] and ry[0] < rx[1]):
        # (on the CPU, apart ranges decide at once: a training loop's out= and scores are
        # separate buffers, and numpy's test below costs tens of microseconds per call)
        return rx is not None and ry is not None and rx[0] < ry[1] and ry[0] < rx[1]

    def as_numpy(v):
        if isinstance(v, np.ndarray):
            return v
        v = v.detach()
        if v.dtype == torch.bfloat16:  # numpy has no bfloat16: the same bytes as int16
            v = v.view(torch.int16)
        return v.numpy()

    try:
        return bool(np.shares_memory(as_numpy(x), as_numpy(y), max_work=1 << 20))
    except np.exceptions.TooHardError:
        return True


def _deliver(q: torch.Tensor, origin, out, out_t):
    """The result in the caller's type, or copied into their ``out`` buffer."""
    if out_t is None:
        return from_tensor(q, origin)
    out_t.copy_(q)
    return out


def _swav_cpu(t: torch.Tensor, alpha: float, n_iters: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    x = t.to(_compute_dtype(t.dtype))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = _RESULTS.empty(tuple(x.shape), x.dtype)
    # Rows carry mass 1/B during the iterations; the plan is written times B (rows sum to 1).
    try:
        form, max_exponent = _backend.core().sinkhorn_swav(x.numpy(), alpha, n_iters, out.numpy())
    except ValueError:
        if x.dtype != torch.float32:
            raise
        check_finite(t, "scores")
        form = max_exponent = None  # finite scores whose scores/epsilon overflow float32: float64 below
    if x.dtype == torch.float32:
        if _float32_too_coarse(x, alpha, form, max_exponent):
            out.copy_(_swav_cpu(x.double(), alpha, n_iters))  # (float64: the core raises on overflow)
    elif (max_exponent if form == "kernel" else _max_exponent(x, alpha)) > _CORE_FLOAT64_MAX_EXPONENT:
        out.copy_(_swav_iterate(_TorchPasses(x, alpha), x.shape[1], x.shape[0], n_iters, x.device))
    return out


# Largest max |alpha x| the core's float64 solve takes. Its loops may fuse alpha * x - m into
# one FMA, skipping the rounding of the product that the maximum m had; the difference is
# half an ulp of alpha x, and past ~1e18 an exponent off by more than 745 turns an entry's
# exp(0) into 0 or inf (measured: all-NaN codes at scores/epsilon of 1e19, randn 8 x 5). The
# torch passes round alpha x once and use it as it is: their codes stay finite with rows
# summing to 1 however large (meaning little past 1e13, where float64 resolves the duals to
# worse than 1e-3: see pym4.ot's _FLOAT64_MAX_EXPONENT, which refuses such costs).
_CORE_FLOAT64_MAX_EXPONENT = 1e15


def _max_exponent(x: torch.Tensor, alpha: float) -> float:
    """max |alpha x| (one read of x)."""
    lo, hi = torch.aminmax(x)
    return alpha * max(abs(float(lo)), abs(float(hi)))


def _precise(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x``, or ``x`` in float64 when float32 is too coarse for alpha * x (one read of x)."""
    if x.dtype == torch.float32:
        lo, hi = torch.aminmax(x)
        if alpha * max(-float(lo), float(hi)) > _FLOAT32_MAX_EXPONENT:
            return x.double()
    return x


def _float32_too_coarse(x: torch.Tensor, alpha: float, form, max_exponent) -> bool:
    """Whether a float32 solve of ``x`` must be redone in float64: max |alpha x| beyond
    _FLOAT32_MAX_EXPONENT. ``form`` and ``max_exponent`` are what the core's ``sinkhorn_swav``
    returned (None: it overflowed): the kernel form measured max |alpha x| while it read x,
    so x is read again only after the log domain (which reads it once per pass anyway)."""
    if form is None:
        return True
    if form == "kernel":
        return not (max_exponent <= _FLOAT32_MAX_EXPONENT)
    lo, hi = torch.aminmax(x)
    return alpha * max(abs(float(lo)), abs(float(hi))) > _FLOAT32_MAX_EXPONENT


def _swav_triton(t: torch.Tensor, alpha: float, n_iters: int,
                 out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The Triton kernels (kernels/sinkhorn.py); the result goes into ``out`` when given:
    written there when its dtype is one Triton stores (float32/16, bfloat16), which may be
    ``t`` itself (in place: None when the kernel form declined, the input then overwritten),
    else (float64) copied there from a float32 result."""
    from pym4.kernels import sinkhorn as kernels  # lazily: triton is optional

    x = t if t.dtype in _CUDA_DTYPE_CODES else t.float()
    b, k = x.shape
    if out is not None and out.dtype not in _CUDA_DTYPE_CODES:
        # (the features form passes its float64 scores as out: returning a fresh result
        # beside them handed back the scores as the codes. Solved into a fresh result, not
        # in place: an in-place solve can decline, its input gone.)
        return out.copy_(_swav_triton(x, alpha, n_iters))
    log_a = torch.full((b,), -math.log(b), dtype=torch.float32, device=x.device)
    log_b = torch.full((k,), -math.log(k), dtype=torch.float32, device=x.device)
    try:
        result = kernels.sinkhorn(x, alpha, n_iters, log_a, log_b, math.log(b), out)
    except kernels.NeedsFloat64:  # nothing written yet: the torch passes in float64
        if out is not None and out.data_ptr() == x.data_ptr():
            return None  # in place: the caller's passes take it (in float64)
        x64 = x.double()
        q = _swav_torch_kernel_form(x64, alpha, n_iters)
        if q is None:
            q = _swav_iterate(_TorchPasses(x64, alpha), k, b, n_iters, x.device)
        return q if out is None else out.copy_(q)
    return None if result is None else result[0]  # None: an in-place solve declined (see kernels)


def _swav_cuda(t: torch.Tensor, alpha: float, n_iters: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The CUDA kernel of the core; ``out`` may be ``t`` itself: every element is read and
    then written by the same thread, never read again. A float64 ``out`` (the kernel computes
    and stores float32/16 and bfloat16) gets the float32 result copied in."""
    core = _backend.core()
    x = t if t.dtype in _CUDA_DTYPE_CODES else t.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is not None and out.dtype != x.dtype:
        # (the features form passes its float64 scores as out: the kernel wrote float32 codes
        # into their first half; x is then a float32 copy of our own, solved in place)
        return out.copy_(_swav_cuda(x, alpha, n_iters, out=x if x is not t else None))
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
        raise ValueError(f"scores: {_CUDA_REFUSES}")
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
    spread of alpha * x is too large for this form (or x is not finite), when float32 is too
    coarse for alpha * x (see ``_FLOAT32_MAX_EXPONENT``; the caller then goes to float64) or
    a scaling vector left the floating-point range: the caller then runs the log domain.
    """
    limit = _KERNEL_FORM_SPREAD[x.dtype]
    lo, hi = torch.aminmax(x)  # NaN propagates, so a non-finite input fails the test below
    lo, hi = alpha * float(lo), alpha * float(hi)
    if not (hi - lo <= limit):
        return None
    if x.dtype == torch.float32 and max(-lo, hi) > _FLOAT32_MAX_EXPONENT:
        return None  # float32 cannot hold these exponents: the caller goes to float64
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


def _sinkhorn_features(z: torch.Tensor, prototypes, alpha: float, n_iters: int, chunk, group, backend,
                       out_t: Optional[torch.Tensor] = None):
    c, _ = to_tensor(prototypes, "prototypes")
    c = c.detach()
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

    def check_finite_features(products_overflow: bool = False):
        """Name the argument at fault: NaN or Inf in z or C, C past the range of z's dtype
        it is cast to, or (``products_overflow``) finite features whose scores are not."""
        if not bool(torch.isfinite(zc).all()):
            raise ValueError("scores: contains NaN or Inf")
        if not bool(torch.isfinite(cc).all()):
            if bool(torch.isfinite(c).all()):
                raise ValueError(f"prototypes: values up to {float(c.abs().max()):g} overflow {dtype}, the dtype "
                                 f"the scores (features) are computed in; pass the features as {c.dtype}")
            raise ValueError("prototypes: contains NaN or Inf")
        if products_overflow:
            raise ValueError(f"scores, prototypes: their products (the scores z @ prototypes.T) overflow {dtype} "
                             f"(largest |z| {float(zc.abs().max()):g}, |prototypes| {float(cc.abs().max()):g}); "
                             "normalise the features, as SwAV does")

    if group is not None:
        if name == "cuda":  # this rank's scores in the result buffer; the plan overwrites them
            # (checked once formed: finite z and C can still give scores past alpha's range;
            # float64 features: the kernel's passes take float32 scores, as for float64 scores)
            q = torch.mm(zc, cc.t())
            if q.dtype not in _CUDA_DTYPE_CODES:
                q = q.float()
            b_global = _global_batch(b, k, _beyond_cuda_kernel(q, alpha), group, z.device, _CUDA_REFUSES)
            return _swav_iterate(_CudaPasses(q, alpha, in_place=True), k, b_global, n_iters, z.device, group)
        b_global = _global_batch(b, k, _not_finite(zc) | _not_finite(cc), group, z.device)
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
                form, max_exponent = _backend.core().sinkhorn_swav(q.numpy(), alpha, n_iters, q.numpy())
                if form == "kernel" and max_exponent <= (_FLOAT32_MAX_EXPONENT if dtype == torch.float32
                                                         else _CORE_FLOAT64_MAX_EXPONENT):
                    return q
            elif name == "cuda":
                return _swav_cuda(q, alpha, n_iters, out=q)
            elif name == "triton":
                if _swav_triton(q, alpha, n_iters, out=q) is not None:
                    return q
            elif _swav_torch_kernel_form(q, alpha, n_iters, in_place=True) is not None:
                return q
        except ValueError:
            no_retry = dtype != torch.float32 or name != "cpu"
            check_finite_features(products_overflow=no_retry and not bool(torch.isfinite(q).all()))
            if no_retry:
                raise  # finite features whose scores overflow once divided by epsilon
            # (in float32: the float64 passes below hold them)
        check_finite_features()
        b_global = b
        if b <= chunk:
            # The scores fit in one block: form them once and run the scores path (one matmul
            # and the dense solve) instead of forming them again in every pass.
            scores = torch.mm(zc, cc.t())
            if not bool(torch.isfinite(scores).all()):  # (the torch passes made them a NaN plan)
                check_finite_features(products_overflow=True)
            if name == "cpu":
                return _swav_cpu(scores, alpha, n_iters, out=q)
            if name == "triton":
                solved = _swav_triton(scores, alpha, n_iters, out=q)
                if solved is not None:
                    return solved
            # (float64 when float32 cannot hold scores/epsilon, as on the scores path)
            return _swav_iterate(_TorchPasses(_precise(scores, alpha), alpha), k, b, n_iters, z.device)
        del q  # the block-wise passes write a plan of their own: one B x K alive at a time, not two
    # |z_i . c_j| <= |z_i| |c_j|: when that bound of scores/epsilon is beyond what float32
    # holds (see _FLOAT32_MAX_EXPONENT), the passes run in float64.
    bound = float(torch.linalg.vector_norm(zc, dim=1).max()) * float(torch.linalg.vector_norm(cc, dim=1).max())
    if dtype == torch.float32 and name != "cuda" and alpha * bound > _FLOAT32_MAX_EXPONENT:
        zc, cc = zc.double(), cc.double()
    # (the core's passes up to what it takes in float64: see _CORE_FLOAT64_MAX_EXPONENT)
    core_takes = name == "cpu" and alpha * bound <= _CORE_FLOAT64_MAX_EXPONENT
    passes = _FeaturePasses(zc, cc, alpha, chunk, _CorePasses if core_takes else _TorchPasses)
    q = _swav_iterate(passes, k, b_global, n_iters, z.device, group)
    if not bool(torch.isfinite(q).all()):  # only a score past the dtype's range leaves one
        check_finite_features(products_overflow=True)
    return q
