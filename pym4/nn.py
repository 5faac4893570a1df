"""Drop-in ``torch.nn`` modules for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor options (where they make sense without open_clip's B x B logits), same
``forward`` signature, same values and gradients; the work is done by
:func:`pym4.clip_loss` / :func:`pym4.siglip_loss`, so no process ever forms the B x B (or,
distributed, the B_r x B) logits.
"""
from __future__ import annotations

from typing import Optional

import torch

from .contrastive import _contrastive

__all__ = ["ClipLoss", "SigLipLoss"]


def _check_options(rank, world_size, **flags) -> None:
    """rank and world_size integers with 0 <= rank < world_size, each flag a bool: a
    world_size of 2.0 or local_loss='yes' (truthy) would pick a mode the caller did not mean."""
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an integer, got {v!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank, world_size: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected True or False, got {v!r}")


def _world_group(rank: int, world_size: int, name: str):
    """The default process group, after checking it agrees with the module's rank/world_size."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"world_size: {name} with world_size={world_size} needs torch.distributed initialised")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size: {world_size} does not match torch.distributed's {dist.get_world_size()}")
    if dist.get_rank() != rank:
        raise ValueError(f"rank: {rank} does not match torch.distributed's rank {dist.get_rank()}")
    return dist.group.WORLD


class _MeanOverRanks(torch.autograd.Function):
    """``mean_r t_r`` on every rank. Backward: ``adjoint`` (the mean of the ranks' incoming
    gradients, the true adjoint) or ``local`` (this rank's gradient / W, as when each rank
    differentiates only its own copy)."""

    @staticmethod
    def forward(ctx, t, group, mode):
        import torch.distributed as dist
        ctx.group, ctx.mode, ctx.world = group, mode, dist.get_world_size(group)
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out / ctx.world

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.clone()
        if ctx.mode == "adjoint":
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad / ctx.world, None, None


class _ReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums (or averages) the gradient over the ranks, for a
    replicated parameter whose loss terms are spread over the ranks."""

    @staticmethod
    def forward(ctx, t, group, average):
        ctx.group, ctx.average = group, average
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.average:
            grad = grad / dist.get_world_size(ctx.group)
        return grad, None, None


class ClipLoss(torch.nn.Module):
    """open_clip's ``ClipLoss``: ``(CE(S, arange) + CE(S^T, arange)) / 2``, ``S = s x y^T + b``.

    Parameters
    ----------
    local_loss, gather_with_grad : bool
        open_clip's distributed modes (ignored when ``world_size == 1``); values and
        gradients equal open_clip's in all four combinations (given the same upstream gradient
        on every rank, as DDP has). ``local_loss=True, gather_with_grad=True`` is the one whose
        averaged gradients equal one process on the whole batch; it is
        :func:`pym4.clip_loss` with ``group``.
    cache_labels : bool
        Accepted for compatibility; there are no label tensors to cache.
    rank, world_size : int
        Must agree with the initialised default process group when ``world_size > 1``.
    use_horovod : bool
        Not supported (must be False).
    backend : str, optional
        Forwarded to :func:`pym4.clip_loss`.

    ``forward(image_features (B, D), text_features (B, D), logit_scale, logit_bias=None,
    output_dict=False)`` returns the 0-d loss, or ``{"contrastive_loss": loss}``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        _check_options(rank, world_size, local_loss=local_loss, gather_with_grad=gather_with_grad,
                       cache_labels=cache_labels, use_horovod=use_horovod)
        if use_horovod:
            raise ValueError("use_horovod: horovod is not supported; use torch.distributed")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod, self.backend = rank, world_size, use_horovod, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        if self.world_size == 1:
            loss = _contrastive("clip", image_features, text_features, logit_scale, logit_bias, None, self.backend)
        elif self.local_loss:
            group = _world_group(self.rank, self.world_size, "ClipLoss")
            loss = _contrastive("clip", image_features, text_features, logit_scale, logit_bias, group, self.backend,
                                local_grad=not self.gather_with_grad)
        else:
            # Every rank reports the loss of the whole batch. open_clip differentiates it
            # through the gathered features of all ranks (gather_with_grad) or through its
            # own only; the per-rank losses and the two reductions below give the same.
            group = _world_group(self.rank, self.world_size, "ClipLoss")
            mean_grad = self.gather_with_grad
            scale = _replicated(logit_scale, group, mean_grad)
            bias = _replicated(logit_bias, group, mean_grad)
            local = _contrastive("clip", image_features, text_features, scale, bias, group, self.backend)
            loss = _MeanOverRanks.apply(local, group, "adjoint" if self.gather_with_grad else "local")
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(torch.nn.Module):
    """open_clip's ``SigLipLoss``: ``-sum log sigmoid(z * S) / B``, ``z = 2 I - 1``.

    Parameters
    ----------
    cache_labels : bool
        Accepted for compatibility; there are no label tensors to cache.
    rank, world_size : int
        Must agree with the initialised default process group when ``world_size > 1``.
    dist_impl : {"bidir", "shift", "reduce", "gather"}, optional
        open_clip's ways of exchanging text features; all give the same loss and gradients,
        which is what pym4 computes (it gathers the text features once, without B_r x B
        logits), so the choice is only validated.
    backend : str, optional
        Forwarded to :func:`pym4.siglip_loss`.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: Optional[str] = None):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl: expected 'bidir', 'shift', 'reduce' or 'gather', got {dist_impl!r}")
        _check_options(rank, world_size, cache_labels=cache_labels)
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        group = _world_group(self.rank, self.world_size, "SigLipLoss") if self.world_size > 1 else None
        loss = _contrastive("siglip", image_features, text_features, logit_scale, logit_bias, group, self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


def _replicated(value, group, average: bool):
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return _ReduceGrad.apply(value, group, average)
    return value
