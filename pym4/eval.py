"""Evaluation: zero-shot classification, retrieval, linear probes, model bias, plots.

Metrics work on features (numpy arrays or torch tensors) and predictions, not on a model,
so any encoder can be measured:

- :func:`zero_shot_classifier` / :func:`zero_shot_predict` / :func:`zero_shot_accuracy`:
  CLIP's zero-shot classification with prompt ensembles (Radford et al., 2021, section 3.1.4:
  each class is the normalised mean of its prompts' normalised text embeddings).
- :func:`retrieval_recall`: image-to-text and text-to-image recall@K through
  :func:`pym4.similarity_topk`, so galleries never need an N x M matrix.
- :func:`linear_probe`: multinomial logistic regression on frozen features (scikit-learn).
- :func:`model_representation_bias`, :func:`model_association_bias`: the bias metrics of
  "CLIP the Bias" (Alabdulmohsin et al., ICLR 2024) applied to a model's zero-shot
  predictions: how often images are matched to each group's prompt against the target
  shares, and the largest difference between groups in how often images are matched to
  each concept.
- :func:`group_accuracy_gap`: accuracy per sensitive group and the largest gap, as in the
  SEER fairness indicators (Goyal et al., "Fairness Indicators for Systematic Assessments of
  Visual Feature Extractors", FAccT 2022).
- ``plot_*``: one PNG per metric, written atomically; figures come from :func:`subplots`
  (matplotlib's Agg canvas, never pyplot), so plotting leaves the caller's backend alone.

scikit-learn and matplotlib are imported only by the functions that need them.
"""
from __future__ import annotations

import json
import sys
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from ._io import atomic_output

__all__ = ["zero_shot_classifier", "zero_shot_predict", "zero_shot_accuracy", "retrieval_recall",
           "linear_probe", "model_representation_bias", "model_association_bias", "group_accuracy_gap",
           "plot_zero_shot", "plot_recall", "plot_linear_probe", "plot_bias", "plot_association",
           "plot_group_accuracy", "subplots", "save_figure", "write_json"]


# ----- helpers -------------------------------------------------------------------------------

def _features(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D array (items, features), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected floating-point features, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x.detach()


def _class_ids(x, n: int, name: str, high: Optional[int] = None) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {a.shape}")
    if a.dtype.kind not in "iub":
        raise TypeError(f"{name}: expected integer labels, got {a.dtype}")
    a = a.astype(np.int64)
    if (a < 0).any() or (high is not None and (a >= high).any()):
        raise ValueError(f"{name}: labels must be in [0, {high}), got values in [{a.min()}, {a.max()}]")
    return a


def _ks(ks) -> list:
    """Sorted distinct cut-offs from an int or a sequence of ints, each >= 1 (1.5 was
    truncated to 1, and ks=5 raised numpy's TypeError)."""
    values = [ks] if isinstance(ks, (int, np.integer)) and not isinstance(ks, bool) else ks
    if isinstance(values, str) or not isinstance(values, (Sequence, np.ndarray)):
        raise TypeError(f"ks: expected an integer or a sequence of integers, got {ks!r}")
    for k in values:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"ks: expected positive integers, got {k!r} in {ks!r}")
    if len(values) == 0:
        raise ValueError("ks: expected at least one cut-off, got none")
    return sorted({int(k) for k in values})


def _names(x, name: str, what: str) -> list:
    """A non-empty sequence of str (a str alone is refused: it would be read letter by letter)."""
    if isinstance(x, str) or not isinstance(x, (Sequence, np.ndarray)):
        raise TypeError(f"{name}: expected a sequence of {what}, got {type(x).__name__} {x!r}"[:200])
    if len(x) == 0:
        raise ValueError(f"{name}: is empty")
    return list(x)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t.float(), dim=-1)


# ----- zero-shot -----------------------------------------------------------------------------

