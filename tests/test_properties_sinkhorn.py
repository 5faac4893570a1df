"""Property-based tests of Sinkhorn, entropic OT and the contrastive losses (issue 11).

Entry points: ``pym4.sinkhorn`` (scores and features forms, on every CPU backend the
dispatcher offers: cpu, torch, and triton through its interpreter at tiny shapes),
``pym4.sinkhorn_ot``, ``pym4.ot.sinkhorn``, ``pym4.clip_loss`` and ``pym4.siglip_loss``.
Inputs vary in shape (1 x N, N x 1, empty), dtype, layout (transposed, negative strides,
read-only numpy, non-contiguous torch) and values (huge, tiny, subnormal, constant,
NaN/Inf). Invariants: the result equals a float64 reference written here (log domain, so
exact at any scale), Sinkhorn rows sum to 1 and converged columns to B/K, converged OT
plans have their marginals, the inputs are never modified, and every rejection is a
ValueError/TypeError whose message starts with the name of an argument.
"""
import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pym4
from pym4 import ot as pym4_ot
from references import swav_sinkhorn_log

pot = pytest.importorskip("ot")

# Machine epsilon of what pym4 computes in (float32 for half precision) and of what it returns.
_UNIT = {np.float64: 2.0 ** -53, np.float32: 2.0 ** -24, np.float16: 2.0 ** -24, "bfloat16": 2.0 ** -24}
_OUT_UNIT = {np.float64: 2.0 ** -53, np.float32: 2.0 ** -24, np.float16: 2.0 ** -11, "bfloat16": 2.0 ** -8}
_FLOAT32_SAFE = 4096.0  # pym4 computes in float64 beyond this max |x| / epsilon


# ----- references (float64, log domain) ----------------------------------------------------------

def ref_sinkhorn(x: np.ndarray, epsilon: float, n_iters: int) -> np.ndarray:
    return swav_sinkhorn_log(x, epsilon, n_iters)


def ref_ot(a, b, cost, reg, n_iters):
    """n_iters (column, row) steps of entropic OT in the log domain from f = 0, zero
    marginals allowed: P_ij = exp(f_i + g_j - C_ij / reg)."""
    k = -torch.as_tensor(cost, dtype=torch.float64) / reg
    la, lb = torch.log(torch.as_tensor(a, dtype=torch.float64)), torch.log(torch.as_tensor(b, dtype=torch.float64))
    f = torch.zeros_like(la)
    for _ in range(n_iters):
        g = torch.where(torch.isinf(lb), lb, lb - torch.logsumexp(k + f[:, None], 0))
        f = torch.where(torch.isinf(la), la, la - torch.logsumexp(k + g[None, :], 1))
    return torch.exp(k + f[:, None] + g[None, :]).numpy()


def ref_losses(x, y, scale, bias):
    """CLIP's and SigLIP's losses from their formulas (DESIGN.md section 2), float64."""
    s = scale * x @ y.T + (0.0 if bias is None else bias)
    diag = torch.diagonal(s)
    clip = (torch.logsumexp(s, 1).sum() + torch.logsumexp(s, 0).sum() - 2 * diag.sum()) / (2 * x.shape[0])
    labels = 2 * torch.eye(x.shape[0], dtype=s.dtype) - 1
    softplus = torch.clamp(-labels * s, min=0) + torch.log1p(torch.exp(-torch.abs(s)))
    siglip = softplus.sum() / x.shape[0]
    return clip, siglip


# ----- inputs ----------------------------------------------------------------------------------

DTYPES = [np.float32, np.float64, np.float16, "bfloat16"]
LAYOUTS = ["contiguous", "transposed", "negative-strides", "read-only", "strided"]


def np_dtype(dtype):
    return np.float32 if dtype == "bfloat16" else dtype


