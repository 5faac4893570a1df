"""`pym4 demo` end to end at the tiny size, and its argument errors."""
import json
import os

import pytest

from pym4 import cli

PLOTS = {"data_bias.png", "model_bias.png", "zero_shot.png", "recall.png", "association.png",
         "group_accuracy.png", "training.png", "samples.png"}


def _is_rate(v):
    return isinstance(v, float) and 0.0 <= v <= 1.0


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--size", "tiny", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "unbalanced" in printed and "balanced" in printed and "zero-shot top-1" in printed
    assert "HOLDS" in printed  # each paper finding is stated as holding or not
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
    assert all(isinstance(f["holds"], bool) for f in summary["findings"])
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
