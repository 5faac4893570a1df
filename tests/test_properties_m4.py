"""Property-based tests of M4's in-memory API (hypothesis; profiles in conftest.py).

Random small problems (N from 0, m from 1, c from 0, empty and full groups), every input
form the API documents (bool / uint8 / int / float 0-1, torch tensors with or without
requires_grad, Fortran order, negative strides, read-only, scipy and torch sparse labels)
and hostile values. The invariants:

- status honesty: the constraints and the budget are recomputed from q here, in float64
  numpy, and must agree with what the status claims ("optimal": every constraint within its
  bound and the budget met; "infeasible": a float64 LP (scipy's HiGHS) finds no feasible q);
- q is finite and in [0, 1], has one entry per example, and does not depend on the input's
  dtype or layout; the closed form ``q_i = clip(eta + u_i - a_i^T w - mu, 0, 1)`` holds;
- inputs are never modified;
- every rejection is a ValueError or TypeError whose message starts with the argument's name.
"""
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pym4 import m4

sparse = pytest.importorskip("scipy.sparse")
optimize = pytest.importorskip("scipy.optimize")

# ----- data ------------------------------------------------------------------------------------

EPS = st.sampled_from([0.0, 0.01, 0.05, 0.2, 1.0])
BUDGET = st.sampled_from([1.0, 0.9, 0.5, 0.2, 0.05])


@st.composite
def data(draw, n_min=1, n_max=12, m_max=3, c_max=3):
    """(s, y) uint8 0/1 matrices (N, m), (N, c); a group may be forced empty or full."""
    n = draw(st.integers(n_min, n_max))
    m = draw(st.integers(1, m_max))
    c = draw(st.integers(0, c_max))
    # Bits from a drawn seed and density: hypothesis' own arrays would be mostly zeros (its
    # simplest values), i.e. mostly empty groups.
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    s = (rng.random((n, m)) < draw(st.sampled_from([0.5, 0.3, 0.7, 0.1]))).astype(np.uint8)
    y = (rng.random((n, c)) < draw(st.sampled_from([0.5, 0.2, 0.8]))).astype(np.uint8)
    edit = draw(st.sampled_from(["none", "none", "none", "empty", "full"]))
    if edit != "none":
        s[:, draw(st.integers(0, m - 1))] = 0 if edit == "empty" else 1
    return s, y


def utilities(n):
    return st.one_of(st.none(), hnp.arrays(np.float64, (n,), elements=st.floats(-3, 3, width=32)))


# The ways a 0/1 matrix may be handed over, all documented as equal.
DENSE = ["uint8", "bool", "int32", "int64", "float32", "float64", "fortran", "negative_strides", "read_only",
         "torch_bool", "torch_uint8", "torch_float64", "torch_transposed", "torch_requires_grad"]
SPARSE = ["csr", "csc", "coo", "lil", "dok", "coo_array", "torch_sparse_coo", "torch_sparse_csr"]


def encode(a, kind):
    """The 0/1 matrix ``a`` (uint8) in form ``kind``."""
    if kind in ("uint8", "bool", "int32", "int64", "float32", "float64"):
        return a.astype(kind)
    if kind == "fortran":
        return np.asfortranarray(a.astype(np.float32))
    if kind == "negative_strides":
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    if kind == "read_only":
        b = a.astype(np.int8)
        b.flags.writeable = False
        return b
    if kind == "torch_bool":
        return torch.from_numpy(a.astype(bool))
    if kind == "torch_uint8":
        return torch.from_numpy(a.copy())
    if kind == "torch_float64":
        return torch.from_numpy(a.astype(np.float64))
    if kind == "torch_transposed":
        return torch.from_numpy(np.ascontiguousarray(a.T).astype(np.float32)).T
    if kind == "torch_requires_grad":
        return torch.from_numpy(a.astype(np.float32)).requires_grad_()
    if kind in ("csr", "csc", "coo", "lil", "dok"):
        return sparse.csr_matrix(a).asformat(kind)
    if kind == "coo_array":
        return sparse.coo_array(a)
    if kind == "torch_sparse_coo":
        return torch.from_numpy(a.astype(np.float32)).to_sparse()
    if kind == "torch_sparse_csr":
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state", once per process
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a.astype(np.float32)).to_sparse_csr()
    raise AssertionError(kind)


