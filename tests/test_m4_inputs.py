"""Regression tests of M4's input layer (issue 11 items 11 and 12): every documented input
form is accepted and converted, every refusal names its argument."""
import warnings

import numpy as np
import pytest
import torch

from pym4 import m4

sparse = pytest.importorskip("scipy.sparse")


def _data(n=60, m=2, c=3, seed=0):
    rng = np.random.default_rng(seed)
    s = (rng.random((n, m)) < np.linspace(0.25, 0.45, m)).astype(np.uint8)
    y = (rng.random((n, c)) < 0.4).astype(np.uint8)
    return s, y


def _q(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pym4.m4.balance: ", category=RuntimeWarning)
        res = m4.balance(*args, **kwargs)
    q = res.q
    return q.detach().numpy() if isinstance(q, torch.Tensor) else q


KW = dict(target=0.3, budget=0.6, eps_rep=0.05, eps_assoc=0.05)


@pytest.mark.parametrize("method", ["exact", "stream"])
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_torch_sparse_labels(method, layout):
    """Was: NotImplementedError from aten (a sparse tensor has no strides)."""
    s, y = _data()
    t = torch.from_numpy(y.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: sparse CSR support is in beta
        ys = t.to_sparse() if layout == "coo" else t.to_sparse_csr()
    np.testing.assert_array_equal(_q(s, ys, method=method, **KW), _q(s, y, method=method, **KW))


def test_torch_sparse_labels_checked():
    s, y = _data()
    bad = torch.from_numpy(y.astype(np.float32) * 2).to_sparse()
    with pytest.raises(ValueError, match=r"^y: values must be 0 or 1 \(binary\), got 2\.0"):
        m4.balance(s, bad, **KW)
    with pytest.raises(ValueError, match=r"^y: expected 60 rows"):
        m4.balance(s, torch.from_numpy(y[:5].astype(np.float32)).to_sparse(), **KW)


@pytest.mark.parametrize("fmt", ["coo", "lil", "dok", "csc", "bsr", "dia"])
def test_scipy_labels_any_format(fmt):
    """Was: COO/LIL/DOK refused ("expected a numpy array or a torch tensor") while CSR/CSC worked."""
    s, y = _data()
    want = _q(s, sparse.csr_matrix(y), **KW)
    np.testing.assert_array_equal(_q(s, sparse.csr_matrix(y).asformat(fmt), **KW), want)
    np.testing.assert_array_equal(want, _q(s, y, **KW))
    solver = m4.M4Solver(0.3, batch_size=7).partial_fit(s, sparse.coo_matrix(y))
    np.testing.assert_array_equal(solver.keep_probability(s, sparse.lil_matrix(y)), solver.keep_probability(s, y))


def test_scipy_labels_stored_zero_is_zero():
    s, y = _data()
    coo = sparse.coo_matrix(y)
    with_zero = sparse.coo_matrix((np.r_[coo.data, 0], (np.r_[coo.row, 0], np.r_[coo.col, 0])), shape=y.shape)
    if y[0, 0] == 0:
        np.testing.assert_array_equal(_q(s, with_zero, **KW), _q(s, y, **KW))


def test_scipy_groups():
    s, y = _data()
    np.testing.assert_array_equal(_q(sparse.csr_matrix(s), y, **KW), _q(s, y, **KW))


@pytest.mark.parametrize("value", [np.array(0.3), torch.tensor(0.3), np.float32(0.3), torch.tensor([0.3, 0.3])])
def test_target_zero_dimensional(value):
    """Was: target=np.array(0.3) refused as "expected a scalar or 2 proportions, got 1"."""
    s, y = _data()
    want = _q(s, y, **{**KW, "target": 0.3})
    np.testing.assert_allclose(_q(s, y, **{**KW, "target": value}), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", [np.complex128(0.3), np.True_, np.str_("0.3"), "0.3", np.array(["0.3"]),
                                   torch.tensor(True)])
def test_target_not_a_number(value):
    s, y = _data()
    with pytest.raises(TypeError, match=r"^target: expected"):
        m4.balance(s, y, target=value)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.float16])
