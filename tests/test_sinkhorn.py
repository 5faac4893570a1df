"""Sinkhorn-Knopp: SwAV equipartition and POT-compatible entropic OT.

References are written here from the papers' formulas in float64 (SwAV's
``distributed_sinkhorn`` as published, and POT itself), never through pym4.
"""
import importlib
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch

import pym4
from pym4 import _backend
from references import swav_sinkhorn as swav_reference
from references import swav_sinkhorn_log as swav_reference_log

BACKENDS = ["cpu", "torch"]


def uniform_scores(b, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, k, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def cosine_scores(b, k, d=32, seed=0):
    """Scores as SwAV computes them: cosine similarities of features to prototypes."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()


# ----- SwAV semantics ----------------------------------------------------------------------

@pytest.mark.parametrize("backend,shape", [
    *[(backend, shape) for backend in BACKENDS for shape in [(1, 1), (1, 3000), (7, 5), (517, 129)]],
    ("cpu", (4096, 3000)),  # the SwAV shape, on the backend that serves it
])
def test_matches_swav_reference(backend, shape):
    s = cosine_scores(*shape)
    q = pym4.sinkhorn(s, backend=backend)
    ref = swav_reference(s)
    assert q.shape == shape and q.dtype == torch.float32
    torch.testing.assert_close(q.double(), ref, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("epsilon", [0.05, 0.01])  # the kernel form; the log domain (spread > 80)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1100, 1103])
def test_row_shares_over_threads_match_reference(epsilon, threads, rows):
    # From 64K entries per thread the core splits every pass's rows over threads, each with
    # its own column sums (pass_threads in csrc/sinkhorn.cpp); below that one thread runs
    # it. Either way: the float64 reference. A share's rows go four at a time, a quarter of
    # the share apart, then the last 0-3 one by one: 1100 rows leave 0 or 2 (550 per share),
    # 1103 rows 3 (one share) or 3 and 0 (551 and 552).
    s = cosine_scores(rows, 2000)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the core shares torch's OpenMP runtime
    try:
        q = pym4.sinkhorn(s, epsilon=epsilon, n_iters=4, backend="cpu")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(q.double(), swav_reference(s, epsilon, 4), rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("threads", [1, 2])
def test_rising_row_maxima_in_the_kernel_form_match_reference(threads):
    # The first pass shifts each row by the running maximum of the rows before it; a row that
    # sets a new maximum is rescaled. Here every row does, up to a spread of ~71 (the kernel
    # form's limit is 80), and the rows' maxima are far apart from the share's first one.
    g = torch.Generator().manual_seed(7)
    b, k, eps = 600, 257, 0.035  # 154K entries: two shares of rows on two threads
    s = torch.rand(b, k, generator=g) - 0.5 + 1.5 * torch.arange(b, dtype=torch.float32).unsqueeze(1) / b
    x = s.numpy()
    core = _backend.core()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        form = core.sinkhorn_solve(x, 1 / eps, None, -math.log(b), 3, 0.0, math.log(b), np.empty_like(x))[3]
        q = pym4.sinkhorn(s, epsilon=eps, n_iters=3, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert form == "kernel"
    torch.testing.assert_close(q.double(), swav_reference(s, eps, 3), rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("shape,epsilon,n_iters", [
    ((16, 16000), 0.03, 10),  # SEER's shape: tiles over both threads
    ((1, 5000), 0.05, 3),     # one row
    ((64, 4099), 0.05, 4),    # the widest rows the column-tile form takes, K no multiple of a tile
    ((5, 70), 0.01, 3),       # one tile, spread > 80: the log domain takes over
])
@pytest.mark.parametrize("threads", [1, 2])
def test_column_tiles_over_threads_match_reference(shape, epsilon, n_iters, threads):
    # Up to 64 rows the core fuses each column step with the next row sums, tile of columns by
    # tile (solve_kernel_form_wide in csrc/sinkhorn.cpp), threads taking ranges of tiles.
    s = cosine_scores(*shape, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q = pym4.sinkhorn(s, epsilon=epsilon, n_iters=n_iters, backend="cpu")
    finally:
        torch.set_num_threads(before)
    ref = swav_reference(s, epsilon, n_iters)
    torch.testing.assert_close(q.double(), ref, rtol=5e-5, atol=1e-7)
    torch.testing.assert_close(q.double().sum(dim=1), torch.ones(shape[0], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_sum_to_one_and_columns_equipartition(backend):
    b, k = 600, 40
    q = pym4.sinkhorn(cosine_scores(b, k), epsilon=0.05, n_iters=50, backend=backend).double()
    torch.testing.assert_close(q.sum(1), torch.ones(b, dtype=torch.float64), rtol=0, atol=1e-5)
    # After many iterations the last column step is (almost) undone by nothing: B/K each.
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k, dtype=torch.float64), rtol=1e-3, atol=0)
    assert (q >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_iters", [1, 2, 10])
def test_iteration_count(backend, n_iters):
    s = uniform_scores(33, 17)
    torch.testing.assert_close(pym4.sinkhorn(s, 0.05, n_iters, backend=backend).double(),
                               swav_reference(s, 0.05, n_iters), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epsilon", [0.01, 0.02])
def test_small_epsilon_is_finite_and_exact(backend, epsilon):
    # exp(1/0.01) = e^100 overflows float32: the log-domain kernel must not.
    s = uniform_scores(257, 300)
    s[0, :] = 1.0  # a row tied at the maximum everywhere
    s[:, 0] = -1.0  # a prototype nobody is close to
    q = pym4.sinkhorn(s, epsilon=epsilon, n_iters=3, backend=backend)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_reference(s, epsilon, 3), rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol,atol", [
    (torch.float32, 2e-5, 1e-7),
    (torch.float64, 1e-10, 1e-13),
    # Half inputs: compared with the float64 reference run on the same (rounded) inputs; the
    # output itself is rounded to the input precision.
    (torch.float16, 2e-3, 1e-4),
    (torch.bfloat16, 1.6e-2, 1e-3),
])
def test_dtypes(backend, dtype, rtol, atol):
    s = uniform_scores(129, 65, dtype=dtype)
    q = pym4.sinkhorn(s, epsilon=0.05, backend=backend)
    assert q.dtype == dtype
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_reference(s.double()), rtol=rtol, atol=atol)


def test_float16_small_epsilon_finite():
    s = uniform_scores(64, 3000, dtype=torch.float16)
    q = pym4.sinkhorn(s, epsilon=0.01)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_reference(s.double(), 0.01), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64, np.float16])
def test_numpy_in_numpy_out(np_dtype):
    s = uniform_scores(20, 9).numpy().astype(np_dtype)
    s.setflags(write=False)  # read-only inputs are fine: nothing is written into them
    before = s.copy()
    q = pym4.sinkhorn(s)
    assert isinstance(q, np.ndarray) and q.dtype == np_dtype and q.shape == s.shape
    np.testing.assert_array_equal(s, before)
    tol = 2e-3 if np_dtype == np.float16 else 2e-5
    np.testing.assert_allclose(q.astype(np.float64), swav_reference(s.astype(np.float64)).numpy(), rtol=tol, atol=1e-6)


def test_non_contiguous_input():
    base = uniform_scores(50, 80)
    s = base.t()  # (80, 50), column-major storage
    ref = swav_reference(s)
    torch.testing.assert_close(pym4.sinkhorn(s).double(), ref, rtol=2e-5, atol=1e-7)
    sliced = uniform_scores(40, 90)[:, 5:70]  # rows strided, columns contiguous
    torch.testing.assert_close(pym4.sinkhorn(sliced).double(), swav_reference(sliced), rtol=2e-5, atol=1e-7)


def test_input_not_modified():
    s = uniform_scores(30, 20)
    before = s.clone()
    pym4.sinkhorn(s)
    assert torch.equal(s, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    s = uniform_scores(999, 301)
    assert torch.equal(pym4.sinkhorn(s, backend=backend), pym4.sinkhorn(s, backend=backend))


def test_backends_agree():
    s = cosine_scores(300, 120)
    torch.testing.assert_close(pym4.sinkhorn(s, backend="cpu"), pym4.sinkhorn(s, backend="torch"), rtol=2e-5, atol=1e-7)


# ----- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("scores,exc,match", [
    (torch.zeros(5), ValueError, "scores: expected a 2-D"),
    (torch.zeros(2, 3, 4), ValueError, "scores: expected a 2-D"),
    (torch.zeros(0, 4), ValueError, "scores: expected a non-empty"),
    (torch.zeros(3, 0), ValueError, "scores: expected a non-empty"),
    (torch.zeros(3, 4, dtype=torch.int64), TypeError, "scores: expected a floating-point"),
    (np.zeros((3, 4), dtype=np.int32), TypeError, "scores: expected a floating-point"),
    ([[0.0, 1.0]], TypeError, "scores: expected a numpy array or a torch tensor"),
    (torch.zeros(3, 4, device="meta"), ValueError, "scores: is on the meta device"),  # (was: Tensor.item() ...)
])
def test_bad_scores(scores, exc, match):
    with pytest.raises(exc, match=match):
        pym4.sinkhorn(scores)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores(backend, bad):
    s = uniform_scores(40, 30)
    s[17, 3] = bad
    with pytest.raises(ValueError, match="scores: contains NaN or Inf"):
        pym4.sinkhorn(s, backend=backend)


def test_overflow_after_division_is_reported():
    # float32 scores whose scores/epsilon overflow float32 are solved in float64 (issue 11,
    # item 5); only an overflow of float64 itself is an error.
    q = pym4.sinkhorn(torch.full((3, 4), 3e38), epsilon=0.01)
    torch.testing.assert_close(q, torch.full((3, 4), 0.25), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="scores"):
        pym4.sinkhorn(torch.full((3, 4), 1e307, dtype=torch.float64), epsilon=0.01)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"epsilon": 0.0}, ValueError, "epsilon: must be a positive"),
    ({"epsilon": -0.05}, ValueError, "epsilon: must be a positive"),
    ({"epsilon": float("nan")}, ValueError, "epsilon: must be a positive"),
    ({"epsilon": "small"}, TypeError, "epsilon"),
    ({"n_iters": 0}, ValueError, "n_iters: must be >= 1"),
    ({"n_iters": 2.5}, TypeError, "n_iters: expected an integer"),
    ({"backend": "fortran"}, ValueError, "backend: unknown backend"),
    ({"backend": "cuda"}, RuntimeError, "backend: 'cuda' cannot run sinkhorn on cpu"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pym4.sinkhorn(uniform_scores(4, 3), **kwargs)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("PYM4_BACKEND", "torch")
    assert _backend.choose("sinkhorn", "cpu") == "torch"
    monkeypatch.setenv("PYM4_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        pym4.sinkhorn(uniform_scores(4, 3))


def test_automatic_choice_on_cpu():
    assert _backend.choose("sinkhorn", "cpu") == "cpu"


# ----- general entropic OT against POT -----------------------------------------------------------

ot = pytest.importorskip("ot")


def random_problem(n, m, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    a = rng.random(n) + 0.1
    b = rng.random(m) + 0.1
    a /= a.sum()
    b /= b.sum()
    x = rng.random((n, 2))
    y = rng.random((m, 2))
    cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return a, b, cost.astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,reg", [(1, 1, 0.1), (7, 5, 0.05), (64, 50, 0.05), (200, 131, 0.1)])
def test_ot_matches_pot(backend, n, m, reg):
    a, b, cost = random_problem(n, m)
    plan = pym4.sinkhorn_ot(a, b, cost, reg, backend=backend)
    ref = ot.sinkhorn(a, b, cost, reg, numItermax=10000, stopThr=1e-12)
    assert isinstance(plan, np.ndarray) and plan.dtype == np.float64
    np.testing.assert_allclose(plan, ref, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(plan.sum(1), a, rtol=1e-10)
    assert np.linalg.norm(plan.sum(0) - b) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_ot_fixed_iterations_match_pot(backend):
    a, b, cost = random_problem(40, 30, seed=3)
    for n_iters in (1, 3, 7):
        plan = pym4.sinkhorn_ot(a, b, cost, 0.05, n_iters=n_iters, tol=0, warn=False, backend=backend)
        ref = ot.sinkhorn(a, b, cost, 0.05, numItermax=n_iters, stopThr=0, warn=False)
        np.testing.assert_allclose(plan, ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ot_small_reg_log_domain(backend):
    # reg = 1e-3: exp(-C/reg) underflows, POT's plain method fails; its log method does not.
    a, b, cost = random_problem(30, 20, seed=1)
    plan = pym4.sinkhorn_ot(a, b, cost, 1e-3, n_iters=20000, tol=1e-9, backend=backend)
    ref = ot.sinkhorn(a, b, cost, 1e-3, method="sinkhorn_log", numItermax=20000, stopThr=1e-9)
    assert np.isfinite(plan).all()
    np.testing.assert_allclose(plan, ref, rtol=1e-4, atol=1e-9)


def test_ot_float32_and_torch():
    a, b, cost = random_problem(50, 40, seed=2)
    plan = pym4.sinkhorn_ot(torch.tensor(a), torch.tensor(b), torch.tensor(cost, dtype=torch.float32), 0.1, tol=1e-6)
    assert isinstance(plan, torch.Tensor) and plan.dtype == torch.float32
    ref = ot.sinkhorn(a, b, cost, 0.1, stopThr=1e-9)
    np.testing.assert_allclose(plan.double().numpy(), ref, rtol=1e-4, atol=1e-8)


def test_ot_uniform_marginals_by_default():
    _, _, cost = random_problem(12, 8)
    plan = pym4.sinkhorn_ot(None, None, cost, 0.1)
    np.testing.assert_allclose(plan, ot.sinkhorn(np.full(12, 1 / 12), np.full(8, 1 / 8), cost, 0.1, stopThr=1e-12),
                               rtol=1e-6, atol=1e-13)


def test_ot_zero_mass_entries():
    a, b, cost = random_problem(10, 6, seed=4)
    a[2] = 0.0
    b[1] = 0.0
    a /= a.sum()
    b /= b.sum()
    plan = pym4.sinkhorn_ot(a, b, cost, 0.1)
    assert np.isfinite(plan).all()
    assert np.all(plan[2] == 0) and np.all(plan[:, 1] == 0)
    # POT cannot take zero marginals (it divides by them): solve the problem without that
    # row and column, whose plan must be the rest of ours.
    rows, cols = np.arange(10) != 2, np.arange(6) != 1
    ref = ot.sinkhorn(a[rows], b[cols], cost[np.ix_(rows, cols)], 0.1, stopThr=1e-12)
    np.testing.assert_allclose(plan[np.ix_(rows, cols)], ref, rtol=1e-6, atol=1e-13)


def test_ot_warns_when_not_converged():
    a, b, cost = random_problem(30, 30)
    with pytest.warns(pym4.ConvergenceWarning, match="n_iters=2"):
        pym4.sinkhorn_ot(a, b, cost, 0.01, n_iters=2)
    # Stopping on n_iters with tol=0 (a fixed count) warns as POT does (issue 10) ...
    with pytest.warns(pym4.ConvergenceWarning, match="n_iters=2"):
        pym4.sinkhorn_ot(a, b, cost, 0.01, n_iters=2, tol=0)
    # ... unless the caller says it expects that, with POT's warn=False.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pym4.sinkhorn_ot(a, b, cost, 0.01, n_iters=2, tol=0, warn=False)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a, b, c: (-a, b, c), ValueError, "a: marginals must be non-negative"),
    (lambda a, b, c: (a, b * 2, c), ValueError, "a, b: marginals must have the same total mass"),
    (lambda a, b, c: (a[:-1], b, c), ValueError, "a: expected 10 entries"),
    (lambda a, b, c: (a, b[:, None, None], c), ValueError, "b: expected a 1-D"),  # 2-D is POT's multi b
    (lambda a, b, c: (a, np.ones((7, 2)) / 7, c), ValueError, r"b: expected shape \(8, h >= 1\)"),
    (lambda a, b, c: (a, b, c[:, :3]), ValueError, "b: expected 3 entries"),
    (lambda a, b, c: (a, b, c.ravel()), ValueError, "cost: expected a 2-D"),
    (lambda a, b, c: (a, b, np.where(np.eye(10, 8, dtype=bool), np.nan, c)), ValueError, "cost: contains NaN"),
    (lambda a, b, c: (np.where(np.arange(10) == 0, np.inf, a), b, c), ValueError, "a: contains NaN or Inf"),
    (lambda a, b, c: (a, b, c.astype(np.int64)), TypeError, "cost: expected a floating-point"),
    (lambda a, b, c: (np.zeros(10), np.zeros(8), c), ValueError, "a: marginals must have positive total mass"),
    # (was: both sums inf, "equal", and a plan of 1e307s)
    (lambda a, b, c: (np.full(10, 1e308), np.full(8, 1.25e308), c), ValueError, "a: the total mass overflows float64"),
    (lambda a, b, c: (torch.tensor(1.0, dtype=torch.float64), b, c[:1]), ValueError,  # (was: len() of a 0-d tensor)
     r"a: expected a 1-D array, got shape \(\)"),
    (lambda a, b, c: (a, np.array(1.0), c[:, :1]), ValueError, r"b: expected a 1-D array, got shape \(\)"),
    (lambda a, b, c: (torch.from_numpy(a).to("meta"), b, c), ValueError, "a: is on the meta device"),
])
def test_ot_bad_input(change, exc, match):
    a, b, cost = random_problem(10, 8)
    a2, b2, c2 = change(a, b, cost)
    with pytest.raises(exc, match=match):
        pym4.sinkhorn_ot(a2, b2, c2, 0.1)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"reg": 0.0}, ValueError, "reg: must be a positive"),
    ({"reg": 0.1, "n_iters": 0}, ValueError, "n_iters: must be >= 1"),
    ({"reg": 0.1, "tol": -1.0}, ValueError, "tol: must be a finite number >= 0"),
])
def test_ot_bad_parameters(kwargs, exc, match):
    a, b, cost = random_problem(4, 3)
    with pytest.raises(exc, match=match):
        pym4.sinkhorn_ot(a, b, cost, **kwargs)


def test_build_info():
    info = pym4.build_info()
    for key in ("version", "compiler", "core", "openmp", "omp_max_threads", "simd", "cuda", "cuda_archs", "torch"):
        assert key in info
    assert info["core"] is True
    assert info["version"] == pym4.__version__
    assert info["omp_max_threads"] >= 1
    assert isinstance(info["cuda"], bool)


# ----- features form: scores computed block by block, never stored ---------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_features_form_matches_dense(backend, chunk):
    g = torch.Generator().manual_seed(5)
    z = torch.nn.functional.normalize(torch.randn(45, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(23, 16, generator=g), dim=1)
    q = pym4.sinkhorn(z, 0.05, 3, prototypes=c, chunk=chunk, backend=backend)
    torch.testing.assert_close(q.double(), swav_reference(z.double() @ c.double().t()), rtol=2e-5, atol=1e-7)


def test_features_form_numpy_and_small_epsilon():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((30, 8)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c = rng.standard_normal((12, 8)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q = pym4.sinkhorn(z, 0.01, 4, prototypes=c, chunk=4)
    assert isinstance(q, np.ndarray) and q.shape == (30, 12) and np.isfinite(q).all()
    ref = swav_reference(torch.from_numpy(z).double() @ torch.from_numpy(c).double().t(), 0.01, 4).numpy()
    np.testing.assert_allclose(q, ref, rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [None, 64, 63])  # the scores in one block (formed once); in two
def test_features_form_log_domain(backend, chunk):
    # Un-normalised features at epsilon 0.02: a spread of scores/epsilon far beyond the kernel
    # form's, so the in-place solve declines and the log domain runs on the features.
    g = torch.Generator().manual_seed(6)
    z, c = 0.5 * torch.randn(64, 16, generator=g), torch.randn(37, 16, generator=g)  # |scores| up to ~8
    q = pym4.sinkhorn(z, 0.02, 3, prototypes=c, chunk=chunk, backend=backend)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), swav_reference(z.double() @ c.double().t(), 0.02, 3),
                               rtol=5e-5, atol=1e-7)


def test_features_form_log_domain_holds_one_b_by_k_at_a_time(monkeypatch):
    # Blocks of 8 rows: the in-place buffer the declined solve used is dropped before the
    # block-wise passes write their plan, so the peak stays one B x K (plus a block).
    import gc
    from pym4 import _sinkhorn_passes

    g = torch.Generator().manual_seed(6)
    z, c = 0.5 * torch.randn(64, 16, generator=g), torch.randn(37, 16, generator=g)
    alive = []
    write_plan = _sinkhorn_passes._FeaturePasses.write_plan

    def spy(self, *args):
        gc.collect()
        alive.append(sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == (64, 37)))
        return write_plan(self, *args)

    monkeypatch.setattr(_sinkhorn_passes._FeaturePasses, "write_plan", spy)
    q = pym4.sinkhorn(z, 0.02, 3, prototypes=c, chunk=8, backend="cpu")
    assert alive == [0]  # the block-wise passes ran, with no B x K alive when the plan is written
    torch.testing.assert_close(q.double(), swav_reference(z.double() @ c.double().t(), 0.02, 3),
                               rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"prototypes": torch.zeros(5, 3)}, ValueError, "prototypes: expected shape"),
    ({"prototypes": torch.zeros(0, 4)}, ValueError, "prototypes: expected shape"),
    ({"prototypes": torch.zeros(5)}, ValueError, "prototypes: expected a 2-D"),
    ({"prototypes": torch.zeros(5, 4, dtype=torch.int32)}, TypeError, "prototypes: expected a floating-point"),
    ({"prototypes": torch.full((5, 4), float("nan"))}, ValueError, "prototypes: contains NaN"),
    ({"prototypes": torch.zeros(5, 4), "chunk": 0}, ValueError, "chunk: must be >= 1"),
    ({"chunk": 8}, ValueError, "chunk: only used with prototypes="),
])
def test_features_form_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pym4.sinkhorn(torch.zeros(6, 4), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_whose_scores_overflow_are_named(backend):
    """Finite features whose products overflow were reported as "scores: contains NaN or
    Inf", and float64 prototypes past float32's range (cast to the float32 features' dtype)
    as "prototypes: contains NaN or Inf"."""
    z = torch.full((6, 4), 1e200, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"scores, prototypes: their products .* overflow torch\.float64 "
                                         r"\(largest \|z\| 1e\+200, \|prototypes\| 1e\+200\)"):
        pym4.sinkhorn(z, prototypes=torch.full((5, 4), 1e200, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match=r"scores, prototypes: their products"):  # block by block: NaN before
        pym4.sinkhorn(z, prototypes=torch.full((5, 4), 1e200, dtype=torch.float64), chunk=2, backend=backend)
    with pytest.raises(ValueError, match=r"prototypes: values up to 1e\+200 overflow torch\.float32, .*"
                                         r"pass the features as torch\.float64"):
        pym4.sinkhorn(torch.ones(6, 4), prototypes=torch.full((5, 4), 1e200, dtype=torch.float64), backend=backend)


# ----- out= : writing into the caller's buffer --------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_out_buffer(backend, dtype):
    s = uniform_scores(40, 17, dtype=dtype)
    buf = torch.full((40, 17), float("nan"), dtype=dtype)
    q = pym4.sinkhorn(s, out=buf, backend=backend)
    assert q is buf
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(buf.double(), swav_reference(s.double()), rtol=tol, atol=1e-6)


def test_out_buffer_numpy_and_features_form():
    s = uniform_scores(12, 5).numpy()
    buf = np.empty((12, 5), dtype=np.float32)
    assert pym4.sinkhorn(s, out=buf) is buf
    np.testing.assert_allclose(buf, swav_reference(s).numpy(), rtol=2e-5, atol=1e-7)
    z, c = torch.randn(9, 4), torch.randn(6, 4)
    fbuf = torch.empty(9, 6)
    assert pym4.sinkhorn(z, prototypes=c, out=fbuf) is fbuf
    torch.testing.assert_close(fbuf.double(), swav_reference(z.double() @ c.double().t()), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("make,exc,match", [
    (lambda s: torch.empty(4, 3), ValueError, r"out: expected shape \(5, 3\)"),
    (lambda s: torch.empty(5, 3, dtype=torch.float64), ValueError, "out: expected dtype torch.float32"),
    (lambda s: torch.empty(3, 5).t(), ValueError, "out: must be C-contiguous"),
    (lambda s: np.empty((5, 3), dtype=np.float32), TypeError, "out: must be a torch tensor"),
    (lambda s: s, ValueError, "out: must not share memory with scores"),
])
def test_out_buffer_bad(make, exc, match):
    s = uniform_scores(5, 3)
    with pytest.raises(exc, match=match):
        pym4.sinkhorn(s, out=make(s))


# ----- the two forms of the CPU solve ------------------------------------------------------------

@pytest.mark.parametrize("spread,form", [(79.0, "kernel"), (81.0, "log"), (30.0, "kernel"), (400.0, "log")])
def test_kernel_and_log_forms_on_both_sides_of_the_switch(spread, form):
    # alpha * x spans `spread`: up to 80 the kernel form is exact in float32, beyond it the
    # log domain takes over; both must give the reference.
    s = uniform_scores(301, 207)  # in [-1, 1], spread 2 / epsilon
    s[0, 0], s[1, 1] = -1.0, 1.0
    eps = 2.0 / spread
    out = np.empty((301, 207), dtype=np.float32)
    b = 301
    result = _backend.core().sinkhorn_solve(s.numpy(), 1.0 / eps, None, -math.log(b), 3, 0.0, math.log(b), out)
    assert result[3] == form
    np.testing.assert_allclose(out, swav_reference(s, eps, 3).numpy(), rtol=5e-5, atol=1e-7)


def test_kernel_form_underflow_free_for_dominated_rows():
    # A row far below every other in every column is where a kernel form without the spread
    # check would lose whole rows to underflow: at a spread of 70 it must still be exact.
    s = uniform_scores(50, 40) * 0.1
    s[7, :] = -0.5
    s[3, :] = 0.5
    q = pym4.sinkhorn(s, epsilon=1.0 / 70.0, n_iters=5)
    torch.testing.assert_close(q.double(), swav_reference(s, 1.0 / 70.0, 5), rtol=5e-5, atol=1e-7)


def test_fresh_results_never_overwrite_live_ones():
    # Large CPU results come from a pool that reuses a buffer only once nothing refers to it.
    s1, s2 = cosine_scores(1024, 1100, seed=1), cosine_scores(1024, 1100, seed=2)  # 4.5 MB each
    q1 = pym4.sinkhorn(s1)
    want1 = q1.clone()
    view, as_numpy = q1[3:5], pym4.sinkhorn(s2).numpy()
    want2 = as_numpy.copy()
    del q1
    others = [pym4.sinkhorn(s) for s in (s2, s1, s2)]
    assert torch.equal(view, want1[3:5]) and np.array_equal(as_numpy, want2)
    assert len({q.data_ptr() for q in others}) == 3
    del view, as_numpy, others
    again = pym4.sinkhorn(s1)  # dropped buffers are reused, and the result is still right
    torch.testing.assert_close(again, want1, rtol=0, atol=0)


def test_dropped_results_are_reused():
    import sys

    pool = importlib.import_module("pym4._sinkhorn")._RESULTS
    pool._arrays.clear()
    s = cosine_scores(1024, 1100, seed=3)
    for _ in range(4):  # each result dropped before the next call: one buffer serves them all
        q = pym4.sinkhorn(s)
        ptr = q.data_ptr()
        del q
    assert len(pool._arrays) == 1 and pool._arrays[0].ctypes.data == ptr


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the Linux memory map")
def test_pooled_results_are_private_memory():
    # Shared anonymous memory (mmap's default) is shmem, which gets no transparent huge pages
    # where shmem_enabled is "never": 12,000 page faults per fresh 49 MB result instead of 25.
    q = pym4.sinkhorn(cosine_scores(1024, 1100, seed=6))
    addr = q.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(v, 16) for v in span.split("-"))
            if lo <= addr < hi:
                assert perms[3] == "p", f"result memory mapped {perms}"
                break
        else:
            pytest.fail("the result's memory is in no mapping")


def test_dropped_results_are_reused_while_others_are_alive():
    # Three results alive at once, each replaced in turn (a trainer's two crops and a probe, or
    # a benchmark keeping each path's last result): every buffer dropped is reused, none of
    # the later calls takes fresh (kernel-zeroed) memory, and at most `keep` buffers sit idle.
    import sys

    pool = importlib.import_module("pym4._sinkhorn")._RESULTS
    pool._arrays.clear()
    s = cosine_scores(1024, 1100, seed=4)
    want = pym4.sinkhorn(s).clone()
    held = {}
    for step in range(10):
        before = {a.ctypes.data for a in pool._arrays}
        q = pym4.sinkhorn(s)
        if step >= 4:  # (steps 0-3: four buffers, the old result being still alive during the call)
            assert q.data_ptr() in before, f"step {step}: a fresh buffer although dropped ones were idle"
        torch.testing.assert_close(q, want, rtol=0, atol=0)
        held[step % 3] = q
        del q
    held.clear()
    assert len(pool._arrays) == pool.keep  # idle: the last released; the third is unmapped


# ----- the CPU core's passes: rows in groups of four, the range it reports ---------------------

@pytest.mark.parametrize("b,k", [(1, 3000), (3, 3000), (5, 3000), (9, 3000), (63, 3000), (64, 2100),
                                 (65, 1100), (67, 1100), (130, 1100), (263, 700)])
def test_row_groups_of_four_and_their_remainders(b, k):
    # The kernel form's passes take rows four at a time and the rest one by one, per share of
    # rows (B > 64) or over all rows per column tile (B <= 64); these shapes cover remainders
    # of 0-3 rows, one and two shares, and both forms.
    s = cosine_scores(b, k, seed=b)
    q = pym4.sinkhorn(s, epsilon=0.03, n_iters=4, backend="cpu")
    torch.testing.assert_close(q.double(), swav_reference(s, 0.03, 4), rtol=2e-5, atol=1e-9)


def test_core_reports_max_abs_exponent_of_the_kernel_form():
    core = _backend.core()
    s = cosine_scores(40, 300, seed=5).numpy()
    form, max_exponent = core.sinkhorn_swav(s, 1 / 0.05, 3, np.empty_like(s))
    assert form == "kernel"
    assert max_exponent == float(np.abs(np.float32(1 / 0.05) * s).max())  # the same float products
    form, max_exponent = core.sinkhorn_swav(s, 1 / 0.002, 3, np.empty_like(s))  # spread 1000: log domain
    assert form == "log" and math.isnan(max_exponent)


def test_float32_too_coarse_inside_the_kernel_form_is_solved_in_float64():
    # alpha x from 10000 to 10050: a spread the kernel form takes, max |alpha x| beyond
    # float32's limit (4096): the solve is redone in float64, so the plan errs only by its
    # rounding to float32 (2^-24 relative); the float32 solve errs by 3e-7 to 5e-7 here.
    g = torch.Generator().manual_seed(7)
    s = 100 + 0.5 * torch.rand(6, 9, generator=g)
    q = pym4.sinkhorn(s, epsilon=0.01, n_iters=3, backend="cpu")
    torch.testing.assert_close(q.double(), swav_reference(s, 0.01, 3), rtol=1e-7, atol=0)


# ----- the plain call's short path -----------------------------------------------------------------

@pytest.mark.parametrize("make,epsilon", [
    (lambda: cosine_scores(257, 300), 0.05),  # the kernel form
    (lambda: cosine_scores(257, 300), 0.01),  # a spread beyond 80: the log domain
    (lambda: 100 + 0.5 * uniform_scores(6, 9), 0.01),  # float32 too coarse: redone in float64
    (lambda: cosine_scores(16, 1000).requires_grad_(), 0.05),
    (lambda: cosine_scores(40, 600)[:, 100:400], 0.05),  # rows with a stride of their own
])
def test_plain_call_equals_the_fully_checked_one(make, epsilon, monkeypatch):
    # Float32 CPU scores with no option but out= (and backend="cpu") take a short path with
    # fewer checks: it must give the codes of the path with every check to the bit.
    s = make()
    with monkeypatch.context() as m:
        m.setattr(importlib.import_module("pym4._sinkhorn"), "_fast_cpu", lambda *args: None)  # the full path only
        full = pym4.sinkhorn(s, epsilon, 3)
    assert torch.equal(pym4.sinkhorn(s, epsilon, 3), full)
    assert torch.equal(pym4.sinkhorn(s, epsilon, 3, backend="cpu"), full)
    buf = torch.full(tuple(full.shape), float("nan"))
    assert pym4.sinkhorn(s, epsilon, 3, out=buf) is buf
    assert torch.equal(buf, full)


def test_plain_call_takes_the_short_path(monkeypatch):
    # The full path's first step is to_tensor: with it broken, only the short path can answer.
    module = importlib.import_module("pym4._sinkhorn")
    s = cosine_scores(33, 70)
    expected = pym4.sinkhorn(s)

    def broken(*args, **kwargs):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(module, "to_tensor", broken)
    assert torch.equal(pym4.sinkhorn(s), expected)
    buf = torch.empty(33, 70)
    assert torch.equal(pym4.sinkhorn(s, out=buf), expected)
    # backend="cpu" is the core either way, and wins over PYM4_BACKEND
    monkeypatch.setenv("PYM4_BACKEND", "torch")
    assert torch.equal(pym4.sinkhorn(s, backend="cpu"), expected)
    with pytest.raises(AssertionError, match="the full path ran"):  # PYM4_BACKEND, unforced
        pym4.sinkhorn(s)
    monkeypatch.delenv("PYM4_BACKEND")
    with pytest.raises(AssertionError, match="the full path ran"):  # an option it does not take
        pym4.sinkhorn(s, backend="torch")


def test_plain_call_reports_non_finite_scores():
    s = cosine_scores(20, 30)
    s[3, 4] = float("nan")
    with pytest.raises(ValueError, match="scores: contains NaN or Inf"):
        pym4.sinkhorn(s)


def _features(b, k, d=24, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1) * scale
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return z, c


@pytest.mark.parametrize("make,epsilon", [
    (lambda: _features(257, 300), 0.05),  # the kernel form
    (lambda: _features(16, 2000), 0.03),  # SEER's wide solve
    (lambda: _features(257, 300), 0.01),  # a spread beyond 80: the log domain, from z and C again
    (lambda: _features(6, 9, scale=120.0), 0.005),  # float32 too coarse: float64
    (lambda: (_features(16, 700)[0].requires_grad_(), _features(16, 700)[1].requires_grad_()), 0.05),
    (lambda: (_features(40, 600, d=48)[0][:, 8:32], _features(40, 600, d=48)[1][:, 8:32]), 0.05),  # strided rows
])
def test_features_call_equals_the_fully_checked_one(make, epsilon, monkeypatch):
    # Float32 CPU features and prototypes with no option but out= (and backend="cpu") take a
    # short path with fewer checks: it must give the codes of the full path to the bit.
    z, c = make()
    with monkeypatch.context() as m:
        m.setattr(importlib.import_module("pym4._sinkhorn"), "_fast_cpu_features", lambda *args: None)  # the full path only
        full = pym4.sinkhorn(z, epsilon, 3, prototypes=c)
    assert bool(torch.isfinite(full).all())
    scores64 = (z.detach().double() @ c.detach().double().t()).numpy()
    torch.testing.assert_close(full.double(), torch.from_numpy(swav_reference_log(scores64, epsilon, 3)),
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(pym4.sinkhorn(z, epsilon, 3, prototypes=c), full)
    assert torch.equal(pym4.sinkhorn(z, epsilon, 3, prototypes=c, backend="cpu"), full)
    buf = torch.full(tuple(full.shape), float("nan"))
    assert pym4.sinkhorn(z, epsilon, 3, prototypes=c, out=buf) is buf
    assert torch.equal(buf, full)


def test_features_call_takes_the_short_path(monkeypatch):
    module = importlib.import_module("pym4._sinkhorn")
    z, c = _features(33, 70)
    expected = pym4.sinkhorn(z, prototypes=c)

    def broken(*args, **kwargs):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(module, "to_tensor", broken)
    assert torch.equal(pym4.sinkhorn(z, prototypes=c), expected)
    buf = torch.empty(33, 70)
    assert torch.equal(pym4.sinkhorn(z, prototypes=c, out=buf), expected)
    for overlapping in (z, c):  # an out sharing bytes with an input is the full path's to refuse
        with pytest.raises(AssertionError, match="the full path ran"):
            pym4.sinkhorn(z, prototypes=c, out=overlapping.view(-1)[:33 * 70].view(33, 70)
                          if overlapping.numel() >= 33 * 70 else torch.empty(0))
    with pytest.raises(AssertionError, match="the full path ran"):  # an option it does not take
        pym4.sinkhorn(z, prototypes=c, chunk=8)


@pytest.mark.parametrize("where,message", [
    ("z", "scores: contains NaN or Inf"), ("c", "prototypes: contains NaN or Inf")])
def test_features_call_names_non_finite_input(where, message):
    z, c = _features(20, 30)
    (z if where == "z" else c)[3, 4] = float("nan")
    buf = torch.zeros(20, 30)
    with pytest.raises(ValueError, match=message):
        pym4.sinkhorn(z, prototypes=c, out=buf)


# ----- the torch backend's work per call, counted in operators --------------------------------

class _CountOps:
    """The aten operators a call dispatches, views and scalar reads left out: each is at least
    one kernel launch on CUDA, so a count no larger than SwAV's code's here is the CPU-side
    stand-in for the GPU test of launches (tests/test_sinkhorn_cuda.py), which can also see
    a library splitting one operator into several kernels."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view and func.name() != "aten::_local_scalar_dense":
                    names.append(func.name())
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def _swav_code_as_published(scores, epsilon, n_iters):
    """SwAV's distributed_sinkhorn on one process, op for op (main_swav.py's formula)."""
    q = torch.exp(scores / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iters):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


@pytest.mark.parametrize("b,k,n_iters,epsilon", [(256, 300, 3, 0.05), (61, 37, 3, 0.05), (16, 1600, 10, 0.03),
                                                 (9, 11, 1, 0.1)])
def test_torch_backend_dispatches_no_more_operators_than_swav_code(b, k, n_iters, epsilon):
    s = cosine_scores(b, k)
    pym4.sinkhorn(s, epsilon, n_iters, backend="torch")  # (first-call set-up is not per call)
    with _CountOps() as ours:
        q = pym4.sinkhorn(s, epsilon, n_iters, backend="torch")
    with _CountOps() as theirs:
        want = _swav_code_as_published(s.clone(), epsilon, n_iters)
    assert "aten::mv" in ours.names  # the kernel (scaling) form ran, not the log domain
    # The kernel form: 4 per iteration + 8 (two matrix-vector products and their reciprocals);
    # SwAV's code about 6 per iteration (two sums, four divisions) + 6: equal at n_iters = 1
    # (12 each, counted here), fewer from 2 on (16 against 18; 48 against 65 at 10).
    assert len(ours.names) <= len(theirs.names), (ours.names, theirs.names)
    assert float((q.double() - swav_reference(s, epsilon, n_iters)).abs().max()) < 1e-6
    assert float((want.double() - swav_reference(s, epsilon, n_iters)).abs().max()) < 1e-6
