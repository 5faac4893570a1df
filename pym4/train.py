"""Training: SwAV (online clustering with Sinkhorn codes) and CLIP/SigLIP two-tower models.

A thin layer over torch; the hot operations are pym4's:

- SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
  Assignments", NeurIPS 2020): :class:`SwAVHead` (projection MLP + L2-normalised prototypes),
  :func:`swav_loss` (the swapped-prediction loss, codes from :func:`pym4.sinkhorn`),
  :class:`SwAVQueue` (features of earlier batches for the codes), :func:`multi_crop`
  (batched random resized crops) and :func:`train_swav`, a loop that runs on CPU.
- CLIP / SigLIP (Radford et al. 2021; Zhai et al. 2023): :class:`TwoTower` with a learnable
  logit scale (stored as its log, as CLIP does) and bias, trained by
  :func:`train_contrastive` with :func:`pym4.clip_loss` / :func:`pym4.siglip_loss`, any
  sampler (e.g. M4's ``pym4.data.BalancedSampler``), and, when torch.distributed is
  initialised, DistributedDataParallel plus the losses' cross-rank feature exchange.

Both loops take any backbone or encoders (``nn.Module``); the small networks ``pym4 demo``
trains live in :mod:`pym4.demo.networks`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SwAVHead", "SwAVQueue", "swav_loss", "multi_crop", "SwAVConfig", "train_swav", "TwoTower",
           "ContrastiveConfig", "train_contrastive", "embed"]


def _progress(iterable=None, total=None, desc=None, enabled=True):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


# ===== SwAV ==================================================================================

class SwAVHead(nn.Module):
    """Projection MLP and prototypes of SwAV.

    ``z = normalize(W2 relu(BN(W1 h)))`` (B, out_dim) and ``scores = z @ C^T`` (B, K) with
    unit-norm prototypes ``C`` (K, out_dim); call :meth:`normalize_prototypes` after every
    optimiser step so the scores stay cosine similarities.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 128, out_dim: int = 32, n_prototypes: int = 30):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                        ("n_prototypes", n_prototypes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        self.projection = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                        nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.projection(h), dim=1)
        return z, self.prototypes(z)


class SwAVQueue:
    """First-in first-out store of the projected features of past global crops.

    SwAV adds them to the Sinkhorn input when the batch is small relative to the number of
    prototypes, so that the equipartition constraint is imposed over more samples; only the
    current batch's codes are used in the loss. One queue per global crop, ``length`` rows each.
    """

    def __init__(self, n_global: int, length: int, dim: int):
        if length < 1:
            raise ValueError(f"length: expected a positive integer, got {length!r}")
        self.features = torch.zeros(n_global, length, dim)
        self.filled = 0

    def scores(self, i: int, prototypes: torch.Tensor) -> Optional[torch.Tensor]:
        """(filled, K) scores of queue ``i`` against the prototypes, or None while empty."""
        if self.filled == 0:
            return None
        return self.features[i, : self.filled] @ prototypes.T

    @torch.no_grad()
    def push(self, z_global: Sequence[torch.Tensor]) -> None:
        b = z_global[0].shape[0]
        length = self.features.shape[1]
        if b >= length:
            for i, z in enumerate(z_global):
                self.features[i] = z[-length:].detach().to(self.features)
            self.filled = length
            return
        self.features[:, b:] = self.features[:, :-b].clone()
        for i, z in enumerate(z_global):
            self.features[i, :b] = z.detach().to(self.features)
        self.filled = min(length, self.filled + b)


