"""The two runs of ``pym4 demo``: the CLIP-the-Bias replay and the SwAV linear probe.

:func:`run_demo` (``pym4 demo``), on CPU:

1. build the synthetic image-caption data of :mod:`pym4.demo.synthetic`, in which a colour tone
   (the sensitive group) is over-represented and correlated with the shapes captions name;
2. measure the data's representation and association bias (RB, AB);
3. balance it with M4 (:func:`pym4.m4.balance`), then measure the balanced data's bias;
4. train the same tiny CLIP (or SigLIP) twice with pym4's loss, for the same number of steps:
   on the unbalanced data, and on the M4-balanced data set, the examples kept by one draw
   ``keep_i ~ Bernoulli(q_i)`` (about ``budget * N`` of them, as the paper subsamples its
   data; :func:`balanced_subset`), reshuffled each pass (``pym4.data.BalancedSampler``). So
   ``--budget`` sets how many distinct examples the balanced model sees;
5. evaluate both on a held-out test set in which group and shape are independent: zero-shot
   top-1 with prompt ensembles, recall@{1,5,10}, the model's AB (difference between groups in
   how often images are matched to each shape) and RB (how often grey, group-less images are
   matched to each colour's prompts), per-group accuracy gaps;
6. print a side-by-side table, state which of the paper's findings hold here, and write PNG
   plots (:mod:`pym4.demo.plots`) and ``summary.json``.

:func:`run_swav_demo` (``pym4 demo --swav``) trains SwAV (codes from :func:`pym4.sinkhorn`)
on scikit-learn's 8 x 8 digits and compares linear probes of the trained and randomly
initialised network.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import numpy as np
import torch

from .synthetic import CONCEPTS, GROUPS, make_biased_captions

__all__ = ["PRESETS", "balanced_subset", "run_demo", "run_swav_demo"]

# Problem sizes (``--size``): "tiny" is for tests (seconds), "small" for a quick look,
# "default" for `make demo`.
PRESETS: Dict[str, Dict[str, int]] = {
    "tiny": dict(n_train=1024, n_test=300, n_neutral=100, epochs=2, batch_size=128, swav_epochs=1),
    "small": dict(n_train=8000, n_test=1000, n_neutral=500, epochs=5, batch_size=256, swav_epochs=20),
    "default": dict(n_train=16000, n_test=2000, n_neutral=1000, epochs=6, batch_size=256, swav_epochs=50),
}

# Zero-shot prompts: one ensemble per shape, and one per colour tone (the sensitive group).
CONCEPT_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "there is a small {}",
                     "there is a large {}", "a {} at the top left", "a {} at the bottom right")
GROUP_TEMPLATES = ("a photo of a {} shape", "a picture of a {} thing", "a {} circle", "a {} ring", "a {} square",
                   "a {} diamond", "a {} cross", "a {} plus", "a {} triangle", "a {} wedge")


@dataclass
class DemoConfig:
    size: str = "default"
    loss: str = "clip"
    association: float = 0.6
    minority_share: float = 0.3
    noise: float = 0.3
    budget: float = 0.3
    target: float = 0.5
    seed: int = 0


def _check_config(cfg: DemoConfig) -> None:
    if cfg.size not in PRESETS:
        raise ValueError(f"size: expected one of {', '.join(PRESETS)}, got {cfg.size!r}")
    if cfg.loss not in ("clip", "siglip"):
        raise ValueError(f"loss: expected 'clip' or 'siglip', got {cfg.loss!r}")
    for name in ("association", "minority_share"):
        v = getattr(cfg, name)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1], got {v}")
    if not 0.0 < cfg.minority_share < 1.0:
        raise ValueError(f"minority_share: both groups must occur, got {cfg.minority_share}")
    if not 0.0 < cfg.budget <= 1.0:
        raise ValueError(f"budget: expected a number in (0, 1], got {cfg.budget}")
    if not 0.0 < cfg.target < 1.0:
        raise ValueError(f"target: expected a number in (0, 1), got {cfg.target}")
    if not 0.0 <= cfg.noise <= 2.0:
        raise ValueError(f"noise: expected a number in [0, 2], got {cfg.noise}")


def balanced_subset(q, seed: int = 0) -> np.ndarray:
    """The balanced training set of the demo: the sorted indices kept by one draw
    ``keep_i ~ Bernoulli(q_i)`` (:func:`pym4.m4.sample`), about ``sum q = budget * N`` of them.

    The paper balances data by subsampling it with M4's keep probabilities and trains on
    what is kept; drawing examples in proportion to q instead, N per epoch, would show the
    balanced model as many distinct examples whatever the budget.
    """
    from .. import m4

    kept = np.flatnonzero(m4.sample(np.asarray(q, dtype=np.float64), seed=seed))
    if kept.size == 0:
        raise ValueError("budget: the draw with M4's keep probabilities kept no example; raise the budget")
    return kept


def _prepare_out(out) -> str:
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out!r} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"out: directory {out!r} is not writable")
    return out


def _evaluate(model, test, neutral) -> Dict[str, object]:
    from .. import eval as ev
    from ..train import embed

    def encode_text(texts):
        return embed(model, tokens=test.tokenizer(texts))[1]

    concepts = ev.zero_shot_classifier(encode_text, CONCEPTS, CONCEPT_TEMPLATES)
    groups = ev.zero_shot_classifier(encode_text, GROUPS, GROUP_TEMPLATES)
    img, txt = embed(model, test.images, test.tokens)
    zs = ev.zero_shot_accuracy(img, concepts, test.concept, ks=(1, 3))
    recall = ev.retrieval_recall(img, txt, (1, 5, 10), image_class=test.caption_class, text_class=test.caption_class)
    ab = ev.model_association_bias(test.s, zs["predictions"], len(CONCEPTS))
    neutral_img, _ = embed(model, neutral.images)
    rb = ev.model_representation_bias(ev.zero_shot_predict(neutral_img, groups), len(GROUPS))
    gap = ev.group_accuracy_gap(zs["predictions"] == test.concept, test.group, GROUPS)
    return {"zero_shot": zs, "recall": recall, "ab": ab, "rb": rb, "group_gap": gap}


def _findings(data: Dict, model: Dict, details: Dict) -> List[Dict[str, object]]:
    """The paper's qualitative claims, each checked on this run."""
    u, b = model["unbalanced"], model["balanced"]
    du, db = data["unbalanced"], data["balanced"]
    dz = b["zero_shot_top1"] - u["zero_shot_top1"]
    out = [
        {"claim": "M4 removes the data's representation and association bias",
         "holds": bool(db["rb"] < du["rb"] and db["ab"] < du["ab"]),
         "detail": f"data RB {du['rb']:.3f} -> {db['rb']:.3f}, AB {du['ab']:.3f} -> {db['ab']:.3f}"},
        {"claim": "balancing lowers the model's association bias",
         "holds": bool(b["ab"] < u["ab"]),
         "detail": f"model AB {u['ab']:.3f} -> {b['ab']:.3f}"},
        {"claim": "balancing lowers the model's representation bias",
         "holds": bool(b["rb"] < u["rb"]),
         "detail": f"model RB {u['rb']:.3f} -> {b['rb']:.3f} (share of group-less images matched to each "
                   f"colour: {details['unbalanced']['rb_shares']} -> {details['balanced']['rb_shares']})"},
        {"claim": "zero-shot classification stays close or improves (paper: balancing tends to improve "
                  "classification); here: no drop larger than 0.03",
         "holds": bool(dz >= -0.03),
         "detail": f"zero-shot top-1 {u['zero_shot_top1']:.3f} -> {b['zero_shot_top1']:.3f} ({dz:+.3f})"},
        {"claim": "retrieval can suffer (paper: balancing can hurt retrieval); here: a recall@5 drops by more "
                  "than 0.01",
         "holds": bool(b["i2t_recall@5"] < u["i2t_recall@5"] - 0.01 or b["t2i_recall@5"] < u["t2i_recall@5"] - 0.01),
         "detail": f"i2t recall@5 {u['i2t_recall@5']:.3f} -> {b['i2t_recall@5']:.3f}, "
                   f"t2i recall@5 {u['t2i_recall@5']:.3f} -> {b['t2i_recall@5']:.3f}"},
        {"claim": "(SEER-style check, not a claim of the paper) the accuracy gap between groups does not widen",
         "holds": bool(details["balanced"]["group_accuracy_gap"] <= details["unbalanced"]["group_accuracy_gap"]),
         "detail": f"gap {details['unbalanced']['group_accuracy_gap']:.3f} -> "
                   f"{details['balanced']['group_accuracy_gap']:.3f}"},
    ]
    return out


