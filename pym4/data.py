"""Data-loading helpers: draw training examples according to M4 keep probabilities."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

from ._arrays import to_tensor

__all__ = ["BalancedSampler"]


class BalancedSampler(Sampler[int]):
    """A ``torch.utils.data`` sampler that applies M4 keep probabilities ``q`` each epoch.

    mode="bernoulli" (default): every epoch keeps example i with probability q_i,
        independently (a fresh draw per epoch, so over epochs every example is seen in
        proportion to q_i), and yields the kept indices in random order; ``len()`` is the
        number kept in the current epoch.
    mode="weighted": every epoch draws ``num_samples`` indices with probability
        proportional to q (with replacement unless ``replacement=False``); default
        ``num_samples = round(sum q)``, the expected number kept. A fixed epoch length.

    Epochs are reproducible from ``(seed, epoch)``. A completed iteration moves on to the
    next epoch, and :meth:`set_epoch` chooses one (as with DistributedSampler); ``len()`` is
    the length of the epoch about to be (or being) iterated.

    Distributed training: with ``num_replicas`` and ``rank`` (default: from an initialised
    torch.distributed), every rank draws the same epoch from the same seed and takes every
    ``num_replicas``-th index starting at ``rank``; the epoch is padded by repeating its
    first indices so that every rank yields the same number (DDP needs equal batch counts).

    q : (N,) probabilities in [0, 1] (numpy array or tensor), e.g. ``balance(...).q``.
    """

    def __init__(self, q, *, mode: str = "bernoulli", num_samples: Optional[int] = None, replacement: bool = True,
                 seed: int = 0, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        t, _ = to_tensor(q, "q")
        if t.dim() != 1:
            raise ValueError(f"q: expected a 1-D array of keep probabilities, got shape {tuple(t.shape)}")
        self.q = t.detach().cpu().double().numpy().copy()
        if not np.all(np.isfinite(self.q)) or np.any(self.q < 0) or np.any(self.q > 1):
            raise ValueError("q: keep probabilities must be finite and in [0, 1]")
        if mode not in ("bernoulli", "weighted"):
            raise ValueError(f"mode: expected 'bernoulli' or 'weighted', got {mode!r}")
        total = float(self.q.sum())
        if not total > 0:
            raise ValueError("q: all keep probabilities are zero; nothing to sample")
        self.mode = mode
        if num_samples is None:
            num_samples = max(1, int(round(total)))
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples: must be a positive integer, got {num_samples!r}")
        if mode == "weighted" and not replacement and num_samples > int((self.q > 0).sum()):
            raise ValueError(f"num_samples: {num_samples} draws without replacement exceed the "
                             f"{int((self.q > 0).sum())} examples with q > 0")
        self.num_samples = int(num_samples)
        self.replacement = bool(replacement)
        self.seed = int(seed)
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        self.epoch = 0
        self._cache = None  # (epoch, indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> np.ndarray:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "bernoulli":
            kept = np.flatnonzero(rng.random(self.q.shape[0]) < self.q)
            idx = rng.permutation(kept)
        else:
            idx = rng.choice(self.q.shape[0], size=self.num_samples, replace=self.replacement, p=self.q / self.q.sum())
        if self.num_replicas > 1:
            per_rank = -(-idx.shape[0] // self.num_replicas)  # ceil
            padded = np.resize(idx, per_rank * self.num_replicas) if idx.shape[0] else idx
            idx = padded[self.rank::self.num_replicas]
        self._cache = (self.epoch, idx)
        return idx

    def __iter__(self) -> Iterator[int]:
        yield from self._indices().tolist()
        self.epoch += 1  # only once the epoch was used up

    def __len__(self) -> int:
        return int(self._indices().shape[0])


def _replicas(num_replicas, rank):
    if num_replicas is None and rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0
    if num_replicas is None or rank is None:
        raise ValueError("num_replicas, rank: give both or neither")
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
        raise ValueError(f"num_replicas: must be a positive integer, got {num_replicas!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank: must be an integer in [0, {num_replicas}), got {rank!r}")
    return int(num_replicas), int(rank)
