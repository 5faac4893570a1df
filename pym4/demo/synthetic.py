"""A synthetic image-caption dataset with a known, controllable bias.

Each 3 x H x W image shows one shape (the *concept* its caption names) of a given size at a
given quadrant, drawn in a colour tone that is the *sensitive attribute*: ``warm`` (red-orange)
or ``cool`` (blue-cyan), standing in for a perceived-gender-like group, or grey for images
whose group is unknown (``neutral``). Captions name the shape, size and position, and mention
the colour tone only with probability ``mention_prob``, as web captions rarely state a
person's perceived gender. Pixel noise makes the shapes of each confusable pair (circle/ring,
square/diamond, cross/plus, triangle/wedge) hard to tell apart, so a model trained on
correlated data can use the colour as a shortcut.

Bias. The eight concepts are split in two halves; group ``k`` *favours* half ``k``, each
pair having one member in each half. A group-``k`` image draws its concept from the favoured
half with probability ``(1 + association) / 2`` (uniformly within the half), so
``association = 0`` makes concept and group independent and ``association = 1`` makes the
group decide the half. With four concepts per half, the data's association bias
(:func:`pym4.m4.association_bias`) is ``AB = association / 4``; the share of the ``cool`` group is
``minority_share``, so the representation bias against ``target = 0.5`` is
``|0.5 - minority_share|``.

Metadata for M4: ``s`` (N, 2) one-hot groups (all-zero for neutral images) and ``y`` (N, 8)
one-hot concepts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["CONCEPTS", "GROUPS", "SHAPE_SIZES", "POSITIONS", "Tokenizer", "BiasedCaptions", "make_biased_captions",
           "images_grid"]

# Pairs of look-alike shapes; the first of each pair is favoured by group 0, the second by group 1.
CONCEPTS = ("circle", "ring", "square", "diamond", "cross", "plus", "triangle", "wedge")
FAVOURED_HALF = np.array([0, 1, 0, 1, 0, 1, 0, 1])
GROUPS = ("warm", "cool")
SHAPE_SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
_PREFIXES = ("a photo of", "a picture of", "an image of", "there is")
# Every word a caption or a zero-shot prompt may use; anything else maps to <unk>.
_EXTRA_WORDS = ("a", "an", "the", "of", "at", "photo", "picture", "image", "there", "is", "shape", "drawing",
                "thing", "something", "object", "in", "colour", "color", "tone", "grey", "toned")


class Tokenizer:
    """Word-level tokenizer over the dataset's closed vocabulary.

    ``tokenizer(texts) -> LongTensor (len(texts), max_len)``: lower-cased whitespace words
    mapped to ids (0 = padding, 1 = unknown word), truncated or zero-padded to ``max_len``.
    """

    PAD, UNK = 0, 1

    def __init__(self, max_len: int = 12):
        words = set(_EXTRA_WORDS) | set(CONCEPTS) | set(GROUPS) | set(SHAPE_SIZES)
        words |= {w for p in POSITIONS + _PREFIXES for w in p.split()}
        self.vocab = {w: i + 2 for i, w in enumerate(sorted(words))}
        self.max_len = int(max_len)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single string")
        out = torch.zeros((len(texts), self.max_len), dtype=torch.int64)
        for i, text in enumerate(texts):
            ids = [self.vocab.get(w, self.UNK) for w in text.lower().split()][: self.max_len]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out


@dataclass
class BiasedCaptions(torch.utils.data.Dataset):
    """The dataset: images, captions and their metadata (see the module docstring).

    Attributes
    ----------
    images : float32 Tensor (N, 3, H, W), values in about [-0.5, 1.5] (noise included)
    captions : list of N str
    tokens : int64 Tensor (N, max_len), ``tokenizer(captions)``
    s : uint8 array (N, 2), one-hot sensitive group (warm, cool); all-zero for neutral images
    y : uint8 array (N, 8), one-hot concept
    group : int64 array (N,), 0 (warm), 1 (cool) or -1 (neutral)
    concept, size, position : int64 arrays (N,), indices into CONCEPTS, SHAPE_SIZES, POSITIONS
    caption_class : int64 array (N,), ``(concept * 2 + size) * 4 + position``: images with the
        same class fit the same captions (colour aside); retrieval relevance uses it
    tokenizer : Tokenizer
    params : dict, the arguments that generated the data

    ``dataset[i]`` is ``(images[i], tokens[i])``; ``dataset.get_batch(idx)`` the same for an
    index tensor, without per-item collation.
    """

    images: torch.Tensor
    captions: List[str]
    tokens: torch.Tensor
    s: np.ndarray
    y: np.ndarray
    group: np.ndarray
    concept: np.ndarray
    size: np.ndarray
    position: np.ndarray
    caption_class: np.ndarray
    tokenizer: Tokenizer
    params: dict

    concept_names = CONCEPTS
    group_names = GROUPS

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.tokens[i]

    def get_batch(self, idx: torch.Tensor):
        return self.images[idx], self.tokens[idx]

    def subset(self, idx) -> "BiasedCaptions":
        """The examples at ``idx`` (int array or boolean mask) as a new dataset."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        t = torch.as_tensor(idx, dtype=torch.int64)
        return BiasedCaptions(self.images[t], [self.captions[i] for i in idx], self.tokens[t], self.s[idx],
                              self.y[idx], self.group[idx], self.concept[idx], self.size[idx],
                              self.position[idx], self.caption_class[idx], self.tokenizer, dict(self.params))


