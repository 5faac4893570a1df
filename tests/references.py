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
