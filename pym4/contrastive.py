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
matmuls in an autograd.Function, any device, memory O(B * chunk + B * D)), ``triton`` (fused
kernels in ``pym4.kernels.contrastive``), ``torch`` (the plain materialised formula: the
reference, never chosen automatically).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _backend
from ._arrays import check_int_at_least, from_tensor, to_tensor

__all__ = ["clip_loss", "siglip_loss", "similarity_topk"]

_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The chunked backend works on row chunks of the logits whose size is about this many elements
# (16 MB in float32): large enough for efficient matmuls, small enough to stay O(B).
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
    return from_tensor(values, q_origin), (indices.numpy() if q_origin.is_numpy else indices)


# ----- checks --------------------------------------------------------------------------------

def _check_features(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
    if t.dtype not in _FEATURE_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (batch, dim) tensor, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (batch, dim) tensor, got shape {tuple(t.shape)}")


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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number or a one-element tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float32, device=device), False


def _validate(x, y, logit_scale, logit_bias):
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
    checks = [torch.isfinite(x).all(), torch.isfinite(y).all(), torch.isfinite(scale.detach()).all(),
              (scale.detach() > 0).all()]
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
    elif bias is not None and not ok[4]:
        problem = "logit_bias: must be finite"
    return scale, bias, problem


# ----- dispatch ------------------------------------------------------------------------------

def _contrastive(kind, x, y, logit_scale, logit_bias, group, backend, local_grad=False):
    error = None
    try:
        scale, bias, problem = _validate(x, y, logit_scale, logit_bias)
    except (TypeError, ValueError) as e:
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
            # A bad input on one rank (a bad value, or a bad shape or dtype) must stop every
            # rank, not leave the others waiting in a collective.
            if isinstance(x, torch.Tensor):
                dev = _comm_device(x, group)
            else:
                dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
            bad = torch.tensor([0.0 if problem is None else 1.0], device=dev)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
            if problem is None and float(bad) > 0:
                problem = "image_features, text_features, logit_scale or logit_bias: bad input on another rank"
    if error is not None:
        raise error
    if problem is not None:
        raise ValueError(problem)
    name = _backend.choose(f"{kind}_loss", x.device.type, backend, dtype=str(x.dtype).replace("torch.", ""))
    if name == "torch":
        if group is not None:
            return _reference_group(kind, x, y, scale, bias, group, local_grad)
        return _reference(kind, x, y, scale, bias)
    return _ContrastiveLoss.apply(x, y, scale, bias, _Spec(kind, _engine(name), group, local_grad))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _engine(name: str):
    if name == "triton":
        from .kernels import contrastive as kernels  # lazy: triton is optional
        return kernels.TritonEngine()
    return ChunkedEngine()


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
    y_all, info = _gather_rows(ys, group, with_grad=not local_grad)
    n, total, world = xs.shape[0], info.total, info.world
    logits = s * xs @ y_all.T + b  # this rank's rows of S
    if kind == "clip":
        x_all, _ = _gather_rows(xs, group, with_grad=not local_grad)
        cols = torch.logsumexp(s * x_all @ ys.T + b, 0)  # the columns of this rank's texts
        diag = s * (xs * ys).sum(1) + b
        loss = (torch.logsumexp(logits, 1).sum() + cols.sum() - 2 * diag.sum()) * (world / (2 * total))
    else:
        labels = -torch.ones_like(logits)
        labels[torch.arange(n, device=x.device), torch.arange(n, device=x.device) + info.offset] = 1.0
        loss = -F.logsigmoid(labels * logits).sum() * (world / total)
    return loss.to(x.dtype)


# ----- the chunked engine ------------------------------------------------------------------

