"""The passes of the log-domain Sinkhorn iteration, shared by ``pym4.sinkhorn`` and
``pym4.sinkhorn_ot``.

A passes object reads the matrix x (B, K) three ways with potentials g (K,) and log row
masses ``log_a``: ``column_logsumexp()`` -> (max, sum) per column, ``row_pass(g, log_a)`` ->
the column masses of the plan ``P_ij = exp(alpha x_ij + g_j + f_i)`` whose rows have mass
``a_i``, and ``write_plan(g, log_a)`` -> P. The same loop (``_iterate``, the loop of
``sinkhorn::solve`` in ``csrc/include/pym4/sinkhorn.h``) runs over any of them: plain torch,
the C++ core, the CUDA kernel, or scores recomputed block by block from features, with the
column statistics all-reduced between passes when a process group is given.
"""
from __future__ import annotations

import math
import mmap
import threading
import weakref
from typing import Optional

import numpy as np
import torch

from . import _backend


_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# float32 holds 24 bits: an exponent alpha * x_ij of magnitude v is rounded by up to v * 2^-24,
# and the iteration adds potentials of the same size to it (alpha x_ij + g_j, which cancel),
# so the plan's entries err by a few v * 2^-24 relatively: below 1e-3 up to this bound. Beyond
# it (scores/epsilon of 1e4 and more: un-normalised features, epsilon far below 0.01) float32
# gives wrong plans, or NaN once the rounding exceeds the range of exp; float64 is exact there.
_FLOAT32_MAX_EXPONENT = 4096.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ResultPool:
    """Memory for fresh CPU results, reused once the caller has dropped them.

    A fresh B x K result from the system allocator is new pages that the kernel zeroes on
    first touch (49 MB at SwAV's 4096 x 3000: 3.5 ms, an eighth of the whole solve, huge
    pages or not: the zeroing, not the faults, is the cost; glibc maps every block above
    32 MB afresh and unmaps it on free). So results from 512 KB up (SEER's 16 x 16000 codes
    are 1 MB, SwAV's 256 x 3000 3 MB) live in blocks the pool maps itself, and a block returns
    to it the moment nothing refers to its result any more: the result is an array over the
    block (the array its views and tensors keep alive, numpy collapsing every view's base to
    it), with a weak reference whose callback hands the block back. However many results are alive at once
    (SwAV's two crops, a caller keeping several), each dropped one is reused; at most ``keep``
    blocks are held idle (those released last), the others are unmapped at once. The result
    is still a new tensor sharing memory with nothing alive.

    ``_arrays``: the idle blocks, as uint8 arrays over them (least recently released first).
    """

    min_bytes = 1 << 19
    keep = 2

    def __init__(self):
        self._arrays = []
        # id(weak reference to a live result) -> (the reference, its block): the callback of
        # a plain weakref.ref runs only while the reference lives. (Not weakref.finalize: its
        # Python-level bookkeeping cost 20 us a call with the caches cold after a solve.)
        self._live = {}
        # Re-entrant: a garbage collection inside the locked section may finalize a result.
        self._lock = threading.RLock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        np_dtype, itemsize = (np.float32, 4) if dtype == torch.float32 else (np.float64, 8)
        nbytes = math.prod(shape) * itemsize  # (not np.prod: it costs more than a small solve's set-up)
        if nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        raw = None
        with self._lock:
            for i in range(len(self._arrays) - 1, -1, -1):  # the most recently released first
                if self._arrays[i].size == nbytes:
                    raw = self._arrays.pop(i)
                    break
        if raw is None:
            # Private: mmap's default, shared anonymous memory, is shmem, which takes no
            # transparent huge pages where shmem_enabled is "never" (measured: 12,000 faults
            # for a 49 MB result, private and advised: 25).
            # (Windows has no flags: its anonymous mappings are private to the process.)
            private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
            block = mmap.mmap(-1, nbytes, **private)
            if hasattr(block, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
                block.madvise(mmap.MADV_HUGEPAGE)
            raw = np.frombuffer(block, dtype=np.uint8)
        # Built on the block itself (not on `raw`): numpy then collapses the base of every view
        # of the result to the result, so the finalizer runs only once all of them are gone.
        arr = np.ndarray(shape, dtype=np_dtype, buffer=raw.base)
        ref = weakref.ref(arr, self._release)
        self._live[id(ref)] = (ref, raw)
        return torch.from_numpy(arr)

    def _release(self, ref: weakref.ref) -> None:
        with self._lock:
            self._arrays.append(self._live.pop(id(ref))[1])
            if len(self._arrays) > self.keep:
                del self._arrays[0]  # unmapped once its last (internal) reference goes


_RESULTS = _ResultPool()


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
        # The kernel's flag for NaN/Inf in alpha * x; never read: the callers check before the
        # first pass (_beyond_cuda_kernel), when every rank can still stop together.
        self.non_finite = torch.zeros(1, dtype=torch.int32, device=x.device)

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


def _global_batch(b_local: int, k: int, bad: torch.Tensor, group, device, what: str = "contains NaN or Inf") -> int:
    """Check every rank's shard and learn the global batch size, before any work: a bad
    shard raises on all ranks instead of leaving the others blocked in a collective.

    ``bad``: a 0-dim bool tensor (on the shard's device), True where this rank's shard cannot
    be solved, for the reason ``what`` says. It joins the all-reduce as it is, so the check
    costs no host synchronisation of its own (the all-reduce's result is read once)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised")
    comm_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    stats = torch.tensor([float(b_local), 0.0, float(k)], dtype=torch.float64, device=comm_device)
    stats[1] = bad.to(comm_device, torch.float64)
    _all_reduce(stats, group, "sum")
    b_global, any_bad, k_total = stats.tolist()  # (the one read of the all-reduce)
    if any_bad > 0:
        raise ValueError(f"scores: {what} on at least one rank")
    if k_total != float(k) * dist.get_world_size(group):
        raise ValueError("scores: every rank must hold the same number of prototypes (columns)")
    return int(b_global)


def _not_finite(x: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on x's device: whether x holds NaN or Inf (no host synchronisation)."""
    return ~torch.isfinite(x).all()


def _beyond_cuda_kernel(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """0-dim bool tensor on x's device (no host synchronisation): whether the CUDA kernel
    cannot take x, which it reads in float32 as alpha * x: NaN or Inf in x, or alpha * |x|
    past float32's range (the kernel's own flag says so only after the solve, too late for
    a group whose ranks must all stop before the first all-reduce). One read of x
    (aminmax: no B x K temporary)."""
    lo, hi = torch.aminmax(x)
    top = torch.maximum(lo.float().abs(), hi.float().abs())  # NaN propagates, and fails the test
    # In the kernel's own arithmetic: float32(alpha) * |x| rounded to float32. In float64 with
    # alpha as given, products within ~1e-7 of FLT_MAX passed and became inf in the kernel
    # (a NaN plan with group=, whose passes never read the kernel's flag). An alpha past
    # float32's range is inf here, and the product inf (or NaN at x = 0): refused as before.
    # (alpha rounded on the host, not as a device tensor: no copy to the GPU; a product of two
    # float32 values is exact in float64, so it rounds to float32 as the kernel's does)
    alpha32 = torch.tensor(alpha, dtype=torch.float32).item()
    return ~torch.isfinite(top * alpha32)


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
