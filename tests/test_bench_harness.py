"""The benchmarks' shared timer, CSV writer and plotter (benchmarks/_harness.py, plot.py).

Only behaviour is checked (call order, sample counts, what reaches the CSV and the PNG), never
a duration: timings are measured by the benchmarks themselves."""
import csv
import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import _harness  # noqa: E402
import plot  # noqa: E402


def test_rounds_are_interleaved_and_rotated_with_caps_and_untimed_setup():
    calls = []

    def impl(name):
        def fn(*args):
            calls.append((name, args))
            return name
        return fn

    setups = []

    def fresh():
        setups.append(len(calls))
        return ("buffer",)

    impls = {"a": impl("a"), "b": _harness.Case(impl("b"), setup=fresh), "c": _harness.Case(impl("c"), max_rounds=1)}
    times = _harness.time_interleaved(impls, rounds=3, warmup=1)
    names = [n for n, _ in calls]
    assert names[:3] == ["a", "b", "c"]                  # warm-up, once each
    assert names[3:] == ["a", "b", "c", "b", "a", "a", "b"]  # rounds rotated by one; c capped at one sample
    assert all(args == ("buffer",) for n, args in calls if n == "b")
    assert len(setups) == 4                              # before every call of b, warm-up included
    assert [times[n].samples for n in "abc"] == [3, 3, 1]
    for n in "abc":
        t = times[n]
        assert 0 <= t.q25 <= t.median <= t.q75 and t.output == n
        assert set(t.row()) == set(_harness.TIMING_FIELDS)


def test_max_seconds_stops_after_the_first_long_sample():
    n = []
    timing = _harness.time_interleaved({"slow": _harness.Case(lambda: n.append(1), max_seconds=-1.0)},
                                       rounds=5, warmup=0)["slow"]
    assert len(n) == 1 and timing.samples == 1 and timing.median == timing.q25 == timing.q75


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rounds"):
        _harness.time_interleaved({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="device"):
        _harness.time_interleaved({"a": lambda: None}, device="tpu")


def test_csv_then_png_from_the_csv(tmp_path):
    rows = [{"kind": "dense", "n": n, "method": m, "median_s": t, "q25_s": 0.9 * t, "q75_s": 1.1 * t, "samples": 3,
             "objective_rel_to_exact": rel, "status": "optimal"}
            for n in (1000, 10000) for m, t, rel in (("pym4-exact", 0.01, 0.0), ("cvxpy-clarabel", 1.0, float("nan")))]
    rows.append({"kind": "sparse", "n": 5, "method": "pym4-exact", "median_s": 1.0})  # filtered out by the spec
    path = _harness.write_csv(str(tmp_path / "m4_cpu.csv"), rows)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == 5 and back[1]["objective_rel_to_exact"] == "nan" and back[4]["status"] == ""
    assert plot.read_csv(path)[0]["n"] == 1000 and plot.read_csv(path)[0]["median_s"] == 0.01
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    png = plot.plot_csv(path)
    assert png == str(tmp_path / "m4_cpu.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot.main([path]) == 0


def test_plot_needs_a_known_benchmark_name(tmp_path):
    path = _harness.write_csv(str(tmp_path / "unknown_cpu.csv"), [{"x": 1}])
    with pytest.raises(ValueError, match="name must start with one of"):
        plot.plot_csv(path)
    assert plot.main([path]) == 1


def test_sinkhorn_benchmark_goes_on_past_a_failing_path(tmp_path, monkeypatch, capsys):
    # A GPU session has one run of the benchmark: a path that raises (a first run's bug) is
    # reported and dropped, and every other path's times and ratios still come out.
    import pym4
    import bench_sinkhorn

    real = pym4.sinkhorn

    def features_form_broken(*args, **kwargs):
        if kwargs.get("prototypes") is not None:
            raise RuntimeError("planted failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(pym4, "sinkhorn", features_form_broken)
    assert bench_sinkhorn.main(["--quick", "--no-pot", "--repeats", "2", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.count("pym4-features    FAILED: RuntimeError('planted failure')") == 2  # both quick shapes
    assert text.count("ratio SwAV B=256: swav-reference / pym4-") >= 2  # the scores paths' ratios
    assert "(matmul+pym4) / pym4-features" not in text
    with open(tmp_path / "sinkhorn.csv") as f:
        impls = {row["impl"] for row in csv.DictReader(f)}
    assert "pym4-cpu" in impls and "swav-reference" in impls and "pym4-features" not in impls