def zero_shot_classifier(encode_text: Callable[[Sequence[str]], torch.Tensor], classnames: Sequence[str],
                         templates: Sequence[str]) -> torch.Tensor:
    """Class embeddings from prompt ensembles.

    ``w_c = normalize(mean_t normalize(encode_text(template_t.format(class_c))))``.

    Parameters
    ----------
    encode_text : callable, list of str -> Tensor (n, D)
    classnames : sequence of C str
    templates : sequence of T str, each with one ``{}`` for the class name

    Returns
    -------
    float32 Tensor (C, D), rows of unit norm.
    """
    classnames = _names(classnames, "classnames", "class names")
    templates = _names(templates, "templates", "templates")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"templates: each must be a str with exactly one '{{}}', got {t!r}")
    texts = [t.format(c) for c in classnames for t in templates]
    with torch.no_grad():
        feats = _features(encode_text(texts), "encode_text(...)")
    if feats.shape[0] != len(texts):
        raise ValueError(f"encode_text: returned {feats.shape[0]} rows for {len(texts)} texts")
    feats = _normalize(feats).reshape(len(classnames), len(templates), -1).mean(1)
    return _normalize(feats)


def zero_shot_predict(image_features, classifier, k: int = 1):
    """Top-``k`` classes of each image by cosine similarity: int64 Tensor (N, k) (or (N,) for k=1)."""
    from .contrastive import similarity_topk

    x = _normalize(_features(image_features, "image_features"))
    w = _normalize(_features(classifier, "classifier"))
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"classifier: expected {x.shape[1]} features per class, got shape {tuple(w.shape)}")
    _, idx = similarity_topk(x, w, min(k, w.shape[0]))
    return idx[:, 0] if k == 1 else idx


def zero_shot_accuracy(image_features, classifier, labels, ks: Sequence[int] = (1,)) -> Dict[str, object]:
    """Top-k zero-shot accuracy, and top-1 accuracy per class.

    Returns ``{"top1": ..., "top5": ..., "per_class": [C floats, NaN for absent classes],
    "predictions": int64 array (N,)}``.
    """
    x = _features(image_features, "image_features")
    w = _features(classifier, "classifier")
    y = _class_ids(labels, x.shape[0], "labels", w.shape[0])
    ks = _ks(ks)
    top = zero_shot_predict(x, w, k=min(max(ks), w.shape[0]))
    top = np.asarray(top.reshape(x.shape[0], -1))
    hit = top == y[:, None]
    out: Dict[str, object] = {f"top{k}": float(hit[:, :k].any(1).mean()) for k in ks}
    pred = top[:, 0]
    out["per_class"] = [float((pred[y == c] == c).mean()) if (y == c).any() else float("nan")
                        for c in range(w.shape[0])]
    out["predictions"] = pred
    return out


# ----- retrieval -----------------------------------------------------------------------------

def retrieval_recall(image_features, text_features, ks: Sequence[int] = (1, 5, 10), *,
                     image_class=None, text_class=None, chunk: Optional[int] = None) -> Dict[str, float]:
    """Image-to-text and text-to-image recall@K.

    Recall@K is the fraction of queries with at least one relevant item among their K nearest
    (by dot product of L2-normalised features). By default image ``i`` and text ``i`` form the
    only relevant pair. With ``image_class`` and ``text_class`` (int arrays), an item is
    relevant to a query when their classes are equal, for datasets in which several captions
    fit an image (COCO's five captions per image: text class = image index).

    Parameters
    ----------
    image_features : (N, D), text_features : (M, D); M = N unless classes are given.
    ks : recall cut-offs (capped at the gallery size).

    Returns
    -------
    ``{"i2t_recall@K": float, "t2i_recall@K": float}`` for every K.
    """
    from .contrastive import similarity_topk

    x = _normalize(_features(image_features, "image_features"))
    t = _normalize(_features(text_features, "text_features"))
    if x.shape[1] != t.shape[1]:
        raise ValueError(f"text_features: expected {x.shape[1]} features to match image_features, got {tuple(t.shape)}")
    if (image_class is None) != (text_class is None):
        raise ValueError("image_class, text_class: give both or neither")
    if image_class is None:
        if x.shape[0] != t.shape[0]:
            raise ValueError(f"text_features: expected {x.shape[0]} rows (one caption per image), got {t.shape[0]}")
        ic, tc = np.arange(x.shape[0]), np.arange(t.shape[0])
    else:
        ic = _class_ids(image_class, x.shape[0], "image_class")
        tc = _class_ids(text_class, t.shape[0], "text_class")
    ks = _ks(ks)
    out: Dict[str, float] = {}
    for name, q, g, qc, gc in (("i2t", x, t, ic, tc), ("t2i", t, x, tc, ic)):
        kmax = min(ks[-1], g.shape[0])
        _, idx = similarity_topk(q, g, kmax, chunk=chunk)
        hit = gc[np.asarray(idx)] == qc[:, None]
        for k in ks:
            out[f"{name}_recall@{k}"] = float(hit[:, :min(k, kmax)].any(1).mean())
    return out


