"""The core's two row loops agree: dense 0/1 label rows with m <= 4 groups run the per-pattern
passes (one margin vector per s-pattern, block sums; csrc/m4_rows.h), CSR index lists the
general loop. Same data, both layouts, every M4 entry point: equal to rounding. Shapes cover
the pattern passes' edge cases: c below, at and off a multiple of 8, c = 0, m = 1..4, blocks
of rows cut short, utilities, a shuffled order, and inputs large enough to run on threads.
"""
import numpy as np
import pytest

from pym4 import _backend

core = _backend.core()
pytestmark = pytest.mark.skipif(core is None, reason="needs the compiled core")


def _instance(n, m, c, seed, with_u=False):
    rng = np.random.default_rng(seed)
    s = (rng.random((n, m)) < rng.uniform(0.2, 0.6, size=m)).astype(np.uint8)
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.5, size=c)).astype(np.uint8)
    u = rng.normal(scale=0.1, size=n) if with_u else None
    indptr = np.zeros(n + 1, np.int64)
    indptr[1:] = np.cumsum(y.sum(axis=1))
    indices = np.nonzero(y)[1].astype(np.int32)
    dense = (s, np.ascontiguousarray(y), None, None, c, u)
    csr = (s, None, indptr, indices, c, u)
    pi = np.clip(s.mean(axis=0), 0.05, 0.95).astype(np.float64)
    problem = (pi, 0.7, 0.01, 0.05)
    w = rng.normal(scale=0.3, size=m * (c + 1))
    return dense, csr, problem, w


CASES = [(1, 5), (2, 0), (2, 1), (2, 8), (3, 13), (4, 32), (2, 33)]