class ChunkedEngine:
    """The tile passes in plain torch, on row chunks of the logits (any device).

    Every method takes A (n_a x D) as the rows and Bm (n_b x D) as the columns of
    ``S = s * A @ Bm.T + b``; the diagonal of the loss sits at ``(i, offset + i)``. All
    results are float32 (float64 for float64 input); the logits never exceed
    ``chunk x n_b`` elements.
    """

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return t.detach().to(dtype).contiguous()

    @staticmethod
    def _chunk(n_b: int) -> int:
        return max(16, _CPU_CHUNK_ELEMENTS // max(n_b, 1))

    @staticmethod
    def _logits(a: torch.Tensor, bm: torch.Tensor, s: float, b: float) -> torch.Tensor:
        out = (a * s) @ bm.T
        if b != 0.0:
            out.add_(b)
        return out

    def clip_forward(self, a, bm, s, b):
        """Row log-sum-exps r (n_a) and the columns' running (max, sum of exp) over these rows."""
        n_a, n_b = a.shape[0], bm.shape[0]
        r = torch.empty(n_a, dtype=a.dtype, device=a.device)
        col_lse = torch.full((n_b,), -math.inf, dtype=a.dtype, device=a.device)
        ch = self._chunk(n_b)
        for i0 in range(0, n_a, ch):
            logits = self._logits(a[i0:i0 + ch], bm, s, b)
            r[i0:i0 + ch] = torch.logsumexp(logits, 1)
            # Online log-sum-exp down the columns, one row chunk at a time.
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, 0))
        # As (max, sum of exp) with the sum 1: the form the ranks' partial columns merge in.
        return r, col_lse, torch.ones_like(col_lse)

    def clip_backward(self, a, bm, s, b, r, c, w_row, w_col, offset, split_scale):
        """dA, the partial dBm over these rows, and the scale gradient.

        ``G_ij = w_row_i (e^{S_ij - r_i} - d_ij) + w_col_j (e^{S_ij - c_j} - d_ij)``. With
        ``split_scale`` the scale gradient comes as (per-row row-term part (n_a), per-column
        column-term part (n_b)); otherwise as one number.
        """
        n_a, n_b = a.shape[0], bm.shape[0]
        da = torch.empty_like(a)
        db_part = torch.zeros_like(bm)
        ds_row = torch.zeros(n_a, dtype=a.dtype, device=a.device) if split_scale else None
        ds_col = torch.zeros(n_b, dtype=a.dtype, device=a.device) if split_scale else None
        ch = self._chunk(n_b)
        positive_w_col = bool((w_col > 0).all())
        c_shift = c - torch.log(w_col) if positive_w_col else None
        for i0 in range(0, n_a, ch):
            ac = a[i0:i0 + ch]
            m = ac.shape[0]
            # The logits exactly as the forward pass rounded them: e^{S - c} must see the
            # same S as c did, or p - 1 on the diagonal loses its small value at large s.
            logits = self._logits(ac, bm, s, b)
            rows = torch.arange(m, device=a.device)
            cols = rows + (offset + i0)
            wr, wc = w_row[i0:i0 + m], w_col
            # e^{S_ij - r_i} is the row softmax (the rows are complete: all columns are here).
            p_row = torch.softmax(logits, 1)
            if split_scale:
                # sum_j G_ij (S_ij - b) / s, kept apart for the row and the column terms.
                p_col = torch.sub(logits, c[None, :]).exp_()
                diag = logits[rows, cols] - b
                ds_row[i0:i0 + m] = wr * (torch.linalg.vecdot(p_row, logits, dim=1) - b * p_row.sum(1) - diag) / s
                ds_col.add_(wc * (torch.linalg.vecdot(p_col, logits, dim=0) - b * p_col.sum(0)) / s)
                ds_col.index_add_(0, cols, -wc[cols] * diag / s)
                del logits
                p_col.mul_(wc[None, :])
            elif positive_w_col:
                # w_j e^{S_ij - c_j} = e^{S_ij - (c_j - log w_j)}: the weight costs no extra pass.
                p_col = logits.sub_(c_shift[None, :]).exp_()  # reuses the logits' storage
            else:
                p_col = logits.sub_(c[None, :]).exp_().mul_(wc[None, :])
            g = p_row.mul_(wr[:, None]).add_(p_col)
            g[rows, cols] -= wr + wc[cols]
            torch.mm(g, bm, out=da[i0:i0 + m]).mul_(s)
            db_part.addmm_(g.T, ac, alpha=s)
        ds = (ds_row, ds_col) if split_scale else float((a * da).sum()) / s
        return da, db_part, ds

    def siglip_forward(self, a, bm, s, b, offset):
        """Per-row sum_j softplus(S_ij) - S_{i, offset+i} (n_a)."""
        n_a, n_b = a.shape[0], bm.shape[0]
        out = torch.empty(n_a, dtype=a.dtype, device=a.device)
        ch = self._chunk(n_b)
        for i0 in range(0, n_a, ch):
            logits = self._logits(a[i0:i0 + ch], bm, s, b)
            m = logits.shape[0]
            rows = torch.arange(m, device=a.device)
            diag = logits[rows, rows + offset + i0]
            out[i0:i0 + m] = F.softplus(logits).sum(1) - diag
        return out

    def siglip_backward(self, a, bm, s, b, w_row, offset):
        """dA, the partial dBm, ds and db for ``G_ij = w_row_i (sigmoid(S_ij) - d_ij)``.

        Each G row belongs to its row's owner, so ``ds = <A, dA> / s`` holds per rank too.
        """
        n_b = bm.shape[0]
        da = torch.empty_like(a)
        db_part = torch.zeros_like(bm)
        db = torch.zeros((), dtype=a.dtype, device=a.device)
        ch = self._chunk(n_b)
        for i0 in range(0, a.shape[0], ch):
            ac = a[i0:i0 + ch]
            m = ac.shape[0]
            logits = self._logits(ac, bm, s, b)
            rows = torch.arange(m, device=a.device)
            cols = rows + offset + i0
            diag = logits[rows, cols]
            g = logits.sigmoid_()
            # sigmoid(S) - 1 = -sigmoid(-S), without the cancellation when S >> 0.
            g[rows, cols] = -torch.sigmoid(-diag)
            g.mul_(w_row[i0:i0 + m, None])
            db += g.sum()
            torch.mm(g, bm, out=da[i0:i0 + m]).mul_(s)
            db_part.addmm_(g.T, ac, alpha=s)
        ds = float((a * da).sum()) / s
        return da, db_part, ds, float(db)


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
            dist_info = _gather_columns(bm, spec.group)
            bm_all, offset, total = dist_info.y_all, dist_info.offset, dist_info.total
            world = dist_info.world
            if spec.local_grad:
                dist_info.x_all = _gather_columns(a, spec.group).y_all
        else:
            bm_all, offset, total, world = bm, 0, a.shape[0], 1
        n = a.shape[0]
        acc = _acc_dtype(x.dtype)
        diag = (a.to(acc) * bm.to(acc)).sum(1) * s + b  # S_ii of this rank's rows
        if spec.kind == "clip":
            r, col_max, col_sum = eng.clip_forward(a, bm_all, s, b)
            if dist_info is not None:
                col_max, col_sum = _combine_lse(col_max, col_sum, dist_info)
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
                g_ranks = _all_gather_scalar(g, info)
                w_col = torch.repeat_interleave(g_ranks.to(acc) * coef, info.sizes_t)
                da, db_part, (ds_row, ds_col) = eng.clip_backward(a, bm_all, s, b, r, c, w_row, w_col, offset, True)
                # One collective for the text gradients and the column part of ds.
                aug = _reduce_rows(torch.cat([db_part, ds_col[:, None]], 1), info)
                dy, ds = aug[:, :-1], float(ds_row.sum() + aug[:, -1].sum())
        else:
            a, bm_all = ctx.stats
            w_row = torch.full((n,), float(g) * world / total, dtype=acc, device=x.device)
            da, db_part, ds, dbias = eng.siglip_backward(a, bm_all, s, b, w_row, offset)
            dy = _reduce_rows(db_part, info) if info is not None else db_part
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


