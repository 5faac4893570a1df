"""M4's stream: an honest status, the pass's accuracy against the exact solve, the bound it
reports, utilities that are constant, and M4Solver's state (checked like the constructor's
arguments; readable by torch.load(weights_only=True))."""
import json
import warnings

import numpy as np
import pytest
import torch

from pym4 import m4


def make_data(n, m=2, c=8, seed=0, prev=(0.3, 0.45), coupling=0.4):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    p = np.linspace(prev[0], prev[1], m)
    s = (rng.random((n, m)) < p * (1 + 0.5 * np.tanh(z))[:, None]).astype(np.uint8)
    base = rng.uniform(0.05, 0.4, size=c)
    logit = np.log(base / (1 - base)) + s @ rng.normal(scale=coupling, size=(m, c))
    y = (rng.random((n, c)) < 1 / (1 + np.exp(-logit))).astype(np.uint8)
    return s, y


def fitted_state():
    s, y = make_data(3000, 2, 4, 1)
    return m4.M4Solver([0.35, 0.4], budget=0.6, batch_size=100).partial_fit(s, y).state_dict()


# ----- M4Solver.load_state_dict -------------------------------------------------------------------

def _with(state, key, value):
    out = dict(state)
    if value is _DROP:
        del out[key]
    else:
        out[key] = value
    return out


_DROP = object()


@pytest.mark.parametrize("key,value,match", [
    ("budget", float("nan"), r"state\['budget'\]: must be in \(0, 1\]"),
    ("budget", None, r"state\['budget'\]: expected a number"),
    ("target", [5.0, -1.0], r"state\['target'\]: proportions must be in \(0, 1\)"),
    ("target", [0.3], r"state\['target'\]: expected 2 values"),
    ("lr", -1.0, r"state\['lr'\]: must be in \(0, inf\)"),
    ("lr", float("inf"), r"state\['lr'\]: must be in \(0, inf\)"),
    ("gamma", -2.0, r"state\['gamma'\]: must be in \[0, inf\)"),
    ("eps_rep", float("nan"), r"state\['eps_rep'\]: must be in"),
    ("batch_size", 0, r"state\['batch_size'\]: must be an integer >= 1"),
    ("m", 2.7, r"state\['m'\]: expected an integer >= 1, got 2.7"),
    ("m", 3, r"state\['target'\]: expected 3 values"),
    ("c", -1, r"state\['c'\]: expected an integer >= 0"),
    ("curv", -torch.ones(10, dtype=torch.float64), r"state\['curv'\]: must be >= 0"),
    ("v_plus", torch.full((10,), float("nan"), dtype=torch.float64), r"state\['v_plus'\]: contains NaN"),
    ("avg_w", torch.zeros(7, dtype=torch.float64), r"state\['avg_w'\]: expected 10 values, got 7"),
    ("scalars", torch.tensor([0.0, 0.0, 3000.0, -30.0], dtype=torch.float64), r"state\['scalars'\]: .*steps"),
    ("scalars", torch.tensor([0.0, 0.0, 10.0, 30.0], dtype=torch.float64), r"state\['scalars'\]: .*steps"),
    ("scalars", torch.tensor([0.0, 0.0, 10.5, 3.0], dtype=torch.float64), r"state\['scalars'\]: .*whole"),
    ("scalars", "abc", r"state\['scalars'\]: expected 4 numbers"),
    ("lr", _DROP, r"state: missing keys \['lr'\]"),
    ("weights", torch.zeros(3), r"state: unknown keys \['weights'\]"),
    ("version", 99, r"state\['version'\]: expected an integer in \[1, 2\]"),
])
def test_load_state_dict_checks_like_the_constructor(key, value, match):
    state = fitted_state()
    solver = m4.M4Solver(0.5)
    with pytest.raises(ValueError, match=match):
        solver.load_state_dict(_with(state, key, value))
    assert solver.m is None  # nothing was half-loaded


@pytest.mark.parametrize("state", [None, [1, 2], "state"])
def test_load_state_dict_refuses_non_dicts(state):
    with pytest.raises(ValueError, match="state: expected the dict of M4Solver.state_dict()"):
        m4.M4Solver(0.5).load_state_dict(state)


def test_constructor_messages_name_the_open_bound():
    with pytest.raises(ValueError, match=r"lr: must be in \(0, inf\), got inf"):
        m4.M4Solver(0.5, lr=float("inf"))
    with pytest.raises(ValueError, match=r"eps_rep: must be in \[0, inf\), got inf"):
        m4.M4Solver(0.5, eps_rep=float("inf"))


def test_state_dict_round_trips_through_torch_load_weights_only(tmp_path):
    s, y = make_data(3000, 2, 4, 2)
    solver = m4.M4Solver([0.35, 0.4], budget=0.6, batch_size=100).partial_fit(s[:2000], y[:2000])
    torch.save(solver.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = m4.M4Solver(0.5).load_state_dict(loaded).partial_fit(s[2000:], y[2000:])
    solver.partial_fit(s[2000:], y[2000:])
    np.testing.assert_array_equal(resumed.state.avg_w, solver.state.avg_w)
    np.testing.assert_array_equal(resumed.keep_probability(s, y), solver.keep_probability(s, y))


def test_version_1_states_still_load():
    # The layout before versioning: numpy arrays, no "version" key.
    state = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in fitted_state().items()}
    del state["version"]
    state["target"] = np.asarray(state["target"])
    solver = m4.M4Solver(0.5).load_state_dict(state)
    np.testing.assert_array_equal(solver.state.avg_w, state["avg_w"])
    assert solver.n_seen == 3000 and solver.problem.budget == 0.6