def snapshot(x):
    """An independent copy of an input, to check afterwards that it was not modified."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().to_dense().clone() if x.layout != torch.strided else x.detach().clone()
    if sparse.issparse(x):
        return x.toarray()
    return np.array(x, copy=True)


def assert_unchanged(x, before):
    if x is None:
        return
    if isinstance(x, torch.Tensor):
        now = x.detach().to_dense() if x.layout != torch.strided else x.detach()
        assert torch.equal(now, before), "an input tensor was modified"
    elif sparse.issparse(x):
        np.testing.assert_array_equal(x.toarray(), before)
    else:
        np.testing.assert_array_equal(x, before)


def as_numpy(q):
    assert isinstance(q, (np.ndarray, torch.Tensor))
    return q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else q


# ----- references (plain numpy / scipy, float64) ----------------------------------------------

def default_target(s):
    """Every group at the mean of the observed group shares."""
    return np.full(s.shape[1], s.astype(np.float64).mean(axis=0).mean())


def constraint_values(s, y, q, pi):
    """(m,) representation and (m, c) association values ``(1/N) sum_i q_i (s_ik - pi_k) [1; y_i]``."""
    d = s.astype(np.float64) - pi
    n = s.shape[0]
    return d.T @ q / n, (d * q[:, None]).T @ y.astype(np.float64) / n


def violations(s, y, q, pi, eta, er, ea):
    """(budget error, max representation excess, max association excess), each >= 0."""
    rep, assoc = constraint_values(s, y, q, pi)
    return (abs(q.mean() - eta), max(0.0, float((np.abs(rep) - eta * er).max(initial=0.0))),
            max(0.0, float((np.abs(assoc) - eta * ea).max(initial=0.0))))


def lp_feasible(s, y, pi, eta, er, ea, margin=1e-6):
    """A q in [0, 1]^N meeting the budget and every bias constraint with ``margin`` to spare
    (where the bound is positive), from a float64 LP; None when HiGHS finds none. The witness
    is checked here (half the margin to spare, or within 1e-9 of a zero bound), not trusted. The margin keeps a problem feasible
    only on its boundary (e.g. a full group with 1 - pi_k == eps_rep, not exactly so in
    float64) from counting against an "infeasible" verdict."""
    n, m = s.shape
    d = s.astype(np.float64) - pi
    rows, bound = [], []
    for k in range(m):
        rows.append(d[:, k] / n)
        bound.append(eta * er)
        for r in range(y.shape[1]):
            rows.append(d[:, k] * y[:, r] / n)
            bound.append(eta * ea)
    A = np.array(rows)
    b = np.array(bound)
    tight = b > margin
    b = np.where(tight, b - margin, b)
    res = optimize.linprog(np.zeros(n), A_ub=np.vstack([A, -A]), b_ub=np.r_[b, b],
                           A_eq=np.ones((1, n)) / n, b_eq=[eta], bounds=[(0, 1)] * n, method="highs")
    if res.status != 0:
        return None
    q = np.clip(res.x, 0, 1)
    slack = np.where(tight, b + margin / 2, 1e-9)
    if abs(q.mean() - eta) > 1e-9 or np.any(np.abs(A @ q) > slack):
        return None
    return q


def closed_form(s, y, u, pi, eta, w, mu):
    """q_i = clip(eta + u_i - sum_k (s_ik - pi_k) (w_k0 + sum_r w_kr y_ir) - mu, 0, 1)."""
    W = np.asarray(w, np.float64).reshape(len(pi), -1)
    ytil = np.concatenate([np.ones((s.shape[0], 1)), y.astype(np.float64)], axis=1)
    margin = ((s.astype(np.float64) - pi) * (ytil @ W.T)).sum(axis=1)
    return np.clip(eta + (0.0 if u is None else u) - margin - mu, 0.0, 1.0)


def quiet(fn, *args, **kwargs):
    """Call fn with pym4's non-optimal-status RuntimeWarning silenced (the status is checked)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pym4.m4.balance: ", category=RuntimeWarning)
        return fn(*args, **kwargs)


# ----- balance: status honesty ---------------------------------------------------------------