def test_integer_utility(dtype):
    """Was: uint16/uint32 utility refused."""
    s, y = _data()
    u = (np.arange(60) % 3).astype(dtype)
    want = _q(s, y, utility=u.astype(np.float64), **KW)
    np.testing.assert_array_equal(_q(s, y, utility=u, **KW), want)
    solver = m4.M4Solver(0.3).partial_fit(s, y, u)
    np.testing.assert_array_equal(solver.keep_probability(s, y, u),
                                  solver.keep_probability(s, y, u.astype(np.float64)))


def test_numpy_float32_scalars():
    """Was: tol=np.float32(...) refused ("tol: must be a positive number, got 0.001")."""
    s, y = _data()
    f = np.float32
    want = _q(s, y, target=0.25, budget=0.5, eps_rep=0.25, eps_assoc=0.25, tol=float(f(1e-3)))
    got = _q(s, y, target=f(0.25), budget=f(0.5), eps_rep=f(0.25), eps_assoc=f(0.25), tol=f(1e-3),
             max_iter=np.int32(100))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_q(s, y, method="stream", lr=f(0.5), batch_size=np.uint16(8), **KW),
                                  _q(s, y, method="stream", lr=0.5, batch_size=8, **KW))
    with pytest.raises(TypeError, match=r"^tol: expected a number"):
        m4.balance(s, y, tol="1e-3", **KW)
    for flag in (True, np.bool_(True)):  # (budget=True ran as 1.0)
        with pytest.raises(TypeError, match=r"^budget: expected a number"):
            m4.balance(s, y, budget=flag)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_requires_grad_tensors(backend):
    """Tensors that require grad are read (detached), not refused by torch's numpy()."""
    s, y = _data()
    u = np.linspace(-0.1, 0.1, 60)
    st, yt = torch.from_numpy(s.astype(np.float32)).requires_grad_(), torch.from_numpy(y.astype(np.float32)).requires_grad_()
    ut = torch.from_numpy(u).requires_grad_()
    kw = dict(KW, method="stream", backend=backend)
    q = _q(st, yt, utility=ut, **kw)
    np.testing.assert_array_equal(q, _q(s, y, utility=u, **kw))
    solver = m4.M4Solver(0.3, backend=backend).partial_fit(st, yt, ut)
    qt = solver.keep_probability(st, yt, ut)
    assert isinstance(qt, torch.Tensor) and not qt.requires_grad
    np.testing.assert_allclose(qt.numpy(), solver.keep_probability(s, y, u), rtol=0, atol=1e-12)
    assert m4.representation_bias(st, torch.ones(60, requires_grad=True), 0.3) == \
        pytest.approx(m4.representation_bias(s, None, 0.3), abs=1e-12)


def test_torch_path_without_labels():
    """The torch path with c = 0 (found by tests/test_properties_m4.py): was a shape error in
    its [1; y_i] column."""
    s, _ = _data()
    solver = m4.M4Solver(0.3, batch_size=16, backend="torch").partial_fit(s)
    core = m4.M4Solver(0.3, batch_size=16).partial_fit(s)
    np.testing.assert_allclose(solver.state.avg_w, core.state.avg_w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(solver.keep_probability(s), core.keep_probability(s), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "stream"])
def test_default_target_with_every_group_empty(method):
    """Was: "target: proportions must be in (0, 1), got [0.0]" though no target was given."""
    s, y = _data()
    with pytest.raises(ValueError, match=r"^s: no example is in any group") as e:
        m4.balance(np.zeros_like(s), y, method=method)
    assert "target:" not in str(e.value)
    with pytest.raises(ValueError, match=r"^s: every example is in every group"):
        m4.balance(np.ones_like(s), y, method=method)
    with pytest.raises(ValueError, match=r"^s: no example is in any group"):
        m4.default_target(np.zeros_like(s))


@pytest.mark.parametrize("arg,method", [("max_iter", "exact"), ("batch_size", "stream")])
@pytest.mark.parametrize("value", [2 ** 63, 2 ** 64, 2 ** 62])
def test_huge_counts_named(arg, method, value):
    """Was: pybind11's "incompatible function arguments" for max_iter=2**63."""
    s, y = _data()
    with pytest.raises(ValueError, match=rf"^{arg}: must be an integer below 2\*\*62"):
        m4.balance(s, y, method=method, **{arg: value}, **KW)
    if arg == "batch_size":
        with pytest.raises(ValueError, match=r"^batch_size: must be an integer below 2\*\*62"):
            m4.M4Solver(0.3, batch_size=value)


