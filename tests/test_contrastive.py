"""CLIP and SigLIP losses on the CPU (chunked backend and torch reference) and similarity_topk.

References are written from the formulas (DESIGN.md section 2, open_clip semantics) in
float64 plain torch, in references.py; gradients come from autograd through them.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pym4
import pym4.contrastive as contrastive
from references import clip_loss as ref_clip
from references import open_clip_loss_module
from references import siglip_loss as ref_siglip

# The independent references (float64 plain torch, from the formulas) are in references.py.
REF = {"clip": ref_clip, "siglip": ref_siglip}
LOSS = {"clip": pym4.clip_loss, "siglip": pym4.siglip_loss}


def features(n, d, dtype=torch.float32, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    if correlated:  # matching pairs are similar, as in training: the diagonal matters
        y = y + 2.0 * x * math.sqrt(d) / 4
    y = F.normalize(y, dim=1)
    return x.to(dtype), y.to(dtype)


def run(kind, x, y, s, b, **kw):
    """Loss and the gradients w.r.t. x, y, s, b (None where b is None)."""
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = LOSS[kind](x, y, s, b, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad, None if b is None else b.grad


def reference(kind, x, y, s, b):
    x = x.detach().double().requires_grad_()
    y = y.detach().double().requires_grad_()
    s = s.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    loss = REF[kind](x, y, s, b)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad, None if b is None else b.grad


def assert_close(got, want, rtol, what):
    names = ("loss", "d image_features", "d text_features", "d logit_scale", "d logit_bias")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        g = g.double()
        # Relative to the largest entry (a vector's small entries carry absolute error), and
        # at least rtol absolute: an exact zero (B = 1, CLIP's bias) is met up to rounding.
        atol = rtol * max(float(w.abs().max()), 1.0)
        torch.testing.assert_close(g, w.to(g.dtype).reshape(g.shape), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {name}: {m}")


# ----- equality with the formula -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["chunked", "torch"])
@pytest.mark.parametrize("n,d", [(1, 16), (7, 24), (37, 72), (130, 24)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients_match_reference(kind, backend, n, d, with_bias, monkeypatch):
    # Small chunks so several row chunks (and a ragged last one) are exercised.
    monkeypatch.setattr(contrastive, "_CPU_CHUNK_ELEMENTS", 16 * n)
    x, y = features(n, d)
    s = torch.tensor(14.3)
    b = torch.tensor(-2.5) if with_bias else None
    got = run(kind, x, y, s, b, backend=backend)
    want = reference(kind, x, y, s, b)
    assert_close(got, want, 1e-5, f"{kind}/{backend} B={n} D={d}")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_float64_is_exact_and_gradcheck(kind, monkeypatch):
    monkeypatch.setattr(contrastive, "_CPU_CHUNK_ELEMENTS", 64)
    x, y = features(9, 5, torch.float64)
    s, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    assert_close(run(kind, x, y, s, b, backend="chunked"), reference(kind, x, y, s, b), 1e-12, kind)
    inputs = [t.clone().requires_grad_() for t in (x, y, s, b)]
    assert torch.autograd.gradcheck(lambda *t: LOSS[kind](*t, backend="chunked"), inputs)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_large_scale_and_bias_stay_finite_and_exact(kind):
    # s = 100 (CLIP's clamp) on aligned pairs: logits span about +-100, exp would overflow
    # without the running max.
    x, y = features(64, 32)
    s, b = torch.tensor(100.0), torch.tensor(-10.0)
    got = run(kind, x, y, s, b, backend="chunked")
    assert all(bool(torch.isfinite(t).all()) for t in got)
    want = reference(kind, x, y, s, b)
    # Logits of size 100 carry float32 rounding of ~1e-5: the yardstick is the plain float32
    # formula (open_clip's computation); the chunked backend may err at most twice as much.
    xf, yf, sf, bf = (t.clone().requires_grad_() for t in (x, y, s, b))
    loss32 = REF[kind](xf, yf, sf, bf)
    loss32.backward()
    plain = (loss32.detach(), xf.grad, yf.grad, sf.grad, bf.grad)
    for name, g, p, w in zip(("loss", "dx", "dy", "ds", "db"), got, plain, want):
        err = float((g.double() - w).abs().max())
        err_plain = float((p.double() - w).abs().max())
        assert err <= 2 * err_plain + 1e-6 * max(float(w.abs().max()), 1.0), (name, err, err_plain)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
@pytest.mark.parametrize("bias", [3.0, 1e5, 1e8, 1e38])
def test_clip_bias_gradient_is_zero_and_bias_does_not_change_loss(backend, bias):
    """The bias cancels in both softmaxes; added to float32 logits it only rounded them away
    (1e8 made the loss 0.0 for a true 6.44, 1e38 NaN), so it is left out of them."""
    x, y = features(20, 8)
    s = torch.tensor(10.0)
    with_b = run("clip", x, y, s, torch.tensor(bias), backend=backend)
    without = run("clip", x, y, s, None, backend=backend)
    assert float(with_b[4]) == 0.0
    for got, want in zip(with_b[:4], without[:4]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(with_b[0].double(), reference("clip", x, y, s, None)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(kind, dtype):
    x, y = features(50, 32, dtype)
    s, b = torch.tensor(20.0), torch.tensor(-3.0)
    got = run(kind, x, y, s, b, backend="chunked")
    want = reference(kind, x, y, s, b)  # the same rounded inputs, in float64
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    # float32 accumulation inside: only the rounding of the outputs to dtype remains.
    assert_close(got, want, 1e-2 if dtype == torch.bfloat16 else 2e-3, f"{kind}/{dtype}")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_scalars_as_numbers_and_one_element_parameters(kind):
    x, y = features(11, 8)
    want = REF[kind](x.double(), y.double(), 7.0, -1.0)
    loss = LOSS[kind](x, y, 7.0, -1.0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    # open_clip keeps logit_scale as a (1,)-shaped parameter (or 0-d): gradients keep the shape.
    log_scale = torch.nn.Parameter(torch.full((1,), math.log(7.0)))
    bias = torch.nn.Parameter(torch.full((1,), -1.0))
    loss = LOSS[kind](x, y, log_scale.exp(), bias)
    loss.backward()
    assert log_scale.grad.shape == (1,) and bias.grad.shape == (1,)
    want_grads = reference(kind, x, y, torch.tensor(7.0), torch.tensor(-1.0))
    torch.testing.assert_close(log_scale.grad.double(), 7.0 * want_grads[3].reshape(1), rtol=1e-5, atol=1e-7)


def test_default_backend_on_cpu_is_the_chunked_function():
    x, y = features(5, 4)
    x.requires_grad_()
    loss = pym4.clip_loss(x, y, 2.0)
    assert type(loss.grad_fn).__name__.startswith("_ContrastiveLoss")
    loss = pym4.clip_loss(x, y, 2.0, backend="torch")
    assert not type(loss.grad_fn).__name__.startswith("_ContrastiveLoss")


def test_only_chunks_of_the_logits_are_formed(monkeypatch):
    # Record the largest matrix product the chunked backend forms: never B x B.
    n, d = 256, 16
    monkeypatch.setattr(contrastive, "_CPU_CHUNK_ELEMENTS", 32 * n)
    shapes = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    real_mm = torch.mm

    def spy_mm(a, b, *args, **kw):
        out = real_mm(a, b, *args, **kw)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "mm", spy_mm)
    for kind in ("clip", "siglip"):
        run(kind, *features(n, d), torch.tensor(5.0), torch.tensor(1.0), backend="chunked")
    assert shapes, "the spy saw no matrix product"
    assert max(r * c for r, c in shapes) <= 32 * n
    assert all(r <= 32 for r, c in shapes if c == n)


# ----- equality with open_clip's own loss.py (when installed) --------------------------------

@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nn_modules_equal_open_clip(kind, with_bias):
    oc = open_clip_loss_module()
    if oc is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    x, y = features(33, 40)
    ours_mod = pym4.nn.ClipLoss() if kind == "clip" else pym4.nn.SigLipLoss()
    theirs_mod = oc.ClipLoss() if kind == "clip" else oc.SigLipLoss()
    results = []
    for mod in (ours_mod, theirs_mod):
        xi, yi = x.clone().requires_grad_(), y.clone().requires_grad_()
        log_s = torch.tensor(math.log(30.0), requires_grad=True)
        b = torch.tensor(-4.0, requires_grad=True) if with_bias else None
        out = mod(xi, yi, log_s.exp(), b, output_dict=True)
        out["contrastive_loss"].backward()
        results.append((out["contrastive_loss"].detach(), xi.grad, yi.grad, log_s.grad, None if b is None else b.grad))
    ours, theirs = results
    for name, g, w in zip(("loss", "dx", "dy", "dlog_scale", "dbias"), ours, theirs):
        if w is None:
            continue
        atol = 1e-5 * max(float(w.abs().max()), 1e-2)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol, msg=lambda m: f"{kind} {name}: {m}")


def test_nn_module_options():
    assert pym4.nn.ClipLoss()(*features(4, 3), 2.0).shape == ()
    with pytest.raises(ValueError, match="dist_impl"):
        pym4.nn.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="use_horovod"):
        pym4.nn.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="world_size"):
        pym4.nn.ClipLoss(world_size=2)(*features(4, 3), 2.0)  # no process group
    # A float world_size or a truthy string would pick a mode the caller did not write.
    for make, exc, match in [
            (lambda: pym4.nn.ClipLoss(world_size=2.0), TypeError, r"world_size: expected an integer, got 2\.0"),
            (lambda: pym4.nn.ClipLoss(rank=True, world_size=2), TypeError, "rank: expected an integer, got True"),
            (lambda: pym4.nn.ClipLoss(local_loss="yes"), TypeError, "local_loss: expected True or False, got 'yes'"),
            (lambda: pym4.nn.ClipLoss(rank=2, world_size=2), ValueError, "need 0 <= rank < world_size"),
            (lambda: pym4.nn.SigLipLoss(world_size=0), ValueError, "need 0 <= rank < world_size"),
            (lambda: pym4.nn.SigLipLoss(cache_labels=1), TypeError, "cache_labels: expected True or False")]:
        with pytest.raises(exc, match=match):
            make()


# ----- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["chunked", "torch"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_float16_loss_past_its_range_is_refused(kind, backend):
    """Features x 100 at D = 32 in float16: the loss (1e5, summed in float32) came back inf
    in the features' dtype. The float32 loss of the same features is finite and large."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(64, 32, generator=g) * 100 for _ in range(2))
    big = LOSS[kind](x, y, 1.0, 0.0, backend=backend)
    assert torch.isfinite(big) and float(big) > 65504
    with pytest.raises(ValueError, match=r"^image_features, text_features: the loss exceeds float16's range"):
        LOSS[kind](x.half(), y.half(), 1.0, 0.0, backend=backend)
    small = LOSS[kind](x.half() / 100, y.half() / 100, 1.0, 0.0, backend=backend)  # in range: as before
    assert small.dtype == torch.float16 and torch.isfinite(small)