def swav_loss(scores: Sequence[torch.Tensor], n_global: int = 2, *, temperature: float = 0.1,
              epsilon: float = 0.05, n_iters: int = 3, queue_scores: Optional[Sequence[Optional[torch.Tensor]]] = None,
              group=None) -> torch.Tensor:
    """SwAV's swapped-prediction loss.

    For each global crop ``i`` the codes ``q_i = sinkhorn(scores_i, epsilon, n_iters)`` (no
    gradient; :func:`pym4.sinkhorn`, with the queue's scores stacked on top when given) are
    predicted from every other crop ``v``:

    ``L = 1/n_global sum_i 1/(V-1) sum_{v != i} -1/B sum_b sum_k q_i[b,k] log softmax(scores_v[b] / T)_k``.

    Parameters
    ----------
    scores : list of V Tensors (B, K)
        Prototype scores (cosine similarities) of each crop of the same B images; the first
        ``n_global`` are the global crops.
    n_global : int, number of crops codes are computed from (SwAV: the 2 large crops)
    temperature : float, T of the softmax (SwAV: 0.1)
    epsilon, n_iters : Sinkhorn's regularisation and iterations (SwAV: 0.05, 3)
    queue_scores : list of n_global Tensors (Q, K) or None
    group : torch.distributed group over which the batch is split (codes equipartition the
        global batch)

    Returns
    -------
    0-d Tensor.
    """
    from ._sinkhorn import sinkhorn

    if len(scores) < 2:
        raise ValueError(f"scores: expected at least 2 crops, got {len(scores)}")
    if not 1 <= n_global <= len(scores):
        raise ValueError(f"n_global: expected 1 <= n_global <= {len(scores)}, got {n_global}")
    shape = scores[0].shape
    for v, s in enumerate(scores):
        if s.dim() != 2 or s.shape != shape:
            raise ValueError(f"scores[{v}]: expected shape {tuple(shape)} like scores[0], got {tuple(s.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature!r}")
    b = shape[0]
    log_p = [F.log_softmax(s / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros(())
    for i in range(n_global):
        with torch.no_grad():
            s = scores[i].detach()
            if queue_scores is not None and queue_scores[i] is not None:
                s = torch.cat([queue_scores[i].to(s), s])
            q = sinkhorn(s, epsilon, n_iters, group=group)[-b:]
        sub = scores[0].new_zeros(())
        for v in range(len(scores)):
            if v != i:
                sub = sub - (q * log_p[v]).sum(1).mean()
        total = total + sub / (len(scores) - 1)
    return total / n_global


def multi_crop(x: torch.Tensor, n: int, size: int, scale: Tuple[float, float], *, max_rotation: float = 0.0,
               noise: float = 0.0, contrast: float = 0.0, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """``n`` random resized crops of every image, batched with one ``grid_sample`` per crop.

    Each crop covers a random fraction ``scale`` of the image area (square, random position,
    rotation in ``[-max_rotation, max_rotation]`` degrees), resampled bilinearly to
    ``size`` x ``size``; then per-image contrast jitter ``x * (1 + U(-c, c))`` and Gaussian
    noise. ``x`` is (B, C, H, W); returns n Tensors (B, C, size, size).
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected (batch, channels, height, width), got shape {tuple(x.shape)}")
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale: expected 0 < low <= high <= 1, got {scale}")
    b = x.shape[0]
    out = []
    for _ in range(n):
        def u(a, c):
            return a + (c - a) * torch.rand(b, generator=generator)
        side = torch.sqrt(u(lo, hi))             # crop side as a fraction of the image side
        tx, ty = (1 - side) * u(-1, 1), (1 - side) * u(-1, 1)
        angle = math.radians(max_rotation) * u(-1, 1)
        cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x), [b, x.shape[1], size, size], align_corners=False)
        crop = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if contrast > 0:
            crop = crop * (1 + contrast * u(-1, 1)).to(x)[:, None, None, None]
        if noise > 0:
            crop = crop + noise * torch.randn(crop.shape, generator=generator).to(x)
        out.append(crop)
    return out


@dataclass
class SwAVConfig:
    """Hyper-parameters of :func:`train_swav` (defaults: tuned for 8 x 8 digits on a CPU)."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    n_prototypes: int = 30
    hidden_dim: int = 128
    out_dim: int = 32
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    n_global: int = 2
    global_size: int = 8
    global_scale: Tuple[float, float] = (0.45, 1.0)
    n_local: int = 2
    local_size: int = 6
    local_scale: Tuple[float, float] = (0.15, 0.45)
    max_rotation: float = 15.0
    noise: float = 0.05
    contrast: float = 0.3
    queue_length: int = 0
    queue_start_epoch: int = 0
    freeze_prototypes_steps: int = 30
    seed: int = 0


def train_swav(backbone: nn.Module, images: torch.Tensor, config: Optional[SwAVConfig] = None, *,
               head: Optional[SwAVHead] = None, progress: bool = True, group=None) -> Dict[str, object]:
    """Train ``backbone`` with SwAV on ``images`` (B, C, H, W) and return the trained parts.

    Each step draws ``n_global`` large crops and ``n_local`` small ones of a batch
    (:func:`multi_crop`), embeds them with ``backbone`` then the head, computes Sinkhorn codes
    of the large crops (optionally with a :class:`SwAVQueue`) and minimises :func:`swav_loss`
    with AdamW and a warm-up + cosine schedule. The prototypes stay frozen for the first
    ``freeze_prototypes_steps`` steps and are re-normalised after every step, as in SwAV.
    With ``group``, each process passes its own shard of the images and gradients are
    all-reduced (the loss equipartitions codes over the global batch).

    Returns ``{"head": SwAVHead, "loss": [per-step losses]}``; ``backbone`` is trained in place
    and left in eval mode.
    """
    cfg = config or SwAVConfig()
    if images.dim() != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"images: need at least 2 images, got {images.shape[0]}")
    if cfg.n_global < 1 or cfg.n_global + cfg.n_local < 2:
        raise ValueError(f"config: need n_global >= 1 and at least 2 crops, got {cfg.n_global} + {cfg.n_local}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out_dim = getattr(backbone, "out_dim", None)
    if head is None:
        if out_dim is None:
            with torch.no_grad():
                out_dim = backbone.eval()(images[:2]).shape[1]
        head = SwAVHead(out_dim, cfg.hidden_dim, cfg.out_dim, cfg.n_prototypes)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = images.shape[0]
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = cfg.epochs * steps_per_epoch
    queue = SwAVQueue(cfg.n_global, cfg.queue_length, cfg.out_dim) if cfg.queue_length > 0 else None
    losses: List[float] = []
    backbone.train()
    head.train()
    step = 0
    bar = _progress(total=total, desc="SwAV", enabled=progress)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for it in range(steps_per_epoch):
            x = images[perm[it * batch:(it + 1) * batch]]
            crops = multi_crop(x, cfg.n_global, cfg.global_size, cfg.global_scale, max_rotation=cfg.max_rotation,
                               noise=cfg.noise, contrast=cfg.contrast, generator=gen)
            if cfg.n_local:
                crops += multi_crop(x, cfg.n_local, cfg.local_size, cfg.local_scale, max_rotation=cfg.max_rotation,
                                    noise=cfg.noise, contrast=cfg.contrast, generator=gen)
            # One forward per resolution, as SwAV batches crops of equal size together.
            z_g, s_g = head(backbone(torch.cat(crops[: cfg.n_global])))
            zs, scores = list(z_g.chunk(cfg.n_global)), list(s_g.chunk(cfg.n_global))
            if cfg.n_local:
                _, s_l = head(backbone(torch.cat(crops[cfg.n_global:])))
                scores += list(s_l.chunk(cfg.n_local))
            use_queue = queue is not None and epoch >= cfg.queue_start_epoch
            q_scores = None
            if use_queue:
                with torch.no_grad():
                    q_scores = [queue.scores(i, head.prototypes.weight) for i in range(cfg.n_global)]
            loss = swav_loss(scores, cfg.n_global, temperature=cfg.temperature, epsilon=cfg.epsilon,
                             n_iters=cfg.sinkhorn_iters, queue_scores=q_scores, group=group)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if group is not None:
                _all_reduce_grads(params, group)
            if step < cfg.freeze_prototypes_steps:
                head.prototypes.weight.grad = None
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _cosine_lr(step, total, cfg.warmup_steps)
            opt.step()
            head.normalize_prototypes()
            if queue is not None and epoch + 1 >= cfg.queue_start_epoch:
                queue.push(zs)
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    backbone.eval()
    head.eval()
    return {"head": head, "loss": losses}


def _all_reduce_grads(params, group) -> None:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= world


# ===== CLIP / SigLIP =========================================================================

class TwoTower(nn.Module):
    """A CLIP/SigLIP model: image and text encoders, a learnable logit scale and bias.

    ``logit_scale`` is ``exp(t)`` of a learned ``t`` (CLIP: ``t0 = log(1/0.07)``; SigLIP:
    ``log 10``), clamped to ``max_logit_scale`` after each step by :meth:`clamp_`;
    ``logit_bias`` (SigLIP: initialised to -10) is learned too, or absent (CLIP default).

    ``forward(images, tokens)`` returns ``(image_features, text_features, logit_scale,
    logit_bias)`` with L2-normalised features, the arguments of :meth:`loss`.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, *, loss: str = "clip",
                 init_logit_scale: Optional[float] = None, init_logit_bias: Optional[float] = None,
                 max_logit_scale: float = 100.0):
        super().__init__()
        if loss not in ("clip", "siglip"):
            raise ValueError(f"loss: expected 'clip' or 'siglip', got {loss!r}")
        self.image_encoder, self.text_encoder, self.loss_kind = image_encoder, text_encoder, loss
        if init_logit_scale is None:
            init_logit_scale = 1 / 0.07 if loss == "clip" else 10.0
        if not init_logit_scale > 0:
            raise ValueError(f"init_logit_scale: must be > 0, got {init_logit_scale!r}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale), dtype=torch.float32))
        if init_logit_bias is None and loss == "siglip":
            init_logit_bias = -10.0
        self.logit_bias = (nn.Parameter(torch.tensor(float(init_logit_bias), dtype=torch.float32))
                           if init_logit_bias is not None else None)
        self.max_log_scale = math.log(max_logit_scale)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.image_encoder(images)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.text_encoder(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp(), self.logit_bias

    def loss(self, image_features, text_features, logit_scale, logit_bias, *, group=None) -> torch.Tensor:
        """pym4's CLIP or SigLIP loss of one (local) batch; ``group``: see :func:`pym4.clip_loss`."""
        from .contrastive import clip_loss, siglip_loss

        fn = clip_loss if self.loss_kind == "clip" else siglip_loss
        return fn(image_features, text_features, logit_scale, logit_bias, group=group)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)


@dataclass
class ContrastiveConfig:
    """Hyper-parameters of :func:`train_contrastive`."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    steps_per_epoch: Optional[int] = None  # default: len(sampler) // batch_size
    seed: int = 0


def train_contrastive(model: TwoTower, dataset, config: Optional[ContrastiveConfig] = None, *, sampler=None,
                      progress: bool = True, desc: str = "CLIP") -> Dict[str, List[float]]:
    """Train a :class:`TwoTower` on image-caption pairs with pym4's CLIP or SigLIP loss.

    Parameters
    ----------
    model : TwoTower (or a DistributedDataParallel wrapping one)
    dataset : a map-style dataset of ``(image, tokens)``; when it has ``get_batch(indices)``
        batches are taken with one indexing call instead of per-item collation.
    config : ContrastiveConfig
    sampler : iterable of indices, optional
        E.g. ``pym4.data.BalancedSampler(q)`` to train on M4-balanced data; its
        ``set_epoch(epoch)`` is called when present. Default: a random permutation per epoch
        (a ``DistributedSampler`` when torch.distributed is initialised with several ranks).

    Distributed (DDP-ready): when ``torch.distributed`` is initialised with more than one
    process, the model is wrapped in ``DistributedDataParallel`` (unless it already is) and
    the loss gets ``group=WORLD``, so each rank's images are contrasted with every rank's
    texts and DDP's gradient average equals one process on the global batch.

    Returns
    -------
    ``{"loss": [...], "logit_scale": [...]}`` per step. The model is trained in place and
    left in eval mode.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cfg = config or ContrastiveConfig()
    if len(dataset) < 1:
        raise ValueError("dataset: is empty")
    if cfg.batch_size < 1 or cfg.epochs < 1:
        raise ValueError(f"config: batch_size and epochs must be >= 1, got {cfg.batch_size}, {cfg.epochs}")
    torch.manual_seed(cfg.seed)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    group = dist.group.WORLD if distributed else None
    module = model.module if isinstance(model, DistributedDataParallel) else model
    if not isinstance(module, TwoTower):
        raise TypeError(f"model: expected a TwoTower (or DDP of one), got {type(module).__name__}")
    net = model
    if distributed and not isinstance(model, DistributedDataParallel):
        net = DistributedDataParallel(model)
    if sampler is None:
        if distributed:
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=cfg.seed)
        else:
            sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed))
    n_items = len(sampler)
    batch = min(cfg.batch_size, n_items)
    steps_per_epoch = cfg.steps_per_epoch or max(1, n_items // batch)
    total = cfg.epochs * steps_per_epoch
    decay = [p for n_, p in module.named_parameters() if p.dim() > 1]
    no_decay = [p for n_, p in module.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    get_batch = getattr(dataset, "get_batch", None)
    history: Dict[str, List[float]] = {"loss": [], "logit_scale": []}
    net.train()
    step = 0
    bar = _progress(total=total, desc=desc, enabled=progress)
    for epoch in range(cfg.epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batches = _batches(sampler, batch, steps_per_epoch)
        for idx in batches:
            if get_batch is not None:
                images, tokens = get_batch(torch.as_tensor(idx, dtype=torch.int64))
            else:
                images, tokens = torch.utils.data.default_collate([dataset[int(i)] for i in idx])
            img_f, txt_f, scale, bias = net(images, tokens)
            loss = module.loss(img_f, txt_f, scale, bias, group=group)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _cosine_lr(step, total, cfg.warmup_steps)
            opt.step()
            module.clamp_()
            history["loss"].append(float(loss.detach()))
            history["logit_scale"].append(float(module.logit_scale.detach().exp()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
    bar.close()
    net.eval()
    return history


def _batches(sampler, batch: int, steps: int):
    """``steps`` full batches of indices, drawing the sampler again when it runs out."""
    buf: List[int] = []
    it = iter(sampler)
    done = 0
    restarted = False
    while done < steps:
        try:
            buf.append(int(next(it)))
            restarted = False
        except StopIteration:
            if restarted:  # the sampler yields nothing
                raise ValueError("sampler: yielded no indices")
            it, restarted = iter(sampler), True
            continue
        if len(buf) == batch:
            yield buf
            buf = []
            done += 1


@torch.no_grad()
def embed(model: TwoTower, images: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None,
          batch_size: int = 1024) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """L2-normalised image and text features of a trained model, computed in eval mode in batches."""
    was_training = model.training
    model.eval()
    img = torch.cat([model.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]) \
        if images is not None else None
    txt = torch.cat([model.encode_text(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)]) \
        if tokens is not None else None
    model.train(was_training)
    return img, txt
