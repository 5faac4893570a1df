"""kill -9 of `pym4 balance` at random moments, on a few million rows (issue 11, item 2).

After every kill: the input's bytes are unchanged, and whatever output is there is whole and
consistent: a single-file OUTPUT's report (q.report.json) names the sha256 and the row count
of the table beside it, a dataset OUTPUT folder has all its parts and its report agrees with
them. After the rerun that follows, no temporary of the killed runs is left. The kills come
at random times over the run, and when the run starts writing (the moment a
kill used to leave a hidden temporary file and a report that described another table).
Each kill of a commit's own steps is in test_cli_commit.py.
"""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from pym4 import _backend, _io, cli  # noqa: E402

pytestmark = pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core")

ROWS = 2_000_000          # single-file input
SHARDS = [300_000, 250_000, 250_000, 200_000]  # dataset input: 1M rows in 4 files
COLS = ["--sensitive", "g0,g1", "--labels", "l0,l1,l2,l3", "--eps-assoc", "0.02", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The inputs, made once per session: big.parquet and shards/part-*.parquet."""
    folder = tmp_path_factory.mktemp("crash")
    rng = np.random.default_rng(0)
    g0, g1 = rng.random(ROWS) < 0.3, rng.random(ROWS) < 0.45
    cols = {"id": np.arange(ROWS), "g0": g0, "g1": g1, "u": rng.normal(scale=0.1, size=ROWS)}
    for r in range(4):
        cols[f"l{r}"] = rng.random(ROWS) < 0.2 + 0.15 * g0 - 0.1 * g1 + 0.05 * r
    table = pa.table(cols)
    pq.write_table(table, folder / "big.parquet", row_group_size=1 << 18)
    (folder / "shards").mkdir()
    start = 0
    for i, n in enumerate(SHARDS):
        pq.write_table(table.slice(start, n), folder / "shards" / f"part-{i}.parquet")
        start += n
    return folder


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(folder):
    return {name: digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def start(args):
    return subprocess.Popen([sys.executable, "-m", "pym4.cli", "balance", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(args, timeout=600):
    proc = start(args)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return err


def kill_when(proc, ready, extra_s):
    """kill -9 ``proc`` ``extra_s`` seconds after ``ready()`` first holds (polled every
    10 ms); (True if it was killed, False if it had finished first; its stderr)."""
    while proc.poll() is None and not ready():
        time.sleep(0.01)
    time.sleep(extra_s)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert killed or proc.returncode == 0, err
    return killed, err


def writing(folder, pid):
    """True once process ``pid`` has a temporary folder in ``folder``: it has started writing
    its output (the files it makes before, a probe and checkpoints, are files)."""
    prefix = f".pym4-{pid}-"
    return lambda: any(n.startswith(prefix) and os.path.isdir(os.path.join(folder, n)) for n in os.listdir(folder))


def after(seconds):
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0 >= seconds


def check_pair(folder, budget_of_report):
    """The single-file output: q.report.json, when there, describes q.parquet (sha256, rows,
    the mean of q); returns the budget the report was made with (None: no report)."""
    rep_path, table_path = os.path.join(folder, "q.report.json"), os.path.join(folder, "q.parquet")
    if not os.path.exists(rep_path):
        return None
    with open(rep_path) as f:
        rep = json.load(f)  # whole: a truncated JSON would not parse
    assert os.path.exists(table_path), "a report without its table"
    assert rep["output_sha256"] == digest(table_path), "the report describes another table"
    table = pq.read_table(table_path)
    assert rep["output_rows"] == table.num_rows == ROWS
    assert abs(float(np.mean(table.column("q").to_numpy())) - rep["kept_fraction"]) < 1e-9
    assert rep["budget"] in budget_of_report
    return rep["budget"]


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".pym4-") or n.endswith(".pym4-checkpoint.json")]


def test_kill_9_during_single_file_balance(data, tmp_path):
    src = data / "big.parquet"
    before = digest(src)
    out = tmp_path / "q.parquet"
    rng = random.Random(11)
    budgets = {}

    def args(run):  # each run its own budget: an old and a new table always differ
        budgets[run] = round(0.8 - 0.01 * run, 2)
        return [src, *COLS, "--budget", budgets[run], "--sample", "--out", out]

    # A first pair, that a killed run must leave whole or replace whole (made in this
    # process: a subprocess spends seconds importing torch before any work).
    assert cli.main(["balance", *map(str, args(0))]) == 0
    assert check_pair(tmp_path, budgets.values()) == budgets[0]
    kills, took = 0, None
    # Kills at random moments after the run starts writing, and at random times over the
    # run (scaled by how long the first run took to reach its writing).
    plan = [("write", 0.0, 0.0), ("time", 0.3, 1.1), ("write", 0.02, 0.6)]
    for run, (when, lo, hi) in enumerate(plan, start=1):
        t0 = time.monotonic()
        proc = start(args(run))
        if when == "time":
            ready, extra = after(rng.uniform(lo, hi) * took), 0.0
        else:
            ready, extra = writing(tmp_path, proc.pid), rng.uniform(lo, hi)
        killed, _ = kill_when(proc, ready, extra)
        kills += killed
        took = took or time.monotonic() - t0
        assert digest(src) == before
        check_pair(tmp_path, budgets.values())  # a report, when there, describes its table
        if run % 2 == 0:  # every other time: recover here as the next run would, then check all is whole
            _io.clean_stale(str(tmp_path))
            assert leftovers(tmp_path) == []
            assert check_pair(tmp_path, budgets.values()) is not None
    assert kills >= 2  # the write kills always land; the timed one when the run is not over yet
    finish(args(len(plan) + 1))  # the rerun: cleans what the last kill left, writes a whole pair
    assert check_pair(tmp_path, budgets.values()) == budgets[len(plan) + 1]
    assert sorted(os.listdir(tmp_path)) == ["q.parquet", "q.report.json", "q.report.png"]
    assert digest(src) == before


def check_folder(out):
    """A dataset OUTPUT folder: there whole (report, model, every part, counts that agree)."""
    if not os.path.exists(out):
        return None
    names = sorted(os.listdir(out))
    assert "_pym4_report.json" in names and "_pym4_model.json" in names, names
    with open(os.path.join(out, "_pym4_report.json")) as f:
        rep = json.load(f)
    parts = [n for n in names if n.endswith(".parquet")]
    assert len(parts) == rep["parts"] == len(SHARDS)
    table = pq.read_table(out)
    assert table.num_rows == rep["rows"] == sum(SHARDS)
    q = table.column("q").to_numpy()
    assert abs(float(np.mean(q)) - rep["kept_fraction"]) < 1e-9
    return q


def test_kill_9_during_dataset_balance(data, tmp_path):
    src = data / "shards"
    before = tree_digest(src)
    out = tmp_path / "balanced"
    checkpoint = str(out) + ".pym4-checkpoint.json"
    # A utility: no pattern table, so the solve is passes over the data, checkpointed.
    args = [src, *COLS, "--utility", "u", "--budget", "0.8", "--out", out]
    rng = random.Random(12)

    def passes_done(k):
        def ready():
            try:
                with open(checkpoint) as f:
                    return json.load(f)["passes"] >= k
            except (OSError, ValueError):
                return False
        return ready

    assert cli.main(["balance", *map(str, args)]) == 0  # in this process: no torch import to wait for
    reference = check_folder(out)
    assert reference is not None and leftovers(tmp_path) == []
    shutil.rmtree(out)
    kills, resumed, took = 0, 0, None
    plan = ["pass", "write", "time"]
    for when in plan:
        t0 = time.monotonic()
        proc = start(args)
        if when == "pass":
            ready, extra = passes_done(rng.randint(1, 4)), 0.0
        elif when == "write":
            ready, extra = writing(tmp_path, proc.pid), rng.uniform(0, 0.3)
        else:
            ready, extra = after(rng.uniform(0.2, 1.0) * took), 0.0
        killed, err = kill_when(proc, ready, extra)
        kills += killed
        took = took or time.monotonic() - t0
        resumed += "resuming from" in err
        assert tree_digest(src) == before
        q = check_folder(out)
        if q is not None:  # the run finished before the kill: a whole folder, no checkpoint
            np.testing.assert_array_equal(q, reference)
            assert not os.path.exists(checkpoint)
            shutil.rmtree(out)
    err = finish(args)  # the rerun: resumes after the last checkpointed pass, if any
    resumed += "resuming from" in err
    assert kills >= 2 and resumed >= 1
    np.testing.assert_array_equal(check_folder(out), reference)  # resumed or not, the same q
    assert sorted(os.listdir(tmp_path)) == ["balanced"], err
    assert tree_digest(src) == before


_RENAME_KILL = r"""
import os, signal, sys
import pym4.m4 as m4
src, out, when = sys.argv[1], sys.argv[2], sys.argv[3]
real = os.rename

def rename(a, b, *args, **kw):
    if b == out and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b, *args, **kw)
    if b == out and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename
m4.balance_dataset(src, out, sensitive=["g0", "g1"], labels=["l0"], utility="u", budget=0.8, eps_assoc=0.02,
                   progress=False)
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_9_at_the_rename_of_a_dataset_output(tmp_path, when):
    # Killed just after OUT was renamed into place, the run used to leave its checkpoint
    # beside a complete OUT for ever (a rerun refuses an existing OUT); just before, a rerun
    # must start afresh and remove the unfinished folder.
    rng = np.random.default_rng(5)
    n = 3000
    g0, g1 = rng.random(n) < 0.3, rng.random(n) < 0.45
    table = pa.table({"g0": g0, "g1": g1, "l0": rng.random(n) < 0.2 + 0.2 * g0, "u": rng.normal(size=n) * 0.1})
    (tmp_path / "d").mkdir()
    pq.write_table(table.slice(0, 1000), tmp_path / "d" / "a.parquet")
    pq.write_table(table.slice(1000), tmp_path / "d" / "b.parquet")
    out = str(tmp_path / "o")
    proc = subprocess.run([sys.executable, "-c", _RENAME_KILL, str(tmp_path / "d"), out, when],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not os.path.exists(out + ".pym4-checkpoint.json")
    if when == "after":
        assert check_folder_rows(out) == n and sorted(os.listdir(tmp_path)) == ["d", "o"]
        return
    assert not os.path.exists(out) and len(leftovers(tmp_path)) == 1  # the unfinished folder
    assert cli.main(["balance", str(tmp_path / "d"), "--sensitive", "g0,g1", "--labels", "l0", "--utility", "u",
                     "--budget", "0.8", "--eps-assoc", "0.02", "--no-progress", "--out", out]) == 0
    assert check_folder_rows(out) == n and sorted(os.listdir(tmp_path)) == ["d", "o"]


def check_folder_rows(out):
    with open(os.path.join(out, "_pym4_report.json")) as f:
        rep = json.load(f)
    assert rep["rows"] == pq.read_table(out).num_rows
    return rep["rows"]