def make_biased_captions(n: int, *, association: float = 0.6, minority_share: float = 0.3,
                         mention_prob: float = 0.1, noise: float = 0.35, neutral_share: float = 0.0,
                         image_size: int = 16, seed: int = 0) -> BiasedCaptions:
    """Generate ``n`` image-caption pairs with a controlled group-concept association.

    Parameters
    ----------
    n : int >= 1
    association : float in [0, 1]
        Strength of the group-concept correlation: P(concept in the group's favoured half |
        group) = (1 + association) / 2; the data's association bias is ``association / 4``.
    minority_share : float in [0, 1]
        Share of the ``cool`` group among images with a group.
    mention_prob : float in [0, 1]
        Probability that a caption names the colour tone (``warm``/``cool``).
    noise : float >= 0
        Standard deviation of the Gaussian pixel noise.
    neutral_share : float in [0, 1]
        Share of grey images with no group (s all-zero; concepts uniform); used to probe which
        group a model prefers when the image shows none.
    image_size : int >= 12
    seed : int

    Returns
    -------
    BiasedCaptions
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    for name, v in (("association", association), ("minority_share", minority_share),
                    ("mention_prob", mention_prob), ("neutral_share", neutral_share)):
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
    if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise: expected a finite number >= 0, got {noise!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 12:
        raise ValueError(f"image_size: expected an integer >= 12, got {image_size!r}")
    n, image_size = int(n), int(image_size)
    rng = np.random.default_rng(seed)

    neutral = rng.random(n) < neutral_share
    group = np.where(rng.random(n) < minority_share, 1, 0)
    group[neutral] = -1
    # Concept: choose a half (the group's favoured one w.p. (1 + a)/2), then a pair uniformly.
    favoured = rng.random(n) < (1.0 + association) / 2.0
    half = np.where(favoured, group, 1 - group)
    half[neutral] = rng.integers(0, 2, int(neutral.sum()))
    concept = 2 * rng.integers(0, 4, n) + half
    size = rng.integers(0, 2, n)
    position = rng.integers(0, 4, n)
    caption_class = (concept * 2 + size) * 4 + position

    images = _render(concept, size, position, group, noise, image_size, rng)
    mention = (rng.random(n) < mention_prob) & ~neutral
    prefix = rng.integers(0, len(_PREFIXES), n)
    captions = []
    for i in range(n):
        colour = f"{GROUPS[group[i]]} " if mention[i] else ""
        captions.append(f"{_PREFIXES[prefix[i]]} a {SHAPE_SIZES[size[i]]} {colour}{CONCEPTS[concept[i]]} "
                        f"at the {POSITIONS[position[i]]}")
    tokenizer = Tokenizer()
    s = np.zeros((n, 2), dtype=np.uint8)
    s[~neutral, group[~neutral]] = 1
    y = np.zeros((n, len(CONCEPTS)), dtype=np.uint8)
    y[np.arange(n), concept] = 1
    params = dict(n=n, association=float(association), minority_share=float(minority_share),
                  mention_prob=float(mention_prob), noise=float(noise), neutral_share=float(neutral_share),
                  image_size=image_size, seed=seed)
    return BiasedCaptions(torch.from_numpy(images), captions, tokenizer(captions), s, y, group.astype(np.int64),
                          concept.astype(np.int64), size.astype(np.int64), position.astype(np.int64),
                          caption_class.astype(np.int64), tokenizer, params)


# ----- rendering -----------------------------------------------------------------------------

_BASE_COLOURS = np.array([[0.95, 0.45, 0.15],   # warm
                          [0.15, 0.55, 0.95],   # cool
                          [0.62, 0.62, 0.62]],  # neutral (grey)
                         dtype=np.float32)


def _shape_masks(concept, dx, dy, r):
    """Boolean masks (N, H, W) of each shape at offsets (dx, dy) from its centre."""
    ax, ay = np.abs(dx), np.abs(dy)
    d = np.sqrt(dx * dx + dy * dy)
    w = np.maximum(0.75, 0.22 * r)  # stroke half-width
    masks = {
        0: d <= r,                                                            # circle (disc)
        1: (d <= r) & (d >= r - 2.0 * w),                                     # ring
        2: np.maximum(ax, ay) <= 0.8 * r,                                     # square
        3: ax + ay <= r,                                                      # diamond
        4: (np.minimum(np.abs(dx - dy), np.abs(dx + dy)) <= 1.414 * w) & (np.maximum(ax, ay) <= 0.8 * r),  # cross
        5: (np.minimum(ax, ay) <= w) & (np.maximum(ax, ay) <= r),             # plus
        6: (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r)),                          # triangle (apex up)
        7: (dy >= -0.8 * r) & (ax <= 0.6 * (r - dy)),                         # wedge (apex down)
    }
    out = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
    for c, m in masks.items():
        out |= (concept == c) & m
    return out


def _render(concept, size, position, group, noise, image_size, rng) -> np.ndarray:
    n, h = concept.shape[0], image_size
    quarter = h / 4.0
    cx = np.where(position % 2 == 0, quarter, 3 * quarter) + rng.uniform(-1.0, 1.0, n)
    cy = np.where(position < 2, quarter, 3 * quarter) + rng.uniform(-1.0, 1.0, n)
    r = np.where(size == 0, 0.16, 0.27) * h * rng.uniform(0.9, 1.1, n)
    grid = np.arange(h, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    mask = _shape_masks(concept[:, None, None], dx, dy, r[:, None, None]).astype(np.float32)
    colour = _BASE_COLOURS[np.where(group < 0, 2, group)] + rng.uniform(-0.08, 0.08, (n, 3)).astype(np.float32)
    background = rng.uniform(0.05, 0.2, (n, 1, 1, 1)).astype(np.float32)
    images = background + mask[:, None] * (colour[:, :, None, None] - background)
    images += rng.normal(0.0, noise, images.shape).astype(np.float32)
    return np.ascontiguousarray(images, dtype=np.float32)


def images_grid(data: BiasedCaptions, idx: Optional[Sequence[int]] = None):
    """(H', W', 3) float array tiling a few images in [0, 1], for figures."""
    idx = list(range(min(16, len(data)))) if idx is None else list(idx)
    imgs = data.images[idx].clamp(0, 1).permute(0, 2, 3, 1).numpy()
    cols = int(math.ceil(math.sqrt(len(idx))))
    rows = int(math.ceil(len(idx) / cols))
    h, w = imgs.shape[1:3]
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, 3), dtype=np.float32)
    for k, im in enumerate(imgs):
        r, c = divmod(k, cols)
        grid[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = im
    return grid
