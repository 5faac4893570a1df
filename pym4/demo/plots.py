"""The demo's PNG figures: pym4.eval's metric plots plus training curves and sample images.

Every figure is drawn on matplotlib's Agg canvas (:func:`pym4.eval.subplots`), never through
pyplot, so running the demo inside a notebook or a GUI session leaves its backend alone.
"""
from __future__ import annotations

import os
from typing import List, Mapping, Sequence

import numpy as np

from .. import eval as ev
from .synthetic import CONCEPTS, GROUPS, BiasedCaptions, images_grid

__all__ = ["write_demo_plots", "write_swav_plots"]


def write_demo_plots(out: str, data: Mapping, model: Mapping, evals: Mapping[str, Mapping],
                     histories: Mapping[str, Mapping[str, Sequence[float]]], train: BiasedCaptions,
                     loss: str) -> List[str]:
    """Write the eight PNGs of ``pym4 demo`` in ``out``; return their paths.

    ``data`` and ``model``: ``{"unbalanced"|"balanced": {"rb", "ab", ...}}``; ``evals``: per
    model, the ``zero_shot``, ``recall``, ``ab`` and ``group_gap`` results of pym4.eval;
    ``histories``: per model, ``train_contrastive``'s ``loss`` and ``logit_scale`` per step.
    """
    paths = [os.path.join(out, name) for name in ("data_bias.png", "model_bias.png", "zero_shot.png", "recall.png",
                                                  "association.png", "group_accuracy.png", "training.png",
                                                  "samples.png")]
    ev.plot_bias(data, paths[0], title="Bias of the training data (M4 before/after)")
    ev.plot_bias(model, paths[1], title="Bias of the trained models")
    ev.plot_zero_shot({k: e["zero_shot"] for k, e in evals.items()}, CONCEPTS, paths[2])
    ev.plot_recall({k: e["recall"] for k, e in evals.items()}, paths[3])
    ev.plot_association({k: e["ab"] for k, e in evals.items()}, CONCEPTS, GROUPS, paths[4])
    ev.plot_group_accuracy({k: e["group_gap"] for k, e in evals.items()}, paths[5],
                           title="Zero-shot accuracy per group (test set)")
    _plot_training(histories, loss, paths[6])
    _plot_samples(train, paths[7])
    return paths


def write_swav_plots(out: str, accuracy: Mapping[str, float], losses: Sequence[float]) -> List[str]:
    """Write the two PNGs of ``pym4 demo --swav`` (linear-probe accuracies, SwAV loss per step); return their paths."""
    paths = [os.path.join(out, "linear_probe.png"), os.path.join(out, "swav_loss.png")]
    ev.plot_linear_probe({"random init": accuracy["random_init"], "SwAV": accuracy["swav"]}, paths[0],
                         title="Linear probe on frozen DigitsNet features")
    fig, ax = ev.subplots(figsize=(5, 3))
    ax.plot(list(losses))
    ax.set_xlabel("step")
    ax.set_ylabel("swapped-prediction loss")
    ax.set_title("SwAV training")
    ev.save_figure(fig, paths[1])
    return paths


def _plot_training(histories: Mapping[str, Mapping[str, Sequence[float]]], loss: str, path: str) -> None:
    fig, axes = ev.subplots(1, 2, figsize=(9, 3.2))
    for k, h in histories.items():
        axes[0].plot(h["loss"], label=k)
        axes[1].plot(h["logit_scale"], label=k)
    axes[0].set_title(f"{loss.upper()} training loss")
    axes[1].set_title("logit scale")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    ev.save_figure(fig, path)


def _plot_samples(train: BiasedCaptions, path: str) -> None:
    idx = [int(i) for g in (0, 1) for i in np.flatnonzero(train.group == g)[:8]]
    fig, ax = ev.subplots(figsize=(5, 2.8))
    ax.imshow(images_grid(train, idx), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("training images: warm (first 8), cool (last 8)", fontsize=9)
    ev.save_figure(fig, path)