# ----- linear probe --------------------------------------------------------------------------

def linear_probe(train_features, train_labels, test_features, test_labels, *, C: float = 1.0,
                 max_iter: int = 3000) -> Dict[str, object]:
    """Accuracy of a logistic-regression probe on frozen features.

    Features are standardised with the training set's mean and standard deviation, then
    scikit-learn's multinomial ``LogisticRegression(C=C)`` (L-BFGS) is fitted on the training
    set and scored on the test set.

    Returns ``{"accuracy": float, "train_accuracy": float, "predictions": int array}``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xtr = _features(train_features, "train_features").double().cpu().numpy()
    xte = _features(test_features, "test_features").double().cpu().numpy()
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"test_features: expected {xtr.shape[1]} features, got shape {xte.shape}")
    ytr = _class_ids(train_labels, xtr.shape[0], "train_labels")
    yte = _class_ids(test_labels, xte.shape[0], "test_labels")
    if np.unique(ytr).size < 2:
        raise ValueError("train_labels: need at least two classes")
    if isinstance(C, bool) or not isinstance(C, (int, float, np.integer, np.floating)) or not 0 < C < float("inf"):
        raise ValueError(f"C: must be a finite number > 0, got {C!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter: must be an integer >= 1, got {max_iter!r}")
    mean, std = xtr.mean(0), xtr.std(0)
    std[std < 1e-8] = 1.0  # constant features carry nothing; keep them at 0
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        # A probe that stops at max_iter is still a valid (slightly under-fitted) probe.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, ytr)
    pred = clf.predict(xte)
    return {"accuracy": float((pred == yte).mean()), "train_accuracy": float(clf.score(xtr, ytr)),
            "predictions": pred}


# ----- model bias ----------------------------------------------------------------------------

def model_representation_bias(group_predictions, n_groups: int, target=None) -> Dict[str, object]:
    """Representation bias of a model: ``RB = max_k |P(pred = k) - pi_k|``.

    ``group_predictions`` (N,) are the group each image was matched to (e.g. the zero-shot
    argmax over one prompt ensemble per group), typically on images that show no group, so
    any preference is the model's. ``target`` (pi) defaults to ``1 / n_groups`` each.

    Returns ``{"rb": float, "shares": [n_groups floats], "target": [n_groups floats]}``.
    """
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 2:
        raise ValueError(f"n_groups: expected an integer >= 2, got {n_groups!r}")
    p = np.asarray(group_predictions.detach().cpu() if isinstance(group_predictions, torch.Tensor)
                   else group_predictions)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"group_predictions: expected a non-empty 1-D array, got shape {p.shape}")
    p = _class_ids(p, p.shape[0], "group_predictions", n_groups)
    if target is None:
        pi = np.full(n_groups, 1.0 / n_groups)
    else:
        try:
            pi = np.asarray(target, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"target: expected a share or {n_groups} shares, got {target!r}") from None
        if pi.ndim > 1 or (pi.ndim == 1 and pi.shape[0] != n_groups):
            raise ValueError(f"target: expected a scalar or {n_groups} shares (one per group), got shape {pi.shape}")
        pi = np.broadcast_to(pi, (n_groups,)).copy()
    if not np.all((pi >= 0) & (pi <= 1)):  # (NaN fails it too)
        raise ValueError(f"target: expected shares in [0, 1], got {pi}")
    shares = np.bincount(p, minlength=n_groups) / p.size
    return {"rb": float(np.abs(shares - pi).max()), "shares": shares.tolist(), "target": pi.tolist()}


def model_association_bias(s, predictions, n_classes: int) -> Dict[str, object]:
    """Association bias of a model: ``AB = max_{k,r} |P(pred = r | s_k = 1) - P(pred = r | s_k = 0)|``.

    Parameters
    ----------
    s : (N, m) 0/1 sensitive-group indicators of the evaluated images (rows with no group
        count as ``s_k = 0`` for every k)
    predictions : (N,) int, the concept each image was matched to
    n_classes : number of concepts

    Returns
    -------
    ``{"ab": float, "rates": (m, 2, n_classes) list [k][s_k=0 / s_k=1][r] of P(pred = r | s_k),
    "worst": [k, r]}``; groups with no member (or no non-member) are left out (NaN rates).
    """
    sa = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s)
    if sa.ndim != 2:
        raise ValueError(f"s: expected a 2-D (examples, groups) array, got shape {sa.shape}")
    if not np.isin(sa, (0, 1)).all():
        raise ValueError("s: expected 0/1 group indicators")
    sa = sa.astype(bool)
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes: expected an integer >= 1, got {n_classes!r}")
    pred = _class_ids(predictions, sa.shape[0], "predictions", n_classes)
    onehot = np.eye(n_classes)[pred]
    m = sa.shape[1]
    rates = np.full((m, 2, n_classes), np.nan)
    for k in range(m):
        for v in (0, 1):
            sel = sa[:, k] == bool(v)
            if sel.any():
                rates[k, v] = onehot[sel].mean(0)
    gap = np.abs(rates[:, 1] - rates[:, 0])
    if np.isnan(gap).all():
        raise ValueError("s: no group has both members and non-members; association bias is undefined")
    k, r = np.unravel_index(np.nanargmax(gap), gap.shape)
    return {"ab": float(gap[k, r]), "rates": rates.tolist(), "worst": [int(k), int(r)]}


def group_accuracy_gap(correct, groups, group_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Accuracy per group and the largest difference between two groups.

    ``correct`` (N,) bool, ``groups`` (N,) int group ids (negative ids = no group, ignored).
    Returns ``{"accuracy": {name: float}, "count": {name: int}, "gap": max - min}``.
    """
    c = np.asarray(correct.detach().cpu() if isinstance(correct, torch.Tensor) else correct)
    if c.ndim != 1:
        raise ValueError(f"correct: expected a 1-D array, got shape {c.shape}")
    if c.dtype.kind not in "biuf" or not np.isin(c, (0, 1)).all():  # NaN and 0.7 are not outcomes
        raise ValueError(f"correct: expected a bool (or 0/1) per example, got {c.dtype}"
                         + ("" if c.dtype.kind not in "biuf" else " with values other than 0 and 1"))
    g = np.asarray(groups.detach().cpu() if isinstance(groups, torch.Tensor) else groups)
    if g.shape != c.shape:
        raise ValueError(f"groups: expected shape {c.shape}, got {g.shape}")
    if g.dtype.kind not in "iu":
        raise TypeError(f"groups: expected integer group ids, got {g.dtype}")
    ids = sorted(int(v) for v in np.unique(g) if v >= 0)
    if not ids:
        raise ValueError("groups: no example has a group")
    if group_names is not None:
        group_names = _names(group_names, "group_names", "group names")
        if len(group_names) <= ids[-1]:
            raise ValueError(f"group_names: {len(group_names)} names for group ids up to {ids[-1]}")
        if len({str(x) for x in group_names}) != len(group_names):  # the result is keyed by name
            raise ValueError(f"group_names: a name is repeated ({group_names!r}); two groups would merge")
    acc, count = {}, {}
    for i in ids:
        name = str(group_names[i]) if group_names is not None else str(i)
        acc[name] = float(c[g == i].astype(np.float64).mean())
        count[name] = int((g == i).sum())
    return {"accuracy": acc, "count": count, "gap": float(max(acc.values()) - min(acc.values()))}


