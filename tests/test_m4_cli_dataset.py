"""`pym4 balance` on datasets: a directory of shards, hive partitions, a glob; --budget max,
--labels-from / --sensitive-from; bad input named by shard and column, exit 2, nothing written."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m4_datasets import VOCAB, dense, metadata, tags_dense, write_hive, write_shards
import pym4.m4 as m4
from pym4 import _backend, cli

pytestmark = pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core")

N = 997
SEVEN = [1, 311, 40, 2, 500, 13, 130]
PROBLEM = ["--target", "0.3", "--budget", "0.8", "--eps-rep", "0.02", "--eps-assoc", "0.05", "--no-progress"]


@pytest.fixture(scope="module")
def table():
    return metadata(N, seed=11)


def _q(out):
    return pq.read_table(out).column("q").to_numpy()


def test_directory_glob_and_hive(table, tmp_path, capsys):
    write_shards(table, str(tmp_path / "d"), SEVEN)
    args = ["--sensitive", "g0,g1", "--labels", "l0", "--labels-from", "tags", *PROBLEM]
    assert cli.main(["balance", str(tmp_path / "d"), "--out", str(tmp_path / "o1"), *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "optimal" and printed["compressed"] is True
    s = dense(table, ["g0", "g1"])
    y = np.concatenate([dense(table, ["l0"]), tags_dense(table, "tags", sorted(VOCAB))], axis=1)
    want = m4.balance(s, y, target=0.3, budget=0.8, eps_rep=0.02, eps_assoc=0.05, tol=1e-11).q
    np.testing.assert_allclose(_q(str(tmp_path / "o1")), want, atol=1e-8)
    assert len([f for f in os.listdir(tmp_path / "o1") if f.endswith(".parquet")]) == 7
    assert cli.main(["balance", str(tmp_path / "d" / "shard-*.parquet"), "--out", str(tmp_path / "o2"), *args]) == 0
    np.testing.assert_array_equal(_q(str(tmp_path / "o2")), _q(str(tmp_path / "o1")))
    # hive partitions: the partition column as groups, named values of the tags as labels
    ordered = write_hive(table, str(tmp_path / "h"))
    assert cli.main(["balance", str(tmp_path / "h"), "--out", str(tmp_path / "o3"), "--sensitive-from", "region",
                     "--labels-from", "tags:doctor,nurse", "--target", "0.3333", "--budget", "0.8",
                     "--eps-rep", "0.02", "--eps-assoc", "0.05", "--id", "id", "--no-progress"]) == 0
    got = pq.read_table(str(tmp_path / "o3"))
    assert got.column_names == ["id", "q"]
    s = tags_dense(ordered, "region", ["east", "north", "west"])
    y = tags_dense(ordered, "tags", ["doctor", "nurse"])
    want = m4.balance(s, y, target=0.3333, budget=0.8, eps_rep=0.02, eps_assoc=0.05, tol=1e-11).q
    np.testing.assert_array_equal(got.column("id").to_numpy(), ordered.column("id").to_numpy())
    np.testing.assert_allclose(got.column("q").to_numpy(), want, atol=1e-8)


def _overlapping(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    g0 = rng.random(n) < 0.26
    g1 = rng.random(n) < np.where(g0, 0.5, (0.31 - 0.26 * 0.5) / 0.74)
    return pa.table({"a": g0, "b": g1, "y0": rng.random(n) < 0.2 + 0.3 * g0, "y1": rng.random(n) < 0.4 - 0.2 * g1,
                     "y2": rng.random(n) < 0.3 + 0.1 * (g0 & g1)})


def test_infeasible_names_the_largest_budget_and_budget_max_solves(tmp_path, capsys):
    t = _overlapping()
    write_shards(t, str(tmp_path / "d"), [8000, 12000])
    args = ["balance", str(tmp_path / "d"), "--sensitive", "a,b", "--labels", "y0,y1,y2", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pym4: error: infeasible") and "the largest feasible budget is 0.7" in err
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert cli.main([*args, "--budget", "max", "--out", str(tmp_path / "o")]) == 0
    printed = json.loads(capsys.readouterr().out)
    s = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in ("a", "b")], 1)
    y = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in ("y0", "y1", "y2")], 1)
    best = m4.largest_feasible_budget(s, y)
    assert printed["status"] == "optimal" and printed["kept_fraction"] == pytest.approx(best, abs=1e-9)


def _break(table, folder, case):
    paths = write_shards(table, folder, SEVEN)

    def rewrite(i, fn):
        pq.write_table(fn(pq.read_table(paths[i])), paths[i])

    def set_col(name, arr):
        return lambda t: t.set_column(t.schema.get_field_index(name), name, arr(t))

    if case == "missing":
        rewrite(5, lambda t: t.drop_columns(["l0"]))
        return r"shard-005\.parquet: missing column 'l0'"
    if case == "values":
        rewrite(4, set_col("l0", lambda t: pa.array(np.where(np.arange(t.num_rows) == 7, 2.0, t.column("l0")))))
        return r"shard-004\.parquet: column 'l0' is not binary: row 7 has value 2\.0"
    if case == "null":
        rewrite(6, set_col("g1", lambda t: pa.array([None] + t.column("g1").to_pylist()[1:], pa.int8())))
        return r"shard-006\.parquet: column 'g1' has a missing value \(null\) at row 0"
    if case == "tag_type":
        for i in range(7):
            rewrite(i, set_col("tags", lambda t: pa.array(np.zeros(t.num_rows, np.int64))))
        return r"shard-000\.parquet: column 'tags' \(labels_from\) has type int64; expected a tag column"
    if case == "empty":
        for i in range(7):
            rewrite(i, lambda t: t.slice(0, 0))
        return "the dataset has no rows"
    if case == "schemas_differ":
        rewrite(3, set_col("g1", lambda t: t.column("g1").cast(pa.int64())))
        return r"shard-003\.parquet: column 'g1' has type int64, but int8 in .*shard-000\.parquet"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "values", "null", "tag_type", "empty", "schemas_differ"])
def test_bad_input_exit_2_before_any_output(table, tmp_path, capsys, case):
    match = _break(table, str(tmp_path / "d"), case)
    rc = cli.main(["balance", str(tmp_path / "d"), "--sensitive", "g0,g1", "--labels", "l0", "--labels-from", "tags",
                   "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("pym4: error: "), err
    import re
    assert re.search(match, err), err
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no output folder, partial folder or checkpoint


@pytest.mark.parametrize("argv,match", [
    (["--sensitive", "g0", "--out", "{tmp}/o.txt/x"], "does not exist"),
    (["--sensitive", "g0", "--method", "stream"], "--method stream: a dataset is balanced by the exact"),
    (["--labels", "l0"], "--sensitive: give at least one group column"),
    (["--sensitive", "g0", "--labels-from", "tags:"], "--labels-from: no values after ':'"),
    (["--sensitive", "g0", "--out", "{tmp}/d"], "already exists"),
])
def test_argument_errors(table, tmp_path, capsys, argv, match):
    write_shards(table, str(tmp_path / "d"), [N])
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    assert cli.main(["balance", str(tmp_path / "d"), *argv, "--no-progress"]) == 2
    assert match in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_budget_argument_and_subprocess(table, tmp_path):
    write_shards(table, str(tmp_path / "d"), [500, 497])
    bad = subprocess.run([sys.executable, "-m", "pym4.cli", "balance", str(tmp_path / "d"), "--sensitive", "g0",
                          "--budget", "most", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--budget: expected a number in (0, 1] or 'max'" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "pym4.cli", "balance", str(tmp_path / "d"), "--sensitive", "g0,g1",
                         "--labels", "l0,l1", "--sample", "--out", str(tmp_path / "o"), *PROBLEM],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "optimal"
    got = pq.read_table(str(tmp_path / "o"))
    assert got.column_names == ["row", "q", "keep"] and got.num_rows == N


def test_without_matplotlib_the_run_completes_with_no_png(table, tmp_path, capsys, monkeypatch):
    # A fit that read a whole dataset must not fail at its last step over a plot: the JSON
    # report is written, the PNG skipped with a warning that says what to install.
    write_shards(table, str(tmp_path / "d"), SEVEN)
    for name in [k for k in sys.modules if k.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib(.*) raises ImportError
    with pytest.warns(RuntimeWarning, match=r"_pym4_report\.png not written: matplotlib is not installed"):
        rc = cli.main(["balance", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--sensitive", "g0,g1",
                       "--labels", "l0", *PROBLEM])
    assert rc == 0, capsys.readouterr().err
    files = sorted(os.listdir(tmp_path / "o"))
    assert "_pym4_report.json" in files and "_pym4_report.png" not in files
    assert len([f for f in files if f.endswith(".parquet")]) == 7
    assert sorted(os.listdir(tmp_path)) == ["d", "o"]  # no checkpoint or partial folder left


@pytest.mark.parametrize("engine,module,extra", [("ray", "ray", "ray"), ("spark", "pyspark", "spark")])
def test_a_missing_engine_names_its_extra(table, tmp_path, capsys, monkeypatch, engine, module, extra):
    write_shards(table, str(tmp_path / "d"), [N])
    monkeypatch.setitem(sys.modules, module, None)
    rc = cli.main(["balance", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--sensitive", "g0",
                   "--engine", engine, *PROBLEM])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"pym4: error: --engine {engine}: "), err
    assert err.rstrip().endswith(f"(pip install 'pym4[{extra}]')"), err
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_a_uri_input_is_a_dataset(table, tmp_path, capsys):
    # os.path knows no URI: a folder, a file or a glob behind scheme:// all take the dataset route.
    write_shards(table, str(tmp_path / "d"), SEVEN)
    args = ["--sensitive", "g0,g1", *PROBLEM]
    assert cli.main(["balance", str(tmp_path / "d"), "--out", str(tmp_path / "plain"), *args]) == 0
    assert cli.main(["balance", (tmp_path / "d").as_uri(), "--out", str(tmp_path / "uri"), *args]) == 0
    np.testing.assert_array_equal(_q(str(tmp_path / "uri")), _q(str(tmp_path / "plain")))
    one = sorted(os.listdir(tmp_path / "d"))[0]
    capsys.readouterr()
    assert cli.main(["balance", (tmp_path / "d" / one).as_uri(), "--out", str(tmp_path / "o.parquet"), *args]) == 2
    assert "names a file; a URI INPUT is read as a dataset, OUTPUT is a folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.parquet")
    assert cli.main(["balance", (tmp_path / "nowhere").as_uri(), "--out", str(tmp_path / "o2"), *args]) == 2
    assert "nowhere" in capsys.readouterr().err and not os.path.exists(tmp_path / "o2")
