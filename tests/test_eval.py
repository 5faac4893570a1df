"""Evaluation metrics against values computed by hand on tiny inputs, and the plot/JSON writers."""
import json
import math
import os

import numpy as np
import pytest
import torch

from pym4 import eval as ev

R2 = 1 / math.sqrt(2)
# Three images and three captions (caption i belongs to image i). Cosine similarities:
#   image 0 = (1,0):  t0 0, t1 1, t2 .71   -> its caption t0 ranks 3rd
#   image 1 = (0,1):  t0 1, t1 0, t2 .71   -> t1 ranks 3rd
#   image 2 = (1,1):  t2 1                 -> t2 ranks 1st
IMAGES = np.array([[1.0, 0.0], [0.0, 1.0], [R2, R2]], dtype=np.float32)
TEXTS = np.array([[0.0, 1.0], [1.0, 0.0], [R2, R2]], dtype=np.float32)


def test_recall_one_caption_per_image():
    r = ev.retrieval_recall(IMAGES, TEXTS, ks=(1, 2, 3))
    assert r == pytest.approx({"i2t_recall@1": 1 / 3, "i2t_recall@2": 1 / 3, "i2t_recall@3": 1.0,
                               "t2i_recall@1": 1 / 3, "t2i_recall@2": 1 / 3, "t2i_recall@3": 1.0})


def test_recall_is_scale_invariant_and_caps_k():
    # Features are L2-normalised inside; K beyond the gallery size means the whole gallery.
    r = ev.retrieval_recall(torch.from_numpy(IMAGES) * 5.0, torch.from_numpy(TEXTS) * 0.1, ks=(1, 10))
    assert r == pytest.approx({"i2t_recall@1": 1 / 3, "i2t_recall@10": 1.0, "t2i_recall@1": 1 / 3,
                               "t2i_recall@10": 1.0})


def test_recall_with_classes():
    # image classes [0, 0, 1], text classes [0, 1, 1]; relevance = equal class.
    # i2t: image 0 ranks t1(c1), t2(c1), t0(c0) -> hit at 3; image 1 -> t0(c0) at 1; image 2 -> t2(c1) at 1.
    # t2i: text 0 -> i1(c0) at 1; text 1 = (1,0) ranks i0(c0), i2(c1) -> hit at 2; text 2 -> i2 at 1.
    r = ev.retrieval_recall(IMAGES, TEXTS, ks=(1, 2, 3), image_class=[0, 0, 1], text_class=[0, 1, 1])
    assert r == pytest.approx({"i2t_recall@1": 2 / 3, "i2t_recall@2": 2 / 3, "i2t_recall@3": 1.0,
                               "t2i_recall@1": 2 / 3, "t2i_recall@2": 1.0, "t2i_recall@3": 1.0})


def test_recall_bad_input():
    with pytest.raises(ValueError, match="text_features"):
        ev.retrieval_recall(IMAGES, TEXTS[:2])
    with pytest.raises(ValueError, match="image_class, text_class"):
        ev.retrieval_recall(IMAGES, TEXTS, image_class=[0, 0, 1])
    bad = IMAGES.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="image_features: contains NaN"):
        ev.retrieval_recall(bad, TEXTS)
    with pytest.raises(ValueError, match="text_features"):
        ev.retrieval_recall(IMAGES, np.ones((3, 3), np.float32))


def _fake_encoder(table):
    def encode(texts):
        return torch.tensor([table[t] for t in texts], dtype=torch.float32)
    return encode


def test_zero_shot_classifier_prompt_ensemble():
    # class "a": prompts (2,0,0) and (0,1,0) -> normalised (1,0,0), (0,1,0) -> mean (.5,.5,0) -> (.71,.71,0)
    # class "b": prompts (0,0,3) and (0,0,1) -> (0,0,1)
    enc = _fake_encoder({"x a": [2, 0, 0], "y a": [0, 1, 0], "x b": [0, 0, 3], "y b": [0, 0, 1]})
    w = ev.zero_shot_classifier(enc, ["a", "b"], ["x {}", "y {}"])
    assert torch.allclose(w, torch.tensor([[R2, R2, 0.0], [0.0, 0.0, 1.0]]), atol=1e-6)


def test_zero_shot_accuracy_by_hand():
    w = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    # image 0 -> class 0 (label 0, hit); image 1 -> class 2 then 1 (label 1: miss at top-1, hit at top-2);
    # image 2 -> class 2 (label 2, hit); image 3 -> class 0 then 1 (label 2: miss at top-1 and top-2).
    x = np.array([[1, 0.1, 0], [0, 0.5, 1], [0, 0, 2], [1, 0.5, 0]], dtype=np.float32)
    r = ev.zero_shot_accuracy(x, w, np.array([0, 1, 2, 2]), ks=(1, 2))
    assert r["top1"] == pytest.approx(0.5)
    assert r["top2"] == pytest.approx(0.75)
    assert r["per_class"] == pytest.approx([1.0, 0.0, 0.5])
    assert list(r["predictions"]) == [0, 2, 2, 0]