@contextlib.contextmanager
def _one_thread():
    """Run torch on one intra-op thread, then restore the setting.

    The demo's networks are tiny (8 x 8 and 16 x 16 inputs): their ops are too small to gain
    from intra-op threads, and on a shared 2-core machine one thread is several times faster.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _table(rows: List[tuple], header=("", "unbalanced", "balanced")) -> str:
    w0 = max(len(r[0]) for r in rows + [header])
    lines = [f"{header[0]:<{w0}}  {header[1]:>12}  {header[2]:>12}", "-" * (w0 + 28)]
    for name, a, b in rows:
        fa = a if isinstance(a, str) else f"{a:.3f}"
        fb = b if isinstance(b, str) else f"{b:.3f}"
        lines.append(f"{name:<{w0}}  {fa:>12}  {fb:>12}")
    return "\n".join(lines)


def run_demo(out, *, size: str = "default", loss: str = "clip", association: float = 0.6,
             minority_share: float = 0.3, noise: float = 0.3, budget: float = 0.3, target: float = 0.5,
             seed: int = 0, progress: bool = True, echo: Callable[[str], None] = print) -> Dict[str, object]:
    """Run the main job and write its outputs to ``out``; return the summary dict.

    ``out/summary.json`` has the schema ``{"data": {"unbalanced": {"rb", "ab"}, "balanced":
    {"rb", "ab"}}, "model": {"unbalanced": {"rb", "ab", "zero_shot_top1", "i2t_recall@5",
    "t2i_recall@5"}, "balanced": {...}}}`` plus ``findings`` (each paper claim, whether it
    holds here), ``details`` (more metrics, timings, and ``balanced_set``: the number, fraction
    and data RB/AB of the kept examples the balanced model trains on) and ``config``. Plots: ``data_bias.png``,
    ``model_bias.png``, ``zero_shot.png``, ``recall.png``, ``association.png``,
    ``group_accuracy.png``, ``training.png``, ``samples.png``.
    """
    from .. import eval as ev
    from .. import m4
    from ..data import BalancedSampler
    from ..train import ContrastiveConfig, TwoTower, train_contrastive
    from .networks import ImageTower, TextTower
    from .plots import write_demo_plots

    cfg = DemoConfig(size=size, loss=loss, association=association, minority_share=minority_share, noise=noise,
                     budget=budget, target=target, seed=seed)
    _check_config(cfg)
    out = _prepare_out(out)
    p = PRESETS[size]
    t_start = time.perf_counter()

    echo(f"pym4 demo: {p['n_train']} biased image-caption pairs ({GROUPS[1]} share {minority_share:.2f}, "
         f"association {association:.2f}), {loss.upper()}, {p['epochs']} epochs per model")
    train = make_biased_captions(p["n_train"], association=association, minority_share=minority_share,
                                 noise=noise, seed=seed)
    # The test set has equal groups and no association: any association in the model's
    # predictions comes from what it learnt, not from the test data.
    test = make_biased_captions(p["n_test"], association=0.0, minority_share=0.5, noise=noise, seed=seed + 1)
    neutral = make_biased_captions(p["n_neutral"], neutral_share=1.0, noise=noise, seed=seed + 2)

    with warnings.catch_warnings():  # a non-optimal status is turned into a clear error below
        warnings.filterwarnings("ignore", message="pym4.m4.balance: ", category=RuntimeWarning)
        res = m4.balance(train.s, train.y, target=target, budget=budget, group_names=list(GROUPS),
                         label_names=list(CONCEPTS))
    if res.status != "optimal":
        raise ValueError(f"budget: M4 could not balance the data ({res.status}): {res.message}")
    q = np.asarray(res.q, dtype=np.float64)
    data = {"unbalanced": {"rb": float(m4.representation_bias(train.s, target=target)),
                           "ab": float(m4.association_bias(train.s, train.y))},
            "balanced": {"rb": float(m4.representation_bias(train.s, weights=q, target=target)),
                         "ab": float(m4.association_bias(train.s, train.y, weights=q))}}
    echo(f"M4: kept fraction {q.mean():.3f} (budget {budget}); data RB {data['unbalanced']['rb']:.3f} -> "
         f"{data['balanced']['rb']:.3f}, AB {data['unbalanced']['ab']:.3f} -> {data['balanced']['ab']:.3f}")

    tcfg = ContrastiveConfig(epochs=p["epochs"], batch_size=p["batch_size"], seed=seed)
    steps = max(1, len(train) // min(tcfg.batch_size, len(train)))
    kept = balanced_subset(q, seed=seed)
    keep = np.zeros(len(train), dtype=np.float64)
    keep[kept] = 1.0
    subset = {"examples": int(kept.size), "fraction": kept.size / len(train),
              "rb": float(m4.representation_bias(train.s, weights=keep, target=target)),
              "ab": float(m4.association_bias(train.s, train.y, weights=keep))}
    echo(f"balanced training set: the {kept.size} examples ({subset['fraction']:.1%}) kept by one draw with M4's "
         f"keep probabilities (budget {budget}), data RB {subset['rb']:.3f}, AB {subset['ab']:.3f}; both models "
         f"train {tcfg.epochs * steps} steps, so the balanced one sees each kept example "
         f"~{tcfg.epochs * steps * min(tcfg.batch_size, len(train)) / kept.size:.1f} times")
    histories, evals, times = {}, {}, {}
    for name in ("unbalanced", "balanced"):
        torch.manual_seed(seed)
        model = TwoTower(ImageTower(64, 32, train.images.shape[-1]), TextTower(train.tokenizer.vocab_size, 64),
                         loss=loss)
        # Same number of steps on both; the balanced run passes over the kept examples,
        # reshuffled each time (q is 0/1 here: every pass yields all of them).
        sampler = None if name == "unbalanced" else BalancedSampler(keep, mode="bernoulli", seed=seed)
        t0 = time.perf_counter()
        with _one_thread():
            histories[name] = train_contrastive(model, train, ContrastiveConfig(**{**asdict(tcfg), "steps_per_epoch": steps}),
                                                sampler=sampler, progress=progress, desc=f"{loss.upper()} {name}")
        times[name] = time.perf_counter() - t0
        evals[name] = _evaluate(model, test, neutral)

    model = {k: {"rb": e["rb"]["rb"], "ab": e["ab"]["ab"], "zero_shot_top1": e["zero_shot"]["top1"],
                 "i2t_recall@5": e["recall"]["i2t_recall@5"], "t2i_recall@5": e["recall"]["t2i_recall@5"]}
             for k, e in evals.items()}
    details = {k: {"zero_shot_top3": e["zero_shot"]["top3"],
                   **{kk: vv for kk, vv in e["recall"].items()},
                   "rb_shares": [round(v, 4) for v in e["rb"]["shares"]],
                   "ab_worst": {"group": GROUPS[e["ab"]["worst"][0]], "concept": CONCEPTS[e["ab"]["worst"][1]]},
                   "group_accuracy": e["group_gap"]["accuracy"], "group_accuracy_gap": e["group_gap"]["gap"],
                   "final_loss": histories[k]["loss"][-1], "logit_scale": histories[k]["logit_scale"][-1],
                   "train_seconds": times[k]} for k, e in evals.items()}
    details["m4"] = res.summary()
    details["balanced_set"] = subset
    findings = _findings(data, model, details)

    rows = [("data RB", data["unbalanced"]["rb"], data["balanced"]["rb"]),
            ("data AB", data["unbalanced"]["ab"], data["balanced"]["ab"]),
            ("model RB (group-less images)", model["unbalanced"]["rb"], model["balanced"]["rb"]),
            ("model AB (zero-shot, test set)", model["unbalanced"]["ab"], model["balanced"]["ab"]),
            ("zero-shot top-1", model["unbalanced"]["zero_shot_top1"], model["balanced"]["zero_shot_top1"])]
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            rows.append((f"{d} recall@{k}", details["unbalanced"][f"{d}_recall@{k}"], details["balanced"][f"{d}_recall@{k}"]))
    rows += [("accuracy gap between groups", details["unbalanced"]["group_accuracy_gap"],
              details["balanced"]["group_accuracy_gap"]),
             ("training time (s)", f"{times['unbalanced']:.1f}", f"{times['balanced']:.1f}")]
    echo("")
    echo(_table(rows))
    echo("")
    echo("The paper's findings on this run:")
    for f in findings:
        mark = "HOLDS" if f["holds"] else "DOES NOT HOLD"
        echo(f"  [{mark}] {f['claim']}: {f['detail']}")

    plots = write_demo_plots(out, data, model, evals, histories, train, loss)

    summary = {"data": data, "model": model, "findings": findings, "details": details,
               "config": {**asdict(cfg), **p, "wall_seconds": time.perf_counter() - t_start}}
    ev.write_json(os.path.join(out, "summary.json"), summary)
    echo(f"\nwrote {os.path.join(out, 'summary.json')} and {len(plots)} plots in {time.perf_counter() - t_start:.0f} s")
    return summary


def run_swav_demo(out, *, size: str = "default", seed: int = 0, progress: bool = True,
                  echo: Callable[[str], None] = print) -> Dict[str, object]:
    """Train SwAV on scikit-learn's digits; linear probes of the trained vs the randomly
    initialised network (same architecture and initial weights).

    Writes ``out/summary.json`` as ``{"linear_probe": {"swav", "random_init"}}`` (plus
    ``config`` and ``details``) and ``linear_probe.png``, ``swav_loss.png``.
    """
    from sklearn.model_selection import train_test_split

    from .. import eval as ev
    from ..train import SwAVConfig, train_swav
    from .digits import load_digits
    from .networks import DigitsNet
    from .plots import write_swav_plots

    if size not in PRESETS:
        raise ValueError(f"size: expected one of {', '.join(PRESETS)}, got {size!r}")
    out = _prepare_out(out)
    t_start = time.perf_counter()
    x, y = load_digits()
    # The probe's labels are split once (stratified); SwAV itself never sees a label.
    tr, te = train_test_split(np.arange(len(y)), test_size=0.5, random_state=seed, stratify=y)
    torch.manual_seed(seed)
    net = DigitsNet()
    random_net = copy.deepcopy(net).eval()
    cfg = SwAVConfig(epochs=PRESETS[size]["swav_epochs"], seed=seed)
    echo(f"pym4 demo --swav: SwAV on {len(y)} digits (8x8), {cfg.epochs} epochs, {cfg.n_prototypes} prototypes, "
         f"{cfg.n_global}+{cfg.n_local} crops")
    t0 = time.perf_counter()
    with _one_thread():
        result = train_swav(net, x, cfg, progress=progress)
    train_seconds = time.perf_counter() - t0

    def probe(m):
        with torch.no_grad():
            f = m.eval()(x)
        return ev.linear_probe(f[tr], y[tr], f[te], y[te])["accuracy"]

    acc = {"swav": probe(net), "random_init": probe(random_net)}
    echo("")
    echo(_table([("linear probe accuracy (digits test half)", acc["random_init"], acc["swav"])],
                header=("", "random init", "SwAV")))
    verdict = "beats" if acc["swav"] > acc["random_init"] else "does NOT beat"
    echo(f"SwAV {verdict} random initialisation by {acc['swav'] - acc['random_init']:+.3f}")
    plots = write_swav_plots(out, acc, result["loss"])
    summary = {"linear_probe": acc,
               "details": {"train_seconds": train_seconds, "final_loss": result["loss"][-1],
                           "n_probe_train": int(len(tr)), "n_probe_test": int(len(te))},
               "config": {"size": size, "seed": seed, **{k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in asdict(cfg).items()},
                          "wall_seconds": time.perf_counter() - t_start}}
    ev.write_json(os.path.join(out, "summary.json"), summary)
    echo(f"\nwrote {os.path.join(out, 'summary.json')} and {len(plots)} plots in {time.perf_counter() - t_start:.0f} s")
    return summary
