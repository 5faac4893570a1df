"""Feature exchange between ranks for the contrastive losses (pym4.contrastive): gather
every rank's rows without forming anything B x B, merge partial column log-sum-exps, and
sum gradients back to the rows' owners. Works with NCCL (on the tensors' device) and gloo
(through the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DistInfo:
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


def comm_device(t: torch.Tensor, group) -> torch.device:
    import torch.distributed as dist
    return t.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def gather_columns(bm: torch.Tensor, group) -> DistInfo:
    """All ranks' text features (B x D), after checking that every rank's input is usable."""
    import torch.distributed as dist
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = comm_device(bm, group)
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
    return DistInfo(group, rank, world, sizes, torch.tensor(sizes, device=bm.device), sum(sizes[:rank]),
                     sum(sizes), y_all, dev)


def combine_lse(col_max, col_sum, info: DistInfo):
    """Merge every rank's partial column (max, sum of exp) into the global ones."""
    import torch.distributed as dist
    gmax = col_max.to(info.comm_device).clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=info.group)
    gmax = gmax.to(col_max.device)
    scaled = (col_sum * torch.exp(col_max - gmax)).to(info.comm_device)
    dist.all_reduce(scaled, op=dist.ReduceOp.SUM, group=info.group)
    return gmax, scaled.to(col_sum.device)


def all_gather_scalar(v: torch.Tensor, info: DistInfo) -> torch.Tensor:
    import torch.distributed as dist
    t = v.reshape(1).to(info.comm_device, torch.float64)
    parts = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(parts, t, group=info.group)
    return torch.cat(parts).to(v.device)


def reduce_rows(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
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


class _GatheredRows(torch.autograd.Function):
    """Identity from this rank's rows to the gathered ``info.y_all``; the backward sums the
    gradient over the ranks and keeps this rank's rows (open_clip's gather_with_grad)."""

    @staticmethod
    def forward(ctx, t, info):
        ctx.info = info
        return info.y_all.clone()

    @staticmethod
    def backward(ctx, grad):
        return reduce_rows(grad, ctx.info), None


def gather_rows(t: torch.Tensor, group, with_grad: bool):
    """(every rank's rows of t concatenated, the gather's DistInfo). Without ``with_grad``
    only this rank's own rows carry a gradient (gather_with_grad=False)."""
    info = gather_columns(t.detach(), group)
    if with_grad:
        return _GatheredRows.apply(t, info), info
    lo, hi = info.offset, info.offset + t.shape[0]
    return torch.cat([info.y_all[:lo], t, info.y_all[hi:]]), info
