"""benchmarks/bench_sinkhorn_load.py runs end to end with a busy process beside it; no
duration is asserted (benchmarks measure; tests check behaviour)."""
import csv
import importlib.util
import os
import subprocess

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "bench_sinkhorn_load.py")


def _load():
    spec = importlib.util.spec_from_file_location("_bench_sinkhorn_load_for_tests", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_for_every_load_and_shape_and_no_spinner_left(tmp_path, monkeypatch):
    bench = _load()
    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(bench.subprocess, "Popen", Recorded)
    assert bench.main(["--loads", "0", "1", "--solves", "3", "--out", str(tmp_path)]) == 0
    assert len(started) == 1 and started[0].poll() is not None  # the busy process ran and is gone
    with open(tmp_path / "sinkhorn_load.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["load"]), r["shape"]) for r in rows) == sorted(
        (load, label) for load in (0, 1) for label, *_ in bench.SHAPES)
    for r in rows:
        assert 0 < float(r["median_s"]) <= float(r["p90_s"])
        assert int(r["solves"]) == 3
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "sinkhorn_load.png").stat().st_size > 0


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _load().main(["--loads", "-1", "--out", str(tmp_path)])
    assert "--loads" in capsys.readouterr().err