def test_zero_shot_bad_input():
    w = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        ev.zero_shot_accuracy(np.eye(3, dtype=np.float32), w, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="templates"):
        ev.zero_shot_classifier(_fake_encoder({}), ["a"], ["no placeholder"])
    with pytest.raises(ValueError, match="classifier"):
        ev.zero_shot_predict(np.eye(3, dtype=np.float32), np.eye(2, dtype=np.float32))


def test_model_representation_bias_by_hand():
    r = ev.model_representation_bias(np.array([0, 0, 0, 1]), 2)
    assert r["shares"] == pytest.approx([0.75, 0.25])
    assert r["rb"] == pytest.approx(0.25)
    r = ev.model_representation_bias(torch.tensor([0, 0, 0, 1]), 2, target=[0.7, 0.3])
    assert r["rb"] == pytest.approx(0.05)
    # three groups, group 2 never predicted: |0 - 1/3| is the largest deviation
    r = ev.model_representation_bias([0, 1, 0, 1], 3)
    assert r["rb"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="group_predictions"):
        ev.model_representation_bias([0, 2], 2)
    with pytest.raises(ValueError, match="n_groups"):
        ev.model_representation_bias([0, 1], 1)


def test_model_association_bias_by_hand():
    # groups: rows 0,1 warm; rows 2,3 cool; row 4 no group (s_k = 0 for both k).
    s = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]])
    pred = np.array([0, 0, 0, 1, 1])
    # k=0: P(pred=0 | warm) = 1, P(pred=0 | not warm) = 1/3 -> 2/3; pred=1: 0 vs 2/3 -> 2/3
    # k=1: P(pred=0 | cool) = 1/2, P(pred=0 | not cool) = 2/3 -> 1/6
    r = ev.model_association_bias(s, pred, 2)
    assert r["ab"] == pytest.approx(2 / 3)
    assert r["worst"][0] == 0
    rates = np.asarray(r["rates"])
    assert rates[1, 1] == pytest.approx([0.5, 0.5])
    assert rates[1, 0] == pytest.approx([2 / 3, 1 / 3])
    # a model whose predictions do not depend on the group has no association bias
    r = ev.model_association_bias(s[:4], np.array([0, 1, 0, 1]), 2)
    assert r["ab"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="s: expected 0/1"):
        ev.model_association_bias(s * 2, pred, 2)
    with pytest.raises(ValueError, match="predictions"):
        ev.model_association_bias(s, pred[:3], 2)


def test_group_accuracy_gap_by_hand():
    r = ev.group_accuracy_gap(np.array([1, 1, 0, 1, 0, 0], bool), np.array([0, 0, 0, 1, 1, -1]), ["warm", "cool"])
    assert r["accuracy"] == pytest.approx({"warm": 2 / 3, "cool": 0.5})
    assert r["count"] == {"warm": 3, "cool": 2}
    assert r["gap"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="groups"):
        ev.group_accuracy_gap(np.ones(3, bool), np.zeros(2, np.int64))