def check_status(res, s, y, u, pi, eta, er, ea, method):
    """The claims of a BalanceResult against its own q, recomputed here."""
    n = s.shape[0]
    q = as_numpy(res.q)
    assert q.shape == (n,) and q.dtype == np.float64
    assert np.all(np.isfinite(q)) and np.all((q >= 0) & (q <= 1))
    np.testing.assert_allclose(res.target, pi, rtol=0, atol=1e-15)
    budget_err, rep_exc, assoc_exc = violations(s, y, q, pi, eta, er, ea)
    assert res.violations["budget"] == pytest.approx(budget_err, abs=1e-12)
    assert res.status in ("optimal", "approximate", "infeasible", "max_iter")
    event(f"{method}: {res.status}")
    rep, assoc = constraint_values(s, y, q, pi)
    if res.status == "optimal":  # every constraint and the budget hold (no factor of two)
        if method == "exact":
            assert max(budget_err, rep_exc, assoc_exc) <= 1e-6, (budget_err, rep_exc, assoc_exc)
        else:
            assert np.all(np.abs(rep) <= eta * er + 1e-8) and np.all(np.abs(assoc) <= eta * ea + 1e-8)
            assert budget_err <= 1e-8
    elif res.status == "approximate":  # the documented claim: within twice each bound, the budget within 1 %
        assert np.all(np.abs(rep) <= 2 * eta * er + 1e-12) and np.all(np.abs(assoc) <= 2 * eta * ea + 1e-12)
        assert budget_err <= 0.01 * eta + 1e-12
    elif res.status == "infeasible":
        witness = lp_feasible(s, y, pi, eta, er, ea)
        assert witness is None, f"'infeasible' ({res.message}), yet q = {witness} is feasible"
        assert res.infeasible_constraints, "an infeasible status names no constraint"
    assert "nan" not in res.message.lower()


@given(data(), st.data(), BUDGET, EPS, EPS, st.sampled_from(["default", "scalar", "vector", "near"]))
def test_balance_exact_status_is_honest(sy, extra, eta, er, ea, target_kind):
    s, y = sy
    n, m = s.shape
    u = extra.draw(utilities(n))
    pi = _target(extra, target_kind, s)
    if pi is None:  # every group empty (or every group full): no default target exists
        with pytest.raises(ValueError, match=r"^s: "):
            m4.balance(s, y, target=None, budget=eta, eps_rep=er, eps_assoc=ea, utility=u, method="exact")
        return
    target = None if target_kind == "default" else (float(pi[0]) if target_kind == "scalar" else pi)
    res = quiet(m4.balance, s, y, target=target, budget=eta, eps_rep=er, eps_assoc=ea, utility=u, method="exact")
    check_status(res, s, y, u, pi, eta, er, ea, "exact")
    # A group with no example (or every example) whose share cannot reach its target is
    # reported as infeasible, by name.
    shares = s.mean(axis=0)
    for k in range(m):
        if (shares[k] == 0 and pi[k] > er) or (shares[k] == 1 and 1 - pi[k] > er):
            assert res.status == "infeasible" and f"representation[group {k}]" in res.infeasible_constraints


def _target(extra, kind, s):
    if kind == "default":
        pi = default_target(s)
        return pi if 0 < pi[0] < 1 else None
    if kind == "scalar":
        return np.full(s.shape[1], extra.draw(st.sampled_from([0.05, 0.3, 0.5, 0.9])))
    if kind == "near":  # each group near its own share: feasible more often
        return np.clip(s.mean(axis=0) + extra.draw(st.sampled_from([0.0, 0.02, -0.05])), 0.05, 0.95)
    return np.array(extra.draw(st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.7]), min_size=s.shape[1],
                                        max_size=s.shape[1])), dtype=np.float64)


@settings(max_examples=100)
@given(data(n_max=10), st.data(), BUDGET, st.sampled_from([0.05, 0.2, 1.0]), st.sampled_from(["cpu", "torch"]))
def test_balance_stream_status_is_honest(sy, extra, eta, eps, backend):
    s, y = sy
    u = extra.draw(utilities(s.shape[0]))
    pi = _target(extra, "scalar", s)
    res = quiet(m4.balance, s, y, target=float(pi[0]), budget=eta, eps_rep=eps, eps_assoc=eps, utility=u,
                method="stream", batch_size=extra.draw(st.sampled_from([1, 3, 256])), backend=backend)
    assert res.method == "stream"
    check_status(res, s, y, u, pi, eta, eps, eps, "stream")


