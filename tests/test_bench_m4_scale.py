"""benchmarks/bench_m4_scale.py --quick runs end to end: the dataset written once into its
cache and reused, each mode of the local engine to the exact answer (the same duals as the
in-memory solve), cvxpy on the small dense instance, the CSV and the PNG. No duration is
asserted (benchmarks measure; tests check behaviour)."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

from pym4 import _backend

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_m4_scale.py")

pytestmark = pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core")


def _run(out):
    cmd = [sys.executable, BENCH, "--quick", "--n", "2000", "--shard-rows", "500", "--engines", "local",
           "--instances", "dense-c8,sparse", "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_quick_run_writes_csv_and_png(tmp_path):
    if importlib.util.find_spec("cvxpy") is None or importlib.util.find_spec("scipy") is None:
        pytest.skip("the benchmark compares with cvxpy (the bench extra)")
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote " + str(tmp_path / "m4_scale_data" / "dense-n2000-shard500") in done.stdout
    with open(tmp_path / "m4_scale.csv", newline="") as f:
        rows = {(r["instance"], r["method"]): r for r in csv.DictReader(f)}
    methods = {m for _, m in rows}
    assert methods == {"in-memory exact", "cvxpy-clarabel", "local compressed", "local passes"}
    assert ("sparse N=2e+03", "cvxpy-clarabel") not in rows  # cvxpy on the dense instance only
    for (inst, method), r in rows.items():
        assert r["status"] == "optimal", (inst, method, r["status"])
        if method.startswith("local"):
            assert float(r["max_abs_w_diff_in_memory"]) <= 1e-9
            assert int(r["passes"]) >= 1 and float(r["peak_rss_mb"]) > 0
            assert r["compressed"] == str(method == "local compressed")  # every table fits at N = 2000
    assert int(rows[("dense-c8 N=2e+03", "local compressed")]["passes"]) == 1  # counts: the table's one pass
    # vocabulary, counts, at least one step, report; ~1000 tags make p large enough for the
    # Hessian-free steps (one more pass per Hessian-vector product), hence no exact count
    assert 4 <= int(rows[("sparse N=2e+03", "local passes")]["passes"]) <= 40
    assert abs(float(rows[("dense-c8 N=2e+03", "cvxpy-clarabel")]["objective_rel_to_exact"])) < 1e-4
    if importlib.util.find_spec("matplotlib") is not None:
        with open(tmp_path / "m4_scale.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The cached dataset is reused, not written again.
    sys.path.insert(0, os.path.dirname(BENCH))
    try:
        import bench_m4_scale
    finally:
        sys.path.remove(os.path.dirname(BENCH))
    folder = str(tmp_path / "m4_scale_data" / "dense-n2000-shard500")
    stamp = os.stat(os.path.join(folder, "shard-00000.parquet")).st_mtime_ns
    assert bench_m4_scale.dataset(str(tmp_path / "m4_scale_data"), "dense", 2000, 500) == folder
    assert os.stat(os.path.join(folder, "shard-00000.parquet")).st_mtime_ns == stamp


def test_profile_times_every_stage(tmp_path):
    cmd = [sys.executable, BENCH, "--profile", "--quick", "--n", "8192", "--shard-rows", "4096", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "m4_scale_profile.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    stages = ["read+decode Parquet (1 thread)", "bool columns -> uint8 rows (core)",
              "m4_partial at solver state 0 (1 thread)", "local pass from Parquet (2 threads)",
              "local pass from its cache (2 threads)"]
    for name in stages:
        if "2 threads" in name:
            name = name.replace("2 threads", f"{os.cpu_count()} threads")
        assert name in rows, (name, sorted(rows))
        assert float(rows[name]["rows_per_s_pass"]) > 0 and float(rows[name]["cpu_ns_per_row"]) >= 0
    assert "the solve: " in done.stdout and "status optimal" in done.stdout