# ----- output --------------------------------------------------------------------------------

def write_json(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temp file in the same folder, then os.replace)."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, **kwargs):
    """A new matplotlib figure and its axes (as ``pyplot.subplots``), drawn by the Agg canvas.

    The figure is a plain ``matplotlib.figure.Figure`` with a ``FigureCanvasAgg``: pyplot is
    never imported, so the caller's backend, open windows and figure list stay as they were.
    ``figsize`` (inches) defaults to rcParams; ``kwargs`` go to ``Figure.subplots`` (``sharey``,
    ``squeeze``, ...). Returns ``(fig, axes)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path) -> None:
    """Save a matplotlib figure as PNG atomically (a temp file in the same folder, then os.replace).

    A figure made by :func:`subplots` needs no closing; one the caller made with pyplot is
    closed afterwards, as pyplot would keep it alive.
    """
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")  # only an already imported pyplot can hold it
        if pyplot is not None:
            pyplot.close(fig)


def _grouped_bars(ax, categories: Sequence[str], series: Mapping[str, Sequence[float]], fmt: str = "{:.2f}"):
    n = max(1, len(series))
    width = 0.8 / n
    xs = np.arange(len(categories))
    for i, (label, vals) in enumerate(series.items()):
        bars = ax.bar(xs + (i - (n - 1) / 2) * width, vals, width, label=label)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(categories, rotation=30 if max(len(c) for c in categories) > 6 else 0, ha="right"
                       if max(len(c) for c in categories) > 6 else "center")
    ax.legend(fontsize=8)


def plot_zero_shot(results: Mapping[str, Mapping], classnames: Sequence[str], path) -> None:
    """Per-class zero-shot top-1 accuracy of each model (``results[label] = zero_shot_accuracy(...)``)."""
    fig, ax = subplots(figsize=(8, 3.5))
    _grouped_bars(ax, list(classnames), {f"{k} (top-1 {v['top1']:.2f})": v["per_class"] for k, v in results.items()})
    ax.set_ylabel("zero-shot top-1 accuracy")
    ax.set_ylim(0, 1.08)
    ax.set_title("Zero-shot classification (prompt ensembles), per class")
    save_figure(fig, path)


def plot_recall(results: Mapping[str, Mapping[str, float]], path) -> None:
    """Recall@K curves, image->text and text->image (``results[label] = retrieval_recall(...)``)."""
    fig, axes = subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, direction, title in zip(axes, ("i2t", "t2i"), ("image -> text", "text -> image")):
        for label, r in results.items():
            ks = sorted(int(k.split("@")[1]) for k in r if k.startswith(direction))
            ax.plot(ks, [r[f"{direction}_recall@{k}"] for k in ks], marker="o", label=label)
        ax.set_xlabel("K")
        ax.set_title(f"{title} recall@K")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def plot_linear_probe(accuracies: Mapping[str, float], path, title: str = "Linear probe on frozen features") -> None:
    """Bar chart of linear-probe accuracies (``accuracies[label] = float``)."""
    fig, ax = subplots(figsize=(4.5, 3.2))
    labels = list(accuracies)
    bars = ax.bar(labels, [accuracies[k] for k in labels], color=["tab:blue", "tab:gray", "tab:orange"][: len(labels)])
    for b in bars:
        ax.annotate(f"{b.get_height():.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    save_figure(fig, path)


def plot_bias(results: Mapping[str, Mapping[str, float]], path, title: str = "Bias") -> None:
    """RB and AB side by side (``results[label] = {"rb": ..., "ab": ...}``)."""
    fig, ax = subplots(figsize=(5, 3.2))
    _grouped_bars(ax, ["RB", "AB"], {k: [v["rb"], v["ab"]] for k, v in results.items()}, fmt="{:.3f}")
    ax.set_ylabel("bias (lower is fairer)")
    ax.set_title(title)
    save_figure(fig, path)


def plot_association(results: Mapping[str, Mapping], classnames: Sequence[str], group_names: Sequence[str],
                     path) -> None:
    """P(prediction = concept | group) per group, one panel per model (``model_association_bias`` results)."""
    fig, axes = subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False, sharey=True)
    for ax, (label, res) in zip(axes[0], results.items()):
        rates = np.asarray(res["rates"])  # (m, 2, C): [k][s_k = 1] is rates[k, 1]
        series = {f"{g}": rates[k, 1] for k, g in enumerate(group_names)}
        _grouped_bars(ax, list(classnames), series, fmt="{:.2f}")
        ax.set_title(f"{label}: AB = {res['ab']:.3f}")
    axes[0][0].set_ylabel("P(matched to concept | group)")
    save_figure(fig, path)


def plot_group_accuracy(results: Mapping[str, Mapping], path, title: str = "Accuracy per group") -> None:
    """Per-group accuracy of each model (``results[label] = group_accuracy_gap(...)``)."""
    fig, ax = subplots(figsize=(5, 3.2))
    groups = list(next(iter(results.values()))["accuracy"])
    _grouped_bars(ax, groups, {f"{k} (gap {v['gap']:.3f})": [v["accuracy"][g] for g in groups]
                               for k, v in results.items()}, fmt="{:.3f}")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    save_figure(fig, path)
