"""M4 over datasets, the loose ends of running at scale: the progress of a pass is reported
while the pass runs (every engine), and a run on the pattern-table path resumes after
kill -9 without reading the data again."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m4_datasets import BALANCE_DATASET_RUN, metadata, read_json, write_shards
import pym4.m4 as m4
from pym4 import _backend
from pym4.engines import engine_for
from pym4.engines.local import LocalEngine
from pym4.m4._columns import ColumnSpec, DataError
from pym4.m4._dataset import CHECKPOINT_SUFFIX
from pym4.m4._stages import TOO_MANY, CountsStage, PatternStage, VocabularyStage

pytestmark = [pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
              pytest.mark.filterwarnings("ignore::FutureWarning:pyspark.*")]

N = 997
SEVEN = [1, 311, 40, 2, 500, 13, 130]


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("scale") / "d")
    write_shards(metadata(N, seed=5), folder, SEVEN)
    return folder


class _Rows:
    """A stage that counts rows, and logs each batch it sees (in-process engines only)."""
    needs_rows = False
    columns = ["g0"]

    def __init__(self, log=None):
        self.log = log

    def partial(self, batch, where, row0):
        if self.log is not None:
            self.log.append(("batch", batch.num_rows))
        return batch.num_rows

    @staticmethod
    def merge(a, b):
        return a + b


def test_local_progress_advances_after_each_batch(seven):
    log = []
    eng = LocalEngine(seven, workers=1, batch_rows=100)
    total = eng.reduce(_Rows(log), lambda rows: log.append(("progress", rows)))
    assert total == N
    batches = [k for kind, k in log if kind == "batch"]
    assert len(batches) >= 10  # 997 rows in batches of at most 100
    # Every batch is reported as soon as it is done, not at the end of the pass.
    assert log == [entry for k in batches for entry in (("batch", k), ("progress", k))]


def test_local_progress_from_threads_adds_up(seven):
    calls = []
    eng = LocalEngine(seven, workers=3, batch_rows=64)
    assert eng.reduce(_Rows(), calls.append) == N
    assert sum(calls) == N and len(calls) >= 16


def test_the_bar_advances_during_the_pass(seven, capsys):
    """fit_dataset's bars (tqdm on stderr) show the rows of each pass and their rate."""
    m4.fit_dataset(seven, sensitive=["g0", "g1"], labels=["l0", "l2"], target=0.3, budget=0.8, eps_rep=0.02,
                   eps_assoc=0.05, progress=True, engine_options=dict(batch_rows=50))
    err = capsys.readouterr().err
    assert "counting" in err and "rows/s" in err


def test_the_write_pass_has_a_bar_too(seven, tmp_path, capsys):
    """balance_dataset's last pass (writing q) shows its rows and rate like the fit's passes."""
    m4.balance_dataset(seven, str(tmp_path / "out"), sensitive=["g0", "g1"], labels=["l0"], target=0.3,
                       budget=0.8, eps_rep=0.02, eps_assoc=0.05, progress=True, engine_options=dict(batch_rows=50))
    err = capsys.readouterr().err
    assert "writing q" in err and "rows/s" in err


@pytest.mark.parametrize("engine", ["local", "ray", "spark"])
def test_write_progress_adds_up_to_the_rows(engine, request, seven, tmp_path):
    if engine != "local":
        request.getfixturevalue("ray_session" if engine == "ray" else "spark")
    from pym4.m4._stages import write_keep_probability
    model = m4.fit_dataset(seven, sensitive=["g0", "g1"], labels=["l0"], target=0.3, budget=0.8, eps_rep=0.02,
                           eps_assoc=0.05, progress=False)
    calls = []
    parts = write_keep_probability(engine_for(seven, engine=engine), model, str(tmp_path / "q"), None,
                                   calls.append)
    assert len(parts) == len(SEVEN) and sum(calls) == N
    assert sum(pq.read_metadata(p).num_rows for p in parts) == N


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engine_progress_adds_up_to_the_rows(engine, request, seven):
    request.getfixturevalue("ray_session" if engine == "ray" else "spark")
    calls = []
    eng = engine_for(seven, engine=engine)
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0"]).resolve()
    counts = eng.reduce(CountsStage(rs), calls.append)  # a stage the workers can import
    assert counts[0] == N and sum(calls) == N
    if engine == "ray":  # one report per file task, as each finishes
        assert sorted(calls) == sorted(SEVEN)