def test_linear_probe_separable_and_uninformative():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    centres = np.array([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    x = centres[y] + rng.normal(0, 0.3, (120, 2))
    r = ev.linear_probe(x[::2], y[::2], x[1::2], y[1::2])
    assert r["accuracy"] == 1.0
    # Constant features carry nothing: the probe can only predict the majority class of training.
    ytr = np.array([0] * 6 + [1] * 4)
    yte = np.array([0, 1, 1, 1])
    r = ev.linear_probe(np.ones((10, 3)), ytr, np.ones((4, 3)), yte)
    assert r["accuracy"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="test_features"):
        ev.linear_probe(x, y, x[:, :1], y)
    with pytest.raises(ValueError, match="train_labels"):
        ev.linear_probe(x, np.zeros(120, np.int64), x, y)


def test_arguments_refused_with_their_names():
    """Each was accepted and gave a wrong or unexplained result: a str of classnames read
    letter by letter, ks=5 a numpy TypeError, ks=(1.5,) truncated to 1, a target of the wrong
    length a broadcasting error, n_classes=0 blamed on the predictions, correct=0.7 averaged,
    repeated group names merged, max_iter passed on to scikit-learn."""
    w, x = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    enc = _fake_encoder({"x a": [1, 0], "x b": [0, 1]})
    cases = [
        (lambda: ev.zero_shot_classifier(enc, "ab", ["x {}"]), TypeError, "classnames: expected a sequence of class names"),
        (lambda: ev.zero_shot_classifier(enc, ["a"], "x {}"), TypeError, "templates: expected a sequence"),
        (lambda: ev.zero_shot_classifier(enc, [], ["x {}"]), ValueError, "classnames: is empty"),
        (lambda: ev.zero_shot_accuracy(x, w, np.arange(3), ks=(1.5,)), ValueError, r"ks: expected positive integers, got 1\.5"),
        (lambda: ev.zero_shot_accuracy(x, w, np.arange(3), ks=(0, 1)), ValueError, "ks: expected positive integers, got 0"),
        (lambda: ev.zero_shot_accuracy(x, w, np.arange(3), ks=()), ValueError, "ks: expected at least one"),
        (lambda: ev.retrieval_recall(IMAGES, TEXTS, ks="5"), TypeError, "ks: expected an integer or a sequence"),
        (lambda: ev.model_representation_bias([0, 1], 2, target=[0.5, 0.3, 0.2]), ValueError,
         r"target: expected a scalar or 2 shares \(one per group\), got shape \(3,\)"),
        (lambda: ev.model_representation_bias([0, 1], 2, target=float("nan")), ValueError, "target: expected shares in"),
        (lambda: ev.model_association_bias(np.eye(2), [0, 0], 0), ValueError, "n_classes: expected an integer >= 1, got 0"),
        (lambda: ev.group_accuracy_gap(np.array([0.7, 1.0]), np.array([0, 1])), ValueError,
         "correct: expected a bool .* values other than 0 and 1"),
        (lambda: ev.group_accuracy_gap(np.array([1, 0], bool), np.array([0, 1]), ["a", "a"]), ValueError,
         "group_names: a name is repeated"),
        (lambda: ev.linear_probe(x, np.arange(3), x, np.arange(3), max_iter=0), ValueError,
         "max_iter: must be an integer >= 1, got 0"),
        (lambda: ev.linear_probe(x, np.arange(3), x, np.arange(3), C=float("inf")), ValueError, "C: must be a finite"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    # ks as one integer is the one cut-off
    r = ev.zero_shot_accuracy(x, w, np.arange(3), ks=2)
    assert r["top2"] == 1.0 and "top1" not in r


def test_write_json_atomic(tmp_path):
    path = tmp_path / "summary.json"
    ev.write_json(path, {"a": 1.5})
    assert json.loads(path.read_text()) == {"a": 1.5}
    with pytest.raises(ValueError):
        ev.write_json(path, {"a": float("nan")})  # invalid JSON is never written
    assert json.loads(path.read_text()) == {"a": 1.5}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_plots_are_png(tmp_path):
    zs = ev.zero_shot_accuracy(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), np.array([0, 1]))
    rec = ev.retrieval_recall(IMAGES, TEXTS)
    ab = ev.model_association_bias(np.array([[1, 0], [0, 1]]), np.array([0, 1]), 2)
    gap = ev.group_accuracy_gap(np.array([True, False]), np.array([0, 1]), ["warm", "cool"])
    ev.plot_zero_shot({"m": zs}, ["a", "b"], tmp_path / "zs.png")
    ev.plot_recall({"m": rec, "n": rec}, tmp_path / "recall.png")
    ev.plot_linear_probe({"random": 0.5, "swav": 0.9}, tmp_path / "probe.png")
    ev.plot_bias({"before": {"rb": 0.2, "ab": 0.1}, "after": {"rb": 0.0, "ab": 0.04}}, tmp_path / "bias.png")
    ev.plot_association({"m": ab}, ["a", "b"], ["warm", "cool"], tmp_path / "assoc.png")
    ev.plot_group_accuracy({"m": gap}, tmp_path / "gap.png")
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["zs.png", "recall.png", "probe.png", "bias.png", "assoc.png", "gap.png"])
    for n in names:
        assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subplots_bypass_pyplot_and_save_figure_closes_only_its_figures(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    open_before = plt.get_fignums()
    fig, axes = ev.subplots(1, 2, figsize=(4, 2))
    assert len(axes) == 2 and plt.get_fignums() == open_before  # never registered with pyplot
    axes[0].plot([0, 1], [1, 0])
    ev.save_figure(fig, tmp_path / "canvas.png")
    user_fig = plt.figure()  # a figure the caller made with pyplot is closed once saved, as before
    assert len(plt.get_fignums()) == len(open_before) + 1
    ev.save_figure(user_fig, tmp_path / "pyplot.png")
    assert plt.get_fignums() == open_before
    for n in ("canvas.png", "pyplot.png"):
        assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