def test_bias_of_an_empty_selection_is_refused_by_both():
    """Was: representation_bias NaN and association_bias 0.0 with all-zero weights."""
    s, y = _data()
    for call in (lambda: m4.representation_bias(s, np.zeros(60), 0.3), lambda: m4.association_bias(s, y, np.zeros(60))):
        with pytest.raises(ValueError, match=r"^weights: every weight is 0"):
            call()
    for call in (lambda: m4.representation_bias(s[:0], None, 0.3), lambda: m4.association_bias(s[:0], y[:0])):
        with pytest.raises(ValueError, match=r"^s: no examples"):
            call()
    # A selection with weight keeps its values.
    w = np.r_[np.zeros(30), np.ones(30)]
    assert m4.representation_bias(s, w, 0.3) == pytest.approx(np.abs(s[30:].mean(0) - 0.3).max(), abs=1e-12)


def test_biases_of_weights_whose_sums_overflow():
    """Was: representation_bias NaN with weights 1e308 (their sum is inf); the biases are
    ratios of weighted counts, the same for any scale of the weights."""
    s, y = _data()
    w = np.random.default_rng(3).random(60)
    for scale in (1e308, 1e300):
        assert m4.representation_bias(s, w * scale, 0.3) == pytest.approx(m4.representation_bias(s, w, 0.3), rel=1e-12)
        assert m4.association_bias(s, y, w * scale) == pytest.approx(m4.association_bias(s, y, w), rel=1e-12)


def test_counts_functions_refuse_what_no_weights_count():
    """group_shares, association_gaps and target_from_counts took negative, NaN and
    inconsistent counts and returned shares of -0.1, 2.0 or NaN."""
    # m = 2, c = 1: [total | group 0, group 1 | label | group 0 & label, group 1 & label]
    good = np.array([10.0, 3, 7, 5, 2, 3])
    np.testing.assert_allclose(m4.group_shares(good, 2, 1), [0.3, 0.7])
    np.testing.assert_allclose(m4.association_gaps(good, 2, 1), [[2 / 3 - 3 / 7], [3 / 7 - 2 / 3]])
    np.testing.assert_allclose(m4.target_from_counts(good, 2, 1), [0.5, 0.5])
    cases = [(np.r_[10.0, -1, 7, 5, 2, 3], ValueError, r"^counts: weighted counts cannot be negative \(value -1 at 1\)"),
             (np.r_[10.0, np.nan, 7, 5, 2, 3], ValueError, r"^counts: contains NaN or Inf \(at 1\)"),
             (np.r_[np.inf, 3, 7, 5, 2, 3], ValueError, r"^counts: contains NaN or Inf \(at 0\)"),
             (np.r_[10.0, 20, 7, 5, 2, 3], ValueError, r"^counts: a group's count exceeds the total at 1 \(20\)"),
             (np.r_[10.0, 3, 7, 11, 2, 3], ValueError, r"^counts: a label's count exceeds the total at 3 \(11\)"),
             (np.r_[10.0, 3, 7, 5, 4, 3], ValueError, r"^counts: a \(group, label\) count exceeds .* at 4 \(4\)"),
             (good[:5], ValueError, r"^counts: expected 6 values for m=2 groups and c=1 labels, got 5"),
             (np.stack([good, good]), ValueError, r"^counts: expected a 1-D array of weighted counts, got shape \(2, 6\)"),
             (good * 1e-12 + np.r_[0, 8e-12, 0, 0, 0, 0], ValueError, r"^counts: a group's count exceeds the total"),
             (np.array(["a"] * 6), TypeError, r"^counts: expected numbers")]
    for counts, err, match in cases:
        for call in (m4.group_shares, m4.association_gaps, m4.target_from_counts):
            with pytest.raises(err, match=match):
                call(counts, 2, 1)
    for m, c, err, match in (("2", 1, TypeError, r"^m: expected an integer"), (0, 1, ValueError, r"^m: must be >= 1"),
                             (2, -1, ValueError, r"^c: must be >= 0")):
        with pytest.raises(err, match=match):
            m4.group_shares(good, m, c)
    # No default target where every group is empty: the counts named, as default_target names s.
    with pytest.raises(ValueError, match=r"^counts: no example is in any group"):
        m4.target_from_counts(np.array([10.0, 0, 0, 5, 0, 0]), 2, 1)


