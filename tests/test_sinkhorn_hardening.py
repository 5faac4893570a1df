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

pot = pytest.importorskip("ot")


def sinkhorn_reference(scores, epsilon=0.05, n_iters=3):
    """SwAV's iteration in the log domain, float64, exact for any spread of scores/epsilon:
    log P = S/eps normalised to total mass 1, then n_iters times columns to mass 1/K and
    rows to mass 1/B; returns B * P. (The probability form of tests/references.py underflows
    once the spread of scores/epsilon passes ~700.)"""
    logp = torch.as_tensor(np.asarray(scores, dtype=np.float64)) / epsilon
    b, k = logp.shape
    logp = logp - torch.logsumexp(logp.reshape(-1), 0)
    for _ in range(n_iters):
        logp = logp - torch.logsumexp(logp, 0, keepdim=True) - math.log(k)
        logp = logp - torch.logsumexp(logp, 1, keepdim=True) - math.log(b)
    return torch.exp(logp + math.log(b)).numpy()


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


def test_float32_scores_over_epsilon_beyond_float32_range():
    # 1e30 / 1e-10 overflows float32 but not float64: still the answer, not an error.
    scores = np.array([[1e30, -1e30, 0.0], [0.0, 1e30, 2e30]], "f4")
    q = pym4.sinkhorn(scores, epsilon=1e-10)
    np.testing.assert_allclose(q, sinkhorn_reference(scores, 1e-10), rtol=1e-5, atol=1e-7)