@pytest.mark.parametrize("m,c", CASES)
@pytest.mark.parametrize("with_u", [False, True])
def test_margins_and_counts_match_general_loop(m, c, with_u):
    dense, csr, problem, w = _instance(1000, m, c, seed=m * 100 + c, with_u=with_u)
    q = [np.empty(1000) for _ in range(2)]
    for data, out in zip((dense, csr), q):
        core.m4_keep_probability(data, problem, w, 0.05, out)
    np.testing.assert_allclose(q[0], q[1], rtol=0, atol=1e-12)
    size = 1 + m + c + m * c
    counts = [np.zeros(size) for _ in range(2)]
    for data, out in zip((dense, csr), counts):
        core.m4_weighted_counts(data, q[0], out)
    np.testing.assert_allclose(counts[0], counts[1], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("m,c", CASES)
@pytest.mark.parametrize("mu0", [0.0, 0.3, -2.0])
def test_keep_probability_at_budget_matches_general_loop(m, c, mu0):
    """mu0 near and far from the answer: the pattern pass corrects the counts of the rows
    that cross a kink of clip between mu0 and mu (all of them when mu0 is far)."""
    dense, csr, problem, w = _instance(1500, m, c, seed=7 + m + c)
    size = 1 + m + c + m * c
    res = []
    for data in (dense, csr):
        q, after, before = np.empty(1500), np.zeros(size), np.zeros(size)
        mu = core.m4_keep_probability_at_budget(data, problem, w, mu0, q, after, before)
        res.append((mu, q, after, before))
    (mu_d, q_d, a_d, b_d), (mu_s, q_s, a_s, b_s) = res
    assert abs(mu_d - mu_s) <= 1e-12
    np.testing.assert_allclose(q_d, q_s, rtol=0, atol=1e-12)
    assert abs(q_d.mean() - problem[1]) <= 1e-12
    np.testing.assert_allclose(a_d, a_s, rtol=1e-11, atol=1e-9)
    np.testing.assert_allclose(b_d, b_s, rtol=0, atol=0)
    # The counts of q are those of the q written (not of the starting point).
    direct = np.zeros(size)
    core.m4_weighted_counts(dense, q_d, direct)
    np.testing.assert_allclose(a_d, direct, rtol=1e-11, atol=1e-9)


@pytest.mark.parametrize("m,c", CASES)
def test_newton_stats_match_general_loop(m, c):
    dense, csr, problem, w = _instance(1300, m, c, seed=11 + m * c)
    size = core.m4_newton_stats_size(m, c)
    stats = [np.zeros(size) for _ in range(2)]
    for data, out in zip((dense, csr), stats):
        core.m4_newton_stats(data, problem, w, 0.02, 3, out)
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("m,c", CASES)
@pytest.mark.parametrize("shuffled", [False, True])
def test_stream_fit_matches_general_loop(m, c, shuffled):
    n = 2000
    dense, csr, problem, _ = _instance(n, m, c, seed=3 + m + 5 * c, with_u=True)
    p = m * (c + 1)
    order = np.random.default_rng(1).permutation(n).astype(np.int64) if shuffled else None
    states = []
    for data in (dense, csr):
        arrays = [np.zeros(p) for _ in range(4)] + [np.zeros(4)]
        steps = core.m4_stream_fit(data, problem, 0.1, 3.0, 96, *arrays, order=order)
        assert steps == -(-n // 96)
        states.append(arrays)
    for a, b in zip(*states):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    stats = [core.m4_batch_stats(data, problem, states[0][2], 0.01) for data in (dense, csr)]
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-12, atol=1e-9)


def test_threaded_passes_match_general_loop():
    """Above the core's threading threshold (2^16 rows) each thread sums its own range."""
    n, m, c = 70_000, 2, 9
    dense, csr, problem, w = _instance(n, m, c, seed=5)
    size = core.m4_newton_stats_size(m, c)
    stats = [np.zeros(size) for _ in range(2)]
    for data, out in zip((dense, csr), stats):
        core.m4_newton_stats(data, problem, w, 0.0, 7, out)
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-12, atol=1e-8)
    K = 1 + m + c + m * c
    res = []
    for data in (dense, csr):
        q, after = np.empty(n), np.zeros(K)
        mu = core.m4_keep_probability_at_budget(data, problem, w, 0.1, q, after, None)
        res.append((mu, q, after))
    assert abs(res[0][0] - res[1][0]) <= 1e-12
    np.testing.assert_allclose(res[0][1], res[1][1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(res[0][2], res[1][2], rtol=1e-11, atol=1e-8)
    # The stream over one batch that large: batch_stats itself runs on threads.
    b = [core.m4_batch_stats(data, problem, w, 0.0) for data in (dense, csr)]
    np.testing.assert_allclose(b[0], b[1], rtol=1e-12, atol=1e-8)


@pytest.mark.parametrize("m,c", [(2, 8), (3, 13), (4, 32)])
def test_exact_partial_matches_general_loop(m, c):
    """One exact pass (with the Hessian) from the same state: the dense pattern pass and the
    index-list pass give the same stats; then the whole solve gives the same duals."""
    n = 3000
    dense, csr, problem, _ = _instance(n, m, c, seed=13 + m + c)
    state = core.m4_exact_init(problem, m, c, n, 100, 1e-10, 1e6, sample_rows=0)
    stats = [core.m4_partial(data, None, problem, state, 0) for data in (dense, csr)]
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-12, atol=1e-9)
    sols = []
    for data in (dense, csr):
        w, q = np.zeros(m * (c + 1)), np.empty(n)
        info = core.m4_solve_exact(data, problem, 100, 1e-10, 1e6, w, q)
        sols.append((info["status"], w, q))
    assert sols[0][0] == sols[1][0]
    np.testing.assert_allclose(sols[0][1], sols[1][1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sols[0][2], sols[1][2], rtol=0, atol=1e-8)


@pytest.mark.parametrize("m,c", [(2, 8), (3, 13), (6, 5)])
def test_newton_stats_without_data_counts(m, c):
    """count_data=False: the same sums but the unweighted moments (sum v, sum s_k v), zero."""
    dense, csr, problem, w = _instance(900, m, c, seed=29 + m + c)
    L = c + 1
    size = core.m4_newton_stats_size(m, c)
    cv = slice(size - 1 - (1 + m) * L, size - 1)
    for data in (dense, csr):
        full, part = np.zeros(size), np.zeros(size)
        core.m4_newton_stats(data, problem, w, 0.01, 2, full)
        core.m4_newton_stats(data, problem, w, 0.01, 2, part, count_data=False)
        assert np.all(part[cv] == 0.0) and np.any(full[cv] != 0.0)
        keep = np.ones(size, bool)
        keep[cv] = False
        np.testing.assert_array_equal(part[keep], full[keep])


@pytest.mark.parametrize("m,c", [(2, 8), (3, 13), (6, 5)])
def test_weighted_counts_of_q_and_data_in_one_pass(m, c):
    """counts_data: the data's counts (q = 1) from the same pass, equal to a separate call."""
    dense, csr, problem, w = _instance(1100, m, c, seed=41 + m + c)
    q = np.empty(1100)
    core.m4_keep_probability(dense, problem, w, 0.3, q)
    assert np.any(q == 0.0)  # rows with q = 0 still count in the data's counts
    K = 1 + m + c + m * c
    for data in (dense, csr):
        after, before = np.zeros(K), np.zeros(K)
        core.m4_weighted_counts(data, q, after, before)
        a1, b1 = np.zeros(K), np.zeros(K)
        core.m4_weighted_counts(data, q, a1)
        core.m4_weighted_counts(data, None, b1)
        np.testing.assert_allclose(after, a1, rtol=1e-13, atol=1e-10)
        np.testing.assert_array_equal(before, b1)
        assert before[0] == 1100


@pytest.mark.parametrize("m,c,with_u,shuffled", [(2, 9, False, False), (3, 13, True, True), (1, 0, False, True)])
def test_stream_fit_in_shares_matches_numpy(m, c, with_u, shuffled):
    """Above 2^16 rows with batches of >= 128 the dense pass cuts each batch into two shares
    (summed on two threads when there are two, added in share order): the same ascent as the
    plain numpy stream, batch by batch."""
    from references import m4_stream

    n, batch = 70_001, 256  # a short last batch
    dense, _, problem, _ = _instance(n, m, c, seed=17 + m + c, with_u=with_u)
    s, y, u = dense[0], dense[1], dense[5]
    pi, eta, er, ea = problem
    order = np.random.default_rng(4).permutation(n).astype(np.int64) if shuffled else None
    arrays = [np.zeros(m * (c + 1)) for _ in range(4)] + [np.zeros(4)]
    steps = core.m4_stream_fit(dense, problem, 0.1, 3.0, batch, *arrays, order=order)
    assert steps == -(-n // batch)
    idx = np.arange(n) if order is None else order
    vp, vm, avg, avg_mu = m4_stream(s[idx], y[idx], pi, eta, er, ea, lr=0.1, gamma=3.0, batch=batch,
                                    utility=None if u is None else u[idx], start_mu_at_budget=False)
    assert np.abs(avg).max() > 1e-3  # the duals moved: the comparison is not of zeros
    for got, want in zip(arrays[:3], (vp, vm, avg)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    assert abs(arrays[4][1] - avg_mu) <= 1e-11
    np.testing.assert_array_equal(arrays[4][2:], [n, steps])


def test_stream_fit_in_shares_does_not_depend_on_threads():
    """The shares, not the threads that sum them, fix the result: one thread and two give the
    same bits."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from pym4 import _backend\n"
        "rng = np.random.default_rng(0)\n"
        "n = 100_000\n"
        "s = (rng.random((n, 2)) < [0.3, 0.5]).astype(np.uint8)\n"
        "y = (rng.random((n, 12)) < 0.3).astype(np.uint8)\n"
        "a = [np.zeros(26) for _ in range(4)] + [np.zeros(4)]\n"
        "_backend.core().m4_stream_fit((s, y, None, None, 12, None), (np.array([0.35, 0.45]), 0.7, 0.01, 0.02),"
        " 0.1, 3.0, 256, *a)\n"
        "print(np.concatenate(a).tobytes().hex())\n")
    import os
    out = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True, timeout=120).stdout)
    assert out[0] and out[0] == out[1]


@pytest.mark.parametrize("n,batch", [(70_000, 256), (3000, 96)])  # in shares; one thread per batch
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_stream_fit_counts_the_data(n, batch, layout):
    """counts_data: the data's counts [n | sum s_k | sum y_r | sum s_k y_r] of the rows the
    pass streamed (numpy float64 reference), added to what the array held; shuffled or not."""
    m, c = 3, 10
    dense, csr, problem, _ = _instance(n, m, c, seed=n % 13)
    data = dense if layout == "dense" else csr
    s, y = dense[0].astype(np.float64), dense[1].astype(np.float64)
    want = np.concatenate([[n], s.sum(0), y.sum(0), (s.T @ y).reshape(-1)])
    for order in (None, np.random.default_rng(2).permutation(n).astype(np.int64)):
        got = np.full(1 + m + c + m * c, 5.0)
        arrays = [np.zeros(m * (c + 1)) for _ in range(4)] + [np.zeros(4)]
        core.m4_stream_fit(data, problem, 0.1, 3.0, batch, *arrays, order=order, counts_data=got)
        np.testing.assert_array_equal(got, want + 5.0)


@pytest.mark.parametrize("n,m,c,with_u,layout", [
    (70_001, 2, 9, False, "dense"),   # packed rows, in shares
    (3000, 4, 60, False, "dense"),    # packed rows at the widest key, one thread per batch
    (70_001, 2, 61, False, "dense"),  # too wide to pack: the order is built and the rows gathered
    (70_001, 3, 13, True, "dense"),   # a utility: gathered
    (3000, 2, 9, False, "csr"),       # index lists: gathered
])
def test_stream_fit_shuffled_streams_the_shuffled_order(n, m, c, with_u, layout):
    """shuffle_seed visits the rows in m4_shuffled_order(n, seed): the plain numpy stream over
    the rows taken in that order gives the same duals, and the data's counts are those of
    every row."""
    from references import m4_stream

    batch = 256
    dense, csr, problem, _ = _instance(n, m, c, seed=n % 11 + c, with_u=with_u)
    s, y, u = dense[0], dense[1], dense[5]
    pi, eta, er, ea = problem
    arrays = [np.zeros(m * (c + 1)) for _ in range(4)] + [np.zeros(4)]
    got = np.zeros(1 + m + c + m * c)
    steps = core.m4_stream_fit(dense if layout == "dense" else csr, problem, 0.1, 3.0, batch, *arrays,
                               counts_data=got, shuffle_seed=123)
    assert steps == -(-n // batch)
    o = core.m4_shuffled_order(n, 123)
    vp, vm, avg, avg_mu = m4_stream(s[o], y[o], pi, eta, er, ea, lr=0.1, gamma=3.0, batch=batch,
                                    utility=None if u is None else u[o], start_mu_at_budget=False)
    assert np.abs(avg).max() > 1e-3
    for a, want in zip(arrays[:3], (vp, vm, avg)):
        np.testing.assert_allclose(a, want, rtol=1e-9, atol=1e-11)
    assert abs(arrays[4][1] - avg_mu) <= 1e-11
    sf, yf = s.astype(np.float64), y.astype(np.float64)
    np.testing.assert_array_equal(got, np.concatenate([[n], sf.sum(0), yf.sum(0), (sf.T @ yf).reshape(-1)]))
    with pytest.raises(ValueError, match="order, shuffle_seed: give one"):
        core.m4_stream_fit(dense, problem, 0.1, 3.0, batch, *arrays, order=o, shuffle_seed=1)


def test_shuffled_order_does_not_depend_on_threads():
    """The permutation's passes run on every thread; the draws are counters, so one thread
    and two give the same permutation."""
    import os
    import subprocess
    import sys

    code = ("import hashlib\nimport numpy as np\nfrom pym4 import _backend\n"
            "o = np.asarray(_backend.core().m4_shuffled_order(200_003, 9))\n"
            "assert np.array_equal(np.sort(o), np.arange(200_003))\n"
            "print(hashlib.sha256(o.tobytes()).hexdigest())\n")
    out = [subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS=t),
                          capture_output=True, text=True, check=True, timeout=120).stdout for t in ("1", "2")]
    assert out[0] and out[0] == out[1]
