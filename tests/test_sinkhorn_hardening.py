"""Regression tests of issue 11 (hardening) for Sinkhorn, entropic OT and the contrastive
losses: each reproducer of the issue, against a float64 reference written here (or POT).

The property-based tests of the same entry points are in tests/test_properties_sinkhorn.py.
"""
import math
import warnings

import numpy as np
import pytest
import torch

import pym4
from pym4 import ot as pym4_ot
from references import swav_sinkhorn_log

pot = pytest.importorskip("ot")


def sinkhorn_reference(scores, epsilon=0.05, n_iters=3):
    return swav_sinkhorn_log(scores, epsilon, n_iters)


def ot_reference(a, b, cost, reg, n_iters=100000, tol=1e-12):
    """Entropic OT in the log domain, float64, zero marginals allowed: f, g potentials with
    P_ij = exp((f_i + g_j - C_ij) / reg); alternate exact row and column updates."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c = torch.as_tensor(np.asarray(cost, dtype=np.float64))
    la, lb = torch.log(torch.as_tensor(a)), torch.log(torch.as_tensor(b))
    f = torch.zeros(len(a), dtype=torch.float64)
    g = torch.zeros(len(b), dtype=torch.float64)
    for _ in range(n_iters):
        g = reg * (lb - torch.logsumexp((f[:, None] - c) / reg, 0))
        g = torch.where(torch.isinf(lb), torch.full_like(g, -math.inf), g)
        f = reg * (la - torch.logsumexp((g[None, :] - c) / reg, 1))
        f = torch.where(torch.isinf(la), torch.full_like(f, -math.inf), f)
        plan = torch.exp((f[:, None] + g[None, :] - c) / reg).nan_to_num(0.0)
        if float(torch.linalg.vector_norm(plan.sum(0) - torch.as_tensor(b))) < tol:
            break
    return plan.numpy()


# ----- item 1: out= overlapping the input is refused, whatever kind of view -----------------------

@pytest.mark.parametrize("views", [
    lambda buf: (buf[:-1], buf[1:]),             # the reproducer: numpy views one row apart
    lambda buf: (buf[1:], buf[:-1]),
    lambda buf: (buf[:-1][::-1], buf[1:]),       # a negative-stride input (copied by pym4) over out
    lambda buf: (buf[:6], buf[:6]),
])
def test_out_overlapping_numpy_scores_is_refused(views):
    buf = np.random.default_rng(0).random((7, 4)).astype("f4")
    before = buf.copy()
    scores, out = views(buf)
    with pytest.raises(ValueError, match="out: must not share memory with scores"):
        pym4.sinkhorn(scores, out=out)
    np.testing.assert_array_equal(buf, before)  # nothing written


def test_out_overlapping_torch_views_and_prototypes_is_refused():
    buf = torch.rand(13, 4)
    with pytest.raises(ValueError, match="out: must not share memory with scores"):
        pym4.sinkhorn(buf[:-1], out=buf[1:])
    z, protos = torch.rand(6, 4), torch.rand(40)
    with pytest.raises(ValueError, match="out: must not share memory with prototypes"):
        pym4.sinkhorn(z, prototypes=protos[:20].reshape(5, 4), out=protos[8:38].reshape(6, 5))


def test_out_beside_interleaved_scores_is_accepted():
    # Views that interleave without a common element are fine (numpy's exact test).
    buf = np.random.default_rng(1).random((5, 8)).astype("f4")
    scores = buf[:, 0::2]
    out = np.empty((5, 4), "f4")
    want = sinkhorn_reference(scores.copy())
    assert pym4.sinkhorn(scores, out=out) is out
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=1e-7)


def test_out_with_negative_strides_is_refused():
    # Such an array would have been copied, and the result written into the copy.
    s = np.random.default_rng(2).random((5, 3)).astype("f4")
    out = np.empty((5, 3), "f4")[::-1]
    with pytest.raises(ValueError, match="out: must be C-contiguous"):
        pym4.sinkhorn(s, out=out)


# ----- item 5: float32 at huge |scores| / epsilon: the finite answer, never NaN --------------------

def _cosine(b, k, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return (z @ c.t()).numpy(), z, c


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", ["1e10", "eps1e-11", "cosine-eps1e-9", "cosine-eps1e-5"])
def test_float32_huge_scores_over_epsilon(backend, case):
    if case == "1e10":
        scores, eps = np.array([[1e10, -1e10]], "f4"), 0.05
    elif case == "eps1e-11":
        scores, eps = np.array([[1, -1], [.3, .2]], "f4"), 1e-11
    else:
        scores, eps = _cosine(64, 16)[0], float(case.split("eps")[1])
    q = pym4.sinkhorn(scores, epsilon=eps, backend=backend)
    assert q.dtype == np.float32 and np.isfinite(q).all()
    np.testing.assert_allclose(q, sinkhorn_reference(scores, eps), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_float32_huge_scores_features_form_and_out(backend):
    scores, z, c = _cosine(64, 16)
    want = sinkhorn_reference(z.double() @ c.double().t(), 1e-9)
    q = pym4.sinkhorn(z, 1e-9, prototypes=c, backend=backend)
    np.testing.assert_allclose(q.numpy(), want, rtol=1e-4, atol=1e-6)
    out = torch.empty(64, 16)
    assert pym4.sinkhorn(torch.from_numpy(scores), 1e-9, out=out, backend=backend) is out
    np.testing.assert_allclose(out.numpy(), sinkhorn_reference(scores, 1e-9), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["eps1e-19", "eps1e-25", "eps1e-100", "scores1e200", "features", "features-blocks"])
def test_float64_scores_over_epsilon_past_1e18_stay_finite(case):
    """The core's float64 loops may fuse alpha * x - max into one FMA (skipping the
    product's rounding the max had): past ~1e18 that put exponents 745 off and made the codes
    all-NaN (eps 1e-19 on randn 8 x 5). Past 1e15 the torch passes take over: finite codes,
    rows summing to 1, as for float32 scores of any size."""
    rng = np.random.default_rng(0)
    x, eps, kwargs = rng.standard_normal((8, 5)), 0.05, {}
    if case.startswith("eps"):
        eps = float(case[3:])
    elif case == "scores1e200":
        x = x * 1e200
    else:  # z (8, 5) against prototypes (3, 5), in one block or in blocks of 2 rows
        eps, kwargs["prototypes"] = 1e-20, rng.standard_normal((3, 5))
        if case == "features-blocks":
            kwargs["chunk"] = 2
    q = pym4.sinkhorn(x, eps, 3, backend="cpu", **kwargs)
    assert np.isfinite(q).all() and (q >= 0).all()
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=0, atol=1e-12)


def test_float32_scores_over_epsilon_beyond_float32_range():
    # 1e30 / 1e-10 overflows float32 but not float64: still the answer, not an error.
    scores = np.array([[1e30, -1e30, 0.0], [0.0, 1e30, 2e30]], "f4")
    q = pym4.sinkhorn(scores, epsilon=1e-10)
    np.testing.assert_allclose(q, sinkhorn_reference(scores, 1e-10), rtol=1e-5, atol=1e-7)


# ----- item 6: sinkhorn_ot never returns a NaN plan on allowed input ------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_ot_zero_marginal_far_column(backend):
    # The reproducer (lists, as POT takes them): row 0 carries no mass, so column 0
    # can only get its mass from row 1 at cost 100 / reg 1e-2, which underflows exp.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converges: no ConvergenceWarning
        plan = pym4.sinkhorn_ot([0., 1.], [.5, .5], [[0., 100.], [100., 0.]], reg=1e-2, backend=backend)
    with np.errstate(divide="ignore"):  # POT takes log(0) of the zero marginal
        want = pot.sinkhorn(np.array([0., 1.]), np.array([.5, .5]), np.array([[0., 100.], [100., 0.]]), 1e-2,
                            method="sinkhorn_log")
    np.testing.assert_allclose(plan, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(plan, [[0, 0], [.5, .5]], rtol=0, atol=1e-12)


def test_ot_zero_marginals_and_small_reg_against_log_reference():
    rng = np.random.default_rng(5)
    a, b = rng.random(9), rng.random(7)
    a[[0, 4]], b[[2]] = 0.0, 0.0
    a, b = a / a.sum(), b / b.sum()
    cost = rng.random((9, 7)) * 50
    plan, log = pym4.sinkhorn_ot(a, b, cost, 0.05, n_iters=20000, log=True)
    assert np.isfinite(plan).all() and np.isfinite(log["log_v"][b > 0]).all()
    np.testing.assert_allclose(plan, ot_reference(a, b, cost, 0.05), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(plan.sum(1), a, rtol=1e-12, atol=1e-15)
    assert np.linalg.norm(plan.sum(0) - b) < 1e-9


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_ot_float32_cost_tiny_reg(backend):
    cost = np.array([[0., 1.], [1., 0.]], "f4")
    plan = pym4.sinkhorn_ot(None, None, cost, 1e-12, backend=backend)
    assert plan.dtype == np.float32
    want = pot.sinkhorn(np.full(2, .5), np.full(2, .5), cost.astype(np.float64), 1e-12, method="sinkhorn_log")
    np.testing.assert_allclose(plan, want, rtol=0, atol=1e-7)
    # A cost where float32 exponents (|cost| / reg ~ 1e5) would be off: solved in float64.
    rng = np.random.default_rng(6)
    cost = rng.random((8, 6)).astype("f4")
    a, b = np.full(8, 1 / 8), np.full(6, 1 / 6)
    plan = pym4.sinkhorn_ot(a, b, cost, 1e-5, n_iters=5, tol=0, warn=False, backend=backend)
    want = pot.sinkhorn(a, b, cost.astype(np.float64), 1e-5, method="sinkhorn_log", numItermax=5, stopThr=0,
                        warn=False)
    np.testing.assert_allclose(plan, want, rtol=1e-5, atol=1e-7)


# ----- items 11 and 12: messages naming the argument; float16 costs; scalars ----------------------

@pytest.mark.parametrize("call,match", [
    (lambda: pym4.sinkhorn(np.ones((3, 2), "f4"), n_iters=2 ** 63), r"n_iters: must be <= 2\*\*63 - 1"),
    (lambda: pym4.sinkhorn_ot(None, None, np.ones((3, 2)), 0.1, n_iters=2 ** 63), r"n_iters: must be <= 2\*\*63"),
    (lambda: pym4_ot.sinkhorn([], [], np.ones((3, 2)), 0.1, numItermax=2 ** 64), r"numItermax: must be <= 2\*\*63"),
    (lambda: pym4_ot.sinkhorn([], [], np.ones((3, 2)), 0.1, stopThr=-1.0), "stopThr: must be a finite number"),
    (lambda: pym4_ot.sinkhorn([], [], np.full((3, 2), np.nan), 0.1), "M: contains NaN"),
    (lambda: pym4.sinkhorn_ot(None, None, np.random.default_rng(0).random((3, 2)), reg=1e-40), "reg: too small"),
])
def test_messages_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_an_out_that_requires_grad_is_refused_and_left_alone():
    """torch refuses in-place writes to a leaf that requires grad; sinkhorn wrote into it."""
    x = torch.randn(8, 5)
    out = torch.zeros(8, 5, requires_grad=True)
    with pytest.raises(ValueError, match="out: requires grad"):
        pym4.sinkhorn(x, out=out)
    assert bool((out == 0).all())


@pytest.mark.parametrize("value", ["0.05", True, np.bool_(True), torch.tensor(True)], ids=repr)
def test_a_string_or_bool_is_not_a_number(value):
    """float() reads "0.05" and True (which ran as epsilon 1.0): both are refused."""
    x = np.random.default_rng(0).random((4, 3))
    with pytest.raises(TypeError, match="epsilon: expected a positive number"):
        pym4.sinkhorn(x, value)
    with pytest.raises(TypeError, match="reg: expected a positive number"):
        pym4.sinkhorn_ot(None, None, x, value)


def test_requires_grad_tensors_are_accepted():
    s = torch.rand(6, 4, requires_grad=True)
    q = pym4.sinkhorn(s)
    assert not q.requires_grad
    np.testing.assert_allclose(q.numpy(), sinkhorn_reference(s.detach().numpy()), rtol=2e-5, atol=1e-7)
    z, c = torch.rand(6, 3, requires_grad=True), torch.rand(4, 3, requires_grad=True)
    q = pym4.sinkhorn(z, prototypes=c)
    np.testing.assert_allclose(q.numpy(), sinkhorn_reference((z @ c.t()).detach().numpy()), rtol=2e-5, atol=1e-7)
    cost = torch.rand(5, 4, dtype=torch.float64, requires_grad=True)
    a = torch.full((5,), 0.2, dtype=torch.float64, requires_grad=True)
    plan = pym4.sinkhorn_ot(a, None, cost, 0.1)
    np.testing.assert_allclose(plan.detach().numpy(), ot_reference(np.full(5, .2), np.full(4, .25),
                                                                   cost.detach().numpy(), 0.1), rtol=1e-6, atol=1e-12)


def test_numpy_scalars_are_accepted():
    s = np.random.default_rng(3).random((5, 4)).astype("f4")
    np.testing.assert_array_equal(pym4.sinkhorn(s, np.float32(0.05), np.int64(3)), pym4.sinkhorn(s, 0.05, 3))
    cost = np.random.default_rng(4).random((5, 4))
    want = pym4.sinkhorn_ot(None, None, cost, 0.1, tol=1e-6)
    got = pym4.sinkhorn_ot(None, None, cost, np.float32(0.1), tol=np.float32(1e-6), n_iters=np.int32(1000))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    got = pym4_ot.sinkhorn(None, None, cost, np.float64(0.1), stopThr=np.float32(1e-6))
    np.testing.assert_array_equal(got, pym4_ot.sinkhorn(None, None, cost, 0.1, stopThr=float(np.float32(1e-6))))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cost_gives_a_float32_plan_with_exact_marginals(dtype):
    rng = np.random.default_rng(7)
    a, b = rng.random(30) + 0.1, rng.random(20) + 0.1
    a, b = a / a.sum(), b / b.sum()
    cost = torch.tensor(rng.random((30, 20))).to(dtype)
    plan = pym4.sinkhorn_ot(torch.tensor(a), torch.tensor(b), cost, 0.1, tol=1e-6)
    assert plan.dtype == torch.float32
    # (a float16 plan's marginals were off by ~1e-4, its entries rounded to 11 bits)
    np.testing.assert_allclose(plan.sum(1).double().numpy(), a, rtol=2e-6, atol=0)
    assert np.linalg.norm(plan.sum(0).double().numpy() - b) < 1e-6
    np.testing.assert_allclose(plan.double().numpy(), ot_reference(a, b, cost.double().numpy(), 0.1),
                               rtol=1e-4, atol=1e-7)


# ----- contrastive losses: large logit_scale at tiny B; numpy scalars -----------------------------

def _grads(fn, x, y, scale):
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    ss = torch.tensor(scale, dtype=x.dtype, requires_grad=True)
    loss = fn(xx, yy, ss)
    loss.backward()
    return loss.detach().double(), xx.grad.double(), yy.grad.double(), ss.grad.double()


def _clip_plain(x, y, s):
    """CLIP's loss as plain torch writes it (open_clip's ClipLoss): two cross-entropies."""
    logits = s * x @ y.T
    labels = torch.arange(x.shape[0])
    return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("b", [1, 2, 5])
@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_clip_gradient_at_large_scale_no_worse_than_float32_torch(b, scale):
    g = torch.Generator().manual_seed(b)
    x = torch.nn.functional.normalize(torch.randn(b, 16, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(x + 0.3 * torch.randn(b, 16, generator=g, dtype=torch.float64), dim=1)
    want = _grads(_clip_plain, x, y, scale)
    plain32 = _grads(_clip_plain, x.float(), y.float(), scale)
    ours = _grads(lambda xx, yy, ss: pym4.clip_loss(xx, yy, ss, backend="chunked"), x.float(), y.float(), scale)
    for name, w, p, o in zip(("loss", "dx", "dy", "dscale"), want, plain32, ours):
        err_plain, err_ours = float((p - w).abs().max()), float((o - w).abs().max())
        # float32 rounding of the logits (|S| <= scale) is the floor both share: ~scale * 2^-24
        assert err_ours <= 2 * err_plain + scale * 2e-7, (name, err_ours, err_plain)
    if b == 1:  # the loss is identically 0 at B = 1: so is every gradient, exactly
        assert all(float(t.abs().max()) == 0.0 for t in ours[1:])


def test_logit_scale_and_bias_as_numpy_scalars():
    x = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    y = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    for fn in (pym4.clip_loss, pym4.siglip_loss):
        want = fn(x, y, 10.0, -1.0)
        for scale, bias in ((np.float32(10.0), np.float64(-1.0)), (np.array(10.0), np.int64(-1))):
            torch.testing.assert_close(fn(x, y, scale, bias), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="logit_scale: expected a number"):
        pym4.clip_loss(x, y, np.bool_(True))


def test_similarity_topk_with_requires_grad_keys_and_numpy_queries():
    q = np.random.default_rng(8).random((5, 3)).astype("f4")
    keys = torch.rand(7, 3, requires_grad=True)
    values, indices = pym4.similarity_topk(q, keys, 2)
    want = q.astype(np.float64) @ keys.detach().double().numpy().T
    np.testing.assert_allclose(values, np.sort(want, 1)[:, ::-1][:, :2], rtol=1e-6)
    assert isinstance(values, np.ndarray) and isinstance(indices, np.ndarray)


def test_siglip_float64_large_logits_exact_softplus():
    # Logits beyond 20: softplus(x) = x + log1p(e^-x), not x (torch's threshold), in float64.
    x = torch.tensor([[2.1], [1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    s = 10.0 * x @ y.T  # the negative pair (0, 1) has logit 21
    labels = 2 * torch.eye(2, dtype=torch.float64) - 1
    want = (torch.clamp(-labels * s, min=0) + torch.log1p(torch.exp(-s.abs()))).sum() / 2
    got = pym4.siglip_loss(x, y, 10.0, None, backend="chunked")
    assert abs(float(got) - float(want)) < 1e-14
