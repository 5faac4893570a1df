"""`pym4 balance` and `pym4 info` under hostile but fair use (issue 11, items 2, 3, 8, 12):
ambiguous column names, arguments checked before any data is read, read-only and
directory outputs, --batch-rows on CSV, a closed stdout pipe, and the table and its report
replaced together."""
import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pacsv = pytest.importorskip("pyarrow.csv")

from pym4 import _backend, cli  # noqa: E402

pytestmark = pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core")

ARGS = ["--sensitive", "g", "--labels", "l", "--budget", "0.8", "--eps-rep", "0.02", "--eps-assoc", "0.05",
        "--no-progress"]


def columns(n=400, seed=0):
    rng = np.random.default_rng(seed)
    g = (rng.random(n) < 0.3).astype(np.int64)
    lab = (rng.random(n) < 0.2 + 0.3 * g).astype(np.int64)
    return g, lab


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def listing(folder):
    return sorted(os.listdir(folder))


# ----- item 3: duplicate column names ---------------------------------------------------------

@pytest.mark.parametrize("order", [("g", "g", "l"), ("g", "l", "g")])
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_duplicate_column_names_are_refused(tmp_path, capsys, order, fmt):
    g, lab = columns()
    arrays = {"g": g, "l": lab}
    data = [arrays[c] if i == order.index(c) else 1 - arrays[c] for i, c in enumerate(order)]
    table = pa.Table.from_arrays([pa.array(a) for a in data], names=list(order))
    src = tmp_path / f"dup.{fmt}"
    (pq.write_table if fmt == "parquet" else pacsv.write_csv)(table, src)
    rc = cli.main(["balance", str(src), *ARGS, "--out", str(tmp_path / "q.parquet")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("pym4: error: ") and str(src) in err
    assert "column 'g' appears 2 times; it is ambiguous" in err
    assert listing(tmp_path) == [f"dup.{fmt}"]


def test_duplicate_column_in_one_shard_of_a_dataset(tmp_path, capsys):
    g, lab = columns()
    os.makedirs(tmp_path / "d")
    pq.write_table(pa.table({"g": g[:200], "l": lab[:200]}), tmp_path / "d" / "a.parquet")
    pq.write_table(pa.Table.from_arrays([pa.array(g[200:]), pa.array(lab[200:]), pa.array(g[200:])],
                                        names=["g", "l", "g"]), tmp_path / "d" / "b.parquet")
    rc = cli.main(["balance", str(tmp_path / "d"), *ARGS, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "b.parquet" in err and "'g'" in err and "ambiguous" in err, err
    assert listing(tmp_path) == ["d"]


# ----- item 8: every argument checked before the data is read --------------------------------

@pytest.fixture
def data(tmp_path):
    g, lab = columns()
    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"g": g, "l": lab, "u": np.zeros(len(g))}), src)
    return src


@pytest.mark.parametrize("extra,match", [
    (["--sample", "--seed", "-1"], "--seed: expected an integer >= 0, got '-1'"),
    (["--batch-rows", "0"], "--batch-rows: expected an integer in [1, 2147483647], got '0'"),
    (["--batch-rows", str(2**63)], "--batch-rows: expected an integer in [1, 2147483647]"),
    (["--eps-rep", "nan"], "--eps-rep: expected a finite number >= 0, got 'nan'"),
    (["--eps-assoc", "-0.1"], "--eps-assoc: expected a finite number >= 0, got '-0.1'"),
])
def test_bad_flag_values_exit_2(data, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as stop:
        cli.main(["balance", str(data), *ARGS, *extra, "--out", str(tmp_path / "q.parquet")])
    assert stop.value.code == 2 and match in capsys.readouterr().err
    assert listing(tmp_path) == ["d.parquet"]


@pytest.mark.parametrize("dataset", [False, True])
def test_empty_paths_are_named(data, tmp_path, capsys, monkeypatch, dataset):
    """Was: "--out: '' already exists" ('' is the current folder as a path)."""
    monkeypatch.chdir(tmp_path)
    src = str(tmp_path) if dataset else str(data)
    for argv, match in (([src, "--out", ""], "pym4: error: --out: is empty; give a file or folder name"),
                        (["", "--out", "q.parquet"], "pym4: error: INPUT: is empty; give a file or folder name")):
        assert cli.main(["balance", *argv, *ARGS]) == 2
        assert match in capsys.readouterr().err
    assert listing(tmp_path) == ["d.parquet"]


@pytest.mark.parametrize("method", ["exact", "stream"])
@pytest.mark.parametrize("fill", [0, 1])
def test_groups_without_a_default_target_are_named_as_flags(tmp_path, capsys, method, fill):
    """Was: m4.balance's "s: ... pass target= proportions" (and, in a dataset, "target:
    proportions must be in (0, 1), got [0.0, 0.0]"), arguments a CLI user never saw."""
    g, lab = columns()
    src = tmp_path / "z.parquet"
    pq.write_table(pa.table({"g": np.full(len(g), fill), "h": np.full(len(g), fill), "l": lab}), src)
    argv = ["balance", str(src), "--sensitive", "g,h", "--labels", "l", "--method", method, "--no-progress"]
    what = "no example is in any group" if fill == 0 else "every example is in every group"
    assert cli.main([*argv, "--out", str(tmp_path / "q.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pym4: error: --sensitive g,h: {what}") and "pass --target proportions" in err, err
    assert "s:" not in err and "target=" not in err
    if method == "exact":  # a folder OUTPUT: the dataset path, after its counting pass
        assert cli.main([*argv, "--out", str(tmp_path / "folder")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"pym4: error: --sensitive: {what}") and "pass --target proportions" in err, err
    assert not os.path.exists(tmp_path / "q.parquet") and not os.path.exists(tmp_path / "folder")


def test_bad_seed_in_a_subprocess_is_no_traceback(data, tmp_path):
    # Before: the whole solve ran, the report was written, then m4.sample raised (exit 1).
    proc = subprocess.run([sys.executable, "-m", "pym4.cli", "balance", str(data), *ARGS, "--sample", "--seed",
                           "-1", "--out", str(tmp_path / "q.parquet")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--seed: expected an integer >= 0" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and listing(tmp_path) == ["d.parquet"]


@pytest.mark.parametrize("extra,match", [
    (["--target", "1.5"], "--target: proportions must be in (0, 1), got '1.5'"),
    (["--target", "0.2,0.3"], "--target: expected one number or 1 (one per --sensitive column), got 2"),
    (["--sensitive", "g,g"], "--sensitive: columns listed twice: 'g'"),
    (["--utility", "g"], "--utility: column 'g' is already used as --sensitive"),
])
def test_inconsistent_arguments_are_named_before_reading(data, tmp_path, capsys, extra, match):
    # The input lacks column "nope": were the data read first, the error would be about it.
    rc = cli.main(["balance", str(data), *ARGS, "--labels", "l,nope", *extra, "--out", str(tmp_path / "q.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert listing(tmp_path) == ["d.parquet"]


def test_output_that_is_a_directory(data, tmp_path, capsys):
    (tmp_path / "q.parquet").mkdir()
    rc = cli.main(["balance", str(data), *ARGS, "--labels", "nope", "--out", str(tmp_path / "q.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out {str(tmp_path / 'q.parquet')!r} is a directory" in err, err
    assert listing(tmp_path) == ["d.parquet", "q.parquet"] and not os.listdir(tmp_path / "q.parquet")
    # A report path that is a directory would fail only at the end: refused first too.
    os.rmdir(tmp_path / "q.parquet")
    (tmp_path / "q.report.png").mkdir()
    assert cli.main(["balance", str(data), *ARGS, "--out", str(tmp_path / "q.parquet")]) == 2
    assert "the report file" in capsys.readouterr().err and not os.listdir(tmp_path / "q.report.png")
    assert listing(tmp_path) == ["d.parquet", "q.report.png"]


@contextlib.contextmanager
def read_only_folder(folder):
    """A folder this process cannot create files in: mode 0o555, or for root (whom modes do
    not stop) the immutable attribute."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield
        finally:
            os.chmod(folder, 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("running as root without chattr +i: no folder is read-only to this process")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_output_in_a_read_only_folder(data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_folder(ro):
        # Before: the solve ran, then writing failed with a traceback (exit 1).
        assert cli.main(["balance", str(data), *ARGS, "--out", str(ro / "q.parquet")]) == 2
        out = capsys.readouterr()
        assert out.err.startswith(f"pym4: error: --out: cannot write in folder {str(ro)!r}"), out.err
        assert out.out == "" and os.listdir(ro) == []
        # A dataset OUTPUT too (its checkpoint and folder would go there).
        assert cli.main(["balance", str(data), *ARGS, "--out", str(ro / "balanced")]) == 2
        assert "--out: cannot write in folder" in capsys.readouterr().err
        assert os.listdir(ro) == []


# ----- item 12: read-only outputs, --batch-rows on CSV ----------------------------------------

def test_read_only_output_is_kept_unless_overwrite(data, tmp_path, capsys):
    out = tmp_path / "q.parquet"
    assert cli.main(["balance", str(data), *ARGS, "--out", str(out)]) == 0
    for name, budget in (("q.parquet", "0.7"), ("q.report.json", "0.65")):
        capsys.readouterr()
        path = tmp_path / name
        before = sha(path)
        os.chmod(path, 0o444)
        assert cli.main(["balance", str(data), *ARGS, "--budget", budget, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{str(path)!r} exists and is read-only; pass --overwrite" in err, err
        assert sha(path) == before
        assert cli.main(["balance", str(data), *ARGS, "--budget", budget, "--overwrite", "--out", str(out)]) == 0
        assert sha(path) != before and stat.S_IMODE(os.stat(path).st_mode) & 0o200
    # Writable outputs are replaced without the flag, as before.
    assert cli.main(["balance", str(data), *ARGS, "--budget", "0.6", "--out", str(out)]) == 0
    assert json.loads((tmp_path / "q.report.json").read_text())["budget"] == 0.6


def test_batch_rows_is_honoured_for_csv(tmp_path):
    # The stream method fits batch by batch (each one shuffled by the seed), so its q
    # depends on the batches: the same rows read from CSV and from Parquet with the same
    # --batch-rows give the same q only if both readers cut the same batches.
    rng = np.random.default_rng(3)
    n = 5000
    g = (rng.random(n) < 0.3).astype(np.int64)
    table = pa.table({"g": g, "l": (rng.random(n) < 0.2 + 0.3 * g).astype(np.int64)})
    pq.write_table(table, tmp_path / "d.parquet")
    pacsv.write_csv(table, tmp_path / "d.csv")
    q = {}
    for src, rows in (("d.parquet", "300"), ("d.csv", "300"), ("d.csv", "4999")):
        out = tmp_path / f"q-{rows}-{src}.parquet"
        assert cli.main(["balance", str(tmp_path / src), *ARGS, "--method", "stream", "--batch-rows", rows,
                         "--out", str(out)]) == 0
        q[src, rows] = pq.read_table(out).column("q").to_numpy()
    np.testing.assert_array_equal(q["d.csv", "300"], q["d.parquet", "300"])
    assert not np.array_equal(q["d.csv", "300"], q["d.csv", "4999"])


def test_csv_rebatch_keeps_rows_and_order():
    batches = [pa.record_batch({"a": pa.array(np.arange(a, b))}) for a, b in ((0, 5), (5, 6), (6, 20), (20, 20))]
    for rows in (1, 3, 7, 20, 100):
        got = list(cli._rebatch(batches, rows))
        assert [b.num_rows for b in got] == [rows] * (20 // rows) + ([20 % rows] if 20 % rows else [])
        np.testing.assert_array_equal(np.concatenate([b.column(0).to_numpy() for b in got]), np.arange(20))


def test_batch_rows_refused_for_spark(data, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    shutil.copy(data, folder / "a.parquet")
    rc = cli.main(["balance", str(folder), *ARGS, "--engine", "spark", "--batch-rows", "100",
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "--batch-rows: not for --engine spark" in capsys.readouterr().err


# ----- item 8: a closed stdout ----------------------------------------------------------------

@pytest.mark.parametrize("command", [["info"], ["balance", "{src}", *ARGS, "--out", "{out}"]])
def test_closed_stdout_pipe_is_not_a_traceback(data, tmp_path, command):
    command = [c.format(src=data, out=tmp_path / "q.parquet") for c in command]
    r, w = os.pipe()
    os.close(r)  # the reader has gone before anything is written, as `pym4 info | head -0`
    try:
        proc = subprocess.run([sys.executable, "-m", "pym4.cli", *command], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


# ----- item 2: the table and the report replaced together ------------------------------------

def test_report_names_the_table_it_describes(data, tmp_path, capsys):
    out = tmp_path / "q.csv"
    assert cli.main(["balance", str(data), *ARGS, "--sample", "--out", str(out)]) == 0
    rep = json.loads((tmp_path / "q.report.json").read_text())
    assert rep["output_sha256"] == sha(out) and rep["output_bytes"] == os.path.getsize(out)
    assert rep["output_rows"] == pacsv.read_csv(out).num_rows == 400
    assert listing(tmp_path) == ["d.parquet", "q.csv", "q.report.json", "q.report.png"]


def test_failed_table_write_changes_nothing(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q.parquet"
    assert cli.main(["balance", str(data), *ARGS, "--out", str(out)]) == 0
    before = {n: sha(tmp_path / n) for n in ("q.parquet", "q.report.json", "q.report.png")}

    def full_disk(table, where, *a, **k):
        with open(where, "wb") as f:
            f.write(b"PAR1")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pq, "write_table", full_disk)
    assert cli.main(["balance", str(data), *ARGS, "--budget", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out: cannot write {str(out)!r}: No space left on device" in err, err
    assert {n: sha(tmp_path / n) for n in before} == before  # the old pair, both files
    assert listing(tmp_path) == ["d.parquet", "q.parquet", "q.report.json", "q.report.png"]


def test_infeasible_run_replaces_the_pair_too(data, tmp_path, capsys):
    out = tmp_path / "q.parquet"
    assert cli.main(["balance", str(data), *ARGS, "--out", str(out)]) == 0
    # Now a run that is infeasible: its report must not sit beside the old run's table.
    assert cli.main(["balance", str(data), *ARGS, "--target", "0.9", "--eps-rep", "0", "--out", str(out)]) == 2
    assert "infeasible" in capsys.readouterr().err
    rep = json.loads((tmp_path / "q.report.json").read_text())
    assert rep["status"] == "infeasible" and rep["output"] is None and rep["output_rows"] == 0
    assert listing(tmp_path) == ["d.parquet", "q.report.json", "q.report.png"]


def test_nested_id_column_with_csv_output_is_refused_first(tmp_path, capsys):
    g, lab = columns()
    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"g": g, "l": lab, "tags": pa.array([["a"]] * len(g))}), src)
    # Before: the solve ran, then pyarrow's CSV writer failed on the list column (traceback).
    rc = cli.main(["balance", str(src), *ARGS, "--id", "tags", "--out", str(tmp_path / "q.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "--id: column 'tags' has type list<" in err and "which a CSV OUTPUT cannot hold" in err, err
    assert listing(tmp_path) == ["d.parquet"]
    assert cli.main(["balance", str(src), *ARGS, "--id", "tags", "--out", str(tmp_path / "q.parquet")]) == 0
    assert pq.read_table(tmp_path / "q.parquet").column("tags").to_pylist()[:2] == [["a"], ["a"]]
