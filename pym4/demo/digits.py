"""scikit-learn's bundled 8 x 8 digits, the data of ``pym4 demo --swav``."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

__all__ = ["load_digits"]


def load_digits() -> Tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's bundled 8 x 8 digits: float32 images (1797, 1, 8, 8) in [0, 1] and labels (1797,)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    return x, d.target.astype(np.int64)
