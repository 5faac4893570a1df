"""benchmarks/bench_m4.py runs end to end on a tiny instance; no duration is asserted
(benchmarks measure; tests check behaviour)."""
import csv
import os
import subprocess
import sys

import pytest

from pym4 import _backend

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_m4.py")

pytestmark = pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core")


def test_sparse_n_zero_skips_the_sparse_cases(tmp_path):
    """--sparse-n 0 means no sparse instance (it crashed with 's: no examples')."""
    cmd = [sys.executable, BENCH, "--sizes", "3000", "--sparse-n", "0", "--cvxpy-max", "0", "--numpy-max", "0",
           "--accuracy-n", "0", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "m4_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"dense"}
    assert {r["method"] for r in rows} == {"pym4-exact", "pym4-stream", "pym4-stream-pass", "pym4-stream-shuffled",
                                           "pym4-stream-core"}
    assert "RATIO stream throughput N=3,000" in done.stdout