@pytest.mark.parametrize("packed", [False, True])
def test_a_spark_dataframes_passes_move_the_bar(spark, seven, packed):
    """A handed-in DataFrame: its first pass learns the row count (the bar moves once, at the
    end), and every later pass moves it as partition tasks finish (16 tasks on 2 slots, each
    0.1 s or more: the 0.2 s poll sees some finish), adding up to the rows every time."""
    df = spark.read.parquet(seven).repartition(16)
    eng = engine_for(df, engine="spark")
    # The counts take the packed frame's path, the tags' vocabulary the raw columns'.
    stage = CountsStage(ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0"]).resolve()) if packed \
        else VocabularyStage(["tags"])
    assert (getattr(stage, "packing", None) is not None) == packed
    try:
        first, second = [], []
        eng.reduce(stage, first.append)
        eng.reduce(stage, second.append)
    finally:
        eng.close()
    assert first == [N]
    assert sum(second) == N and len(second) >= 2, second


def test_a_spark_dataframes_write_moves_the_bar(spark, seven, tmp_path):
    from pym4.m4._stages import write_keep_probability
    df = spark.read.parquet(seven).repartition(8)
    model = m4.fit_dataset(df, sensitive=["g0", "g1"], labels=["l0"], id="id", target=0.3, budget=0.8,
                           eps_rep=0.02, eps_assoc=0.05, progress=False)
    calls = []
    parts = write_keep_probability(engine_for(df, engine="spark"), model, str(tmp_path / "q"), None, calls.append)
    assert sum(calls) == N == sum(pq.read_metadata(p).num_rows for p in parts)


def test_a_spark_dataframes_bad_value_in_the_write_names_its_partition_row(spark, tmp_path):
    """The write numbers rows within the partition (not within each Arrow batch of 200 rows,
    as it did), as the fit's errors do."""
    from pym4.m4._stages import write_keep_probability
    good = metadata(997, seed=5)
    folder = str(tmp_path / "good")
    write_shards(good, folder, [997])
    model = m4.fit_dataset(folder, sensitive=["g0", "g1"], labels=["l0"], id="id", target=0.3, budget=0.8,
                           eps_rep=0.02, eps_assoc=0.05, progress=False)
    l0 = good.column("l0").to_numpy().copy()
    l0[450] = 0.5  # the third Arrow batch of the one partition (maxRecordsPerBatch = 200)
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(good.set_column(good.schema.get_field_index("l0"), "l0", pa.array(l0)), bad)
    df = spark.read.parquet(bad).coalesce(1)
    with pytest.raises(DataError, match=r"spark partition 0: column 'l0' is not binary: row 450 has value 0\.5"):
        write_keep_probability(engine_for(df, engine="spark"), model, str(tmp_path / "q"))


# ----- checkpoint on the pattern-table path -------------------------------------------------------

_ARGS = dict(sensitive=["g0", "g1"], labels=["l0", "l2"], labels_from="tags", target=0.3, budget=0.8,
             eps_rep=0.02, eps_assoc=0.05, tol=1e-10, progress=False)
def test_kill_on_the_pattern_table_path_then_resume(seven, tmp_path, capsys):
    out = str(tmp_path / "out")
    ck = out + CHECKPOINT_SUFFIX
    env = {**os.environ, "PYM4_TEST_SLEEP_AFTER_PASS": "2"}
    proc = subprocess.Popen([sys.executable, "-c", BALANCE_DATASET_RUN.format(src=seven, out=out, args=_ARGS)], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(ck) and "pattern" in read_json(ck):
                break
            time.sleep(0.05)
        assert os.path.exists(ck), "the run wrote no checkpoint"
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: no clean-up runs
    finally:
        proc.wait(timeout=60)
    saved = read_json(ck)
    assert "pattern" in saved and saved["pattern"]["table"] is not None and not os.path.exists(out)
    assert len(saved["tags"]["tags"]) == 6  # the vocabulary pass's result is saved too
    capsys.readouterr()
    m4.balance_dataset(seven, out, **_ARGS)  # the same call again
    err = capsys.readouterr().err
    assert f"resuming from {ck}: " in err and "counts and pattern table saved: not read again" in err
    assert not os.path.exists(ck)
    rep = read_json(os.path.join(out, "_pym4_report.json"))
    m4.balance_dataset(seven, out + "-plain", **_ARGS)
    plain_rep = read_json(os.path.join(out + "-plain", "_pym4_report.json"))
    assert rep["compressed"] and plain_rep["compressed"] and rep["status"] == "optimal"
    assert plain_rep["passes"] == 2 and rep["passes"] == 0  # vocabulary + counting, not redone
    assert pq.read_table(out).equals(pq.read_table(out + "-plain"))  # the same q, bit for bit
    np.testing.assert_array_equal(rep["mu"], plain_rep["mu"])


def test_a_checkpoint_of_another_request_is_not_used(seven, tmp_path, capsys):
    out = str(tmp_path / "out")
    ck = out + CHECKPOINT_SUFFIX
    env = {**os.environ, "PYM4_TEST_SLEEP_AFTER_PASS": "30"}
    proc = subprocess.Popen([sys.executable, "-c", BALANCE_DATASET_RUN.format(src=seven, out=out, args=_ARGS)], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not os.path.exists(ck):
            time.sleep(0.05)
        assert os.path.exists(ck)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    capsys.readouterr()
    m4.balance_dataset(seven, out, **{**_ARGS, "budget": 0.75})
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "resuming" not in err
    rep = read_json(os.path.join(out, "_pym4_report.json"))
    assert rep["passes"] == 2 and rep["status"] == "optimal"


# ----- the local engine's cache and the boolean conversion --------------------------------------------

def test_local_cache_gives_the_same_passes_within_its_bound(seven):
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0", "l2"], utility="u").resolve()
    stage = CountsStage(rs)
    want = LocalEngine(seven, batch_rows=64, cache_bytes=0).reduce(stage)
    full = LocalEngine(seven, batch_rows=64)
    for _ in range(3):  # read and keep, then from memory
        np.testing.assert_array_equal(full.reduce(stage), want)
    assert len(full._cache._files) == len(SEVEN) and full._cache.nbytes > 0
    bound = full._cache.nbytes // 2
    half = LocalEngine(seven, batch_rows=64, cache_bytes=bound)
    for _ in range(3):
        np.testing.assert_array_equal(half.reduce(stage), want)
    assert 0 < half._cache.nbytes <= bound and 0 < len(half._cache._files) < len(SEVEN)
    with pytest.raises(ValueError, match="cache_bytes: must be an integer >= 0"):
        LocalEngine(seven, cache_bytes=-1)


@pytest.mark.parametrize("offset", [0, 8, 3])
def test_boolean_columns_to_uint8_at_any_offset(offset):
    import pyarrow as pa
    rng = np.random.default_rng(offset)
    cols = {k: rng.random(1000) < p for k, p in (("a", 0.3), ("b", 0.6), ("x", 0.5))}
    batch = pa.record_batch({k: pa.array(v) for k, v in cols.items()}).slice(offset, 701)
    s, y = ColumnSpec.make(sensitive=["a", "b"], labels=["x"]).resolve().data_tuple(batch, "shard")[:2]
    want = np.stack([cols[k][offset:offset + 701] for k in "abx"], axis=1).astype(np.uint8)
    assert s.dtype == np.uint8 and s.flags.c_contiguous and y.flags.c_contiguous
    np.testing.assert_array_equal(s, want[:, :2])
    np.testing.assert_array_equal(y, want[:, 2:])


def test_pattern_pass_stops_building_tables_past_the_bound(seven):
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0", "l1", "l2"], labels_from="tags").resolve(
        {"tags": ["doctor", "nurse", "pilot", "chef", "judge", "baker"]})
    eng = LocalEngine(seven, workers=1, batch_rows=64)
    stage = PatternStage(rs, max_patterns=20)
    merged, counts, _ = eng.reduce(stage)
    assert merged == TOO_MANY and stage.table(merged) is None and stage.over  # later batches only counted
    np.testing.assert_array_equal(counts, eng.reduce(CountsStage(rs)))


def test_pattern_tables_merged_like_a_binary_counter(seven):
    """The merged table holds every distinct (s, y) row once with its count (numpy's unique
    as the reference), though the batches' tables were aggregated only a few times each."""
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0", "l1", "l2"]).resolve()
    eng = LocalEngine(seven, workers=1, batch_rows=16)
    stage = PatternStage(rs, max_patterns=1 << 20)
    merged, _, _ = eng.reduce(stage)
    assert 1 <= len(merged) <= 8  # a few tables of decreasing size, not one per batch (> 60)
    sizes = [len(t[1]) for t in merged]
    assert sizes == sorted(sizes, reverse=True)
    (s, y, _, _, c, _), counts = stage.table(merged)
    got = {tuple(r): int(k) for r, k in zip(np.concatenate([s, y], axis=1).tolist(), counts)}
    t = pq.read_table(seven)
    rows = np.stack([np.asarray(t.column(k).to_numpy(zero_copy_only=False), dtype=np.uint8)
                     for k in ("g0", "g1", "l0", "l1", "l2")], axis=1)
    uniq, want = np.unique(rows, axis=0, return_counts=True)
    assert got == {tuple(r): int(k) for r, k in zip(uniq.tolist(), want)}


def test_local_cache_holds_the_latest_column_set(seven):
    """A pass over other columns (here: fewer labels) replaces what the cache holds, within
    the same bound, and gives the same counts as an engine without a cache."""
    wide = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0", "l2"]).resolve()
    narrow = ColumnSpec.make(sensitive=["g0"], labels=["l2"]).resolve()
    eng = LocalEngine(seven, batch_rows=64)
    eng.reduce(CountsStage(wide))
    assert eng._cache._key[1] == tuple(CountsStage(wide).columns) and eng._cache._files
    got = eng.reduce(CountsStage(narrow))
    assert eng._cache._key[1] == tuple(CountsStage(narrow).columns) and eng._cache._files
    assert eng._cache.nbytes == sum(b.nbytes for batches in eng._cache._files.values() for b, _ in batches)
    np.testing.assert_array_equal(got, LocalEngine(seven, batch_rows=64, cache_bytes=0).reduce(CountsStage(narrow)))
    np.testing.assert_array_equal(eng.reduce(CountsStage(narrow)), got)


def test_pattern_pass_gives_up_early_on_nearly_unique_rows():
    """A batch where more than half the rows are patterns seen once, in a dataset whose
    rows at that rate would make 4x the bound, ends the table at once (each Spark/Ray task
    decides from its own first batch); a dataset of few patterns, or one too small for the
    rate to matter, keeps its table."""
    rng = np.random.default_rng(5)
    n = 4500
    cols = {"g0": rng.random(n) < 0.4, **{f"l{r:02d}": rng.random(n) < 0.5 for r in range(20)}}
    batch = pa.RecordBatch.from_pydict(cols)
    rs = ColumnSpec.make(sensitive=["g0"], labels=[f"l{r:02d}" for r in range(20)]).resolve()
    assert PatternStage(rs, 5000, rows=30000).partial(batch, "b", 0)[0] == TOO_MANY
    for rows in (None, 15000):  # unknown size, or 4500 / 4500 x 15000 < 4 x 5000
        tables = PatternStage(rs, 5000, rows=rows).partial(batch, "b", 0)[0]
        assert tables != TOO_MANY and len(tables[0][1]) > n // 2
    few = ColumnSpec.make(sensitive=["g0"], labels=["l00", "l01"]).resolve()  # 8 patterns
    tables = PatternStage(few, 5000, rows=10 ** 10).partial(batch, "b", 0)[0]
    assert tables != TOO_MANY and len(tables[0][1]) == 8
