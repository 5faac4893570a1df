"""`pym4 demo` end to end at the tiny size, its argument errors and missing extra, and the
synthetic biased dataset it trains on."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pym4 import cli
from pym4.demo import INSTALL_HINT, REQUIREMENTS
from pym4.demo.synthetic import CONCEPTS, Tokenizer, make_biased_captions

PLOTS = {"data_bias.png", "model_bias.png", "zero_shot.png", "recall.png", "association.png",
         "group_accuracy.png", "training.png", "samples.png"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `pym4 demo ARGS` in a fresh interpreter whose matplotlib backend is "svg", then says
# whether the run left that backend as it was and whether it ever imported pyplot.
_DEMO_IN_A_FRESH_PROCESS = """
import sys
import matplotlib
from pym4 import cli
rc = cli.main(sys.argv[1:])
print("PYPLOT_IMPORTED", "matplotlib.pyplot" in sys.modules)
print("BACKEND", matplotlib.rcParams["backend"])
sys.exit(rc)
"""


def _is_rate(v):
    return isinstance(v, float) and 0.0 <= v <= 1.0


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-c", _DEMO_IN_A_FRESH_PROCESS, "demo", "--out", str(out), "--size",
                           "tiny", "--no-progress"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MPLBACKEND": "svg"})
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout
    assert "unbalanced" in printed and "balanced" in printed and "zero-shot top-1" in printed
    # Plotting drew on the Agg canvas only: the user's backend is untouched, pyplot never loaded.
    assert "PYPLOT_IMPORTED False" in printed and "BACKEND svg" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["data"]) == {"unbalanced", "balanced"}
    assert set(summary["model"]) == {"unbalanced", "balanced"}
    for k in ("unbalanced", "balanced"):
        assert set(summary["data"][k]) == {"rb", "ab"}
        assert set(summary["model"][k]) == {"rb", "ab", "zero_shot_top1", "i2t_recall@5", "t2i_recall@5"}
        assert all(_is_rate(v) for v in summary["data"][k].values())
        assert all(_is_rate(v) for v in summary["model"][k].values())
    # M4 balances the training data: RB to ~0, AB to within its tolerance (4 * eps_assoc for 2 groups)
    assert summary["data"]["unbalanced"]["rb"] > 0.1 and summary["data"]["balanced"]["rb"] < 0.02
    assert summary["data"]["balanced"]["ab"] < summary["data"]["unbalanced"]["ab"]
    # The balanced model trains on the examples one draw with q keeps: about budget (0.3) * N.
    kept = summary["details"]["balanced_set"]
    assert abs(kept["examples"] - 0.3 * 1024) < 50 and kept["fraction"] == pytest.approx(kept["examples"] / 1024)
    assert f"balanced training set: the {kept['examples']} examples" in printed
    # Each of the six findings is printed once, with the verdict summary.json records for it;
    # the first (M4 removes the data's bias) must hold, as the numbers above show.
    findings = summary["findings"]
    assert len(findings) == 6 and all(isinstance(f["holds"], bool) for f in findings)
    lines = printed.splitlines()
    for f in findings:
        verdict = "[HOLDS]" if f["holds"] else "[DOES NOT HOLD]"
        assert sum(f["claim"] in line for line in lines) == 1, f["claim"]
        assert f"  {verdict} {f['claim']}: {f['detail']}" in lines, f["claim"]
    assert findings[0]["claim"].startswith("M4 removes") and findings[0]["holds"]
    assert set(os.listdir(out)) == PLOTS | {"summary.json"}  # no temp files left behind
    for p in PLOTS:
        assert (out / p).read_bytes()[:4] == b"\x89PNG"


def test_demo_swav_tiny(tmp_path):
    out = tmp_path / "swav"
    assert cli.main(["demo", "--swav", "--out", str(out), "--size", "tiny", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["linear_probe"]) == {"swav", "random_init"}
    assert all(_is_rate(v) for v in summary["linear_probe"].values())
    assert {"linear_probe.png", "swav_loss.png"} <= set(os.listdir(out))


@pytest.mark.parametrize("absent", [("matplotlib", "sklearn"), ("sklearn",)])
def test_demo_without_its_extra_says_which_to_install(absent, tmp_path, capsys, monkeypatch):
    # A None entry in sys.modules makes a package unimportable, as in a base install without it.
    for module in absent:
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "o"
    assert cli.main(["demo", "--out", str(out), "--size", "tiny", "--no-progress"]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    lines = printed.err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("pip install 'pym4[demo]'")
    for module, dist in REQUIREMENTS.items():
        assert (dist in lines[0]) == (module in absent)
    assert not out.exists()  # checked before any work


def test_demo_extra_carries_what_the_demo_checks():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["demo"]
    names = {req.split(">")[0].split("=")[0].split("<")[0].strip() for req in extra}
    assert names == set(REQUIREMENTS.values())
    assert INSTALL_HINT == "pip install 'pym4[demo]'"


def test_demo_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    assert cli.main(["demo", "--out", str(f), "--size", "tiny"]) == 2
    assert "--out" in capsys.readouterr().err
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("argv", [["demo", "--out", "x", "--bogus"], ["demo", "--out", "x", "--size", "huge"],
                                  ["demo", "--out", "x", "--budget", "0"], ["demo", "--out", "x", "--association", "2"],
                                  ["demo"]])
def test_demo_bad_arguments(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_demo_infeasible_budget_is_reported(tmp_path, capsys):
    # With association 1 every warm image shows a warm-favoured shape: no subset balances it.
    rc = cli.main(["demo", "--out", str(tmp_path / "o"), "--size", "tiny", "--association", "1", "--no-progress"])
    assert rc == 2
    assert "M4 could not balance" in capsys.readouterr().err


# ----- the synthetic biased dataset ----------------------------------------------------------

def _ab(s, y):
    # max_{k,r} |P(y_r | s_k=1) - P(y_r | s_k=0)|, written out for two one-hot groups
    return max(abs(y[s[:, k] == 1].mean(0) - y[s[:, k] == 0].mean(0)).max() for k in range(s.shape[1]))


@pytest.mark.parametrize("association", [0.0, 0.6, 1.0])
def test_synthetic_bias_is_controlled(association):
    d = make_biased_captions(20000, association=association, minority_share=0.3, noise=0.0, seed=0)
    s, y = d.s.astype(float), d.y.astype(float)
    assert s.sum(1).max() == 1 and y.sum(1).min() == 1
    assert s[:, 1].mean() == pytest.approx(0.3, abs=0.015)
    # favoured half of group k has P = (1 + a) / 2 over 4 concepts: AB = a / 4
    assert _ab(s, y) == pytest.approx(association / 4, abs=0.02)


def test_synthetic_captions_tokens_and_metadata():
    d = make_biased_captions(2000, mention_prob=0.25, neutral_share=0.1, seed=5)
    assert d.images.shape == (2000, 3, 16, 16) and d.images.dtype == torch.float32
    neutral = d.group == -1
    assert d.s[neutral].sum() == 0 and 0.07 < neutral.mean() < 0.13
    for i in range(50):
        words = d.captions[i].split()
        assert CONCEPTS[d.concept[i]] in words
        assert ("warm" in words or "cool" in words) == (not neutral[i] and
                                                        any(w in words for w in ("warm", "cool")))
        assert d.caption_class[i] == (d.concept[i] * 2 + d.size[i]) * 4 + d.position[i]
    mentioned = np.mean([("warm" in c.split() or "cool" in c.split()) for c in d.captions])
    assert 0.18 < mentioned < 0.27  # 0.25 of the 90% with a group
    tok = Tokenizer()
    ids = tok(["a large ring", "zebra"])
    inv = {v: k for k, v in tok.vocab.items()}
    assert [inv[int(i)] for i in ids[0, :3]] == ["a", "large", "ring"] and int(ids[0, 3]) == 0
    assert int(ids[1, 0]) == Tokenizer.UNK
    assert torch.equal(d.tokens, tok(d.captions))
    sub = d.subset(d.group == 1)
    assert len(sub) == int((d.group == 1).sum()) and (sub.s[:, 1] == 1).all()
    img, toks = d.get_batch(torch.tensor([3, 1]))
    assert torch.equal(img[1], d.images[1]) and torch.equal(toks[0], d.tokens[3])


def test_synthetic_colour_is_the_group():
    # Noise-free shape pixels are warm (red > blue) or cool (blue > red): the attribute is visible.
    d = make_biased_captions(200, noise=0.0, neutral_share=0.2, seed=6)
    fg = d.images.amax(dim=(2, 3))  # brightest value per channel ~ the shape's colour
    warm, cool, grey = d.group == 0, d.group == 1, d.group == -1
    assert bool((fg[warm, 0] > fg[warm, 2] + 0.4).all())
    assert bool((fg[cool, 2] > fg[cool, 0] + 0.4).all())
    assert bool(((fg[grey, 0] - fg[grey, 2]).abs() < 0.2).all())


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="association"):
        make_biased_captions(10, association=1.5)
    with pytest.raises(ValueError, match="n"):
        make_biased_captions(0)
    with pytest.raises(ValueError, match="image_size"):
        make_biased_captions(10, image_size=8)
    with pytest.raises(ValueError, match="noise"):
        make_biased_captions(10, noise=float("nan"))
    with pytest.raises(TypeError, match="texts"):
        Tokenizer()("a single string")