@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bad_input_is_rejected_with_the_argument_named(kind):
    f = LOSS[kind]
    x, y = features(6, 4)
    cases = [
        ((x, y[:5], 1.0, 0.0), ValueError, "text_features: expected shape"),
        ((x, y[:, :3], 1.0, 0.0), ValueError, "text_features: expected shape"),
        ((x[0], y[0], 1.0, 0.0), ValueError, "image_features: expected a 2-D"),
        ((x[:0], y[:0], 1.0, 0.0), ValueError, "image_features: expected a non-empty"),
        ((x.numpy(), y, 1.0, 0.0), TypeError, "image_features: expected a torch tensor"),
        ((x.int(), y.int(), 1.0, 0.0), TypeError, "image_features: expected float32"),
        ((x, y.double(), 1.0, 0.0), TypeError, "text_features: expected dtype"),
        ((x.index_fill(0, torch.tensor([2]), math.nan), y, 1.0, 0.0), ValueError, "image_features: contains NaN"),
        ((x, y.index_fill(1, torch.tensor([1]), math.inf), 1.0, 0.0), ValueError, "text_features: contains NaN or Inf"),
        ((x, y, 0.0, 0.0), ValueError, "logit_scale: must be a positive"),
        ((x, y, -3.0, 0.0), ValueError, "logit_scale: must be a positive"),
        ((x, y, torch.tensor(math.nan), 0.0), ValueError, "logit_scale: must be a positive"),
        ((x, y, torch.tensor([1.0, 2.0]), 0.0), ValueError, "logit_scale: expected a scalar"),
        ((x, y, "2", 0.0), TypeError, "logit_scale: expected a number"),
        ((x, y, 1.0, torch.tensor(math.inf)), ValueError, "logit_bias: must be finite"),
        ((x, y, 1.0, torch.ones(2)), ValueError, "logit_bias: expected a scalar"),
    ]
    for args, err, match in cases:
        with pytest.raises(err, match=match):
            f(*args)
    with pytest.raises(ValueError, match="backend"):
        f(x, y, 1.0, 0.0, backend="cuda")
    with pytest.raises(ValueError, match=r"^image_features: is on the meta device"):
        f(x.to("meta"), y.to("meta"), 1.0, 0.0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_logits_past_the_accumulators_range_are_refused_not_nan(kind):
    """Was: features of norm 1e20 made the logits overflow float32 and the loss NaN."""
    f = LOSS[kind]
    x, y = features(6, 4)
    for big_x, big_y in ((x * 1e20, y * 1e20), (x * 1e30, y), (x * 1e15, y * 1e15)):
        with pytest.raises(ValueError, match=r"^image_features, text_features: the logits can reach .* float32") as e:
            f(big_x, big_y, 10.0, -10.0)
        assert "or pass float64 features" in str(e.value)
    with pytest.raises(ValueError, match=r"the logits can reach .* float64"):
        f(x.double() * 1e160, y.double() * 1e160, 1.0, 0.0)
    # A bias added to every logit counts too (was: a float64 1e300 bias made SigLIP's loss NaN).
    if kind == "siglip":
        with pytest.raises(ValueError, match=r"the logits can reach 1e\+300 .*plus \|logit_bias\|"):
            f(x, y, 10.0, torch.tensor(-1e300, dtype=torch.float64))
    else:  # CLIP's bias cancels: left out of the logits, any finite one is taken
        assert torch.isfinite(f(x, y, 10.0, torch.tensor(-1e300, dtype=torch.float64)))
    # float64 takes what float32 cannot, and gets the reference's loss.
    got = f(x.double() * 1e15, y.double() * 1e15, 10.0, -10.0)
    want = REF[kind](x.double() * 1e15, y.double() * 1e15, torch.tensor(10.0, dtype=torch.float64),
                     torch.tensor(-10.0, dtype=torch.float64))
    assert torch.isfinite(got) and float(got) == pytest.approx(float(want), rel=1e-9)
    # Large but summable logits are taken (the reach is s max|x| max|y|: 1e7, then 1e21).
    assert torch.isfinite(f(x * 1e3, y * 1e3, 10.0, -10.0))
    assert torch.isfinite(f(x * 1e20, y, 10.0, -10.0))


# ----- similarity_topk ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,m,k,chunk", [(1, 1, 1, None), (17, 100, 5, 7), (40, 33, 33, 8), (64, 500, 10, 64)])
def test_similarity_topk_matches_full_topk(n, m, k, chunk):
    q, _ = features(n, 12, seed=1, correlated=False)
    keys, _ = features(m, 12, seed=2, correlated=False)
    values, indices = pym4.similarity_topk(q, keys, k, chunk=chunk)
    full = q.double() @ keys.double().T
    want_v, want_i = torch.topk(full, k, dim=1)
    assert values.shape == (n, k) and indices.dtype == torch.int64
    torch.testing.assert_close(values.double(), want_v, rtol=1e-6, atol=1e-6)
    assert torch.equal(indices, want_i)  # random scores: no ties
    assert bool((values[:, 1:] <= values[:, :-1]).all())


def test_similarity_topk_numpy_and_errors():
    q, keys = features(5, 4, seed=3, correlated=False)
    values, indices = pym4.similarity_topk(q.numpy(), keys.numpy(), 2, chunk=2)
    assert isinstance(values, np.ndarray) and isinstance(indices, np.ndarray) and values.dtype == np.float32
    np.testing.assert_array_equal(indices, torch.topk(q @ keys.T, 2).indices.numpy())
    with pytest.raises(ValueError, match="k: must be <="):
        pym4.similarity_topk(q, keys, 6)
    with pytest.raises(ValueError, match="k: must be >= 1"):
        pym4.similarity_topk(q, keys, 0)
    with pytest.raises(ValueError, match="keys: expected 4 features"):
        pym4.similarity_topk(q, keys[:, :3], 1)
    with pytest.raises(ValueError, match="queries: contains NaN"):
        pym4.similarity_topk(q.index_fill(0, torch.tensor([0]), math.nan), keys, 1)
    with pytest.raises(ValueError, match="chunk"):
        pym4.similarity_topk(q, keys, 1, chunk=0)
    with pytest.raises(ValueError, match=r"^queries: is on the meta device"):
        pym4.similarity_topk(q.to("meta"), keys.to("meta"), 1)


def test_similarity_topk_scores_past_the_dtypes_range():
    """Was: NaN values for features of norm 1e30 (the scores' block held inf - inf)."""
    q, keys = features(9, 4, seed=4, correlated=False)
    with pytest.raises(ValueError, match=r"^queries, keys: the scores can reach [0-9.]+e\+60 .* float32's range"):
        pym4.similarity_topk(q * 1e30, keys * 1e30, 2)
    # float64 holds them: the order and the values of the float64 reference.
    q64, k64 = q.double() * 1e30, keys.double() * 1e30
    values, indices = pym4.similarity_topk(q64, k64, 3)
    want = torch.topk(q64 @ k64.T, 3, dim=1)
    assert torch.equal(indices, want.indices)
    torch.testing.assert_close(values, want.values, rtol=1e-12, atol=0)
    # float16 values past 65504 would come back inf: refused, the values named.
    with pytest.raises(ValueError, match=r"^queries: the best scores reach .* float16's range"):
        pym4.similarity_topk((q * 1e3).half(), (keys * 1e3).half(), 2)
    values, _ = pym4.similarity_topk((q * 10).half(), (keys * 10).half(), 2)
    assert values.dtype == torch.float16 and bool(torch.isfinite(values).all())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_double_backward_raises_instead_of_dropping_the_second_derivative(kind):
    # The chunked backward builds no graph: a gradient penalty through it would silently
    # lose its second-order term. First-order gradients under create_graph stay exact.
    x0, y = features(6, 5)
    x0, y = x0.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(4.0, requires_grad=True)
    x = x0 * 1.0  # a non-leaf, as features coming out of a model
    loss = LOSS[kind](x, y, s, -1.0, backend="chunked")
    dx, ds = torch.autograd.grad(loss, [x, s], create_graph=True)
    want = reference(kind, x, y, s, torch.tensor(-1.0))
    torch.testing.assert_close(dx.detach().double(), want[1], rtol=1e-5, atol=1e-6)
    for wrt in (x0, y, s):
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad((dx ** 2).sum() + ds + (x0 ** 2).sum(), wrt, retain_graph=True)
    # The torch backend is plain autograd and supports it.
    loss = LOSS[kind](x, y, s, -1.0, backend="torch")
    dx, = torch.autograd.grad(loss, x, create_graph=True)
    assert torch.autograd.grad((dx ** 2).sum(), x0)[0].abs().sum() > 0
