"""The exact M4 solver as passes (pym4/m4/_passes.py over pym4._core's m4_partial/m4_step):
against cvxpy, shards in any order, merge by addition, pattern tables, CSR labels, utilities,
row counts, the infeasibility certificate checked independently in numpy."""
import numpy as np
import pytest

from pym4 import _backend, m4
from pym4.m4 import _passes as passes
from test_m4 import bias_matrix, bounds, cvxpy_solve, make_data, objective

core = _backend.core()
pytestmark = pytest.mark.skipif(core is None, reason="needs the compiled core")


def data_of(s, y=None, u=None, sparse=False):
    if y is not None and sparse:
        rows, cols = np.nonzero(y)
        indptr = np.zeros(len(y) + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=len(y)), out=indptr[1:])
        return passes.shard_data(s, y_indptr=indptr, y_indices=cols.astype(np.int32), c=y.shape[1], u=u)
    return passes.shard_data(s, y, u=u)


def take(s, y, u, idx):
    return s[idx], y[idx], None if u is None else u[idx]


def keep(data, problem, res):
    q = np.empty(data[0].shape[0])
    core.m4_keep_probability(data, problem, res.w, res.mu, q)
    return q


def target(s):
    return np.full(s.shape[1], s.mean(axis=0).mean())


@pytest.mark.parametrize("n,m,c,eta,er,ea,util,seed,sparse", [
    (3000, 2, 8, 0.5, 0.01, 0.01, True, 3, False),
    (2500, 3, 6, 0.6, 0.01, 0.03, False, 21, True),   # groups by s-pattern, CSR labels
    (2500, 5, 4, 0.6, 0.02, 0.04, True, 22, False),   # 5 groups: pair blocks
    (2500, 6, 3, 0.5, 0.02, 0.05, False, 23, True),   # pair blocks, CSR labels
])
def test_passes_match_cvxpy(n, m, c, eta, er, ea, util, seed, sparse):
    s, y, u = make_data(n, m, c, seed, util)
    pi = target(s)
    problem = (pi, eta, er, ea)
    data = data_of(s, y, u, sparse)
    res = passes.solve(lambda: [data], problem, m, c, tol=1e-10)
    status, value, _ = cvxpy_solve(s, y, u, pi, eta, er, ea)
    assert status == "optimal" and res.status == "optimal", res
    q = keep(data, problem, res)
    assert abs(q.mean() - eta) <= 1e-9
    viol = np.abs(bias_matrix(s, y, pi).T @ q / n) - bounds(m, c, eta, er, ea)
    assert viol.max() <= 1e-9
    assert abs(objective(q, u, eta) - value) <= 1e-5 * abs(value) + 1e-12
    assert res.max_violation <= 1e-10 and res.passes <= 30


def test_shards_in_any_order_equal_one_shard():
    s, y, u = make_data(20000, 2, 8, 30, True)
    pi = target(s)
    problem = (pi, 0.6, 0.01, 0.02)
    whole = data_of(s, y, u)
    cuts = [0, 1, 1, 900, 4000, 4001, 11000, 17777, 20000]  # 8 shards, one empty, one of one row
    parts = [data_of(*take(s, y, u, np.arange(a, b))) for a, b in zip(cuts[:-1], cuts[1:])]
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    # Offsets number the rows as in the whole array, so the warm-start sample is the same.
    shards = [passes.Shard(parts[k], offset=cuts[k]) for k in order]
    kw = dict(tol=1e-10, sample_rows=2000)  # rate 10: the sample phase runs
    one = passes.solve(lambda: [whole], problem, 2, 8, **kw)
    many = passes.solve(lambda: shards, problem, 2, 8, **kw)
    assert one.status == many.status == "optimal" and one.sample_passes >= 1
    np.testing.assert_allclose(many.w, one.w, atol=1e-9)
    assert abs(many.mu - one.mu) <= 1e-9
    np.testing.assert_allclose(keep(whole, problem, many), keep(whole, problem, one), atol=1e-9)
    # Without offsets (rows numbered in the order the shards come) the answer is the same too.
    plain = passes.solve(lambda: [parts[k] for k in order], problem, 2, 8, **kw)
    np.testing.assert_allclose(keep(whole, problem, plain), keep(whole, problem, one), atol=1e-9)


def test_stats_merge_is_addition_in_any_order():
    s, y, u = make_data(5000, 3, 5, 31, True)
    pi = target(s)
    problem = (pi, 0.6, 0.01, 0.02)
    state = core.m4_exact_init(problem, 3, 5, 5000, 100, 1e-10, 1e6, None, 0)
    whole = core.m4_partial(data_of(s, y, u), None, problem, state, 0)
    cuts = [0, 700, 701, 3000, 5000]
    parts = [core.m4_partial(data_of(*take(s, y, u, np.arange(a, b))), None, problem, state, a)
             for a, b in zip(cuts[:-1], cuts[1:])]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        merged = None
        for k in order:
            merged = passes.merge(merged, parts[k])
        np.testing.assert_allclose(merged, whole, rtol=1e-12, atol=1e-9)
    # The first stat is the row weight, and the stats do not grow with the rows.
    assert whole[0] == 5000 and whole.shape == (core.m4_exact_sizes(3, 5)[1],)


