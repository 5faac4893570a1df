"""Independent float64 references shared by the tests and the benchmarks (plain torch and
numpy, written from the papers' formulas, never through pym4). Benchmarks import this file
by path (benchmarks/_harness.py: references())."""
import math

import numpy as np
import torch


def swav_sinkhorn(scores, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """SwAV's distributed_sinkhorn (Caron et al. 2020, facebookresearch/swav) on one
    process, in float64: P = exp(S/eps) with total mass 1, then n_iters times every
    prototype (column) gets mass 1/K and every sample (row) mass 1/B; returns B * P.
    The global maximum is subtracted first (it cancels in the first normalisation) so
    that epsilon = 0.01 does not overflow even in float64."""
    s = torch.as_tensor(scores).double()
    q = torch.exp((s - s.max()) / epsilon).t()  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def swav_sinkhorn_log(scores, epsilon: float = 0.05, n_iters: int = 3) -> np.ndarray:
    """SwAV's iteration in the log domain, float64, exact for any spread of scores/epsilon:
    log P = S/eps normalised to total mass 1, then n_iters times columns to mass 1/K and
    rows to mass 1/B; returns B * P. (The probability form above underflows once the spread
    of scores/epsilon passes ~700.)"""
    logp = torch.as_tensor(np.asarray(scores, dtype=np.float64)) / epsilon
    b, k = logp.shape
    logp = logp - torch.logsumexp(logp.reshape(-1), 0)
    for _ in range(n_iters):
        logp = logp - torch.logsumexp(logp, 0, keepdim=True) - math.log(k)
        logp = logp - torch.logsumexp(logp, 1, keepdim=True) - math.log(b)
    return torch.exp(logp + math.log(b)).numpy()


def open_clip_loss_module():
    """open_clip's own loss.py (ClipLoss, SigLipLoss), loaded by file path: it needs only
    torch, while importing the open_clip package pulls torchvision. None when not installed."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        return None
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss_for_tests", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# ----- CLIP / SigLIP (DESIGN.md section 2, open_clip semantics) ---------------------------------

def contrastive_logits(x, y, logit_scale, logit_bias=None) -> torch.Tensor:
    """S (B, B) = s * x @ y^T (+ b), in the inputs' dtype and device (pass float64 tensors)."""
    return logit_scale * x @ y.T + (0.0 if logit_bias is None else logit_bias)


def clip_loss_terms(x, y, logit_scale, logit_bias=None) -> torch.Tensor:
    """CLIP's per-example terms (B,): r_i + c_i - 2 S_ii with r_i = LSE_j S_ij, c_i = LSE_j S_ji
    (image-to-text and text-to-image cross-entropy of pair i). The loss is their sum / 2B."""
    logits = contrastive_logits(x, y, logit_scale, logit_bias)
    diag = logits.diagonal()
    return (torch.logsumexp(logits, 1) - diag) + (torch.logsumexp(logits, 0) - diag)


def clip_loss(x, y, logit_scale, logit_bias=None) -> torch.Tensor:
    """CLIP's softmax loss (1/2B) sum_i (r_i + c_i - 2 S_ii): open_clip's ClipLoss."""
    return clip_loss_terms(x, y, logit_scale, logit_bias).sum() / (2 * x.shape[0])


def siglip_loss_rows(x, y, logit_scale, logit_bias=None) -> torch.Tensor:
    """SigLIP's per-row terms (B,): sum_j -log sigmoid(l_ij S_ij), l = +1 on the diagonal, -1 off it."""
    logits = contrastive_logits(x, y, logit_scale, logit_bias)
    labels = 2 * torch.eye(x.shape[0], dtype=logits.dtype, device=logits.device) - 1
    return -torch.nn.functional.logsigmoid(labels * logits).sum(1)


def siglip_loss(x, y, logit_scale, logit_bias=None) -> torch.Tensor:
    """SigLIP's sigmoid loss (1/B) sum_ij -log sigmoid(l_ij S_ij): open_clip's SigLipLoss."""
    return siglip_loss_rows(x, y, logit_scale, logit_bias).sum() / x.shape[0]


# ----- M4 (DESIGN.md section 3), in numpy float64 -------------------------------------------------

def m4_bounds(m: int, c: int, budget: float, eps_rep: float, eps_assoc: float):
    """(m (c + 1),) bounds of |constraint|: budget * eps_rep for group k's representation
    (index k (c + 1)), budget * eps_assoc for its association with label r (k (c + 1) + 1 + r)."""
    return budget * np.tile(np.r_[eps_rep, np.full(c, eps_assoc)], m)


def m4_bias_rows(s, y, pi):
    """a_i (n, m (c + 1)) of rows s (n, m), dense y (n, c): [s_i - pi ; (s_i - pi) (x) y_i],
    group-major (index k (c + 1) + r, r = 0 the representation term)."""
    d = np.asarray(s, dtype=np.float64) - pi
    yt = np.concatenate([np.ones((d.shape[0], 1)), np.asarray(y, dtype=np.float64)], axis=1)
    return (d[:, :, None] * yt[:, None, :]).reshape(d.shape[0], -1)


def m4_stream(s, y, pi, budget: float, eps_rep: float, eps_assoc: float, *, lr: float = 0.1, gamma: float = 3.0,
              batch: int = 256, utility=None, start_mu_at_budget: bool = True):
    """M4's streaming dual ascent (the paper's one pass; M4Solver.partial_fit) written out
    in numpy, dense labels. Per mini-batch t of ``batch`` rows: q = clip(eta + u - a (v+ - v-)
    - mu, 0, 1); the curvature h = (running mean of a^2) + 1e-6; the gradient g = q a / n_t;
    v+ = max(0, v+ + lr (g - lam) / h), v- = max(0, v- + lr (-g - lam) / h),
    mu += lr (mean q - eta); the duals are averaged with weight (gamma + 1) / (t + gamma).
    With a utility, mu (and its average) starts at the root of mean clip(eta + u - mu, 0, 1)
    = eta over the first mini-batch (bisection), as M4Solver starts it (the core's pass
    itself starts from its state: ``start_mu_at_budget=False``, mu = 0). Returns (v_plus,
    v_minus, averaged w = v+ - v-, averaged mu); memory O(batch m c)."""
    n, m = s.shape
    c = y.shape[1]
    p = m * (c + 1)
    lam = m4_bounds(m, c, budget, eps_rep, eps_assoc)
    vp, vm, curv, avg = np.zeros(p), np.zeros(p), np.zeros(p), np.zeros(p)
    mu = avg_mu = seen = 0.0
    if utility is not None and n and start_mu_at_budget:
        head = budget + np.asarray(utility[:batch], dtype=np.float64)
        lo, hi = head.min() - 1.0, head.max()  # mean clip(head - mu) is eta at most at lo, 0 at hi
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.clip(head - mid, 0, 1).mean() > budget else (lo, mid)
        mu = avg_mu = 0.5 * (lo + hi)
    for t, b in enumerate(range(0, n, batch), start=1):
        a = m4_bias_rows(s[b:b + batch], y[b:b + batch], pi)
        u = 0.0 if utility is None else utility[b:b + batch]
        q = np.clip(budget + u - a @ (vp - vm) - mu, 0, 1)
        curv += (a * a).sum(0)
        seen += a.shape[0]
        h = curv / seen + 1e-6
        g = q @ a / a.shape[0]
        vp = np.maximum(0, vp + lr * (g - lam) / h)
        vm = np.maximum(0, vm + lr * (-g - lam) / h)
        mu += lr * (q.mean() - budget)
        r = (gamma + 1) / (t + gamma)
        avg = (1 - r) * avg + r * (vp - vm)
        avg_mu = (1 - r) * avg_mu + r * mu
    return vp, vm, avg, avg_mu


def m4_keep_probability(s, y, pi, budget: float, w, mu: float, utility=None, chunk: int = 1 << 16):
    """The closed form q_i = clip(eta + u_i - a_i^T w - mu, 0, 1) (n,), dense y, in chunks."""
    n = s.shape[0]
    q = np.empty(n)
    for b in range(0, n, chunk):
        u = 0.0 if utility is None else utility[b:b + chunk]
        q[b:b + chunk] = np.clip(budget + u - m4_bias_rows(s[b:b + chunk], y[b:b + chunk], pi) @ w - mu, 0, 1)
    return q


def m4_constraint_values(s, y, q, pi, chunk: int = 1 << 16):
    """(m (c + 1),) values (1/N) sum_i q_i (s_ik - pi_k) [1, y_i], in m4_bounds's order; y
    dense (N, c) or scipy CSR. Chunked, so N = 1e7 rows need no N x c float copy."""
    n, m = s.shape
    c = y.shape[1]
    out = np.zeros((m, c + 1))
    for b in range(0, n, chunk):
        d = (np.asarray(s[b:b + chunk], dtype=np.float64) - pi) * q[b:b + chunk, None]  # (n_b, m)
        out[:, 0] += d.sum(0)
        out[:, 1:] += np.asarray(y[b:b + chunk].T @ d).T
    return out.reshape(-1) / n


def m4_max_violation(s, y, q, pi, budget: float, eps_rep: float, eps_assoc: float) -> float:
    """max over the constraints of (|value| - bound)_+, the budget's |mean q - eta| included."""
    g = m4_constraint_values(s, y, q, pi)
    excess = np.abs(g) - m4_bounds(s.shape[1], y.shape[1], budget, eps_rep, eps_assoc)
    return float(max(np.maximum(excess, 0).max(), abs(float(np.mean(q)) - budget)))