@settings(max_examples=100)
@given(data(n_max=10), st.data(), BUDGET)
def test_stream_torch_path_matches_core(sy, extra, eta):
    """backend="torch" runs the core's algorithm in torch: the same q (up to rounding)."""
    s, y = sy
    u = extra.draw(utilities(s.shape[0]))
    kw = dict(target=0.3, budget=eta, utility=u, method="stream", batch_size=extra.draw(st.sampled_from([1, 4])),
              seed=extra.draw(st.integers(0, 3)))
    a = quiet(m4.balance, s, y, backend="cpu", **kw)
    b = quiet(m4.balance, s, y, backend="torch", **kw)
    np.testing.assert_allclose(as_numpy(b.q), as_numpy(a.q), rtol=0, atol=1e-9)
    assert a.status == b.status


@settings(max_examples=100)
@given(data(), st.data(), st.sampled_from(["exact", "stream"]))
def test_balance_ignores_input_form(sy, extra, method):
    """Every documented form of s, y (and utility) gives the q of the uint8 arrays, bit for bit,
    in the caller's array type, and leaves the inputs as they were."""
    s, y = sy
    n = s.shape[0]
    u = extra.draw(utilities(n))
    kind_s = extra.draw(st.sampled_from(DENSE))
    kind_y = extra.draw(st.sampled_from(DENSE + SPARSE))
    s_in, y_in = encode(s, kind_s), encode(y, kind_y)
    u_in = None if u is None else extra.draw(st.sampled_from([
        lambda v: v, lambda v: v.astype(np.float32).astype(np.float64), lambda v: v[::-1].copy()[::-1],
        lambda v: torch.from_numpy(v).requires_grad_()]))(u)
    before = [snapshot(x) for x in (s_in, y_in, u_in)]
    kw = dict(target=0.3, budget=0.5, method=method, eps_rep=0.05, eps_assoc=0.05)
    ref = quiet(m4.balance, s, y, utility=None if u_in is None else as_numpy(u_in), **kw)
    res = quiet(m4.balance, s_in, y_in, utility=u_in, **kw)
    for x, b in zip((s_in, y_in, u_in), before):
        assert_unchanged(x, b)
    assert isinstance(res.q, torch.Tensor) == isinstance(s_in, torch.Tensor)
    np.testing.assert_array_equal(as_numpy(res.q), as_numpy(ref.q))
    assert res.status == ref.status


def test_balance_rejects_no_examples():
    for s in (np.zeros((0, 2)), torch.zeros((0, 1))):
        with pytest.raises(ValueError, match=r"^s: no examples"):
            m4.balance(s)


# ----- huge and constant utilities ------------------------------------------------------------

@settings(max_examples=100)
@given(data(n_min=2), st.data(), BUDGET)
def test_balance_huge_utility_status_is_honest(sy, extra, eta):
    s, y = sy
    n = s.shape[0]
    scale = extra.draw(st.sampled_from([1e8, 1e12, 1e16]))
    u = scale * (1 + extra.draw(hnp.arrays(np.float64, (n,), elements=st.sampled_from([0.0, 0.0, 1e-3, -1e-3]))))
    res = quiet(m4.balance, s, y, target=0.3, budget=eta, eps_rep=1.0, eps_assoc=1.0, utility=u, method="exact")
    check_status(res, s, y, u, np.full(s.shape[1], 0.3), eta, 1.0, 1.0, "exact")
    json.dumps(res.summary(), allow_nan=False)


# ----- M4Solver -------------------------------------------------------------------------------

