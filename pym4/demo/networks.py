"""The demo's small networks: a conv net for 8 x 8 digits (SwAV) and the two towers of its tiny CLIP.

Any ``nn.Module`` works with :func:`pym4.train.train_swav` and :class:`pym4.train.TwoTower`;
these are sized so the demo trains in seconds on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DigitsNet", "ImageTower", "TextTower"]


class DigitsNet(nn.Module):
    """A small conv net for 1 x 8 x 8 digits (any input size >= 2): ``out_dim``-d globally pooled features.

    The default width is small on purpose: its 16-d features at random initialisation are a weak
    baseline (about 0.75 linear-probe accuracy on digits), which SwAV training lifts to about 0.97.
    """

    def __init__(self, width: int = 16, out_dim: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, out_dim, 3, padding=1), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ImageTower(nn.Module):
    """Conv net for small RGB images (3 x H x W, H and W multiples of 4) -> ``embed_dim``."""

    def __init__(self, embed_dim: int = 64, width: int = 32, image_size: int = 16, in_channels: int = 3):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size: expected a multiple of 4, got {image_size}")
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, 4 * width), nn.ReLU(inplace=True),
            nn.Linear(4 * width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TextTower(nn.Module):
    """Bag-of-words text encoder: mean of token embeddings (padding id 0 ignored) -> MLP -> ``embed_dim``."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, width: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, width, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, embed_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != 0).unsqueeze(-1).float()
        h = (self.embedding(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.mlp(h)
