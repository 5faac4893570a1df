"""M4's stream: an honest status, the pass's accuracy against the exact solve, the bound it
reports, utilities that are constant, and M4Solver's state (checked like the constructor's
arguments; readable by torch.load(weights_only=True))."""
import json
import warnings

import numpy as np
import pytest
import torch

from pym4 import m4
from test_m4 import make_data as _make_data


def make_data(n, m=2, c=8, seed=0, coupling=0.4):
    """test_m4's overlapping groups and associated labels, without a utility."""
    return _make_data(n, m, c, seed, coupling=coupling)[:2]


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


# ----- status honesty -------------------------------------------------------------------------------

def _counts(s, y, w):
    """[sum w | sum w s_k | sum w y_r | sum w s_k y_r] written out in numpy."""
    return np.concatenate([[w.sum()], w @ s, w @ y, ((s * w[:, None]).T @ y).reshape(-1)]).astype(np.float64)


def _scaled_rep_violation(factor):
    """Counts of a kept data set whose group-0 share is off its target by factor * eps_rep * eta."""
    s = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 25, np.uint8)
    y = np.zeros((100, 0), np.uint8)
    share = s.mean(axis=0)
    eta, er = 0.5, 0.02
    q = np.full(100, eta)
    # Shift weight from rows outside group 0 to rows in it, keeping sum q: the constraint
    # value (1/N) sum q (s_0 - pi_0) becomes (50 (delta/2) (1/2) + 50 (delta/2) (1/2)) / 100
    # = delta / 4 (pi_0 = 1/2).
    delta = 4 * factor * er * eta
    q[s[:, 0] == 1] += delta / 2
    q[s[:, 0] == 0] -= delta / 2
    return _counts(s, y, np.ones(100)), _counts(s, y, q), share, eta, er


@pytest.mark.parametrize("factor,status", [(0.9, "optimal"), (1.5, "approximate"), (3.0, "max_iter")])
@pytest.mark.parametrize("method", ["stream", "exact"])
def test_status_is_optimal_only_within_every_tolerance(factor, status, method):
    before, after, share, eta, er = _scaled_rep_violation(factor)
    rep = m4.report(before, after, target=share, budget=eta, eps_rep=er, method=method,
                    group_names=["a", "b"], label_names=[])
    assert rep.status == status, rep.message
    assert rep.violations["representation"][0] == pytest.approx(max(factor - 1, 0) * er * eta, abs=1e-12)
    if status == "approximate":
        assert "within twice its tolerance" in rep.message and "representation[a]" in rep.message


@pytest.mark.parametrize("method", ["stream", "exact"])
def test_a_missed_budget_is_not_optimal(method):
    s = np.array([[1, 0], [0, 1], [1, 1], [0, 0]] * 25, np.uint8)
    y = np.zeros((100, 0), np.uint8)
    # Every constraint holds (uniform q keeps the shares), but 0.4 is kept instead of 0.5.
    rep = m4.report(_counts(s, y, np.ones(100)), _counts(s, y, np.full(100, 0.4)), target=s.mean(axis=0),
                    budget=0.5, method=method, group_names=["a", "b"], label_names=[])
    assert rep.status == "max_iter" and "the budget" in rep.message
    assert rep.violations["budget"] == pytest.approx(0.1)


# ----- utility: a constant part changes nothing; reports hold no NaN ------------------------------

