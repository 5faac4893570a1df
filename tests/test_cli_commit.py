"""pym4._io: files replaced together survive a kill -9 at every step of their commit, and
clean_stale removes exactly the leftovers of dead pym4 processes (issue 11, item 2)."""
import os
import subprocess
import sys

import pytest

from pym4 import _io

NAMES = ["t.parquet", "t.report.png", "t.report.json"]

# The child loads _io.py by path: `import pym4` would import torch, seconds per child.
_CHILD = r"""
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("pym4_io", {io!r})
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
folder, kill_at = sys.argv[1], int(sys.argv[2])
calls = [0]

def counted(f):
    def step(*a, **k):
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 just before this file operation
        calls[0] += 1
        return f(*a, **k)
    return step

with io.Staging(folder) as stage:
    for name in {names!r}:
        with open(stage.path(name), "w") as f:
            f.write("new " + name)
    os.replace, os.unlink, os.rmdir = counted(os.replace), counted(os.unlink), counted(os.rmdir)
    stage.commit({names!r})
print(calls[0])
"""


def contents(folder):
    out = {}
    for name in NAMES:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            with open(p) as f:
                out[name] = f.read()
    return out


def leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".pym4-")]


def run_child(folder, kill_at):
    code = _CHILD.format(io=_io.__file__, names=NAMES)
    return subprocess.run([sys.executable, "-c", code, str(folder), str(kill_at)], capture_output=True, text=True,
                          timeout=60)


def test_kill_at_every_step_of_a_commit(tmp_path):
    (tmp_path / "probe").mkdir()
    full = run_child(tmp_path / "probe", 10**6)  # no kill: counts the steps
    assert full.returncode == 0, full.stderr
    steps = int(full.stdout)  # file operations of one whole commit
    assert steps >= 5 and contents(tmp_path / "probe") == {n: "new " + n for n in NAMES}
    for kill_at in range(steps):
        folder = tmp_path / f"k{kill_at}"
        folder.mkdir()
        for name in NAMES:
            (folder / name).write_text("old " + name)
        proc = run_child(folder, kill_at)
        assert proc.returncode == -9, (kill_at, proc.stderr)
        seen = contents(folder)
        # Never a report beside another run's table: when the JSON is there, both are one run's.
        if "t.report.json" in seen:
            age = seen["t.report.json"].split()[0]
            assert seen["t.parquet"] == f"{age} t.parquet", (kill_at, seen)
        removed = _io.clean_stale(str(folder))  # what the next run does first
        assert len(removed) == 1 and leftovers(folder) == [], (kill_at, removed)
        after = contents(folder)
        ages = {v.split()[0] for v in after.values()}
        assert set(after) == set(NAMES) and len(ages) == 1, (kill_at, after)
        # Before the manifest is written the old files stay; after, the commit is finished.
        assert ages == ({"old"} if kill_at == 0 else {"new"}), (kill_at, after)


def test_clean_stale_removes_only_dead_runs_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = _io.temp_prefix().split("-")[2]
    other = "0123abcd" if host != "0123abcd" else "fedcba98"
    names = {
        f".pym4-{dead_pid}-{host}-abc.tmp": True,            # a dead run's file: removed
        f".pym4-{os.getpid()}-{host}-abc.tmp": False,        # this (live) process's: kept
        f".pym4-{dead_pid}-{other}-abc.tmp": False,          # a pid of another host: kept
        ".pym4-q1w2e3r4.tmp": False,                         # no pid in the name: not provably ours
        "data.parquet": False,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    staged = tmp_path / f".pym4-{dead_pid}-{host}-dir.tmp"  # a dead run's staging folder, not committed
    staged.mkdir()
    (staged / "t.parquet").write_text("partial")
    removed = _io.clean_stale(str(tmp_path))
    assert sorted(removed) == sorted([n for n, gone in names.items() if gone] + [staged.name])
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, gone in names.items() if not gone)


def test_staging_without_commit_changes_nothing(tmp_path):
    (tmp_path / "t.parquet").write_text("old")
    with pytest.raises(RuntimeError):
        with _io.Staging(str(tmp_path)) as stage:
            with open(stage.path("t.parquet"), "w") as f:
                f.write("new")
            raise RuntimeError("the table write failed")
    assert (tmp_path / "t.parquet").read_text() == "old" and os.listdir(tmp_path) == ["t.parquet"]
    with _io.Staging(str(tmp_path)) as stage, pytest.raises(ValueError, match="plain file name"):
        stage.path("../t.parquet")
    assert os.listdir(tmp_path) == ["t.parquet"]