def test_counts_weight_rows_like_repeats():
    s, y, u = make_data(3000, 2, 6, 32, True)
    counts = np.random.default_rng(0).integers(0, 4, size=3000)
    pi = target(s)
    problem = (pi, 0.6, 0.01, 0.02)
    weighted = passes.solve(lambda: [(data_of(s, y, u), counts)], problem, 2, 6, tol=1e-10)
    idx = np.repeat(np.arange(3000), counts)
    repeated = passes.solve(lambda: [data_of(*take(s, y, u, idx))], problem, 2, 6, tol=1e-10)
    assert weighted.status == repeated.status == "optimal"
    np.testing.assert_allclose(weighted.w, repeated.w, atol=1e-9)
    assert abs(weighted.mu - repeated.mu) <= 1e-9


@pytest.mark.parametrize("sparse", [False, True])
def test_pattern_table_counts_distinct_rows(sparse):
    rng = np.random.default_rng(33)
    s = (rng.random((5000, 2)) < 0.4).astype(np.uint8)
    y = (rng.random((5000, 5)) < 0.3).astype(np.uint8)
    halves = [data_of(s[:2600], y[:2600], sparse=sparse), data_of(s[2600:], y[2600:], sparse=sparse)]
    table, counts = passes.pattern_table(halves, max_patterns=1000)
    keys, ref = np.unique(np.concatenate([s, y], axis=1), axis=0, return_counts=True)
    dense_y = table[1]
    if dense_y is None:  # the table keeps the input's CSR layout
        dense_y = np.zeros((len(counts), 5), np.uint8)
        rows = np.repeat(np.arange(len(counts)), np.diff(table[2]))
        dense_y[rows, table[3]] = 1
    got = np.concatenate([table[0], dense_y], axis=1)
    order = np.lexsort(got.T[::-1])
    np.testing.assert_array_equal(got[order], keys)
    np.testing.assert_array_equal(counts[order], ref)
    assert counts.sum() == 5000
    assert passes.pattern_table(halves, max_patterns=len(ref) - 1) is None


def test_compressed_equals_uncompressed():
    rng = np.random.default_rng(34)
    n = 40000
    s = (rng.random((n, 2)) < [0.3, 0.45]).astype(np.uint8)
    y = (rng.random((n, 4)) < 0.2 + 0.1 * s[:, :1]).astype(np.uint8)  # associated with group 0
    pi = target(s)
    problem = (pi, 0.6, 0.02, 0.05)
    data = data_of(s, y)
    rows = passes.solve(lambda: [data], problem, 2, 4, tol=1e-10)
    table = passes.pattern_table([data], max_patterns=1000)
    assert table is not None and len(table[1]) <= 64
    compressed = passes.solve(lambda: [table], problem, 2, 4, tol=1e-10)
    assert rows.status == compressed.status == "optimal"
    np.testing.assert_allclose(keep(data, problem, compressed), keep(data, problem, rows), atol=1e-9)
    # The in-memory entry says which it used: the table here, the rows once there is a utility.
    w, q = np.zeros(10), np.empty(n)
    info = core.m4_solve_exact(data, problem, 100, 1e-10, 1e6, w, q)
    assert info["compressed"] and info["patterns"] == len(table[1]) and info["status"] == 0
    np.testing.assert_allclose(q, keep(data, problem, rows), atol=1e-9)
    with_u = data_of(s, y, u=np.zeros(n))
    info_u = core.m4_solve_exact(with_u, problem, 100, 1e-10, 1e6, np.zeros(10), q)
    assert not info_u["compressed"]
    np.testing.assert_allclose(q, keep(data, problem, rows), atol=1e-9)


def test_csr_labels_match_dense_with_many_labels():
    s, y, u = make_data(3000, 2, 150, 35, True, coupling=0.2)
    pi = target(s)
    problem = (pi, 0.6, 0.02, 0.05)
    dense = passes.solve(lambda: [data_of(s, y, u)], problem, 2, 150, tol=1e-10)
    sparse = passes.solve(lambda: [data_of(s, y, u, sparse=True)], problem, 2, 150, tol=1e-10)
    assert dense.status == sparse.status == "optimal"
    np.testing.assert_allclose(sparse.w, dense.w, atol=1e-9)
    q = keep(data_of(s, y, u), problem, dense)
    viol = np.abs(bias_matrix(s, y, pi).T @ q / 3000) - bounds(2, 150, 0.6, 0.02, 0.05)
    assert viol.max() <= 1e-9