@settings(max_examples=100)
@given(data(n_min=0, n_max=20), st.data())
def test_solver_state_and_keep_probability(sy, extra):
    """partial_fit over chunks cut at multiples of batch_size is one partial_fit; the keep
    probabilities are the closed form of the state; q in [0, 1]; N = 0 is a no-op."""
    s, y = sy
    n, m = s.shape
    u = extra.draw(utilities(n))
    bs = extra.draw(st.sampled_from([1, 2, 5, 256]))
    pi = extra.draw(st.sampled_from([0.2, 0.5]))
    kw = dict(budget=extra.draw(BUDGET), eps_rep=0.02, eps_assoc=0.05, batch_size=bs)
    whole = m4.M4Solver(pi, **kw).partial_fit(s, y, u)
    cut = sorted(extra.draw(st.lists(st.integers(0, -(-n // bs)), max_size=3)))
    parts = m4.M4Solver(pi, **kw)
    edges = [0] + [min(k * bs, n) for k in cut] + [n]
    for b, e in zip(edges[:-1], edges[1:]):
        parts.partial_fit(s[b:e], y[b:e], None if u is None else u[b:e])
    assert whole.steps == -(-n // bs) and whole.n_seen == n
    for key in ("avg_w", "v_plus", "v_minus", "curv"):
        np.testing.assert_allclose(getattr(parts.state, key), getattr(whole.state, key), rtol=1e-12, atol=1e-15)
    q = whole.keep_probability(s, y, u)
    ref = closed_form(s, y, u, np.full(m, pi), kw["budget"], whole.state.avg_w, whole.state.mu_avg)
    assert q.shape == (n,) and np.all((q >= 0) & (q <= 1))
    np.testing.assert_allclose(q, ref, rtol=0, atol=1e-12)


@settings(max_examples=100)
@given(data(), st.data(), st.sampled_from(["cpu", "torch"]))
def test_solver_ignores_input_form(sy, extra, backend):
    s, y = sy
    kind_s, kind_y = extra.draw(st.sampled_from(DENSE)), extra.draw(st.sampled_from(DENSE + SPARSE))
    s_in, y_in = encode(s, kind_s), encode(y, kind_y)
    before = [snapshot(s_in), snapshot(y_in)]
    ref = m4.M4Solver(0.3, batch_size=3, backend=backend).partial_fit(s, y)
    got = m4.M4Solver(0.3, batch_size=3, backend=backend).partial_fit(s_in, y_in)
    np.testing.assert_array_equal(got.state.avg_w, ref.state.avg_w)
    q = got.keep_probability(s_in, y_in)
    assert_unchanged(s_in, before[0])
    assert_unchanged(y_in, before[1])
    assert isinstance(q, torch.Tensor) == isinstance(s_in, torch.Tensor)
    np.testing.assert_allclose(as_numpy(q), as_numpy(ref.keep_probability(s, y)), rtol=0, atol=1e-12)


# ----- report and the bias measures -----------------------------------------------------------

@settings(max_examples=100)
@given(data(), st.data(), BUDGET, EPS, EPS)
def test_report_from_counts_matches_recomputation(sy, extra, eta, er, ea):
    """report() on the counts of the data and of q gives the violations recomputed here; its
    summary is JSON (no NaN) whenever q keeps something."""
    s, y = sy
    n, m = s.shape
    c = y.shape[1]
    q = extra.draw(hnp.arrays(np.float64, (n,), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0])))
    pi = np.full(m, 0.3)
    rep = m4.report(m4.weighted_counts(s, y), m4.weighted_counts(s, y, q), target=pi, budget=eta, eps_rep=er,
                    eps_assoc=ea, label_names=[f"l{r}" for r in range(c)])
    rv, av = constraint_values(s, y, q, pi)
    np.testing.assert_allclose(rep.violations["representation"], np.maximum(np.abs(rv) - eta * er, 0), atol=1e-12)
    np.testing.assert_allclose(rep.violations["association"], np.maximum(np.abs(av) - eta * ea, 0), atol=1e-12)
    assert rep.violations["budget"] == pytest.approx(abs(q.mean() - eta), abs=1e-12)
    assert rep.kept_fraction == pytest.approx(q.mean(), abs=1e-12)
    if rep.status == "optimal":  # method "stream" (the default): within twice each bound, budget within 1 %
        assert np.all(np.abs(rv) <= 2 * eta * er + 1e-12) and np.all(np.abs(av) <= 2 * eta * ea + 1e-12)
        assert abs(q.mean() - eta) <= 0.01 * eta + 1e-12
    if q.sum() > 0:
        json.dumps(rep.summary(), allow_nan=False)


def _bias_reference(s, y, w, pi):
    """RB and AB from their definitions (DESIGN.md §3), with plain loops."""
    s, y, w = s.astype(np.float64), y.astype(np.float64), np.asarray(w, np.float64)
    rb = max(abs((w * s[:, k]).sum() / w.sum() - pi[k]) for k in range(s.shape[1]))
    gaps = [0.0]
    for k in range(s.shape[1]):
        w1, w0 = (w * s[:, k]).sum(), (w * (1 - s[:, k])).sum()
        if w1 > 0 and w0 > 0:
            for r in range(y.shape[1]):
                gaps.append(abs((w * s[:, k] * y[:, r]).sum() / w1 - (w * (1 - s[:, k]) * y[:, r]).sum() / w0))
    return rb, max(gaps)


@given(data(n_min=0), st.data())
def test_bias_measures(sy, extra):
    """RB and AB against their definitions; an empty selection (no example, or every weight
    zero) is refused by both, naming what is empty."""
    s, y = sy
    n, m = s.shape
    w = extra.draw(st.one_of(st.none(), hnp.arrays(np.float64, (n,), elements=st.sampled_from([0.0, 0.5, 1.0, 3.0]))))
    kind = extra.draw(st.sampled_from(DENSE))
    s_in = encode(s, kind)
    pi = np.full(m, 0.4)
    total = n if w is None else float(np.sum(w))
    if total == 0:
        arg = "s" if n == 0 else "weights"
        with pytest.raises(ValueError, match=rf"^{arg}: "):
            m4.representation_bias(s_in, w, pi)
        with pytest.raises(ValueError, match=rf"^{arg}: "):
            m4.association_bias(s_in, y, w)
        return
    rb, ab = _bias_reference(s, y, np.ones(n) if w is None else w, pi)
    assert m4.representation_bias(s_in, w, pi) == pytest.approx(rb, abs=1e-12)
    assert m4.association_bias(s_in, y, w) == pytest.approx(ab, abs=1e-12)


# ----- M4Model -------------------------------------------------------------------------------

@settings(max_examples=100)
@given(data(n_min=0), st.data())
def test_model_keep_probability_and_transform(sy, extra):
    pa = pytest.importorskip("pyarrow")
    from pym4.m4._columns import ColumnSpec
    from pym4.m4.model import M4Model

    s, y = sy
    n, m = s.shape
    c = y.shape[1]
    u = extra.draw(utilities(n))
    groups, labels = [f"g{k}" for k in range(m)], [f"l{r}" for r in range(c)]
    spec = ColumnSpec.make(sensitive=groups, labels=labels, utility=None if u is None else "u").resolve()
    w = extra.draw(hnp.arrays(np.float64, (m * (c + 1),), elements=st.floats(-2, 2, width=32)))
    mu = extra.draw(st.floats(-1, 1, width=32))
    pi = np.full(m, 0.35)
    model = M4Model(pi, 0.6, 0.01, 0.01, w, mu, spec)
    ref = closed_form(s, y, u, pi, 0.6, w, mu)
    kind_s = extra.draw(st.sampled_from([k for k in DENSE if not k.startswith("torch")]))
    kind_y = extra.draw(st.sampled_from([k for k in DENSE + SPARSE if not k.startswith("torch")]))
    s_in, y_in = encode(s, kind_s), encode(y, kind_y)
    before = [snapshot(s_in), snapshot(y_in)]
    q = model.keep_probability(s_in, y_in if c else None, u)
    assert_unchanged(s_in, before[0])
    assert_unchanged(y_in, before[1])
    np.testing.assert_allclose(q, ref, rtol=0, atol=1e-12)
    cols = {**{g: pa.array(s[:, k].astype(bool)) for k, g in enumerate(groups)},
            **{lab: pa.array(y[:, r].astype(np.int64)) for r, lab in enumerate(labels)}}
    if u is not None:
        cols["u"] = pa.array(u)
    table = pa.table(cols) if cols else None
    out = model.transform(table)
    np.testing.assert_allclose(out.column("q").to_numpy(), ref, rtol=0, atol=1e-12)
    assert out.num_rows == n


# ----- rejections: every one a ValueError/TypeError naming its argument ------------------------

def _model(m, c):
    from pym4.m4._columns import ColumnSpec
    from pym4.m4.model import M4Model
    spec = ColumnSpec.make(sensitive=[f"g{k}" for k in range(m)], labels=[f"l{r}" for r in range(c)]).resolve()
    return M4Model(np.full(m, 0.3), 0.5, 0.01, 0.01, np.zeros(m * (c + 1)), 0.0, spec)


def _with(value, dtype=np.float64):
    """The matrix with its last entry replaced by ``value``."""
    def edit(a):
        b = a.astype(dtype)
        b[-1, -1] = value
        return b
    return edit


_BAD_S = [("value 2", _with(2, np.int64)), ("value -1", _with(-1, np.int64)), ("value 0.5", _with(0.5)),
          ("NaN", _with(np.nan)), ("Inf", _with(np.inf)), ("3-D", lambda a: a[:, :, None]),
          ("strings", lambda a: a.astype(str)), ("complex", lambda a: a.astype(np.complex64)),
          ("list", lambda a: a.tolist()), ("sparse value 2", lambda a: sparse.csr_matrix(_with(2)(a))),
          ("torch value 3", lambda a: torch.from_numpy(_with(3)(a))),
          ("torch sparse value 0.5", lambda a: torch.from_numpy(_with(0.5)(a)).to_sparse())]
_BAD_SCALARS = {
    "budget": [0.0, -0.1, 1.5, float("nan"), float("inf"), "half", None, np.array([0.5, 0.5])],
    "eps_rep": [-1.0, float("nan"), float("inf"), "x"],
    "eps_assoc": [-0.01, float("nan"), "x"],
    "target": [0.0, 1.0, -0.2, 1.3, float("nan"), "x", [0.2, 0.3, 0.4, 0.5], np.zeros((2, 3)) + 0.3, True],
    "max_iter": [0, -1, 1.5, 2 ** 63, 2 ** 64, "10", True],
    "tol": [0.0, -1e-3, float("nan"), "x"],
    "batch_size": [0, -3, 2 ** 63, 2.0],
    "lr": [0.0, -1.0, float("nan"), "x"],
    "method": ["fast", 3],
    "seed": [-1, 1.5, "x", None],
}


def _named(exc, name):
    msg = str(exc.value)
    assert re.match(rf"{re.escape(name)}\b", msg), f"the message does not start with {name!r}: {msg!r}"


@given(data(n_min=2), st.sampled_from(range(len(_BAD_S))), st.sampled_from(["s", "y"]),
       st.sampled_from(["balance", "stream", "solver", "torch_solver", "keep", "model", "rb", "ab", "counts"]))
def test_bad_matrices_are_named(sy, which, arg, entry):
    s, y = sy
    if arg == "y" and y.shape[1] == 0:
        y = np.ones((s.shape[0], 1), np.uint8)
    if entry == "rb" and arg == "y":
        entry = "ab"
    bad = _BAD_S[which][1](s if arg == "s" else y)
    s_in, y_in = (bad, y) if arg == "s" else (s, bad)
    calls = {"balance": lambda: m4.balance(s_in, y_in, target=0.3),
             "stream": lambda: m4.balance(s_in, y_in, target=0.3, method="stream"),
             "solver": lambda: m4.M4Solver(0.3).partial_fit(s_in, y_in),
             "rb": lambda: m4.representation_bias(s_in, target=0.3),
             "ab": lambda: m4.association_bias(s_in, y_in),
             "counts": lambda: m4.weighted_counts(s_in, y_in),
             "torch_solver": lambda: m4.M4Solver(0.3, backend="torch").partial_fit(s_in, y_in),
             "keep": lambda: m4.M4Solver(0.3).partial_fit(s, y).keep_probability(s_in, y_in),
             "model": lambda: _model(s.shape[1], y.shape[1]).keep_probability(s_in, y_in)}
    if entry == "model" and (isinstance(bad, (torch.Tensor, list))):
        entry = "keep"  # M4Model is the torch-free data side: numpy array-likes (lists are arrays there)
    with pytest.raises((ValueError, TypeError)) as e:
        quiet(calls[entry])
    _named(e, arg)


@given(data(n_min=2), st.data())
def test_bad_vectors_are_named(sy, extra):
    s, y = sy
    n = s.shape[0]
    arg = extra.draw(st.sampled_from(["utility", "weights", "y rows"]))
    bad = extra.draw(st.sampled_from([
        np.full(n, np.nan), np.r_[np.zeros(n - 1), np.inf], np.zeros(n + 1), np.zeros((n, 2)),
        np.zeros(n, np.complex128), np.array(["a"] * n), -np.ones(n)]))
    if arg == "y rows":
        with pytest.raises((ValueError, TypeError)) as e:
            m4.balance(s, np.ones((n + 1, 1)), target=0.3)
        _named(e, "y")
        return
    if arg == "utility":
        if bad.dtype.kind == "f" and bad.shape == (n,) and np.all(np.isfinite(bad)):
            return  # a negative utility is allowed
        for call in (lambda: m4.balance(s, y, target=0.3, utility=bad),
                     lambda: m4.M4Solver(0.3).partial_fit(s, y, bad),
                     lambda: m4.M4Solver(0.3, backend="torch").partial_fit(s, y, bad)):
            with pytest.raises((ValueError, TypeError)) as e:
                quiet(call)
            _named(e, "utility")
    else:
        for call in (lambda: m4.representation_bias(s, bad, 0.3), lambda: m4.association_bias(s, y, bad),
                     lambda: m4.weighted_counts(s, y, bad)):
            with pytest.raises((ValueError, TypeError)) as e:
                call()
            _named(e, "weights")


@given(data(n_min=2), st.data())
def test_bad_scalars_are_named(sy, extra):
    s, y = sy
    arg = extra.draw(st.sampled_from(sorted(_BAD_SCALARS)))
    value = extra.draw(st.sampled_from(_BAD_SCALARS[arg]))
    base = dict(target=0.3)
    stream = arg in ("batch_size", "lr", "seed")
    calls = [lambda: m4.balance(s, y, **{**base, "method": "stream" if stream else None, arg: value})]
    if arg in ("budget", "eps_rep", "eps_assoc", "batch_size", "lr"):
        calls.append(lambda: m4.M4Solver(0.3, **{arg: value}).partial_fit(s, y))
    if arg == "seed":
        calls.append(lambda: m4.sample(np.full(s.shape[0], 0.5), seed=value))
    if arg == "target":
        calls.append(lambda: m4.M4Solver(value).partial_fit(s, y))
        calls.append(lambda: m4.representation_bias(s, target=value))
    if arg in ("budget", "eps_rep", "eps_assoc", "target"):
        cnt = m4.weighted_counts(s, y)
        calls.append(lambda: m4.report(cnt, cnt, **{"target": 0.3, "budget": 0.5, arg: value},
                                       group_names=[f"g{k}" for k in range(s.shape[1])],
                                       label_names=[f"l{r}" for r in range(y.shape[1])]))
    for call in calls:
        with pytest.raises((ValueError, TypeError)) as e:
            quiet(call)
        _named(e, arg)


@settings(max_examples=100)
@given(data(n_min=1), st.sampled_from([np.float32, np.float64, np.float16]),
       st.sampled_from([np.int32, np.int64, np.uint32, np.uint64, np.uint16]))
def test_numpy_scalars_accepted(sy, ftype, itype):
    """numpy scalars and 0-d arrays are numbers wherever a number is taken (budget, eps_*,
    tol, lr, target, max_iter, batch_size)."""
    s, y = sy
    kw = dict(budget=ftype(0.5), eps_rep=ftype(0.25), eps_assoc=ftype(0.25), tol=ftype(1e-3))
    a = quiet(m4.balance, s, y, target=ftype(0.25), max_iter=itype(20), method="exact", **kw)
    b = quiet(m4.balance, s, y, target=np.array(0.25, dtype=ftype), max_iter=20, method="exact",
              **{k: float(v) for k, v in kw.items()})
    np.testing.assert_array_equal(a.q, b.q)
    c = quiet(m4.balance, s, y, target=torch.tensor(0.25), method="stream", batch_size=itype(4), lr=ftype(0.5),
              budget=0.5)
    d = quiet(m4.balance, s, y, target=0.25, method="stream", batch_size=4, lr=float(ftype(0.5)), budget=0.5)
    np.testing.assert_array_equal(c.q, d.q)
    assert math.isfinite(float(a.q.sum()))