def cast(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` in a numpy dtype; what overflows it becomes inf (that is tested, not warned)."""
    with np.errstate(over="ignore", under="ignore"):
        return values.astype(np_dtype(dtype))


def make_array(values: np.ndarray, dtype, layout: str, as_torch: bool):
    """``values`` (float64) in the given dtype, memory layout and container."""
    if dtype == "bfloat16":
        as_torch = True
    if not as_torch:
        v = cast(values, dtype)
        if layout == "transposed":
            return np.asfortranarray(v)
        if layout == "negative-strides":
            return np.ascontiguousarray(v[::-1, ::-1])[::-1, ::-1]
        if layout == "read-only":
            v = v.copy()
            v.flags.writeable = False
            return v
        if layout == "strided":
            wide = np.zeros((v.shape[0], 2 * v.shape[1]), dtype=v.dtype)
            wide[:, ::2] = v
            return wide[:, ::2]
        return v
    tdtype = torch.bfloat16 if dtype == "bfloat16" else getattr(torch, np.dtype(dtype).name)
    t = torch.from_numpy(values.copy()).to(tdtype)
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout in ("strided", "negative-strides"):  # torch has no negative strides
        wide = torch.zeros((t.shape[0], 2 * t.shape[1]), dtype=tdtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


def as_float64(arr) -> np.ndarray:
    if isinstance(arr, torch.Tensor):
        return arr.detach().double().numpy()
    return np.array(arr, dtype=np.float64)  # (a copy: torch cannot view negative strides)


def copy_of(arr):
    return arr.detach().clone() if isinstance(arr, torch.Tensor) else np.array(arr, copy=True)


def same(arr, before) -> bool:
    if isinstance(arr, torch.Tensor):  # equal, NaN where NaN
        return torch.equal(arr.isnan(), before.isnan()) and torch.equal(arr.nan_to_num(0.0), before.nan_to_num(0.0))
    return np.array_equal(arr, before, equal_nan=True)


@st.composite
def matrix_values(draw, max_side=8, scales=(1.0, 1e-3, 30.0, 1e4, 1e10), outliers=True, non_finite=False):
    """(B, K) float64 values: uniform in [-scale, scale], sometimes constant, subnormal or
    with one large outlier; shapes include 1 x N and N x 1."""
    kind = draw(st.sampled_from(["any", "row", "column"]))
    b = 1 if kind == "row" else draw(st.integers(1, max_side))
    k = 1 if kind == "column" else draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    scale = draw(st.sampled_from(scales))
    v = rng.uniform(-1, 1, (b, k)) * scale
    special = draw(st.sampled_from([None, None, "constant", "subnormal"] + (["outlier"] if outliers else []) +
                                   (["nan", "inf", "-inf"] if non_finite else [])))
    if special == "constant":
        v[:] = v.flat[0]
    elif special == "subnormal":
        v *= 1e-40 / scale  # float32 subnormals (zero in float16)
    elif special == "outlier":
        v.flat[rng.integers(v.size)] = 50 * scale
    elif special in ("nan", "inf", "-inf"):
        v.flat[rng.integers(v.size)] = float(special)
    return v


def tolerance(max_exponent: float, dtype) -> float:
    """Absolute error allowed on entries in [0, 1]: the rounding of the exponents (a few
    units of max |x| / eps in the precision pym4 computes in) and of the returned dtype."""
    unit = _UNIT[dtype] if max_exponent <= _FLOAT32_SAFE else 2.0 ** -53
    return 1e-6 + 32 * max_exponent * unit + 4 * _OUT_UNIT[dtype]


ARG_NAME = re.compile(r"^(scores|epsilon|n_iters|out|prototypes|chunk|backend|a|b|a, b|cost|reg|tol|warmstart|M|"
                      r"numItermax|stopThr|method|image_features|text_features|logit_scale|logit_bias|sinkhorn)\b")


def assert_names_an_argument(exc: BaseException) -> None:
    assert isinstance(exc, (ValueError, TypeError)), repr(exc)
    assert ARG_NAME.match(str(exc)), f"message does not start with an argument name: {exc}"


# ----- pym4.sinkhorn ---------------------------------------------------------------------------

def _check_sinkhorn(values, dtype, layout, as_torch, epsilon, n_iters, backend, features=None):
    scores = make_array(values, dtype, layout, as_torch)
    before = copy_of(scores)
    x = as_float64(scores)
    kwargs = {}
    if features is not None:
        protos = make_array(features, dtype, "contiguous", isinstance(scores, torch.Tensor))
        kwargs["prototypes"] = protos
        protos_before = copy_of(protos)
        x = x @ as_float64(protos).T
    if not np.isfinite(x).all() or not np.isfinite(as_float64(scores)).all():
        with pytest.raises(ValueError) as info:
            pym4.sinkhorn(scores, epsilon, n_iters, backend=backend, **kwargs)
        assert_names_an_argument(info.value)
        assert same(scores, before)
        return
    q = pym4.sinkhorn(scores, epsilon, n_iters, backend=backend, **kwargs)
    assert same(scores, before), "scores modified"
    if features is not None:
        assert same(protos, protos_before), "prototypes modified"
    assert type(q) is type(scores) and q.shape == x.shape
    assert q.dtype == scores.dtype
    got = as_float64(q)
    assert np.isfinite(got).all()
    tol = tolerance(float(np.abs(x).max()) / epsilon, dtype)
    if features is not None:  # pym4 rounds z @ c.T to float32 first: that error, divided by eps
        tol += 8 * _UNIT[dtype] * float(np.abs(as_float64(scores)).max() * np.abs(features).max()) * \
            scores.shape[1] / epsilon
    np.testing.assert_allclose(got, ref_sinkhorn(x, epsilon, n_iters), rtol=0, atol=tol)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=0, atol=x.shape[1] * tol + 1e-6)


@settings(max_examples=250)
@given(values=matrix_values(non_finite=True), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       as_torch=st.booleans(), epsilon=st.sampled_from([1.0, 0.05, 0.01, 1e-3, 1e-6, 1e-9]),
       n_iters=st.sampled_from([1, 2, 3, 7]), backend=st.sampled_from(["cpu", "torch"]))
def test_sinkhorn_matches_reference(values, dtype, layout, as_torch, epsilon, n_iters, backend):
    # Within what float64 resolves (max |x| / eps <= 1e12); beyond, see the next property.
    v = cast(values, dtype).astype(np.float64)
    assume(not np.isfinite(v).all() or np.abs(v).max() / epsilon <= 1e12)
    _check_sinkhorn(values, dtype, layout, as_torch, epsilon, n_iters, backend)


@settings(max_examples=200)
@given(values=matrix_values(scales=(1.0, 1e10, 1e30)), as_torch=st.booleans(),
       epsilon=st.sampled_from([0.05, 1e-6, 1e-12]), backend=st.sampled_from(["cpu", "torch"]))
def test_sinkhorn_never_nan(values, as_torch, epsilon, backend):
    # float32 scores of any size: a finite result whose rows sum to 1, never NaN (issue 11, item 5).
    scores = make_array(values, np.float32, "contiguous", as_torch)
    q = as_float64(pym4.sinkhorn(scores, epsilon, 3, backend=backend))
    assert np.isfinite(q).all() and (q >= 0).all()
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=0, atol=1e-5 * q.shape[1])


@settings(max_examples=150)
@given(values=matrix_values(scales=(1.0, 0.3), outliers=False), dtype=st.sampled_from([np.float32, np.float64]),
       backend=st.sampled_from(["cpu", "torch"]))
def test_sinkhorn_converged_columns_equipartition(values, dtype, backend):
    scores = make_array(values, dtype, "contiguous", False)
    b, k = values.shape
    q = pym4.sinkhorn(scores, 1.0, 200, backend=backend).astype(np.float64)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(q.sum(0), b / k, rtol=1e-4, atol=0)


@settings(max_examples=150)
@given(values=matrix_values(max_side=6, scales=(1.0, 30.0)), d=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), as_torch=st.booleans(), epsilon=st.sampled_from([1.0, 0.05, 0.01]),
       backend=st.sampled_from(["cpu", "torch"]), seed=st.integers(0, 2 ** 16))
def test_sinkhorn_features_form_matches_reference(values, d, dtype, layout, as_torch, epsilon, backend, seed):
    b = values.shape[0]
    rng = np.random.default_rng(seed)
    z = values.reshape(-1)[:b * d].reshape(b, d) if values.size >= b * d else rng.uniform(-1, 1, (b, d))
    protos = rng.uniform(-1, 1, (values.shape[1], d))
    assume(np.isfinite(cast(z, dtype)).all())
    _check_sinkhorn(z, dtype, layout, as_torch, epsilon, 3, backend, features=protos)


@settings(max_examples=25)
@given(values=matrix_values(max_side=4, scales=(1.0, 30.0)), dtype=st.sampled_from([np.float32, np.float16]),
       layout=st.sampled_from(["contiguous", "strided", "transposed"]), epsilon=st.sampled_from([0.05, 0.01]),
       k=st.sampled_from([None, 1, 3]))
def test_sinkhorn_triton_interpreter_matches_reference(values, dtype, layout, epsilon, k):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the CPU property; on a GPU the triton tests run natively")
    # k: the features form with k prototypes (values are then the features z), or the scores.
    protos = None if k is None else np.random.default_rng(k).uniform(-1, 1, (k, values.shape[1]))
    _check_sinkhorn(values, dtype, layout, True, epsilon, 3, "triton", features=protos)


@settings(max_examples=200)
@given(n=st.integers(1, 6), k=st.integers(1, 4), s0=st.integers(0, 6), o0=st.integers(0, 6),
       as_torch=st.booleans(), features=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sinkhorn_out_never_overwrites_inputs(n, k, s0, o0, as_torch, features, seed):
    # scores (or the features z) and out are row ranges of one buffer: refused exactly when
    # the ranges overlap, with nothing written; otherwise the result is right and the input intact.
    rng = np.random.default_rng(seed)
    buf = rng.uniform(-1, 1, (14, k)).astype(np.float32)
    buf = torch.from_numpy(buf) if as_torch else buf
    before = copy_of(buf)
    scores, out = buf[s0:s0 + n], buf[o0:o0 + n]
    protos = None
    if features:
        protos = rng.uniform(-1, 1, (k, k)).astype(np.float32)
        protos = torch.from_numpy(protos) if as_torch else protos
    x = as_float64(scores) if protos is None else as_float64(scores) @ as_float64(protos).T
    if abs(s0 - o0) < n:
        with pytest.raises(ValueError, match="^out: must not share memory with scores"):
            pym4.sinkhorn(scores, out=out, prototypes=protos)
        assert same(buf, before)
    else:
        assert pym4.sinkhorn(scores, out=out, prototypes=protos) is out
        assert same(scores, before[s0:s0 + n])
        np.testing.assert_allclose(as_float64(out), ref_sinkhorn(x, 0.05, 3), rtol=0, atol=1e-5)


def _bad_sinkhorn_calls():
    s = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    t = torch.from_numpy(s.copy())
    return [
        lambda: pym4.sinkhorn(s, epsilon=0.0), lambda: pym4.sinkhorn(s, epsilon=-1.0),
        lambda: pym4.sinkhorn(s, epsilon=float("nan")), lambda: pym4.sinkhorn(s, epsilon=float("inf")),
        lambda: pym4.sinkhorn(s, epsilon="x"), lambda: pym4.sinkhorn(s, epsilon=None),
        lambda: pym4.sinkhorn(s, n_iters=0), lambda: pym4.sinkhorn(s, n_iters=2.0),
        lambda: pym4.sinkhorn(s, n_iters=True), lambda: pym4.sinkhorn(s, n_iters=2 ** 63),
        lambda: pym4.sinkhorn(s, n_iters=-(2 ** 70)), lambda: pym4.sinkhorn(s[:0]),
        lambda: pym4.sinkhorn(s[:, :0]), lambda: pym4.sinkhorn(s[0]), lambda: pym4.sinkhorn(s[None]),
        lambda: pym4.sinkhorn(s.astype(np.int32)), lambda: pym4.sinkhorn(s.astype(np.complex64)),
        lambda: pym4.sinkhorn(s.tolist()), lambda: pym4.sinkhorn("scores"),
        lambda: pym4.sinkhorn(np.where(s > 0.5, np.nan, s)), lambda: pym4.sinkhorn(t, backend="nope"),
        lambda: pym4.sinkhorn(t, out=torch.empty(4, 2)), lambda: pym4.sinkhorn(t, out=s.copy()),
        lambda: pym4.sinkhorn(t, out=t), lambda: pym4.sinkhorn(t, out=torch.empty(4, 3, dtype=torch.float64)),
        lambda: pym4.sinkhorn(t, chunk=4), lambda: pym4.sinkhorn(t, prototypes=torch.rand(5, 2)),
        lambda: pym4.sinkhorn(t, prototypes=torch.rand(0, 3)), lambda: pym4.sinkhorn(t, prototypes=[[1.0]]),
        lambda: pym4.sinkhorn(t, prototypes=torch.rand(5, 3), chunk=0),
        lambda: pym4.sinkhorn(t, prototypes=torch.full((5, 3), math.inf)),
        lambda: pym4.sinkhorn(s, 1e-320),  # scores/epsilon overflows even float64
    ]


@settings(max_examples=100)
@given(index=st.integers(0, len(_bad_sinkhorn_calls()) - 1))
def test_sinkhorn_rejections_name_an_argument(index):
    with pytest.raises((ValueError, TypeError)) as info:
        _bad_sinkhorn_calls()[index]()
    assert_names_an_argument(info.value)


# ----- pym4.sinkhorn_ot and pym4.ot.sinkhorn ---------------------------------------------------------

@st.composite
def ot_problems(draw, zeros=True):
    n, m = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    a, b = rng.random(n) + 0.05, rng.random(m) + 0.05
    if zeros and n > 1 and draw(st.booleans()):
        a[rng.integers(n)] = 0.0
    if zeros and m > 1 and draw(st.booleans()):
        b[rng.integers(m)] = 0.0
    cost = rng.random((n, m)) * draw(st.sampled_from([1.0, 10.0, 100.0]))
    return a / a.sum(), b / b.sum(), cost


@settings(max_examples=250)
@given(problem=ot_problems(), reg=st.sampled_from([1.0, 0.1, 0.01]), n_iters=st.sampled_from([1, 3, 10, 50]),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), as_torch=st.booleans(),
       as_list=st.booleans(), backend=st.sampled_from(["cpu", "torch"]))
def test_sinkhorn_ot_fixed_iterations_match_reference(problem, reg, n_iters, dtype, layout, as_torch, as_list,
                                                       backend):
    a, b, cost = problem
    c = make_array(cost, dtype, layout, as_torch)
    before = copy_of(c)
    av, bv = (a.tolist(), b.tolist()) if as_list else (a, b)
    plan = pym4.sinkhorn_ot(av, bv, c, reg, n_iters=n_iters, tol=0, warn=False, backend=backend)
    assert same(c, before), "cost modified"
    x = as_float64(c)
    got = as_float64(plan)
    assert type(plan) is type(c) and got.shape == cost.shape
    half = dtype in (np.float16, "bfloat16")
    assert plan.dtype == ((torch.float32 if as_torch or dtype == "bfloat16" else np.float32) if half else c.dtype)
    tol = tolerance(float(np.abs(x).max()) / reg, np.float32 if half else dtype)
    np.testing.assert_allclose(got, ref_ot(a, b, x, reg, n_iters), rtol=0, atol=tol)
    np.testing.assert_allclose(got.sum(1), a, rtol=0, atol=cost.shape[1] * tol)  # the last step is a row step
    assert np.all(got[a == 0] == 0) and np.all(got[:, b == 0] == 0)


@settings(max_examples=150)
@given(problem=ot_problems(), reg=st.sampled_from([1.0, 0.3]), dtype=st.sampled_from([np.float32, np.float64]),
       backend=st.sampled_from(["cpu", "torch"]))
def test_sinkhorn_ot_converged_marginals(problem, reg, dtype, backend):
    a, b, cost = problem
    tol = 1e-9 if dtype == np.float64 else 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", pym4.ConvergenceWarning)  # converged, or the test fails
        plan = pym4.sinkhorn_ot(a, b, (cost / cost.max()).astype(dtype), reg, tol=tol, n_iters=10000,
                                backend=backend).astype(np.float64)
    np.testing.assert_allclose(plan.sum(1), a, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=0)
    assert np.linalg.norm(plan.sum(0) - b) < tol * (1.01 if dtype == np.float64 else 3)


@settings(max_examples=150)
@given(problem=ot_problems(zeros=False), reg=st.sampled_from([1.0, 0.1, 0.01]),
       method=st.sampled_from(["sinkhorn", "sinkhorn_log"]), n_iters=st.sampled_from([1, 7, 30]))
def test_ot_sinkhorn_matches_pot(problem, reg, method, n_iters):
    a, b, cost = problem
    assume(method == "sinkhorn_log" or cost.max() / reg <= 100)  # POT's plain method underflows beyond
    got = pym4_ot.sinkhorn(a, b, cost, reg, method=method, numItermax=n_iters, stopThr=0, warn=False)
    want = pot.sinkhorn(a, b, cost, reg, method=method, numItermax=n_iters, stopThr=0, warn=False)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-14)


def _bad_ot_calls():
    rng = np.random.default_rng(1)
    a, b, c = np.full(4, 0.25), np.full(3, 1 / 3), rng.random((4, 3))
    return [
        lambda: pym4.sinkhorn_ot(a, b, c, 0.0), lambda: pym4.sinkhorn_ot(a, b, c, -1.0),
        lambda: pym4.sinkhorn_ot(a, b, c, "x"), lambda: pym4.sinkhorn_ot(a, b, c, 1e-40),
        lambda: pym4.sinkhorn_ot(a, b, c, 0.1, n_iters=0), lambda: pym4.sinkhorn_ot(a, b, c, 0.1, n_iters=2 ** 63),
        lambda: pym4.sinkhorn_ot(a, b, c, 0.1, tol=-1.0), lambda: pym4.sinkhorn_ot(a, b, c, 0.1, tol="x"),
        lambda: pym4.sinkhorn_ot(a, b, c, 0.1, tol=float("nan")), lambda: pym4.sinkhorn_ot(-a, b, c, 0.1),
        lambda: pym4.sinkhorn_ot(a, b * 2, c, 0.1), lambda: pym4.sinkhorn_ot(a[:3], b, c, 0.1),
        lambda: pym4.sinkhorn_ot(a, b, c[:, :0], 0.1), lambda: pym4.sinkhorn_ot(a, b, c.ravel(), 0.1),
        lambda: pym4.sinkhorn_ot(a, b, np.where(c > 0.5, np.inf, c), 0.1),
        lambda: pym4.sinkhorn_ot(np.full(4, np.nan), b, c, 0.1), lambda: pym4.sinkhorn_ot(a, b, c.astype(int), 0.1),
        lambda: pym4.sinkhorn_ot(a, b, [[1, 2], [3]], 0.1), lambda: pym4.sinkhorn_ot(a, b, "cost", 0.1),
        lambda: pym4.sinkhorn_ot(np.zeros(4), np.zeros(3), c, 0.1),
        lambda: pym4.sinkhorn_ot(a, b, c, 0.1, warmstart=(np.zeros(3), np.zeros(3))),
        lambda: pym4.sinkhorn_ot(a, b, c, 0.1, warmstart=np.zeros(4)),
        lambda: pym4_ot.sinkhorn(a, b, c, 0.1, method="greenkhorn"),
        lambda: pym4_ot.sinkhorn(a, b, c, 0.1, numItermax=-1), lambda: pym4_ot.sinkhorn(a, b, c, 0.1, stopThr=-1),
        lambda: pym4_ot.sinkhorn(a, b, np.full((4, 3), np.nan), 0.1),
        lambda: pym4_ot.sinkhorn(a, b, c, 0.1, tau=1e3),
    ]


@settings(max_examples=100)
@given(index=st.integers(0, len(_bad_ot_calls()) - 1))
def test_ot_rejections_name_an_argument(index):
    with pytest.raises((ValueError, TypeError)) as info:
        _bad_ot_calls()[index]()
    assert_names_an_argument(info.value)


# ----- clip_loss and siglip_loss ---------------------------------------------------------------

def _loss_and_grads(fn, x, y, scale, bias):
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    loss = fn(x, y, scale, bias)
    loss.backward()
    return [loss.detach().double(), x.grad.double(), y.grad.double()]


@st.composite
def feature_pairs(draw):
    b, d = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    x = rng.standard_normal((b, d))
    y = x + draw(st.sampled_from([0.1, 1.0, 3.0])) * rng.standard_normal((b, d))
    if draw(st.booleans()):  # L2-normalised, as in training; otherwise raw
        x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    return x, y


def _check_loss(kind, pair, scale, bias, dtype, layout, scale_kind, backend):
    x, y = (make_array(v, dtype, layout, True) for v in pair)
    xb, yb = copy_of(x), copy_of(y)
    s_arg = {"float": scale, "numpy": np.float32(scale), "tensor": torch.tensor(scale)}[scale_kind]
    fn = (lambda a, b_, s, t: getattr(pym4, f"{kind}_loss")(a, b_, s, t, backend=backend))
    got = _loss_and_grads(fn, x, y, s_arg, bias)
    assert same(x, xb) and same(y, yb), "features modified"
    xr, yr = as_float64(x), as_float64(y)  # the values pym4 saw

    def reference(a, b_, s, t):
        return ref_losses(a.double(), b_.double(), float(s), t)[0 if kind == "clip" else 1]

    want = _loss_and_grads(reference, torch.from_numpy(xr), torch.from_numpy(yr), scale, bias)
    # The baseline: the same formula in plain torch float32 (float64 input: float64).
    plain_dtype = torch.float64 if dtype == np.float64 else torch.float32
    plain = _loss_and_grads(lambda a, b_, s, t: ref_losses(a.to(plain_dtype), b_.to(plain_dtype), s, t)
                            [0 if kind == "clip" else 1],
                            torch.from_numpy(xr), torch.from_numpy(yr), scale, bias)
    # At most 4x the plain formula's error in the same precision, plus a floor of a few
    # roundings of the largest logit (times scale * |features| for the gradients), for when
    # the plain error happens to be ~0.
    max_logit = scale * float(np.abs(xr @ yr.T).max()) + (0.0 if bias is None else abs(bias))
    floor = 4 * _UNIT[dtype] * (1.0 + max_logit)
    grad_floor = floor * (1.0 + scale * max(float(np.abs(xr).max()), float(np.abs(yr).max())))
    for name, g, w, p in zip(("loss", "dx", "dy"), got, want, plain):
        assert torch.isfinite(g).all(), name
        err, err_plain = float((g - w).abs().max()), float((p - w).abs().max())
        assert err <= 4 * err_plain + (floor if name == "loss" else grad_floor), (name, err, err_plain)
    if kind == "clip" and xr.shape[0] == 1:  # CLIP's loss is identically 0 at B = 1: exact gradients
        assert float(got[1].abs().max()) == 0.0 and float(got[2].abs().max()) == 0.0


@settings(max_examples=200)
@given(pair=feature_pairs(), scale=st.sampled_from([1.0, 10.0, 100.0, 1000.0]),
       bias=st.sampled_from([None, -10.0, 2.5]), dtype=st.sampled_from([np.float32, np.float64]),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       scale_kind=st.sampled_from(["float", "numpy", "tensor"]), backend=st.sampled_from(["chunked", "torch"]),
       kind=st.sampled_from(["clip", "siglip"]))
def test_losses_match_reference(pair, scale, bias, dtype, layout, scale_kind, backend, kind):
    _check_loss(kind, pair, scale, bias, dtype, layout, scale_kind, backend)


@settings(max_examples=20)
@given(pair=feature_pairs(), scale=st.sampled_from([1.0, 100.0]), bias=st.sampled_from([None, -10.0]),
       kind=st.sampled_from(["clip", "siglip"]))
def test_losses_triton_interpreter_match_reference(pair, scale, bias, kind):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the CPU property; on a GPU the triton tests run natively")
    _check_loss(kind, pair, scale, bias, np.float32, "contiguous", "float", "triton")


def _bad_loss_calls():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    calls = []
    for fn in (pym4.clip_loss, pym4.siglip_loss):
        calls += [
            lambda fn=fn: fn(x, y, 0.0, None), lambda fn=fn: fn(x, y, -1.0, None),
            lambda fn=fn: fn(x, y, float("nan"), None), lambda fn=fn: fn(x, y, "s", None),
            lambda fn=fn: fn(x, y, torch.ones(2), None), lambda fn=fn: fn(x, y, 1.0, float("inf")),
            lambda fn=fn: fn(x, y[:3], 1.0, None), lambda fn=fn: fn(x, y.double(), 1.0, None),
            lambda fn=fn: fn(x.numpy(), y, 1.0, None), lambda fn=fn: fn(x[:0], y[:0], 1.0, None),
            lambda fn=fn: fn(x[0], y[0], 1.0, None), lambda fn=fn: fn(x.int(), y.int(), 1.0, None),
            lambda fn=fn: fn(torch.where(x > 0, torch.nan, x), y, 1.0, None),
            lambda fn=fn: fn(x, torch.full_like(y, math.inf), 1.0, None),
            lambda fn=fn: fn(x, y, 1.0, None, backend="nope"),
        ]
    return calls


@settings(max_examples=100)
@given(index=st.integers(0, len(_bad_loss_calls()) - 1))
def test_loss_rejections_name_an_argument(index):
    with pytest.raises((ValueError, TypeError)) as info:
        _bad_loss_calls()[index]()
    assert_names_an_argument(info.value)
