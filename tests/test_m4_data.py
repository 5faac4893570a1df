"""BalancedSampler: per-epoch Bernoulli keep and weighted sampling from M4 keep probabilities."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pym4.data import BalancedSampler


def test_bernoulli_epochs_follow_q():
    q = np.r_[np.zeros(100), np.full(100, 0.5), np.ones(100)]
    sampler = BalancedSampler(q, seed=1)
    counts = np.zeros(300)
    for _ in range(200):
        n = len(sampler)
        idx = list(sampler)
        assert len(idx) == n and len(set(idx)) == n  # no repeats within an epoch
        counts[idx] += 1
    assert counts[:100].sum() == 0 and np.all(counts[200:] == 200)
    assert abs(counts[100:200].mean() / 200 - 0.5) < 0.02
    again = BalancedSampler(q, seed=1)
    again.set_epoch(3)
    ref = BalancedSampler(q, seed=1)
    for _ in range(3):
        list(ref)
    assert list(again) == list(ref)


def test_weighted_fixed_length_and_dataloader():
    q = torch.tensor([0.0, 0.1, 0.3, 0.6], dtype=torch.float64)
    sampler = BalancedSampler(q, mode="weighted", num_samples=20000, seed=0)
    idx = np.array(list(sampler))
    assert len(idx) == 20000 and len(sampler) == 20000
    freq = np.bincount(idx, minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.0, 0.1, 0.3, 0.6], atol=0.015)
    ds = TensorDataset(torch.arange(4))
    loader = DataLoader(ds, batch_size=8, sampler=BalancedSampler(q, mode="weighted", num_samples=16))
    batches = [b[0] for b in loader]
    assert len(batches) == 2 and all(int(x) != 0 for b in batches for x in b)


@pytest.mark.parametrize("q,kw,match", [
    (np.array([0.5, 1.5]), {}, "q: keep probabilities must be finite and in"),
    (np.zeros(3), {}, "all keep probabilities are zero"),
    (np.ones((2, 2)), {}, "q: expected a 1-D"),
    (np.ones(3), {"mode": "x"}, "mode: expected"),
    (np.array([0.5, 0.0]), {"mode": "weighted", "num_samples": 2, "replacement": False}, "exceed"),
])
def test_bad_input(q, kw, match):
    with pytest.raises(ValueError, match=match):
        BalancedSampler(q, **kw)


def test_len_describes_the_epoch_being_iterated_and_set_epoch_repeats():
    q = np.linspace(0.05, 0.95, 400)
    sampler = BalancedSampler(q, seed=3)
    first_len = len(sampler)
    it = iter(sampler)
    first = [next(it)]
    assert len(sampler) == first_len       # during the epoch, len() still describes it
    first += list(it)
    assert len(first) == first_len
    second_len = len(sampler)              # a used-up epoch moves on to the next
    second = list(sampler)
    assert len(second) == second_len and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first          # epochs are reproducible


@pytest.mark.parametrize("mode", ["bernoulli", "weighted"])
def test_ranks_partition_the_epoch_with_equal_lengths(mode):
    q = np.random.default_rng(0).random(101)
    whole = list(BalancedSampler(q, mode=mode, seed=7))
    shards = [list(BalancedSampler(q, mode=mode, seed=7, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(sh) for sh in shards}) == 1                 # equal batch counts for DDP
    merged = [i for group in zip(*shards) for i in group]         # rank r took positions r, r+3, ...
    assert merged[:len(whole)] == whole                           # together: the whole epoch...
    assert merged[len(whole):] == whole[:len(merged) - len(whole)]  # ...padded with its first indices


@pytest.mark.parametrize("kw,match", [
    ({"num_replicas": 2}, "num_replicas, rank: give both"),
    ({"num_replicas": 0, "rank": 0}, "num_replicas: must be a positive"),
    ({"num_replicas": 2, "rank": 2}, r"rank: must be an integer in \[0, 2\)"),
])
def test_bad_replicas(kw, match):
    with pytest.raises(ValueError, match=match):
        BalancedSampler(np.full(10, 0.5), **kw)
