"""M4's torch implementation (any device; the ``torch`` backend) and the one launcher of the
core's CUDA kernel (the ``cuda`` backend), for the streaming solver's mini-batches.

Rows are float64 tensors ``s`` (n, m), ``y`` (n, c), ``u`` (n,) or None; ``w = v+ - v-``
(p = m (c + 1),) and ``pi`` (m,) float64 on the same device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._arrays import to_tensor
from ._inputs import Labels, dense_input


def as_rows(s, y, utility, device: torch.device, for_kernel: bool = False):
    """(s, y, u) as float64 tensors on ``device``, shapes and values checked before any
    kernel reads raw pointers; with ``for_kernel``, s and y in the CUDA kernel's layout
    instead (:func:`cuda_rows`: contiguous uint8), converted once from the values given: a
    float64 copy on the way, 8 bytes per entry, was 2.6 GB for 1e7 rows of 32 labels."""
    st, _ = to_tensor(dense_input(s), "s")
    s_t = (st[:, None] if st.dim() == 1 else st).to(device=device)
    if s_t.dim() != 2:
        raise ValueError(f"s: expected a 1-D or 2-D array (examples, columns), got shape {tuple(s_t.shape)}")
    if s_t.shape[1] == 0:  # (as _inputs.group_matrix says it on the host)
        raise ValueError(f"s: need at least one group column, got shape {tuple(s_t.shape)}")
    n = s_t.shape[0]
    if y is None:
        y_t = torch.zeros((n, 0), dtype=torch.float64, device=device)
    else:
        # The torch path reads dense rows (sparse of any kind made dense, tensors detached).
        y = y.to_dense() if isinstance(y, Labels) else dense_input(y)
        yt, _ = to_tensor(y, "y")
        y_t = (yt[:, None] if yt.dim() == 1 else yt).to(device=device)
    if y_t.dim() != 2 or y_t.shape[0] != n:
        raise ValueError(f"y: expected {n} rows (one per example), got shape {tuple(y_t.shape)}")
    u_t = None
    if utility is not None:
        u_t = to_tensor(dense_input(utility), "utility")[0].to(device=device, dtype=torch.float64)
        if u_t.dim() != 1 or u_t.shape[0] != n:
            raise ValueError(f"utility: expected shape ({n},), got {tuple(u_t.shape)}")
    for name, t in (("s", s_t), ("y", y_t)):  # (on the values as given: exact in any dtype)
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name}: values must be 0 or 1 (binary)")
    if u_t is not None and not bool(torch.isfinite(u_t).all()):
        raise ValueError("utility: contains NaN or Inf")
    if for_kernel:
        return cuda_rows(s_t, y_t, u_t)
    return s_t.to(torch.float64), y_t.to(torch.float64), u_t


def _margins(s, y, pi, w):
    m, L = s.shape[1], y.shape[1] + 1
    d = s - pi
    # [1; y_i] per row: the ones column built by shape, since y[:, :1] is empty when c = 0.
    ytil = torch.cat([torch.ones((y.shape[0], 1), dtype=y.dtype, device=y.device), y], dim=1)
    return ((ytil @ w.view(m, L).T) * d).sum(dim=1), d, ytil


def keep_probability(s, y, u, pi, eta: float, w, mu):
    """q_i = clip(eta + u_i - a_i^T w - mu, 0, 1), (n,) float64."""
    t, _, _ = _margins(s, y, pi, w)
    return (eta + (0 if u is None else u) - t - mu).clamp(0.0, 1.0)


def batch_stats(s, y, u, pi, eta: float, w, mu):
    """[sum q a (p) | sum a^2 (p) | sum q | count] of a mini-batch, float64."""
    t, d, ytil = _margins(s, y, pi, w)
    q = (eta + (0 if u is None else u) - t - mu).clamp(0.0, 1.0)
    qa = ((q[:, None] * d).T @ ytil).reshape(-1)
    a2 = ((d * d).T @ ytil).reshape(-1)
    tail = torch.stack([q.sum(), torch.tensor(float(s.shape[0]), dtype=torch.float64, device=s.device)])
    return torch.cat([qa, a2, tail])


def apply_update(state, stats, lam, eta: float, lr: float, gamma: float) -> None:
    """One stochastic dual-ascent step from (all-reduced) ``stats``, in place on a
    :class:`~pym4.m4._solver.StreamState` of tensors; the same step as the core's
    ``apply_update`` (include/pym4/m4.h). ``lam`` (p,): the tolerance vector."""
    p = lam.shape[0]
    # No host sync here: every mini-batch of the loop holds at least one example globally
    # (the step count is the largest over the ranks), so count > 0.
    count = stats[2 * p + 1]
    state.n_seen += count
    state.steps += 1.0
    r = (gamma + 1.0) / (state.steps + gamma)
    state.curv += stats[p:2 * p]
    h = state.curv / state.n_seen + 1e-6
    g = stats[:p] / count
    state.v_plus.copy_(torch.clamp(state.v_plus + lr * (g - lam) / h, min=0.0))
    state.v_minus.copy_(torch.clamp(state.v_minus + lr * (-g - lam) / h, min=0.0))
    state.avg_w.copy_((1.0 - r) * state.avg_w + r * (state.v_plus - state.v_minus))
    state.mu += lr * (stats[2 * p] / count - eta)
    state.mu_avg = (1.0 - r) * state.mu_avg + r * state.mu


def cuda_rows(s, y, u):
    """The kernel's layout of checked rows: contiguous uint8 s and y, contiguous u."""
    return s.to(torch.uint8).contiguous(), y.to(torch.uint8).contiguous(), None if u is None else u.contiguous()


def cuda_batch(s8, y8, u, row0: int, rows: int, pi, eta: float, w, mu, *, q: Optional[torch.Tensor] = None,
               stats: Optional[torch.Tensor] = None) -> None:
    """One launch of the core's M4 kernel on rows [row0, row0 + rows) of (s8, y8, u) (from
    :func:`cuda_rows`): writes q[row0:row0 + rows] when ``q`` is given and adds the
    mini-batch statistics into ``stats`` (2p + 2, zeroed by the caller) when given. ``mu``
    is a one-element device tensor, so no host sync is needed between mini-batches."""
    dev = s8.device
    with torch.cuda.device(dev):  # the kernel launches on the current device: the data's
        _backend.core().m4_batch_cuda(
            s8.data_ptr(), y8.data_ptr(), 0 if u is None else u.data_ptr(), s8.shape[0], row0, rows, s8.shape[1],
            y8.shape[1], pi.data_ptr(), eta, w.data_ptr(), mu.data_ptr(), 0 if q is None else q.data_ptr(),
            0 if stats is None else stats.data_ptr(), torch.cuda.current_stream(dev).cuda_stream)