@pytest.mark.parametrize("m,seed", [(2, 7), (5, 36)])
def test_infeasible_is_certified(m, seed):
    s, y, u = make_data(3000, m, 4, seed)
    pi = target(s)
    eta, er, ea = 0.95, 0.0, 0.0
    res = passes.solve(lambda: [data_of(s, y)], (pi, eta, er, ea), m, 4)
    assert res.status == "infeasible" and res.recession > 0
    assert cvxpy_solve(s, y, None, pi, eta, er, ea)[0] == "infeasible"
    # The certificate, recomputed here: the dual's recession function
    # D_inf(w, mu) = mean min(0, a_i^T w + mu) - mu eta - lambda^T |w| is > 0 at the returned
    # duals or along the last Newton direction (D is then unbounded above).
    A = bias_matrix(s, y, pi)
    lam = bounds(m, 4, eta, er, ea)

    def recession(w, mu):
        return np.minimum(0.0, A @ w + mu).mean() - mu * eta - lam @ np.abs(w)

    best = max(recession(res.w, res.mu), recession(res.dw, res.dmu))
    assert best > 0 and best == pytest.approx(res.recession, rel=1e-6)
    # The Python side names constraints from w: the largest duals are the ones that conflict.
    assert np.abs(res.w).max() > 0


def test_warm_start_sample_gives_the_same_answer():
    s, y, u = make_data(30000, 2, 8, 37, False)
    pi = target(s)
    problem = (pi, 0.7, 0.01, 0.02)
    data = data_of(s, y)
    cold = passes.solve(lambda: [data], problem, 2, 8, tol=1e-10, sample_rows=0)
    warm = passes.solve(lambda: [data], problem, 2, 8, tol=1e-10, sample_rows=3000)
    assert cold.sample_passes == 0 and warm.sample_passes >= 1
    assert cold.status == warm.status == "optimal"
    np.testing.assert_allclose(keep(data, problem, warm), keep(data, problem, cold), atol=1e-9)
    assert warm.passes <= cold.passes


def test_max_iter_stops_with_the_measured_violation():
    s, y, u = make_data(3000, 4, 5, 8, True)
    pi = target(s)
    problem = (pi, 0.7, 0.0, 0.0)
    res = passes.solve(lambda: [data_of(s, y, u)], problem, 4, 5, max_iter=1)
    assert res.status == "max_iter" and res.iterations == 1
    # The reported violation is the one of the duals' q, budget included, measured here.
    q = keep(data_of(s, y, u), problem, res)
    viol = max(np.abs(bias_matrix(s, y, pi).T @ q / 3000).max(), abs(q.mean() - 0.7))
    assert res.max_violation == pytest.approx(viol, rel=1e-9)


@pytest.mark.parametrize("call,exc,match", [
    (lambda d, p: passes.solve(lambda: [(d, -np.ones(10, np.int64))], p, 2, 3), ValueError, "counts: must be >= 0"),
    (lambda d, p: passes.solve(lambda: [], p, 2, 3), ValueError, "shards: no rows"),
    (lambda d, p: passes.solve(lambda: [d], p, 3, 3), ValueError, "target has 2 proportions"),
    (lambda d, p: passes.solve(lambda: [d], (p[0], 0.5, 0.01, 0.01), 2, 4), ValueError, "c=3 labels, expected m=2, c=4"),
    (lambda d, p: passes.solve(lambda: ["rows"], p, 2, 3, rows=10), TypeError, "shards: each shard"),
    (lambda d, p: passes.solve(lambda: [d], p, 2, 3, tol=0.0), ValueError, "tol: must be a positive"),
    (lambda d, p: passes.pattern_table([(d, np.ones(9, np.int64))], 10), ValueError, "counts: expected 10 rows"),
])
def test_bad_input(call, exc, match):
    rng = np.random.default_rng(0)
    d = passes.shard_data((rng.random((10, 2)) < 0.5), (rng.random((10, 3)) < 0.5))
    with pytest.raises(exc, match=match):
        call(d, (np.array([0.4, 0.4]), 0.5, 0.01, 0.01))


def test_in_memory_exact_is_the_passes_solver():
    # balance(method="exact") runs m4_solve_exact: the same partial/step loop over one shard.
    s, y, u = make_data(4000, 2, 8, 38, True)
    pi = target(s)
    problem = (pi, 0.6, 0.01, 0.02)
    data = data_of(s, y, u)
    w, q = np.zeros(18), np.empty(4000)
    info = core.m4_solve_exact(data, problem, 100, 1e-10, 1e6, w, q)
    res = passes.solve(lambda: [data], problem, 2, 8, tol=1e-10)
    assert (info["status"], info["passes"], info["iterations"]) == (0, res.passes, res.iterations)
    np.testing.assert_allclose(w, res.w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(q, keep(data, problem, res), rtol=0, atol=1e-12)
    bal = m4.balance(s, y, target=pi, budget=0.6, eps_rep=0.01, eps_assoc=0.02, utility=u)
    np.testing.assert_allclose(bal.q, q, rtol=0, atol=1e-12)