@pytest.mark.parametrize("method", ["exact", "stream"])
def test_constant_utility_changes_nothing(method):
    s, y = make_data(4000, 2, 4, 3)
    plain = m4.balance(s, y, budget=0.5, method=method)
    # (np.mean of 1e30s is not 1e30, and of 1e308s overflows: both once broke the solve)
    for shift in (1e16, -3.0, 1e30, 1e308, -1e308):
        res = m4.balance(s, y, budget=0.5, method=method, utility=np.full(4000, shift))
        assert res.status == plain.status == "optimal", res.message
        np.testing.assert_allclose(res.q, plain.q, atol=1e-9)
        assert abs(res.q.mean() - 0.5) <= 1e-9
        json.dumps(res.summary(), allow_nan=False)
    # A utility with a constant part: the same q as its varying part alone.
    u = np.random.default_rng(0).normal(scale=0.1, size=4000)
    a = m4.balance(s, y, budget=0.5, method=method, utility=u)
    b = m4.balance(s, y, budget=0.5, method=method, utility=u + 1e6)
    np.testing.assert_allclose(a.q, b.q, atol=1e-8)
    # mu is reported for the utility as given: q is the closed form of the returned duals.
    pi = b.target
    d = s - pi
    w = (b.v_plus - b.v_minus)
    margin = (d * (w[:, 0] + y @ w[:, 1:].T)).sum(axis=1)
    np.testing.assert_allclose(b.q, np.clip(0.5 + (u + 1e6) - margin - b.mu, 0, 1), atol=1e-6)


def _closed_form(res, s, y, u):
    """q_i = clip(eta + u_i - a_i^T w - mu, 0, 1) at the returned duals (mu for u as given)."""
    d = s - res.target
    w = res.v_plus - res.v_minus
    with np.errstate(over="ignore"):  # 0.5 + 1e300 - ... is finite; -1e300 - mu too
        return np.clip(0.5 + u - (d * (w[:, 0] + y @ w[:, 1:].T)).sum(axis=1) - res.mu, 0, 1)


@pytest.mark.parametrize("method", ["exact", "stream"])
@pytest.mark.parametrize("outlier", [1e3, 1e9, 1e300, -1e300])
def test_one_utility_outlier_pins_only_its_row(method, outlier):
    """One u_i far from the others pins q_i at 1 (or 0) and leaves the rest a solvable
    problem. Centred at the midrange, u_i = 1e3 among values in [0, 0.1) stopped the exact
    solve with every q at 0 ("making no further progress"), and 1e300 gave mean q 0.0005
    against a budget of 0.5, with only a warning."""
    s, y = make_data(3000, 2, 3, 7)
    u = np.random.default_rng(1).random(3000) * 0.1
    u[5] = outlier
    kw = dict(budget=0.5, eps_rep=0.05, eps_assoc=0.05, method=method)
    res = m4.balance(s, y, utility=u, **kw)  # (no RuntimeWarning: filterwarnings = error)
    assert res.status == "optimal", res.message
    assert res.q[5] == (1.0 if outlier > 0 else 0.0)
    assert abs(res.q.mean() - 0.5) <= 1e-9
    rest = np.arange(3000) != 5
    np.testing.assert_allclose(res.q[rest], _closed_form(res, s, y, u)[rest], atol=1e-6)
    gap = res.report.objective_gap_bound  # (the stream's Newton passes end near the optimum)
    assert gap is not None and gap <= (1e-9 if method == "exact" else 1e-5)
    json.dumps(res.summary(), allow_nan=False)
    # Every outlier of one sign is the same problem: the same q.
    same = u.copy()
    same[5] = 1e3 if outlier > 0 else -1e3
    np.testing.assert_allclose(res.q, m4.balance(s, y, utility=same, **kw).q, atol=1e-7)


