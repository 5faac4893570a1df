"""The demo's --budget sets how many examples the balanced model trains on (issue 11 item 12):
the balanced training set is one draw keep_i ~ Bernoulli(q_i), about budget * N examples."""
import warnings

import numpy as np
import pytest

from pym4 import m4
from pym4.demo.run import PRESETS, balanced_subset
from pym4.demo.synthetic import CONCEPTS, GROUPS, make_biased_captions


def test_balanced_subset_is_one_bernoulli_draw():
    q = np.linspace(0, 1, 20001)
    kept = balanced_subset(q, seed=5)
    np.testing.assert_array_equal(kept, balanced_subset(q, seed=5))
    assert np.all(np.diff(kept) > 0) and kept.dtype.kind == "i"
    assert 0 not in kept and 20000 in kept  # q = 0 never kept, q = 1 always
    sd = np.sqrt((q * (1 - q)).sum())
    assert abs(kept.size - q.sum()) < 5 * sd
    with pytest.raises(ValueError, match=r"^budget: .*kept no example"):
        balanced_subset(np.zeros(10))


@pytest.mark.parametrize("budget", [0.1, 0.4])
def test_balanced_set_size_follows_the_budget(budget):
    n = PRESETS["tiny"]["n_train"]
    train = make_biased_captions(n, association=0.6, minority_share=0.3, noise=0.3, seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pym4.m4.balance: ", category=RuntimeWarning)
        res = m4.balance(train.s, train.y, target=0.5, budget=budget, group_names=list(GROUPS),
                         label_names=list(CONCEPTS))
    assert res.status == "optimal"
    kept = balanced_subset(res.q, seed=0)
    q = np.asarray(res.q)
    assert abs(kept.size - budget * n) < 5 * np.sqrt((q * (1 - q)).sum()) + 1