def test_weighted_counts_refuse_weights_whose_sum_overflows():
    """Weights of 1e308 gave counts of inf, which every function of counts then refused as
    "contains NaN or Inf" without naming the weights."""
    s = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.uint8)
    with pytest.raises(ValueError, match=r"^weights: their sum overflows float64 \(largest 1e\+308\); scale them"):
        m4.weighted_counts(s, weights=np.full(3, 1e308))
    np.testing.assert_allclose(m4.weighted_counts(s, weights=np.full(3, 1e300))[:3], [3e300, 2e300, 2e300])


def test_passes_and_dataset_take_numpy_scalars(tmp_path):
    """The data-side exact solver and fit_dataset: numpy scalars for tol and max_iter, huge
    counts named (was: tol=np.float32 refused, max_iter=2**63 passed to the core)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from pym4.m4 import _passes as passes

    s, y = _data(200)
    d = passes.shard_data(s, y)
    problem = (np.array([0.3, 0.3]), 0.6, 0.05, 0.05)
    a = passes.solve(lambda: [d], problem, 2, 3, tol=np.float32(1e-6), max_iter=np.int64(50))
    b = passes.solve(lambda: [d], problem, 2, 3, tol=float(np.float32(1e-6)), max_iter=50)
    np.testing.assert_array_equal(a.w, b.w)
    with pytest.raises(ValueError, match=r"^max_iter: must be an integer below 2\*\*62"):
        passes.solve(lambda: [d], problem, 2, 3, max_iter=2 ** 63)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"g0": s[:, 0], "g1": s[:, 1], "l0": y[:, 0]}), path)
    kw = dict(sensitive=["g0", "g1"], labels=["l0"], target=0.3, budget=0.6, eps_rep=0.05, eps_assoc=0.05,
              progress=False)
    m1 = m4.fit_dataset(str(path), tol=np.float32(1e-6), max_passes=np.int32(20), **kw)
    m2 = m4.fit_dataset(str(path), tol=float(np.float32(1e-6)), max_passes=20, **kw)
    np.testing.assert_array_equal(m1.w, m2.w)
    with pytest.raises(ValueError, match=r"^tol: must be a number in \(0, 1\)"):
        m4.fit_dataset(str(path), tol=np.float32(2), **kw)


@pytest.mark.parametrize("value", [-1, 1.5, "0", None, True])
def test_seed_named(value):
    """Was: numpy's "expected non-negative integer" (or a SeedSequence TypeError), unnamed."""
    s, y = _data()
    with pytest.raises(ValueError, match=r"^seed: must be an integer >= 0"):
        m4.balance(s, y, method="stream", seed=value, **KW)
    with pytest.raises(ValueError, match=r"^seed: must be an integer >= 0"):
        m4.sample(np.full(5, 0.5), seed=value)
    np.testing.assert_array_equal(m4.sample(np.full(50, 0.5), seed=np.int64(3)), m4.sample(np.full(50, 0.5), seed=3))


@pytest.mark.parametrize("call", ["balance", "representation_bias", "default_target", "largest_feasible_budget",
                                  "solver-cpu", "solver-torch"])
def test_no_group_column_is_refused_naming_s(call):
    """An (n, 0) s was an IndexError from deep inside (and ran on the torch solver)."""
    import torch
    s = np.zeros((20, 0), np.uint8)
    run = {"balance": lambda: m4.balance(s),
           "representation_bias": lambda: m4.representation_bias(s),
           "default_target": lambda: m4.default_target(s),
           "largest_feasible_budget": lambda: m4.largest_feasible_budget(s, target=0.3),
           "solver-cpu": lambda: m4.M4Solver(0.4).partial_fit(s),
           "solver-torch": lambda: m4.M4Solver(0.4, backend="torch").partial_fit(torch.zeros(20, 0))}[call]
    with pytest.raises(ValueError, match=r"^s: need at least one group column, got shape \(20, 0\)"):
        run()