def test_a_clamp_too_tight_is_widened(monkeypatch):
    """A clamp of the centred utility that pins rows the duals would not pin is widened and
    the problem solved again: the same q as from the default clamp."""
    from pym4.m4 import _balance

    s, y = make_data(2000, 2, 3, 8)
    u = np.random.default_rng(2).normal(size=2000)
    kw = dict(budget=0.5, eps_rep=0.05, eps_assoc=0.05, utility=u)
    plain = m4.balance(s, y, **kw)
    monkeypatch.setattr(_balance, "UTILITY_CLAMP", 0.05)  # pins most rows at first
    clamps, center = [], _balance.center_utility

    def counted(*args):
        out = center(*args)
        clamps.append(out[2])
        return out

    monkeypatch.setattr(_balance, "center_utility", counted)
    tight = m4.balance(s, y, **kw)
    assert len(clamps) == 2 and clamps[0] < 1 < clamps[1]  # one solve too tight, one widened
    assert plain.status == tight.status == "optimal"
    np.testing.assert_allclose(tight.q, plain.q, atol=1e-9)
    assert tight.objective == pytest.approx(plain.objective, abs=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_stream_solver_is_blind_to_a_utility_offset(backend):
    """M4Solver starts mu where the budget holds on its first mini-batch: u + 100 gives the
    q of u. From mu = 0 every q was 1 (mean 1.0 against a budget of 0.5) after the pass."""
    s, y = make_data(20000, 2, 3, 9)
    u = np.random.default_rng(3).random(20000) * 0.1
    qs = []
    for offset in (0.0, 100.0, -1e6):
        solver = m4.M4Solver(0.4, budget=0.5, eps_rep=0.05, eps_assoc=0.05, backend=backend)
        solver.partial_fit(s, y, u + offset)
        qs.append(solver.keep_probability(s, y, u + offset))
        assert abs(solver.mu - offset) < 1.0
    np.testing.assert_allclose(qs[1], qs[0], atol=1e-9)
    np.testing.assert_allclose(qs[2], qs[0], atol=1e-6)  # (1e6's ulp is 1.2e-10; lr steps sum them)
    assert abs(qs[0].mean() - 0.5) < 0.01


def test_report_of_nothing_kept_has_no_nan():
    s, y = make_data(500, 2, 3, 4)
    rep = m4.report(_counts(s, y, np.ones(500)), _counts(s, y, np.zeros(500)), target=0.4, budget=0.5,
                    method="stream", group_names=["a", "b"], label_names=["x", "y", "z"])
    assert rep.status == "max_iter"
    summary = rep.summary()
    text = json.dumps({**summary, **rep.details()}, allow_nan=False)  # raises on NaN/Inf
    assert summary["rb_after"] is None and "no weight kept" in summary["undefined"]["rb_after"]
    assert summary["kept_fraction"] == 0.0 and '"rb_before": ' in text


@pytest.mark.parametrize("change,match", [
    ("nan_after", "counts_after: contains NaN or Inf"),
    ("negative", r"counts_before: weighted counts cannot be negative \(value -1 at 3\)"),
    ("after_over_before", r"counts_after: value .* at 2 exceeds counts_before's"),
    ("no_rows", r"counts_before: its first value \(the number of examples\) must be > 0"),
    ("short_duals", r"duals: w must have 8 values \(m \(c \+ 1\) = 2 x 4\), got 5"),
    ("nan_duals", "duals: contains NaN or Inf"),
    ("iterations", "iterations: must be an integer >= 0, got 'x'"),
    # flattened, two datasets' counts once read as one of twice the groups
    ("two_d", r"counts_before: expected a 1-D array of weighted counts, got shape \(2, 12\)"),
    ("tiny_over", r"counts_after: value 3e-12 at 0 exceeds counts_before's 1e-12"),  # within 1e-9 absolute
    ("group_over_total", r"counts_before: a group's count exceeds the total at 1"),
    ("target_2d", r"target: expected a scalar or a 1-D array of proportions, got shape \(1, 2\)"),
])
def test_report_refuses_counts_no_data_can_have(change, match):
    """NaN counts were once reported "optimal" (max constraint violation nan)."""
    s, y = make_data(100, 2, 3, 4)
    before, after = _counts(s, y, np.ones(100)), _counts(s, y, np.full(100, 0.6))
    kw = dict(target=0.4, budget=0.5, method="exact", group_names=["a", "b"], label_names=["x", "y", "z"])
    if change == "nan_after":
        after = after * np.nan
    elif change == "negative":
        before = before.copy()
        before[3] = -1.0
    elif change == "after_over_before":
        after = after.copy()
        after[2] = before[2] + 1.0
    elif change == "no_rows":
        before, after = before * 0, after * 0
    elif change == "short_duals":
        kw["duals"] = (np.zeros(5), 0.0)
    elif change == "nan_duals":
        kw["duals"] = (np.full(8, np.nan), 0.0)
    elif change == "two_d":
        before, after = np.stack([before, before]), np.stack([after, after])
    elif change == "tiny_over":
        before, after = before * 1e-14, after * 5e-14  # kept 3x the data (q = 3)
    elif change == "group_over_total":
        before = before.copy()
        before[1] = before[0] + 1.0
    elif change == "target_2d":
        kw["target"], kw["group_names"] = np.array([[0.4, 0.4]]), None
    else:
        kw["iterations"] = "x"
    with pytest.raises(ValueError, match=match):
        m4.report(before, after, **kw)


# ----- the stream's result: within tolerance and near the optimum, with a bound -----------------

def _constraints(s, y, q, pi):
    """(1/N) sum_i q_i (s_ik - pi_k) [1; y_i], (m, c + 1), written out in numpy."""
    d = (s - pi) * q[:, None]
    return np.concatenate([d.sum(axis=0)[:, None], d.T @ y], axis=1) / len(q)


def _stream_near_exact(s, y):
    """(stream, exact) at budget 0.8, eps 0.01, both optimal; the stream's q within every
    bound (recomputed here), on budget, and within 2 % of the exact objective."""
    kw = dict(budget=0.8, eps_rep=0.01, eps_assoc=0.01)
    exact = m4.balance(s, y, **kw)
    stream = m4.balance(s, y, method="stream", **kw)
    assert exact.status == stream.status == "optimal", stream.message
    g = _constraints(s, y, stream.q, stream.target)
    assert np.all(np.abs(g) <= 0.8 * 0.01 + 1e-9)
    assert abs(stream.q.mean() - 0.8) <= 1e-9
    assert abs(stream.objective - exact.objective) <= 0.02 * exact.objective
    return stream, exact


def test_stream_is_within_tolerance_and_near_the_optimum():
    # The class (two overlapping groups, budget 0.8, eps 0.01), at a size a test can run.
    s, y = make_data(60_000, 2, 16, 12, coupling=0.2)
    stream, exact = _stream_near_exact(s, y)
    # The reported bound holds: the optimum is at least objective - bound.
    bound = stream.summary()["objective_gap_bound"]
    assert 0 <= bound <= 0.02 * stream.objective and stream.summary()["objective_gap_note"] == ""
    assert stream.objective - exact.objective <= bound + 1e-9


def test_stream_pass_alone_reports_what_holds():
    s, y = make_data(60_000, 2, 16, 12, coupling=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = m4.balance(s, y, method="stream", refine=0, budget=0.8, eps_rep=0.01, eps_assoc=0.01)
    g = _constraints(s, y, res.q, res.target)
    excess = (np.abs(g) / (0.8 * 0.01)).max()
    budget_err = abs(res.q.mean() - 0.8)
    # The pass sets mu so that the budget holds; the status follows the constraints recomputed here.
    assert budget_err <= 1e-9
    assert res.status == ("optimal" if excess <= 1 + 1e-7 else "approximate" if excess <= 2 else "max_iter")
    assert res.status != "optimal"  # on this instance one pass is not within tolerance
    # q misses a constraint: it is no candidate, and the duality gap bounds nothing (it may be
    # negative); the summary says so instead of giving a number.
    summary = res.summary()
    assert summary["objective_gap_bound"] is None and res.report.objective_gap_bound is None
    assert "misses a constraint" in summary["objective_gap_note"] and res.status in summary["objective_gap_note"]
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [f"pym4.m4.balance: {res.message}"]


@pytest.mark.parametrize("m,c,sparse,stride", [(2, 5, False, 1), (3, 4, False, 3), (3, 150, True, 2), (1, 0, False, 1)])
def test_newton_model_matches_dense_formula(m, c, sparse, stride):
    from pym4.m4 import _inputs, _problem, _solver
    s, y = make_data(3000, m, max(c, 1), 7)
    y = y[:, :c]
    rng = np.random.default_rng(1)
    u = rng.normal(scale=0.2, size=3000)
    pi = np.linspace(0.3, 0.4, m)
    problem = _problem.make_problem(pi, m, None, 0.6, 0.01, 0.02)
    w = rng.normal(scale=0.5, size=m * (c + 1))
    mu = 0.05
    lab = _inputs.as_labels(y, 3000)
    if sparse:
        assert lab.dense is None  # c >= 128: index lists
    H, n_h, r, after, before = _solver.newton_model(_inputs.binary_matrix(s, "s"), lab, u, problem, w, mu, stride)
    # The reference: dense rows a_i = [(s_i - pi) (x) [1; y_i]; 1].
    v = np.concatenate([np.ones((3000, 1)), y], axis=1)
    a = np.concatenate([np.einsum("ik,ij->ikj", s - pi, v).reshape(3000, -1), np.ones((3000, 1))], axis=1)
    z = 0.6 + u - a[:, :-1] @ w - mu
    q = np.clip(z, 0, 1)
    act = (z > 0) & (z < 1) & (np.arange(3000) % stride == 0)  # the curvature's rows
    assert 0 < act.sum() < 3000 and n_h == len(range(0, 3000, stride))
    np.testing.assert_allclose(H, a[act].T @ a[act], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(r, q @ a, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(after, _counts(s, y, q), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(before, _counts(s, y, np.ones(3000)), rtol=1e-12, atol=1e-9)


def test_keep_probability_at_budget():
    from pym4.m4 import _inputs, _problem, _solver
    s, y = make_data(100_000, 2, 6, 8)  # large enough for the parallel passes
    problem = _problem.make_problem([0.35, 0.4], 2, None, 0.7, 0.01, 0.01)
    w = np.random.default_rng(2).normal(scale=0.3, size=14)
    q, mu, after, before = _solver.keep_probability_at_budget(_inputs.binary_matrix(s, "s"),
                                                              _inputs.as_labels(y, 100_000), None, problem, w, 0.3,
                                                              want_before=True)
    assert abs(q.mean() - 0.7) <= 1e-12
    np.testing.assert_allclose(after, _counts(s, y, q), rtol=1e-12)
    np.testing.assert_allclose(before, _counts(s, y, np.ones(100_000)), rtol=1e-12)
    v = np.concatenate([np.ones((100_000, 1)), y], axis=1)
    margin = ((s - [0.35, 0.4]) * (v @ w.reshape(2, 7).T)).sum(axis=1)
    np.testing.assert_allclose(q, np.clip(0.7 - margin - mu, 0, 1), atol=1e-12)


def test_shuffled_stream_without_labels():
    # c = 0 with the core's shuffled pass: the gather read the (absent) sparse labels' row
    # pointers and crashed (found by tests/test_properties_m4.py).
    s = np.array([[0], [0], [1]], np.uint8)
    res = m4.balance(s, target=0.3, budget=0.5, eps_rep=0.2, eps_assoc=0.2, utility=np.array([-1.3, 0.9, 0.4]),
                     method="stream", batch_size=1, backend="cpu", shuffle=True)
    assert np.all((res.q >= 0) & (res.q <= 1)) and np.isfinite(res.q).all()


# ----- the stream's shuffled order -------------------------------------------------------------

def test_shuffled_order_is_a_seeded_permutation():
    from pym4 import _backend
    from pym4.m4._balance import shuffled_order
    for n in (0, 1, 7, (1 << 15) + 3, 3 * (1 << 15) + 1):  # one bucket; several, cut unevenly
        o = shuffled_order(n, 11)
        assert o.dtype == np.int64 and o.shape == (n,)
        np.testing.assert_array_equal(np.sort(o), np.arange(n))
        np.testing.assert_array_equal(shuffled_order(n, 11), o)
        if n > 5:
            assert not np.array_equal(shuffled_order(n, 12), o)
    if _backend.core() is not None:  # seeds past 64 bits: numpy's permutation
        np.testing.assert_array_equal(shuffled_order(9, 1 << 70), np.random.default_rng(1 << 70).permutation(9))


def test_shuffled_order_is_uniform():
    """Every permutation of 4 equally often over 24,000 seeds; and with several buckets, the
    first index lands in each tenth of the positions equally often (chi-square, 9 dof)."""
    from collections import Counter

    from pym4.m4._balance import shuffled_order
    counts = Counter(tuple(shuffled_order(4, seed)) for seed in range(24_000))
    assert len(counts) == 24
    chi2 = sum((v - 1000) ** 2 / 1000 for v in counts.values())
    assert chi2 < 60  # 23 dof: P(chi2 > 60) ~ 4e-5
    n = 3 * (1 << 15) + 1
    pos = np.array([int(np.flatnonzero(shuffled_order(n, seed) == 0)[0]) for seed in range(3000)])
    hist = np.bincount(pos * 10 // n, minlength=10)
    assert ((hist - 300) ** 2 / 300).sum() < 35  # 9 dof: P ~ 6e-5


def test_balance_streams_the_shuffled_order():
    from pym4.m4._balance import shuffled_order
    s, y = make_data(5000, 2, 4, 3)
    kw = dict(target=0.35, budget=0.7, method="stream", refine=0, batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shuffled = m4.balance(s, y, shuffle=True, seed=5, **kw)
        o = shuffled_order(5000, 5)
        in_order = m4.balance(s[o], y[o], shuffle=False, **kw)
    np.testing.assert_allclose(shuffled.q[o], in_order.q, rtol=0, atol=1e-12)


def test_infeasible_result_gives_no_gap_bound():
    # Group 1 holds every example but its target is 0.5: infeasible, so no optimum to be near.
    s = np.ones((400, 2), np.uint8)
    s[::2, 0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = m4.balance(s, target=0.5, budget=0.5, method="stream")
    assert res.status == "infeasible"
    assert res.summary()["objective_gap_bound"] is None
    assert "infeasible" in res.summary()["objective_gap_note"]


@pytest.mark.parametrize("order", ["by-group", "by-labels"])
def test_stream_on_sorted_rows_is_within_tolerance(order):
    # Rows sorted by group (then by label) are the stream's hardest order; the shuffle undoes
    # most of it, and the extra Newton passes (while q is past a bound) the rest.
    s, y = make_data(200_000, 2, 16, 0, coupling=0.2)
    keys = s if order == "by-group" else np.concatenate([s, y], axis=1)
    o = np.lexsort(keys.T[::-1])
    s, y = s[o], y[o]
    stream, exact = _stream_near_exact(s, y)


def test_results_say_how_many_passes_and_whether_compressed():
    s, y = make_data(20_000, 2, 4, 7)
    u = np.random.default_rng(7).random(len(s))
    exact, with_u = m4.balance(s, y, budget=0.7), m4.balance(s, y, budget=0.7, utility=u)
    # No utility: the solve runs on the table of distinct (s, y) patterns; with one, on the rows.
    assert exact.summary()["compressed"] is True and with_u.summary()["compressed"] is False
    assert exact.report.passes >= 1 and with_u.report.passes >= 1
    for refine in (0, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # refine=0 need not be within tolerance
            stream = m4.balance(s, y, budget=0.7, method="stream", refine=refine)
        extra = stream.iterations - (-(-len(s) // 256) + refine)  # Newton passes past a bound
        assert stream.summary()["passes"] == 1 + refine + 1 + 2 * extra and stream.report.compressed is False
    json.dumps(exact.summary(), allow_nan=False)