class _GatheredRows(torch.autograd.Function):
    """Identity from this rank's rows to the gathered ``info.y_all``; the backward sums the
    gradient over the ranks and keeps this rank's rows (open_clip's gather_with_grad)."""

    @staticmethod
    def forward(ctx, t, info):
        ctx.info = info
        return info.y_all.clone()

    @staticmethod
    def backward(ctx, grad):
        return _reduce_rows(grad, ctx.info), None


def _gather_rows(t: torch.Tensor, group, with_grad: bool):
    """(every rank's rows of t concatenated, the gather's _DistInfo). Without ``with_grad``
    only this rank's own rows carry a gradient (gather_with_grad=False)."""
    info = _gather_columns(t.detach(), group)
    if with_grad:
        return _GatheredRows.apply(t, info), info
    lo, hi = info.offset, info.offset + t.shape[0]
    return torch.cat([info.y_all[:lo], t, info.y_all[hi:]]), info


# ----- distributed plumbing ----------------------------------------------------------------------

@dataclass
class _DistInfo:
    group: object
    rank: int
    world: int
    sizes: list
    sizes_t: torch.Tensor
    offset: int
    total: int
    y_all: torch.Tensor
    comm_device: torch.device
    x_all: Optional[torch.Tensor] = None


def _comm_device(t: torch.Tensor, group) -> torch.device:
    import torch.distributed as dist
    return t.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _gather_columns(bm: torch.Tensor, group) -> _DistInfo:
    """All ranks' text features (B x D), after checking that every rank's input is usable."""
    import torch.distributed as dist
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = _comm_device(bm, group)
    meta = torch.tensor([bm.shape[0], bm.shape[1]], dtype=torch.int64, device=dev)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    metas = [m.tolist() for m in metas]
    if any(m[1] != bm.shape[1] for m in metas):
        raise ValueError(f"text_features: every rank must have the same feature dimension, got {[m[1] for m in metas]}")
    sizes = [m[0] for m in metas]
    width = max(sizes)
    padded = torch.zeros((width, bm.shape[1]), dtype=bm.dtype, device=dev)
    padded[:bm.shape[0]] = bm.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    y_all = torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(bm.device)
    return _DistInfo(group, rank, world, sizes, torch.tensor(sizes, device=bm.device), sum(sizes[:rank]),
                     sum(sizes), y_all, dev)


