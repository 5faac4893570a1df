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
