"""Independent float64 references shared by several test files (plain torch, written from
the papers' formulas, never through pym4)."""
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