def _combine_lse(col_max, col_sum, info: _DistInfo):
    """Merge every rank's partial column (max, sum of exp) into the global ones."""
    import torch.distributed as dist
    gmax = col_max.to(info.comm_device).clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=info.group)
    gmax = gmax.to(col_max.device)
    scaled = (col_sum * torch.exp(col_max - gmax)).to(info.comm_device)
    dist.all_reduce(scaled, op=dist.ReduceOp.SUM, group=info.group)
    return gmax, scaled.to(col_sum.device)


def _all_gather_scalar(v: torch.Tensor, info: _DistInfo) -> torch.Tensor:
    import torch.distributed as dist
    t = v.reshape(1).to(info.comm_device, torch.float64)
    parts = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(parts, t, group=info.group)
    return torch.cat(parts).to(v.device)


def _reduce_rows(t: torch.Tensor, info: _DistInfo) -> torch.Tensor:
    """Sum a (B x k) tensor over the ranks and keep this rank's rows (a reduce-scatter)."""
    import torch.distributed as dist
    lo, hi = info.offset, info.offset + info.sizes[info.rank]
    if dist.get_backend(info.group) == "nccl" and len(set(info.sizes)) == 1:
        out = torch.empty((hi - lo, t.shape[1]), dtype=t.dtype, device=t.device)
        dist.reduce_scatter_tensor(out, t.contiguous(), op=dist.ReduceOp.SUM, group=info.group)
        return out
    # gloo has no reduce-scatter: all-reduce and slice (twice the traffic, same result).
    buf = t.to(info.comm_device).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=info.group)
    return buf[lo:hi].to(t.device)
