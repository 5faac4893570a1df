"""Contrastive losses over giant batches: CLIP's softmax loss and SigLIP's sigmoid loss.

With image features ``x_i`` and text features ``y_j`` (B x D, L2-normalised by the caller),
``s = logit_scale`` (the multiplier, i.e. ``exp`` of the learned temperature) and
``b = logit_bias``, the logits are ``S_ij = s * x_i . y_j + b`` and

- CLIP (Radford et al., 2021):  ``L = (1/2B) sum_i (r_i + c_i - 2 S_ii)`` with the row and
  column log-sum-exps ``r_i = LSE_j S_ij`` and ``c_j = LSE_i S_ij``;
- SigLIP (Zhai et al., 2023):   ``L = (1/B) [sum_ij softplus(S_ij) - sum_i S_ii]``.

Both equal open_clip's ``ClipLoss`` / ``SigLipLoss``. The B x B matrix is never held: the
forward pass walks it tile by tile keeping only ``r`` and ``c`` (online log-sum-exp), and
the backward pass recomputes each tile to form ``G = dL/dS`` and accumulate
``dx = s G y``, ``dy = s G^T x``, ``ds = sum G_ij x_i . y_j`` and ``db = sum G_ij``
(DESIGN.md section 2). Backends (``pym4._backend.OPS``): ``chunked`` (row chunks of torch
matmuls, ``pym4/_chunked.py``, in an autograd.Function; any device, memory
O(B * chunk + B * D)), ``triton`` (fused kernels in ``pym4.kernels.contrastive``), ``torch``
(the plain materialised formula: the reference, never chosen automatically).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import _backend, _exchange
from ._arrays import check_has_values, check_int_at_least, from_tensor, to_tensor
from ._chunked import ChunkedEngine

__all__ = ["clip_loss", "siglip_loss", "similarity_topk"]

_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The chunked backend (pym4/_chunked.py) works on row chunks of the logits whose size is
# about this many elements (16 MB in float32): large enough for efficient matmuls, small
# enough to stay O(B).
_CPU_CHUNK_ELEMENTS = 1 << 22


# ----- public API ----------------------------------------------------------------------------

def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None, *,
              group=None, backend: Optional[str] = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss, without ever forming the B x B logits.

    ``L = (1/2B) sum_i (LSE_j S_ij + LSE_j S_ji - 2 S_ii)``, ``S = s * x @ y.T + b``: the mean
    of the image-to-text and text-to-image cross-entropies with labels ``arange(B)``, as in
    open_clip's ``ClipLoss`` (Radford et al., "Learning Transferable Visual Models From
    Natural Language Supervision", 2021).

    Parameters
    ----------
    image_features, text_features : Tensor (B, D), float32/float16/bfloat16 (float64 on CPU)
        Same shape, dtype and device; CPU or CUDA. Normally L2-normalised (not required).
    logit_scale : Tensor with one element, or float
        The positive multiplier ``s`` (the exp of CLIP's learned log-temperature).
    logit_bias : Tensor with one element, float or None
        Added to every logit (it cancels in the softmax, so its gradient is zero).
    group : torch.distributed.ProcessGroup, optional
        Each rank passes its local batch (B_r rows; sizes may differ). Semantics of open_clip's
        ``local_loss=True, gather_with_grad=True``: this rank's loss is
        ``(W / 2B) sum_{i in rank} (r_i + c_i - 2 S_ii)`` (the mean of the ranks' losses is
        the loss of the concatenated batch of size B), and the features' gradients include
        the other ranks' losses, so that averaging gradients over ranks (DDP) gives exactly
        the gradients of one process on the concatenated batch. Only the text features are
        gathered (B x D); no rank forms more than a chunk of its B_r x B logits.
    backend : {"chunked", "triton", "torch"}, optional
        Force an implementation; default: ``triton`` for CUDA tensors (``chunked`` without
        triton or for float64), ``chunked`` for CPU tensors (see ``pym4._backend``).
        ``torch`` forms the B x B logits (with ``group``, of the gathered batch).

    Returns
    -------
    loss : 0-d Tensor in the features' dtype, differentiable w.r.t. both features,
    ``logit_scale`` and ``logit_bias``. Computed with float32 accumulation (float64 for
    float64 input).
    """
    return _contrastive("clip", image_features, text_features, logit_scale, logit_bias, group, backend)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias, *,
                group=None, backend: Optional[str] = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, without ever forming the B x B logits.

    ``L = -(1/B) sum_ij log sigmoid(z_ij S_ij) = (1/B) [sum_ij softplus(S_ij) - sum_i S_ii]``
    with ``S = s * x @ y.T + b`` and labels ``z = 2 I - 1``, as in open_clip's ``SigLipLoss``
    (Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid Loss for Language Image Pre-Training", 2023).

    Parameters are those of :func:`clip_loss`; ``logit_bias`` (typically initialised to -10)
    may be None for no bias. With ``group``, this rank's loss is
    ``(W / B) sum_{i in rank} sum_j -log sigmoid(z_ij S_ij)`` (its images against every
    text, as open_clip's neighbour exchange computes it), and gradients flow back to the
    text features of every rank, so that DDP's gradient average equals one process on the
    concatenated batch.

    Returns
    -------
    loss : 0-d Tensor in the features' dtype.
    """
    return _contrastive("siglip", image_features, text_features, logit_scale, logit_bias, group, backend)


def similarity_topk(queries, keys, k: int, *, chunk: Optional[int] = None):
    """The ``k`` largest dot products of each query against a gallery too large for N x M.

    Parameters
    ----------
    queries : array (N, D), keys : array (M, D)
        numpy arrays or torch tensors (CPU or CUDA), float32/float16/bfloat16/float64.
    k : int, 1 <= k <= M
    chunk : int, optional
        Rows and columns per block of the similarity matrix (default: about 16 M elements
        per block). Memory is O(chunk^2 + N k), never N x M.

    Returns
    -------
    values : (N, k) scores ``q_i . k_j`` in descending order (queries' type and dtype; computed
    in float32, or float64 for float64 input), indices : (N, k) int64 positions in ``keys``.
    Among equal scores the order is unspecified. Used by retrieval recall@K.
    """
    q, q_origin = to_tensor(queries, "queries")
    kt, _ = to_tensor(keys, "keys")
    q, kt = q.detach(), kt.detach()  # a search, not differentiated (and numpy results need no grad)
    _check_features(q, "queries")
    _check_features(kt, "keys")
    if q.shape[1] != kt.shape[1]:
        raise ValueError(f"keys: expected {q.shape[1]} features per row to match queries, got shape {tuple(kt.shape)}")
    if q.device != kt.device:
        raise ValueError(f"keys: on {kt.device}, but queries are on {q.device}")
    k = check_int_at_least(k, 1, "k")
    n, m = q.shape[0], kt.shape[0]
    if k > m:
        raise ValueError(f"k: must be <= the number of keys ({m}), got {k}")
    if chunk is None:
        chunk = max(256, int(math.isqrt(_CPU_CHUNK_ELEMENTS)) * 2)
    chunk = check_int_at_least(chunk, 1, "chunk")
    _check_finite_all((q, "queries"), (kt, "keys"))
    dtype = torch.float64 if torch.float64 in (q.dtype, kt.dtype) else torch.float32
    # Past the compute dtype's range a block of scores holds inf - inf, and the values came out NaN.
    reach = float(_dot_reach(q, kt))
    if not reach <= torch.finfo(dtype).max:
        raise ValueError(f"queries, keys: the scores can reach {reach:.3g} (D times the largest |entry| of both), "
                         f"beyond {str(dtype).replace('torch.', '')}'s range: normalise or rescale them"
                         + (", or pass float64 features" if dtype == torch.float32 else ""))
    values = torch.empty((n, k), dtype=dtype, device=q.device)
    indices = torch.empty((n, k), dtype=torch.int64, device=q.device)
    for q0 in range(0, n, chunk):
        qc = q[q0:q0 + chunk].to(dtype)
        best_v = best_i = None
        for k0 in range(0, m, chunk):
            scores = qc @ kt[k0:k0 + chunk].to(dtype).T
            v, i = torch.topk(scores, min(k, scores.shape[1]), dim=1, sorted=False)
            if best_v is not None:
                # Keep the running k best: merge this block's candidates with them.
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i + k0], 1)
                v, pos = torch.topk(v, min(k, v.shape[1]), dim=1, sorted=False)
                i = i.gather(1, pos)
            best_v, best_i = v, i
        best_v, order = torch.sort(best_v, dim=1, descending=True)
        values[q0:q0 + chunk], indices[q0:q0 + chunk] = best_v, best_i.gather(1, order)
    delivered = from_tensor(values, q_origin)
    if q_origin.dtype != dtype and not bool(torch.isfinite(torch.as_tensor(delivered)).all()):
        # (a float16 query's scores past 65504: the order is right, its values would be inf)
        raise ValueError(f"queries: the best scores reach {float(values.abs().max()):.3g}, beyond "
                         f"{str(q_origin.dtype).replace('torch.', '')}'s range, the dtype of the values returned: "
                         "pass float32 features")
    return delivered, (indices.numpy() if q_origin.is_numpy else indices)


# ----- checks --------------------------------------------------------------------------------

def _check_features(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
    check_has_values(t, name)
    if t.dtype not in _FEATURE_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (batch, dim) tensor, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (batch, dim) tensor, got shape {tuple(t.shape)}")


def _magnitudes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(2,) float64 tensor [max|x|, max|y|]: one min/max read of each matrix, no copy."""
    out = []
    for t in (x, y):
        lo, hi = torch.aminmax(t.detach())
        out.append(torch.maximum(-lo, hi).double())
    return torch.stack(out)


def _dot_reach(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A float64 0-d tensor bounding every |x_i . y_j| and each of its partial sums:
    D max|x| max|y|. No squares that overflow (float32 norms of 1e20-scale rows are inf
    where their dot products are not)."""
    mags = _magnitudes(x, y)
    return float(x.shape[1]) * mags[0] * mags[1]


def _check_finite_all(*named) -> None:
    # One device sync for all the checks, not one per tensor.
    flags = torch.stack([torch.isfinite(t).all() for t, _ in named]).cpu()
    for ok, (_, name) in zip(flags.tolist(), named):
        if not ok:
            raise ValueError(f"{name}: contains NaN or Inf")


def _as_scalar(value, name: str, device) -> Tuple[torch.Tensor, bool]:
    """A 1-element tensor for a scalar argument, and whether it came as a tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a scalar (one element), got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {str(value.dtype).replace('torch.', '')}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name}: on {value.device}, but the features are on {device}")
        return value, True
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        value = value[()]  # a 0-d array: its numpy scalar
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):  # np.float32 etc. are Real
        raise TypeError(f"{name}: expected a number or a one-element tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float32, device=device), False


def _validate(x, y, logit_scale, logit_bias, kind="siglip"):
    _check_features(x, "image_features")
    _check_features(y, "text_features")
    if x.shape != y.shape:
        raise ValueError(f"text_features: expected shape {tuple(x.shape)} to match image_features, got {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"text_features: expected dtype {x.dtype} to match image_features, got {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"text_features: on {y.device}, but image_features are on {x.device}")
    scale, _ = _as_scalar(logit_scale, "logit_scale", x.device)
    bias = None if logit_bias is None else _as_scalar(logit_bias, "logit_bias", x.device)[0]
    # One sync for every value check: finiteness of features and scalars, positivity of s.
    mags = _magnitudes(x, y)
    reach, limit = _logit_reach(x, scale, bias, kind, mags)
    checks = [torch.isfinite(x).all(), torch.isfinite(y).all(), torch.isfinite(scale.detach()).all(),
              (scale.detach() > 0).all(), reach <= limit]
    if bias is not None:
        checks.append(torch.isfinite(bias.detach()).all())
    ok = torch.stack([c.to(x.device) for c in checks]).tolist()
    problem = None
    if not ok[0]:
        problem = "image_features: contains NaN or Inf"
    elif not ok[1]:
        problem = "text_features: contains NaN or Inf"
    elif not (ok[2] and ok[3]):
        problem = f"logit_scale: must be a positive finite scalar, got {float(scale.detach().reshape(()))!r}"
    elif bias is not None and not ok[5]:
        problem = "logit_bias: must be finite"
    elif not ok[4]:
        problem = _reach_problem(x, bias, kind, reach, limit)
    return scale, bias, problem, mags


def _logit_reach(x, scale, bias, kind, mags):
    """(bound of every |logit| as a float64 0-d tensor, the largest the loss takes), from
    ``mags`` = [max|x|, max|y|] (:func:`_magnitudes`, or their maxima over the ranks)."""
    reach = scale.detach().double().reshape(()) * float(x.shape[1]) * mags[0] * mags[1]
    if bias is not None and kind == "siglip":  # (added to every logit: a float64 1e300 made the loss NaN;
        # CLIP's cancels in its softmaxes and is left out of the logits)
        reach = reach + bias.detach().double().reshape(()).abs()
    return reach, torch.finfo(_acc_dtype(x.dtype)).max * _LOGIT_HEADROOM


def _reach_problem(x, bias, kind, reach, limit, where: str = "") -> str:
    acc_name = str(_acc_dtype(x.dtype)).replace("torch.", "")
    return (f"image_features, text_features: the logits can reach {float(reach):.3g} (logit_scale times D times "
            f"the largest |entry| of both{where}" + ("" if bias is None or kind != "siglip" else ", plus |logit_bias|")
            + f"), beyond what the loss can sum in {acc_name} ({limit:.3g}): "
            "L2-normalise the features, as CLIP and SigLIP do"
            + (", or pass float64 features" if acc_name == "float32" else ""))


# ----- dispatch ------------------------------------------------------------------------------

def _contrastive(kind, x, y, logit_scale, logit_bias, group, backend, local_grad=False):
    error, mags = None, None
    try:
        scale, bias, problem, mags = _validate(x, y, logit_scale, logit_bias, kind)
        name = _backend.choose(f"{kind}_loss", x.device.type, backend, dtype=str(x.dtype).replace("torch.", ""))
    except (TypeError, ValueError, RuntimeError) as e:
        if group is None:
            raise
        error, problem = e, str(e)  # raised after the other ranks have heard of it
    if group is not None:
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised")
        if dist.get_world_size(group) == 1:
            group = None
        else:
            # A bad input on one rank (a bad value, shape or dtype, or a backend that cannot
            # run it) must stop every rank, not leave the others waiting in a collective.
            if isinstance(x, torch.Tensor):
                dev = _exchange.comm_device(x, group)
            else:
                dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
            # With the largest |entries| over the ranks: this rank's rows meet every rank's
            # texts (and its texts every rank's rows), so its logits reach D max|x| max|y|
            # taken over all of them, not over its own features alone.
            # The features' dtype, as +code and -code (the maximum of both: max and -min): the
            # ranks must agree, or their collectives would not match (the float16 check below
            # is one more all-reduce on float16 ranks only).
            bad = torch.zeros(5, dtype=torch.float64, device=dev)
            bad[0] = 0.0 if problem is None else 1.0
            if mags is not None and problem is None:
                bad[1:3] = mags.to(bad.device)
                code = float(_FEATURE_DTYPES.index(x.dtype) + 1)
                bad[3], bad[4] = code, -code
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
            if problem is None and float(bad[0]) > 0:
                problem = "image_features, text_features, logit_scale or logit_bias: bad input on another rank"
            elif problem is None and float(bad[3]) != -float(bad[4]):
                problem = (f"image_features, text_features: the ranks' features differ in dtype (this rank's: "
                           f"{str(x.dtype).replace('torch.', '')}); every rank must pass the same")
            elif problem is None:
                reach, limit = _logit_reach(x, scale, bias, kind, bad[1:3].to(x.device))
                if not float(reach) <= limit:  # (every rank has the same maxima: all refuse)
                    problem = _reach_problem(x, bias, kind, reach, limit, " over every rank's features")
    if error is not None:
        raise error
    if problem is not None:
        raise ValueError(problem)
    zero = None
    if kind == "clip" and bias is not None:
        # The bias cancels in both softmaxes, so it is left out of the logits: added to them in
        # float32 it only rounds them away (logit_bias=1e8 made the loss 0.0 for a true 6.44,
        # and 1e5 was 3e-3 off). It stays in the graph, with its gradient 0.
        zero, bias = bias.reshape(()) * 0, None
    if name == "torch":
        if group is not None:
            loss = _reference_group(kind, x, y, scale, bias, group, local_grad)
        else:
            loss = _reference(kind, x, y, scale, bias)
    else:
        loss = _ContrastiveLoss.apply(x, y, scale, bias, _Spec(kind, _engine(name), group, local_grad))
    if x.dtype == torch.float16:
        _refuse_float16_overflow(loss, group, x)
    return loss if zero is None else loss + zero.to(loss.dtype)


def _refuse_float16_overflow(loss: torch.Tensor, group, x: torch.Tensor) -> None:
    """ValueError when the float16 loss came back inf: summed in float32 from checked finite
    inputs, so only its cast to the features' float16 can overflow (features x 100 at D = 32:
    a loss of 1.3e5). With a group each rank's loss is its own, so the ranks agree first (one
    all-reduce of a flag, float16 only): a rank raising alone would leave the others waiting in
    the backward pass's collectives."""
    overflow = ~torch.isfinite(loss.detach())
    where = ""
    if group is not None:
        import torch.distributed as dist
        flag = overflow.to(device=_exchange.comm_device(x, group), dtype=torch.float64).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        overflow, where = flag[0] > 0, " on at least one rank"
    if bool(overflow):
        raise ValueError(f"image_features, text_features: the loss exceeds float16's range (65504){where}, the dtype "
                         "of the features it is returned in: L2-normalise the features, as CLIP and SigLIP do, or "
                         "pass float32 features")


# The logits' largest magnitude, as a share of the accumulation dtype's range, that the loss
# takes: its sums run over up to 2**32 rows (float32: logits up to 7.9e28, which no normalised
# features times a logit scale come near; past float32's range the loss was NaN).
_LOGIT_HEADROOM = 2.0 ** -32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _engine(name: str):
    if name == "triton":
        from .kernels import contrastive as kernels  # lazy: triton is optional
        return kernels.TritonEngine()
    return ChunkedEngine(_CPU_CHUNK_ELEMENTS)


def _reference(kind, x, y, scale, bias):
    """The plain materialised formula (open_clip's computation), in float32 or float64."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = scale.to(dtype).reshape(()) * (x.to(dtype) @ y.to(dtype).T)
    if bias is not None:
        logits = logits + bias.to(dtype).reshape(())
    n = x.shape[0]
    if kind == "clip":
        labels = torch.arange(n, device=x.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        labels = 2 * torch.eye(n, dtype=dtype, device=x.device) - 1
        loss = -F.logsigmoid(labels * logits).sum() / n
    return loss.to(x.dtype)


def _reference_group(kind, x, y, scale, bias, group, local_grad):
    """The plain formula on a group: this rank's rows against the gathered batch, the same
    per-rank loss and gradients as the tiled engines (see :func:`clip_loss`)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, ys = x.to(dtype), y.to(dtype)
    s = scale.to(dtype).reshape(())
    b = 0.0 if bias is None else bias.to(dtype).reshape(())
    y_all, info = _exchange.gather_rows(ys, group, with_grad=not local_grad)
    n, total, world = xs.shape[0], info.total, info.world
    logits = s * xs @ y_all.T + b  # this rank's rows of S
    if kind == "clip":
        x_all, _ = _exchange.gather_rows(xs, group, with_grad=not local_grad)
        cols = torch.logsumexp(s * x_all @ ys.T + b, 0)  # the columns of this rank's texts
        diag = s * (xs * ys).sum(1) + b
        loss = (torch.logsumexp(logits, 1).sum() + cols.sum() - 2 * diag.sum()) * (world / (2 * total))
    else:
        labels = -torch.ones_like(logits)
        labels[torch.arange(n, device=x.device), torch.arange(n, device=x.device) + info.offset] = 1.0
        loss = -F.logsigmoid(labels * logits).sum() * (world / total)
    return loss.to(x.dtype)


# ----- autograd --------------------------------------------------------------------------------

@dataclass
class _Spec:
    kind: str
    engine: object
    group: object
    # open_clip's local_loss=True, gather_with_grad=False: each rank's features get only the
    # gradient of its own loss through its own logits rows (CLIP only).
    local_grad: bool = False


class _ContrastiveLoss(torch.autograd.Function):
    """Loss and all four gradients from the engine's tile passes (single process or a group)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, spec):
        eng = spec.engine
        s = float(scale.detach().reshape(()))
        b = 0.0 if bias is None else float(bias.detach().reshape(()))
        a = eng.prepare(x)
        bm = eng.prepare(y)
        dist_info = None
        if spec.group is not None:
            dist_info = _exchange.gather_columns(bm, spec.group)
            bm_all, offset, total = dist_info.y_all, dist_info.offset, dist_info.total
            world = dist_info.world
            if spec.local_grad:
                dist_info.x_all = _exchange.gather_columns(a, spec.group).y_all
        else:
            bm_all, offset, total, world = bm, 0, a.shape[0], 1
        n = a.shape[0]
        acc = _acc_dtype(x.dtype)
        diag = (a.to(acc) * bm.to(acc)).sum(1) * s + b  # S_ii of this rank's rows
        if spec.kind == "clip":
            r, col_max, col_sum = eng.clip_forward(a, bm_all, s, b)
            if dist_info is not None:
                col_max, col_sum = _exchange.combine_lse(col_max, col_sum, dist_info)
            c = col_max + torch.log(col_sum)
            loss = (r.sum() + c[offset:offset + n].sum() - 2 * diag.sum()) * (world / (2 * total))
            ctx.save_for_backward(x, y, scale, *(() if bias is None else (bias,)))
            ctx.stats = (a, bm_all, r, c)
        else:
            rows = eng.siglip_forward(a, bm_all, s, b, offset)
            loss = rows.sum() * (world / total)
            ctx.save_for_backward(x, y, scale, *(() if bias is None else (bias,)))
            ctx.stats = (a, bm_all)
        ctx.spec, ctx.dist_info, ctx.s, ctx.b, ctx.has_bias = spec, dist_info, s, b, bias is not None
        ctx.geometry = (offset, total, world)
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x, y, scale = saved[:3]
        bias = saved[3] if ctx.has_bias else None
        spec, info, s, b = ctx.spec, ctx.dist_info, ctx.s, ctx.b
        offset, total, world = ctx.geometry
        eng = spec.engine
        g = grad.detach().reshape(()).to(torch.float64)
        n = x.shape[0]
        acc = _acc_dtype(x.dtype)
        if spec.kind == "clip":
            a, bm_all, r, c = ctx.stats
            coef = world / (2 * total)
            w_row = torch.full((n,), float(g) * coef, dtype=acc, device=x.device)
            dbias = 0.0  # the bias cancels in both softmaxes
            if info is None:
                da, dy, ds = eng.clip_backward(a, bm_all, s, b, r, c, w_row, w_row, offset, False)
            elif spec.local_grad:
                # Image rows against all texts, then text rows against all images, each with
                # only this rank's loss terms (the other side's weights are zero).
                zeros = torch.zeros(total, dtype=acc, device=x.device)
                da, _, (ds_img, _) = eng.clip_backward(a, bm_all, s, b, r, c, w_row, zeros, offset, True)
                # The image rows' LSEs are not needed there (their weights are zero): an
                # infinite LSE makes those terms exactly 0 instead of 0 * overflow.
                never = torch.full((total,), math.inf, dtype=acc, device=x.device)
                dy, _, (ds_txt, _) = eng.clip_backward(eng.prepare(y), info.x_all, s, b, c[offset:offset + n],
                                                       never, w_row, zeros, offset, True)
                ds = float(ds_img.sum() + ds_txt.sum())
            else:
                # Column j's loss terms belong to the rank holding text j: weight them with
                # that rank's upstream gradient.
                g_ranks = _exchange.all_gather_scalar(g, info)
                w_col = torch.repeat_interleave(g_ranks.to(acc) * coef, info.sizes_t)
                da, db_part, (ds_row, ds_col) = eng.clip_backward(a, bm_all, s, b, r, c, w_row, w_col, offset, True)
                # One collective for the text gradients and the column part of ds.
                aug = _exchange.reduce_rows(torch.cat([db_part, ds_col[:, None]], 1), info)
                dy, ds = aug[:, :-1], float(ds_row.sum() + aug[:, -1].sum())
        else:
            a, bm_all = ctx.stats
            w_row = torch.full((n,), float(g) * world / total, dtype=acc, device=x.device)
            da, db_part, ds, dbias = eng.siglip_backward(a, bm_all, s, b, w_row, offset)
            dy = _exchange.reduce_rows(db_part, info) if info is not None else db_part
        dx = da.to(x.dtype) if ctx.needs_input_grad[0] else None
        dy = dy.to(y.dtype) if ctx.needs_input_grad[1] else None
        dscale = torch.full_like(scale, ds) if ctx.needs_input_grad[2] else None
        dbias_t = torch.full_like(bias, dbias) if bias is not None and ctx.needs_input_grad[3] else None
        grads = (dx, dy, dscale, dbias_t)
        if torch.is_grad_enabled():
            # create_graph=True: the tile passes build no graph, so a second derivative through
            # these gradients would silently be 0; mark them so that one raises instead.
            inputs = [t for t in saved if t.requires_grad]
            grads = tuple(None if t is None else _NoSecondOrder.apply(t, *inputs) for t in grads)
        return (*grads, None)


class _NoSecondOrder(torch.autograd.Function):
    """Identity on ``t`` whose backward raises. It takes the loss's inputs as well, so that
    differentiating ``t`` with respect to them reaches it (torch's once_differentiable only
    checks the upstream gradient, which create_graph=True usually leaves without grad)."""

    @staticmethod
    def forward(ctx, t, *inputs):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("clip_loss/siglip_loss: double backward is not supported by the chunked and triton "
                           "backends; use backend='torch' for higher-order gradients")
