"""pym4.m4.fit_dataset / balance_dataset: equal to the in-memory exact solve on odd shard
layouts, compressed equal to uncompressed, Ray and Spark equal to local, the output folder,
checkpoint/resume after kill -9, and the largest feasible budget (checked by an LP)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m4_datasets import (BALANCE_DATASET_RUN, VOCAB, arrays_of, dense, metadata, read_json, tags_dense, write_hive,
                         write_shards)
import pym4.m4 as m4
from pym4 import _backend

pytestmark = [pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
              pytest.mark.filterwarnings("ignore::FutureWarning:pyspark.*")]

N = 997
LAYOUTS = {"one": [N], "seven": [1, 311, 40, 2, 500, 13, 130], "empty": [400, 0, 597]}
PROBLEM = dict(budget=0.8, eps_rep=0.02, eps_assoc=0.05)


@pytest.fixture(scope="module")
def table():
    return metadata(N, seed=11)


def _layout(table, folder, layout):
    """(source, table in file order, columns, target)."""
    if layout == "hive":
        ordered = write_hive(table, os.path.join(folder, "hive"))
        return (os.path.join(folder, "hive"), ordered,
                dict(sensitive=["g0"], sensitive_from="region", labels=["l0"], labels_from="tags"),
                [0.3, 1 / 3, 1 / 3, 1 / 3])  # the regions partition the rows: their targets add up to one
    write_shards(table, os.path.join(folder, "shards"), LAYOUTS[layout])
    return (os.path.join(folder, "shards"), table, dict(sensitive=["g0", "g1"], labels=["l0", "l2"], labels_from="tags"),
            0.3)


_arrays = arrays_of


def _in_memory(s, y, target, utility=None, **problem):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return m4.balance(s, y, target=target, utility=utility, tol=1e-11, **{**PROBLEM, **problem})


@pytest.mark.parametrize("layout", ["one", "seven", "empty", "hive"])
def test_fit_equals_in_memory_compressed_or_not(table, tmp_path, layout):
    src, ordered, cols, target = _layout(table, str(tmp_path), layout)
    s, y = _arrays(ordered, cols)
    res = _in_memory(s, y, target)
    assert res.status == "optimal"
    fits = {mp: m4.fit_dataset(src, **cols, target=target, **PROBLEM, tol=1e-10, progress=False, max_patterns=mp)
            for mp in (1 << 20, 1)}  # the pattern table, and (past its bound) passes over the data
    table_fit, rows_fit = fits[1 << 20], fits[1]
    assert table_fit.info["compressed"] and table_fit.info["patterns"] <= N
    assert not rows_fit.info["compressed"] and rows_fit.info["patterns"] is None
    for model in (table_fit, rows_fit):
        assert model.info["status"] == "optimal" and model.info["rows"] == N
        assert model.info["max_violation"] <= 1e-9
        np.testing.assert_allclose(model.keep_probability(s, y), res.q, rtol=0, atol=1e-9)
    # engine passes: the tag vocabulary, counts + table; then none for the table (its solve and
    # report are in memory), or one per solver pass and the counts weighted by q
    assert table_fit.info["passes"] == 2
    assert rows_fit.info["passes"] == 2 + rows_fit.info["solver_passes"] + 1


def test_utility_and_id_and_sources(table, tmp_path):
    paths = write_shards(table, str(tmp_path / "d"), LAYOUTS["seven"])
    cols = dict(sensitive=["g0", "g1"], labels=["l0"], utility="u", id="id")
    s, y = _arrays(table, cols)
    u = table.column("u").to_numpy()
    res = _in_memory(s, y, 0.3, utility=u)
    model = m4.fit_dataset(str(tmp_path / "d" / "*.parquet"), **cols, target=0.3, **PROBLEM, tol=1e-10,
                           progress=False)
    assert not model.info["compressed"]  # a utility makes each row its own
    np.testing.assert_allclose(model.keep_probability(s, y, u), res.q, atol=1e-9)
    out = str(tmp_path / "out")
    m4.balance_dataset(paths[::-1], out, **cols, target=0.3, **PROBLEM, tol=1e-10, progress=False)
    got = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(out + "/*.parquet"))])
    assert got.column_names == ["id", "q"]
    np.testing.assert_array_equal(got.column("id").to_numpy(), table.column("id").to_numpy())
    np.testing.assert_allclose(got.column("q").to_numpy(), res.q, atol=1e-9)


def _snapshot(folder):
    out = {}
    for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[p] = f.read()
    return out


def test_balance_dataset_folder(table, tmp_path):
    src, ordered, cols, target = _layout(table, str(tmp_path), "seven")
    before = _snapshot(src)
    out = str(tmp_path / "balanced")
    model = m4.balance_dataset(src, out, sample=True, seed=5, **cols, target=target, **PROBLEM, progress=False)
    assert _snapshot(src) == before  # the input is never modified
    names = sorted(os.listdir(out))
    assert names == ["_pym4_model.json", "_pym4_report.json", "_pym4_report.png"] + \
        [f"part-{i:05d}.parquet" for i in range(7)]
    assert sorted(os.listdir(tmp_path)) == ["balanced", "shards"]  # no checkpoint, no partial folder
    got = pq.read_table(out)  # Parquet readers skip the underscore files
    assert got.column_names == ["row", "q", "keep"]
    np.testing.assert_array_equal(got.column("row").to_numpy(), np.arange(N))
    s, y = _arrays(ordered, cols)
    q = got.column("q").to_numpy()
    np.testing.assert_allclose(q, _in_memory(s, y, target).q, atol=1e-9)
    keep = got.column("keep").to_numpy()
    assert abs(keep.sum() - q.sum()) <= 4 * np.sqrt((q * (1 - q)).sum())  # Bernoulli(q)
    assert np.all(keep[q == 0] == 0) and np.all(keep[q == 1] == 1)
    with open(os.path.join(out, "_pym4_report.json")) as f:
        report = json.load(f)
    assert report["status"] == "optimal" and report["passes"] == model.info["passes"]
    assert report["kept_fraction"] == pytest.approx(0.8, abs=1e-9)
    assert os.path.getsize(os.path.join(out, "_pym4_report.png")) > 1000
    back = m4.M4Model.load(os.path.join(out, "_pym4_model.json"))
    np.testing.assert_array_equal(back.w, model.w)
    # The draw depends on the row and the seed only: one shard gives the same keep.
    one = str(tmp_path / "one")
    write_shards(table, one, [N])
    again = m4.balance_dataset(one, str(tmp_path / "o1"), sample=True, seed=5, **cols, target=target, **PROBLEM,
                               progress=False)
    np.testing.assert_array_equal(pq.read_table(str(tmp_path / "o1")).column("keep").to_numpy(), keep)
    assert again.info["status"] == "optimal"


@pytest.mark.parametrize("case,match", [
    ("missing", r"shard-002\.parquet: missing column 'l9'"),
    ("out_exists", "already exists"),
    ("budget", r"budget: expected a number in \(0, 1\] or 'max'"),
    ("values", r"shard-004\.parquet: column 'l0' is not binary: row 3 has value 0\.5"),
])
def test_bad_input_before_any_output(table, tmp_path, case, match):
    paths = write_shards(table, str(tmp_path / "d"), LAYOUTS["seven"])
    cols = dict(sensitive=["g0", "g1"], labels=["l0"])
    kw = {}
    if case == "missing":
        cols["labels"] = ["l0", "l9"]
        t = pq.read_table(paths[2])
        for p in paths[:2]:
            pq.write_table(pq.read_table(p).append_column("l9", pa.array([True] * pq.read_table(p).num_rows)), p)
    if case == "out_exists":
        os.makedirs(tmp_path / "out")
    if case == "budget":
        kw["budget"] = "most"
    if case == "values":
        t = pq.read_table(paths[4])
        l0 = t.column("l0").to_numpy().copy()
        l0[3] = 0.5
        pq.write_table(t.set_column(t.schema.get_field_index("l0"), "l0", pa.array(l0)), paths[4])
    with pytest.raises((ValueError, FileExistsError), match=match):
        m4.balance_dataset(str(tmp_path / "d"), str(tmp_path / "out"), **cols, **kw, progress=False)
    left = sorted(os.listdir(tmp_path))
    assert left == (["d", "out"] if case == "out_exists" else ["d"])


def test_data_that_is_not_a_parquet_dataset_is_named(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("g0,g1\n1,0\n0,1\n")
    with pytest.raises(ValueError, match=r"^data: .*d\.csv: not a Parquet dataset \(.*\); pym4 reads datasets as Parquet"):
        m4.fit_dataset(str(csv), sensitive=["g0", "g1"], progress=False)
    with pytest.raises(TypeError, match="^data: expected a path, .* got int"):
        m4.fit_dataset(5, sensitive=["g0", "g1"], progress=False)


def test_out_inside_the_source_folder_is_refused(table, tmp_path):
    """Every folder below a source folder is read: parts written there would join the input."""
    write_shards(table, str(tmp_path / "d"), LAYOUTS["seven"])
    before = sorted(os.listdir(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"out: .*/d/inner' lies inside the source folder"):
        m4.balance_dataset(str(tmp_path / "d"), str(tmp_path / "d" / "inner"), sensitive=["g0", "g1"],
                           labels=["l0"], progress=False)
    assert sorted(os.listdir(tmp_path / "d")) == before


@pytest.mark.parametrize("content", [b"important notes\n", b'{"format": "mine"}', b"[1, 2]"])
def test_a_checkpoint_path_holding_a_users_file_is_refused_and_left_alone(table, tmp_path, content):
    """The run would overwrite the file, then remove it at the end: refused before any pass."""
    write_shards(table, str(tmp_path / "d"), LAYOUTS["seven"])
    mine = tmp_path / "notes.txt"
    mine.write_bytes(content)
    with pytest.raises(ValueError, match=r"checkpoint: .*notes\.txt exists and is not a pym4 checkpoint"):
        m4.fit_dataset(str(tmp_path / "d"), sensitive=["g0", "g1"], labels=["l0"], max_patterns=1,
                       checkpoint=str(mine), progress=False)
    assert mine.read_bytes() == content


@pytest.mark.parametrize("where,match", [("folder", ".*/ck is a folder; give the path of a file"),
                                         ("missing", "the folder .*/nowhere does not exist")])
def test_a_checkpoint_path_that_cannot_be_written_is_refused_before_any_pass(table, tmp_path, where, match,
                                                                             monkeypatch):
    from pym4.m4 import _dataset
    write_shards(table, str(tmp_path / "d"), LAYOUTS["seven"])
    path = tmp_path / "ck" if where == "folder" else tmp_path / "nowhere" / "ck.json"
    if where == "folder":
        path.mkdir()
    passes = []
    monkeypatch.setattr(_dataset._Passes, "reduce", lambda self, *a: passes.append(a))
    with pytest.raises(ValueError, match="checkpoint: " + match):
        m4.fit_dataset(str(tmp_path / "d"), sensitive=["g0", "g1"], labels=["l0"], max_patterns=1,
                       checkpoint=str(path), progress=False)
    assert passes == []


# ----- the largest feasible budget ------------------------------------------------------------------

def overlapping_groups(n=20000, seed=0):
    """The issue's ordinary data: two overlapping groups of ~26 % and ~31 %, three labels
    associated with them."""
    rng = np.random.default_rng(seed)
    g0 = rng.random(n) < 0.26
    g1 = rng.random(n) < np.where(g0, 0.5, (0.31 - 0.26 * 0.5) / 0.74)
    s = np.stack([g0, g1], 1).astype(np.uint8)
    y = np.stack([rng.random(n) < 0.2 + 0.3 * g0, rng.random(n) < 0.4 - 0.2 * g1,
                  rng.random(n) < 0.3 + 0.1 * (g0 & g1)], 1).astype(np.uint8)
    return s, y


def lp_largest_budget(s, y, pi, er, ea):
    """max t over q in [0, 1]^N with mean q = t and every |constraint| <= t eps (scipy's
    HiGHS on the distinct rows with their counts): the largest feasible budget."""
    from scipy.optimize import linprog
    keys, cnt = np.unique(np.concatenate([s, y], 1), axis=0, return_counts=True)
    m = s.shape[1]
    sp, yp = keys[:, :m].astype(float), keys[:, m:].astype(float)
    n = cnt.sum()
    rows, lam = [], []
    for k in range(m):
        rows.append(cnt * (sp[:, k] - pi[k]) / n)
        lam.append(er)
        for r in range(yp.shape[1]):
            rows.append(cnt * (sp[:, k] - pi[k]) * yp[:, r] / n)
            lam.append(ea)
    A, lam = np.array(rows), np.array(lam)[:, None]
    a_ub = np.vstack([np.hstack([A, -lam]), np.hstack([-A, -lam])])
    res = linprog(np.r_[np.zeros(len(cnt)), -1.0], A_ub=a_ub, b_ub=np.zeros(len(a_ub)),
                  A_eq=np.hstack([cnt / n, [-1.0]])[None], b_eq=[0.0], bounds=[(0, 1)] * (len(cnt) + 1),
                  method="highs")
    assert res.status == 0
    return -res.fun


def test_largest_feasible_budget_in_memory():
    pytest.importorskip("scipy")
    s, y = overlapping_groups()
    pi = np.full(2, s.mean(axis=0).mean())
    with pytest.warns(RuntimeWarning, match="the largest feasible budget is 0\\.7"):
        res = m4.balance(s, y)  # default target, tolerances and budget 0.9
    assert res.status == "infeasible"
    best = res.report.largest_feasible_budget
    exact = lp_largest_budget(s, y, pi, 0.01, 0.01)
    assert exact - 1e-3 <= best <= exact + 1e-9
    assert res.summary()["largest_feasible_budget"] == best
    at_max = m4.balance(s, y, budget="max")
    assert at_max.status == "optimal" and at_max.max_violation <= 1e-9
    assert abs(np.mean(at_max.q) - best) <= 1e-9 and at_max.report.largest_feasible_budget == best
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        above = m4.balance(s, y, budget=best + 1e-3)
    assert above.status == "infeasible" and best + 1e-3 > exact
    assert m4.largest_feasible_budget(s, y) == best


def test_largest_feasible_budget_on_a_dataset(tmp_path):
    s, y = overlapping_groups()
    t = pa.table({"a": s[:, 0].astype(bool), "b": s[:, 1].astype(bool),
                  **{f"y{r}": y[:, r].astype(bool) for r in range(3)}})
    write_shards(t, str(tmp_path / "d"), [5000, 9000, 6000])
    cols = dict(sensitive=["a", "b"], labels=["y0", "y1", "y2"])
    with pytest.raises(m4.InfeasibleError, match=r"representation\[a\].*the largest feasible budget is 0\.7") as e:
        m4.balance_dataset(str(tmp_path / "d"), str(tmp_path / "out"), **cols, progress=False)
    assert not os.path.exists(tmp_path / "out")
    best = m4.largest_feasible_budget(s, y)
    assert e.value.largest_budget == best and e.value.report.status == "infeasible"
    model = m4.fit_dataset(str(tmp_path / "d"), **cols, budget="max", progress=False)
    assert model.budget == best and model.info["status"] == "optimal" and model.info["budget_requested"] == "max"
    assert model.info["largest_feasible_budget"] == best


# ----- checkpoint and resume --------------------------------------------------------------------------

_ARGS = dict(sensitive=["g0", "g1"], labels=["l0", "l2"], labels_from="tags", utility="u", target=0.3,
             budget=0.8, eps_rep=0.02, eps_assoc=0.05, tol=1e-10, progress=False)
def test_kill_during_a_pass_then_resume(table, tmp_path, capsys):
    src, _, _, _ = _layout(table, str(tmp_path), "seven")
    out = str(tmp_path / "out")
    ck = out + ".pym4-checkpoint.json"
    code = BALANCE_DATASET_RUN.format(src=src, out=out, args=_ARGS)
    env = {**os.environ, "PYM4_TEST_SLEEP_AFTER_PASS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(ck) and read_json(ck)["passes"] >= 2:
                break
            time.sleep(0.05)
        assert os.path.exists(ck), "the run wrote no checkpoint"
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: no clean-up runs
    finally:
        proc.wait(timeout=60)
    saved = read_json(ck)
    assert saved["passes"] >= 2 and not saved["done"] and not os.path.exists(out)
    capsys.readouterr()
    m4.balance_dataset(src, out, **_ARGS)  # the same call again
    err = capsys.readouterr().err
    assert f"resuming from {ck}: {saved['passes']} solver passes already done" in err
    assert not os.path.exists(ck)
    resumed = pq.read_table(out)
    m4.balance_dataset(src, out + "-plain", **_ARGS)
    plain = pq.read_table(out + "-plain")
    assert resumed.equals(plain)  # the same q, bit for bit
    rep = read_json(os.path.join(out, "_pym4_report.json"))
    assert rep["resumed_after_pass"] == saved["passes"] and rep["status"] == "optimal"


# ----- Ray and Spark --------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engine_fit_equals_local(engine, request, table, tmp_path):
    request.getfixturevalue("ray_session" if engine == "ray" else "spark")
    src, ordered, target = str(tmp_path / "two"), table, 0.3
    write_shards(table, src, [600, 397])  # few tasks per pass: engine start-up per task dominates here
    # Named tag values (no vocabulary pass) and a utility (no pattern table): every solver
    # pass runs on the engine.
    cols = dict(sensitive=["g0", "g1"], labels=["l0", "l2"], labels_from="tags:" + ",".join(VOCAB[:4]))
    kw = dict(**cols, utility="u", target=target, **PROBLEM, tol=1e-10, progress=False)
    local = m4.fit_dataset(src, **kw)
    other = m4.balance_dataset(src, str(tmp_path / "out"), engine=engine, **kw)
    assert other.info["engine"] == engine and not other.info["compressed"]
    np.testing.assert_allclose(other.w, local.w, rtol=0, atol=1e-9)
    assert abs(other.mu - local.mu) <= 1e-9 and other.info["passes"] == local.info["passes"]
    got = pq.read_table(str(tmp_path / "out")).sort_by("row")
    s = dense(ordered, cols["sensitive"])
    y = np.concatenate([dense(ordered, cols["labels"]), tags_dense(ordered, "tags", VOCAB[:4])], axis=1)
    np.testing.assert_allclose(got.column("q").to_numpy(), local.keep_probability(s, y, ordered.column("u").to_numpy()),
                               atol=1e-9)
    # The fitted model, saved and loaded, applied in the user's own job on that engine.
    path = str(tmp_path / "model.json")
    other.save(path)
    model = m4.M4Model.load(path)
    if engine == "ray":
        import ray.data
        parts = ray.data.read_parquet(src).map_batches(model.transform, batch_format="pyarrow").to_arrow_refs()
        applied = pa.concat_tables(request.getfixturevalue("ray_session").get(parts))
    else:
        df = request.getfixturevalue("spark").read.parquet(src).select("id", "g0", "g1", "l0", "l2", "tags", "u")
        schema = "id long, g0 boolean, g1 byte, l0 double, l2 boolean, tags array<string>, u double, q double"
        applied = pa.Table.from_pylist([r.asDict() for r in df.mapInArrow(model.transform_batches, schema)
                                        .select("id", "q").collect()])
    applied = applied.select(["id", "q"]).sort_by("id")
    want = pa.table({"id": ordered.column("id"), "q": got.column("q")}).sort_by("id")
    np.testing.assert_allclose(applied.column("q").to_numpy(), want.column("q").to_numpy(), atol=1e-9)


def test_budget_max_when_no_budget_is_feasible(tmp_path):
    s, y = overlapping_groups(2000)
    s[:, 1] = 0  # an empty group with target 0.3: infeasible whatever is kept
    with pytest.raises(ValueError, match="budget='max': the problem is infeasible at every budget >= 0.001"):
        m4.balance(s, y, target=0.3, budget="max")
    assert m4.largest_feasible_budget(s, y, target=0.3) is None
    write_shards(pa.table({"a": s[:, 0] == 1, "b": s[:, 1] == 1}), str(tmp_path / "d"), [2000])
    with pytest.raises(m4.InfeasibleError, match="no budget >= 0.001 is feasible") as e:
        m4.fit_dataset(str(tmp_path / "d"), sensitive=["a", "b"], target=0.3, budget="max", progress=False)
    assert e.value.largest_budget is None


@pytest.mark.parametrize("constant", [0.0, 5.0, 1e3, 1e16])
def test_constant_utility_changes_nothing(table, tmp_path, constant):
    """Adding a constant to every utility only shifts mu (sum q = N eta is fixed): the fit
    centres the utility as balance() does, so a constant utility gives the q of no utility
    (it then solves on the pattern table), and u + 5 the q of u. Before, a constant 5 ended
    at max_passes with q off by 0.42."""
    cols = dict(sensitive=["g0", "g1"], labels=["l0", "l2"])
    t = table.append_column("uc", pa.array(np.full(table.num_rows, constant)))
    write_shards(t, str(tmp_path / "d"), LAYOUTS["seven"])
    s, y = _arrays(table, cols)
    kw = dict(target=0.3, **PROBLEM, tol=1e-10, progress=False)
    plain = m4.fit_dataset(str(tmp_path / "d"), **cols, **kw)
    model = m4.fit_dataset(str(tmp_path / "d"), **cols, utility="uc", **kw)
    assert model.info["status"] == "optimal" and model.info["compressed"]
    q0 = plain.keep_probability(s, y)
    np.testing.assert_allclose(model.keep_probability(s, y, np.full(N, constant)), q0, rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.transform(t).column("q").to_numpy(), q0, rtol=0, atol=1e-9)
    loaded = m4.M4Model.load(_saved(model, tmp_path))
    np.testing.assert_allclose(loaded.keep_probability(s, y, np.full(N, constant)), q0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("outlier", [1e3, 1e300])
def test_one_utility_outlier_leaves_the_fit_solvable(table, tmp_path, outlier, monkeypatch):
    """Centred at its midrange, a utility with one outlier (1e3 among values in [0, 0.1))
    sat half its range below mu = 0: every q 0 and the fit at max_passes (violation 0.5).
    The shift now comes from utilities sampled in the counting pass (here forced to every
    15th row: 67 of 997), and the fit matches balance() on the rows in memory."""
    from pym4.m4 import _stages

    monkeypatch.setattr(_stages, "UTILITY_SAMPLE", 64)  # N // 64 = 15 rows apart
    cols = dict(sensitive=["g0", "g1"], labels=["l0"])
    u = np.random.default_rng(4).random(N) * 0.1
    u[5] = outlier
    write_shards(table.append_column("uo", pa.array(u)), str(tmp_path / "d"), LAYOUTS["seven"])
    s, y = _arrays(table, cols)
    res = _in_memory(s, y, 0.3, utility=u)
    model = m4.fit_dataset(str(tmp_path / "d"), **cols, utility="uo", target=0.3, **PROBLEM, tol=1e-10,
                           progress=False)
    assert res.status == "optimal" and model.info["status"] == "optimal", model.info["message"]
    q = model.keep_probability(s, y, u)
    assert q[5] == 1.0
    np.testing.assert_allclose(q, res.q, rtol=0, atol=1e-8)


def test_utility_summaries_merge_alike_in_any_order(monkeypatch):
    """The counting pass's sample of utilities: the rows at a multiple of the stride, the
    same in any merge order (as Ray's and Spark's trees merge), at most 2 UTILITY_SAMPLE."""
    from pym4.m4 import _stages

    monkeypatch.setattr(_stages, "UTILITY_SAMPLE", 8)
    u = np.random.default_rng(5).normal(size=300)
    parts = [_stages.utility_summary(u[b:b + 37], b, 1) for b in range(0, 300, 37)]  # stride unknown: 1
    forward, backward = parts[0], parts[-1]
    for p in parts[1:]:
        forward = _stages.merge_utility_summaries(forward, p)
    for p in parts[-2::-1]:
        backward = _stages.merge_utility_summaries(p, backward)
    assert forward[:3].tolist() == pytest.approx([u.sum(), u.min(), u.max()])
    stride = int(forward[3])
    k = (forward.shape[0] - 4) // 2
    rows, vals = forward[4:4 + k], forward[4 + k:]
    assert 0 < k <= 16 and stride == int(backward[3])
    assert sorted(rows.tolist()) == list(range(0, 300, stride))  # every row at the stride, no other
    np.testing.assert_array_equal(vals, u[rows.astype(int)])
    assert sorted(zip(rows.tolist(), vals.tolist())) == sorted(zip(backward[4:4 + k].tolist(), backward[4 + k:].tolist()))


def _saved(model, tmp_path):
    path = str(tmp_path / "model.json")
    model.save(path)
    return path


def test_shifted_utility_gives_the_same_q(table, tmp_path):
    """u + 5 gives the q of u (both centred to the same values, up to the rounding of their
    shifts), and the in-memory solve's q within its own accuracy (balance() itself moves by
    2.2e-9 between u and u + 5 on this instance: its max_violation is 4.5e-10)."""
    cols = dict(sensitive=["g0", "g1"], labels=["l0"])
    u = table.column("u").to_numpy()
    t = table.append_column("u5", pa.array(u + 5.0))
    write_shards(t, str(tmp_path / "d"), LAYOUTS["seven"])
    s, y = _arrays(table, cols)
    res = _in_memory(s, y, 0.3, utility=u)
    kw = dict(target=0.3, **PROBLEM, tol=1e-10, progress=False)
    model = m4.fit_dataset(str(tmp_path / "d"), **cols, utility="u5", **kw)
    base = m4.fit_dataset(str(tmp_path / "d"), **cols, utility="u", **kw)
    assert model.info["status"] == "optimal" and not model.info["compressed"]
    u5 = u + 5.0
    # The shift puts the budget's mu without constraints at 0 (every row sampled at N = 997)
    shift = model.info["utility_shift"]
    assert abs(np.clip(PROBLEM["budget"] + u5 - shift, 0, 1).mean() - PROBLEM["budget"]) < 1e-12
    q = model.keep_probability(s, y, u + 5.0)
    np.testing.assert_allclose(q, base.keep_probability(s, y, u), rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.transform(t).column("q").to_numpy(), q, rtol=0, atol=1e-15)
    np.testing.assert_allclose(q, res.q, rtol=0, atol=1e-8)
    # the dual for the utility as given: u + 5 moves it by 5
    assert abs((model.mu + model.info["utility_shift"]) - (base.mu + base.info["utility_shift"] + 5.0)) < 1e-10


def test_an_infeasible_warm_start_sample_leaves_the_data_a_cold_start(tmp_path, monkeypatch):
    """With the warm-start sample forced to 32 rows (one 64-row block of N = 997), this row
    order's sample is infeasible: its duals run along a recession direction. The full solve
    starts cold instead of from them (from them it stopped at max_iter, violation 1.9e-4), and
    reaches the unsampled fit's optimum."""
    import pym4.m4._dataset as fitting

    table = metadata(N, seed=11)
    write_shards(table.take(pa.array(np.random.default_rng(14).permutation(N))), str(tmp_path / "d"), [N])
    kw = dict(sensitive=["g0", "g1"], labels=["l0", "l2"], utility="u", target=0.3, budget=0.8, eps_rep=0.02,
              eps_assoc=0.05, progress=False)
    unsampled = m4.fit_dataset(str(tmp_path / "d"), **kw)
    monkeypatch.setattr(fitting, "_SAMPLE_ROWS", 32)
    sampled = m4.fit_dataset(str(tmp_path / "d"), **kw)
    assert sampled.info["solver_passes"] > unsampled.info["solver_passes"]  # the sample's passes ran
    assert sampled.info["status"] == unsampled.info["status"] == "optimal", sampled.info["message"]
    np.testing.assert_allclose(sampled.w, unsampled.w, rtol=0, atol=1e-6)
    assert abs(sampled.mu - unsampled.mu) <= 1e-6
