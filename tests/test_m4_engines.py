"""Engines (pym4/engines): local on odd shard layouts equal to in-memory; Ray and Spark
equal to local; M4Model applied inside Ray map_batches and Spark mapInArrow; bad input named
by shard and column before any output exists. One Ray and one Spark start per session."""
import glob
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from m4_datasets import arrays_of, counts_reference, dense, metadata, write_hive, write_shards
import pym4.m4
from pym4.m4._columns import ColumnSpec, DataError
from pym4.m4.model import M4Model
from pym4.m4._stages import resolve_columns, weighted_counts, write_keep_probability
from pym4.engines import engine_for, list_shards
from pym4.engines.local import LocalEngine

# Ray and PySpark warn about their own deprecations and versions; those are not pym4's.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
              pytest.mark.filterwarnings("ignore::FutureWarning:pyspark.*")]

N = 997
LAYOUTS = {"one": [N], "seven": [1, 311, 40, 2, 500, 13, 130], "empty": [400, 0, 597]}


@pytest.fixture(scope="module")
def table():
    return metadata(N, seed=11)


def _layout(table, tmp_path, layout):
    """(source path, table in file order, spec) for a layout."""
    if layout == "hive":
        ordered = write_hive(table, str(tmp_path / "hive"))
        return str(tmp_path / "hive"), ordered, dict(sensitive=["g0"], sensitive_from="region", labels=["l0"],
                                                     labels_from="tags")
    write_shards(table, str(tmp_path / "shards"), LAYOUTS[layout])
    return str(tmp_path / "shards"), table, dict(sensitive=["g0", "g1"], labels=["l0", "l2"], labels_from="tags")


_arrays = arrays_of


def _fit(s, y, rs, target=0.3, **kw):
    """Duals from the in-memory exact solver (the stand-in for fit_dataset's passes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = pym4.m4.balance(s, y, target=target, budget=0.8, eps_rep=0.02, eps_assoc=0.05, **kw)
    model = M4Model.from_duals(rs, target=res.target, budget=0.8, eps_rep=0.02, eps_assoc=0.05,
                               v_plus=res.v_plus, v_minus=res.v_minus, mu=res.mu)
    return res, model


def _read_parts(out):
    parts = sorted(glob.glob(os.path.join(out, "*.parquet")))
    return parts, pa.concat_tables([pq.read_table(p) for p in parts])


@pytest.mark.parametrize("layout", ["one", "seven", "empty", "hive"])
def test_local_equals_in_memory(table, tmp_path, layout):
    src, ordered, kw = _layout(table, tmp_path, layout)
    eng = LocalEngine(src, workers=2, batch_rows=50)
    rs = resolve_columns(eng, ColumnSpec.make(**kw))
    s, y = _arrays(ordered, kw)
    assert rs.m == s.shape[1] and rs.c == y.shape[1]
    np.testing.assert_allclose(weighted_counts(eng, rs), counts_reference(s, y), rtol=0, atol=1e-9)
    # hive: the three regions partition the rows, so their targets must add up to one
    res, model = _fit(s, y, rs, target=[0.3, 1 / 3, 1 / 3, 1 / 3] if layout == "hive" else 0.3)
    assert res.status == "optimal"
    out = str(tmp_path / "q")
    write_keep_probability(eng, model, out)
    parts, got = _read_parts(out)
    assert len(parts) == len(eng.shards.fragments)  # one part per input file, empty ones included
    assert got.column_names == ["row", "q"]
    np.testing.assert_array_equal(got.column("row").to_numpy(), np.arange(N))  # files in path order
    np.testing.assert_allclose(got.column("q").to_numpy(), res.q, rtol=0, atol=1e-12)
    # weighted by q, the counts are those of the in-memory solution
    np.testing.assert_allclose(weighted_counts(eng, rs, model), counts_reference(s, y, res.q), atol=1e-9)


def test_sources_glob_list_dataset_and_id(table, tmp_path):
    paths = write_shards(table, str(tmp_path / "d"), LAYOUTS["seven"])
    kw = dict(sensitive=["g0", "g1"], labels=["l0"], utility="u", id="id")
    s, y = dense(table, ["g0", "g1"]), dense(table, ["l0"])
    ref = counts_reference(s, y)
    for src in (str(tmp_path / "d" / "shard-*.parquet"), paths[::-1], pads.dataset(paths), paths[2]):
        eng = engine_for(src)
        assert eng.name == "local"
        rs = resolve_columns(eng, ColumnSpec.make(**kw))
        if src is paths[2]:
            np.testing.assert_allclose(weighted_counts(eng, rs), counts_reference(s[312:352], y[312:352]))
        else:
            np.testing.assert_allclose(weighted_counts(eng, rs), ref, atol=1e-9)
    res, model = _fit(s, y, rs, utility=table.column("u").to_numpy())
    eng = engine_for(paths[::-1], workers=1)
    write_keep_probability(eng, model, str(tmp_path / "q"))
    _, got = _read_parts(str(tmp_path / "q"))
    assert got.column_names == ["id", "q"]
    np.testing.assert_array_equal(got.column("id").to_numpy(), table.column("id").to_numpy())
    np.testing.assert_allclose(got.column("q").to_numpy(), res.q, atol=1e-12)


def _broken(table, folder, case):
    paths = write_shards(table, folder, LAYOUTS["seven"])
    if case == "schema":
        t = pq.read_table(paths[2])
        t = t.set_column(t.schema.get_field_index("g1"), "g1", pa.array([str(v) for v in t.column("g1").to_pylist()]))
        pq.write_table(t, paths[2])
        return paths[2], r"shard-002\.parquet: column 'g1' has type string; expected 0/1"
    if case == "missing":
        pq.write_table(pq.read_table(paths[5]).drop_columns(["l0"]), paths[5])
        return paths[5], r"shard-005\.parquet: missing column 'l0'"
    if case == "type_differs":
        t = pq.read_table(paths[3])
        pq.write_table(t.set_column(t.schema.get_field_index("g1"), "g1", t.column("g1").cast(pa.int64())), paths[3])
        return paths[3], r"shard-003\.parquet: column 'g1' has type int64, but int8 in .*shard-000\.parquet"
    if case == "duplicate":
        t = pq.read_table(paths[6])
        pq.write_table(t.append_column("l0", t.column("l0")), paths[6])
        return paths[6], r"shard-006\.parquet: column name 'l0' appears 2 times"
    if case == "value":
        t = pq.read_table(paths[4])
        l0 = t.column("l0").to_numpy().copy()
        l0[123] = 0.5
        pq.write_table(t.set_column(t.schema.get_field_index("l0"), "l0", pa.array(l0)), paths[4])
        return paths[4], r"shard-004\.parquet: column 'l0' is not binary: row 123 has value 0\.5"
    if case == "empty":
        for p in paths:
            pq.write_table(pq.read_table(p).slice(0, 0), p)
        return folder, "the dataset has no rows"
    if case == "no_tags":
        for p in paths:
            t = pq.read_table(p)
            pq.write_table(t.set_column(t.schema.get_field_index("tags"), "tags",
                                        pa.array([[]] * t.num_rows, pa.list_(pa.string()))), p)
        return folder, "column 'tags' has no tag values"
    raise AssertionError(case)


def _run_all(eng, spec, model, out):
    """The driver's order: checks, vocabulary, counts (every value read), then the write."""
    rs = resolve_columns(eng, spec)
    weighted_counts(eng, rs)
    write_keep_probability(eng, model, out)


@pytest.mark.parametrize("case", ["schema", "missing", "type_differs", "duplicate", "value", "empty", "no_tags"])
def test_bad_shard_named_before_output(table, tmp_path, case):
    _, match = _broken(table, str(tmp_path / "d"), case)
    spec = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0"], labels_from="tags" if case == "no_tags" else None)
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0"]).resolve()
    model = M4Model(np.full(2, 0.3), 0.8, 0.01, 0.01, np.zeros(4), 0.0, rs)
    out = str(tmp_path / "q")
    with pytest.raises(DataError, match=match):
        _run_all(LocalEngine(str(tmp_path / "d")), spec, model, out)
    assert not os.path.exists(out)


def test_engine_choice_errors(tmp_path):
    with pytest.raises(ValueError, match="engine: expected one of"):
        engine_for("x.parquet", engine="dask")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        list_shards(str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(ValueError, match="batch_rows: must be an integer >= 1"):
        LocalEngine(str(tmp_path), batch_rows=0)


# ----- Ray and Spark (one start each per session) ----------------------------------------------------

@pytest.fixture(scope="module")
def seven(table, tmp_path_factory):
    """Seven uneven shards and the fitted model (saved and loaded), shared by the engine tests."""
    folder = tmp_path_factory.mktemp("seven")
    write_shards(table, str(folder / "d"), LAYOUTS["seven"])
    kw = dict(sensitive=["g0", "g1"], labels=["l0"], labels_from="tags", utility="u")
    rs = resolve_columns(LocalEngine(str(folder / "d")), ColumnSpec.make(**kw))
    s, y = _arrays(table, kw)
    res, model = _fit(s, y, rs, utility=table.column("u").to_numpy())
    model.save(str(folder / "model.json"))
    return str(folder / "d"), str(folder), res, M4Model.load(str(folder / "model.json")), rs


def _check_given_dataset(eng, name, table, rs, res, with_q, model, out):
    """An engine over a dataset it was handed: its counts, the q that the model applied in the
    user's own map gave (``with_q``: a table with id and q), and no row numbers to write by."""
    assert eng.name == name
    s, y = _arrays(table, {"sensitive": ["g0", "g1"], "labels": ["l0"], "labels_from": "tags"})
    np.testing.assert_allclose(weighted_counts(eng, rs), counts_reference(s, y), atol=1e-9)
    got = with_q.sort_by("id")
    want = pa.table({"id": table.column("id"), "q": res.q}).sort_by("id")
    np.testing.assert_array_equal(got.column("id").to_numpy(), want.column("id").to_numpy())
    np.testing.assert_allclose(got.column("q").to_numpy(), want.column("q").to_numpy(), atol=1e-12)
    with pytest.raises(DataError, match="give an id column"):
        write_keep_probability(eng, model, out)


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engine_equals_local(engine, request, seven, tmp_path):
    request.getfixturevalue("ray_session" if engine == "ray" else "spark")
    src, _, res, model, rs = seven
    local, other = LocalEngine(src), engine_for(src, engine=engine)
    assert other.name == engine
    assert resolve_columns(other, rs.spec).tags == rs.tags
    np.testing.assert_allclose(weighted_counts(other, rs, model), weighted_counts(local, rs, model), atol=1e-9)
    write_keep_probability(local, model, str(tmp_path / "local"))
    write_keep_probability(other, model, str(tmp_path / engine))
    lp, lt = _read_parts(str(tmp_path / "local"))
    op, ot = _read_parts(str(tmp_path / engine))
    # one task, and one part, per input file, named as local names it
    assert [os.path.basename(p) for p in op] == [os.path.basename(p) for p in lp] and len(op) == len(LAYOUTS["seven"])
    for a, b in zip(op, lp):
        assert pq.read_table(a).equals(pq.read_table(b))
    assert ot.sort_by("row").equals(lt)  # the same row numbers and q
    np.testing.assert_array_equal(lt.column("row").to_numpy(), np.arange(N))
    np.testing.assert_allclose(lt.column("q").to_numpy(), res.q, atol=1e-12)
    # hive partitions: the partition column (from the paths) as the groups
    hive, _, kw = _layout(metadata(N, seed=11), tmp_path, "hive")
    spec = ColumnSpec.make(**kw)
    hl, ho = LocalEngine(hive), engine_for(hive, engine=engine)
    rs_l, rs_o = resolve_columns(hl, spec), resolve_columns(ho, spec)
    assert rs_o == rs_l and rs_l.group_names == ["g0", "region=east", "region=north", "region=west"]
    np.testing.assert_allclose(weighted_counts(ho, rs_o), weighted_counts(hl, rs_l), atol=1e-9)


def test_ray_dataset_and_model_in_map_batches(ray_session, seven, table, tmp_path):
    import ray.data
    src, _, res, model, rs = seven
    ds = ray.data.read_parquet(src, include_paths=True)
    # The user's own job: the loaded model inside map_batches.
    out = ds.map_batches(model.transform, batch_format="pyarrow").select_columns(["id", "q"]).to_arrow_refs()
    _check_given_dataset(engine_for(ds), "ray", table, rs, res, pa.concat_tables(ray.get(out)), model,
                         str(tmp_path / "q"))


def test_spark_dataframe_and_model_in_map_in_arrow(spark, seven, table, tmp_path):
    src, _, res, model, rs = seven
    df = spark.read.parquet(src)
    # The user's own job: the loaded model inside mapInArrow.
    out = df.select("id", "g0", "g1", "l0", "tags", "u").mapInArrow(
        model.transform_batches, "id long, g0 boolean, g1 byte, l0 double, tags array<string>, u double, q double")
    got = pa.Table.from_pylist([r.asDict() for r in out.select("id", "q").collect()])
    _check_given_dataset(engine_for(df), "spark", table, rs, res, got, model, str(tmp_path / "q"))


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_engines_name_bad_shard(engine, request, table, tmp_path):
    request.getfixturevalue("ray_session" if engine == "ray" else "spark")
    _broken(table, str(tmp_path / "d"), "value")
    eng = engine_for(str(tmp_path / "d"), engine=engine)
    rs = resolve_columns(eng, ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0"]))
    with pytest.raises(DataError, match=r"^/.*/shard-004\.parquet: column 'l0' is not binary: row 123 has value 0\.5"):
        weighted_counts(eng, rs)


# ----- Ray and Spark: the host's shared cache; Spark: a DataFrame's packed columns ---------------------

def _garble_keeping_identity(paths):
    """Overwrite each file with other bytes of the same size and mtime: a read of it fails,
    but its (path, size, mtime) is unchanged, so only a cache keyed by them can still serve it."""
    for p in paths:
        st = os.stat(p)
        with open(p, "wb") as f:
            f.write(b"\0" * st.st_size)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_shared_cache_serves_every_worker_and_is_removed(engine, request, table, tmp_path, monkeypatch):
    """After one pass the workers have left every file's batches in the host's cache; the
    next passes read no Parquet at all (the files are garbled in place, size and mtime kept,
    and the passes still give local's counts, in whichever worker each task runs); close()
    leaves nothing behind. Without the cache (cache_bytes=0) the same passes read the files."""
    request.getfixturevalue("ray_session" if engine == "ray" else "spark")
    root = tmp_path / "cache"
    monkeypatch.setenv("PYM4_SHARD_CACHE_DIR", str(root))
    paths = write_shards(table, str(tmp_path / "d"), LAYOUTS["seven"])
    rs = ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0", "l2"]).resolve()
    want = weighted_counts(LocalEngine(paths), rs)
    eng = engine_for(str(tmp_path / "d"), engine=engine, tasks=3)
    plain = engine_for(str(tmp_path / "d"), engine=engine, cache_bytes=0)
    np.testing.assert_allclose(weighted_counts(eng, rs), want, rtol=0, atol=1e-9)
    folder = eng._shared.folder
    assert os.path.dirname(folder) == str(root / f"pym4-shard-cache-{os.getuid()}")
    assert len([f for f in os.listdir(folder) if f.endswith(".arrow")]) == len(paths)
    _garble_keeping_identity(paths)
    for _ in range(2):
        np.testing.assert_allclose(weighted_counts(eng, rs), want, rtol=0, atol=1e-9)
    eng.close()
    assert not os.path.exists(folder) and os.listdir(root / f"pym4-shard-cache-{os.getuid()}") == []
    with pytest.raises(Exception):
        weighted_counts(plain, rs)  # garbled files, no cache: the pass reads them and fails
    for bad in ({"cache_bytes": -1}, {"tasks": 0}, {"tasks": 1.5}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}: must be an integer"):
            engine_for(str(tmp_path / "d"), engine=engine, **bad)


def _run_python(code, env):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


_READ_IN_ANOTHER_PROCESS = """
import pickle, sys
import pym4.engines.local as local
from pym4.engines.local import reduce_shard
def no_parquet(*args, **kwargs):
    raise AssertionError("read Parquet")
local.scan_shard = no_parquet  # a cache hit must not come here
cache, shards, stage = pickle.load(open(sys.argv[1] if len(sys.argv) > 1 else %r, "rb"))
cols = tuple(stage.columns)
out = [reduce_shard(shards, i, stage, 64, None, cache.batches(shards, i, cols, 64)) for i in range(len(shards.paths))]
pickle.dump((out, cache.hits, cache.misses), open(%r, "wb"))
"""


def test_shared_cache_read_by_another_process(table, tmp_path, monkeypatch):
    """A second process (another worker) maps the words the first one cached: every file a
    hit, no Parquet read (its reader is replaced by one that fails), the same partials.
    The bound keeps what fits; another column set replaces the cached one."""
    import pickle
    from pym4.engines.local import reduce_shard
    from pym4.engines.shared_cache import SharedCache
    from pym4.m4._stages import CountsStage
    monkeypatch.setenv("PYM4_SHARD_CACHE_DIR", str(tmp_path / "cache"))
    paths = write_shards(table, str(tmp_path / "d"), LAYOUTS["empty"])  # an empty file too
    shards = list_shards(paths)
    shards.identity
    stage = CountsStage(ColumnSpec.make(sensitive=["g0", "g1"], labels=["l0"], labels_from="tags").resolve(
        {"tags": ["a", "b", "c", "d", "e"]}))
    cols = tuple(stage.columns)
    cache = SharedCache.create(1 << 30)
    want = [reduce_shard(shards, i, stage, 64, None, cache.batches(shards, i, cols, 64)) for i in range(3)]
    assert (cache.hits, cache.misses, cache.written) == (0, 3, 3)
    with open(tmp_path / "job.pkl", "wb") as f:
        pickle.dump((cache, shards, stage), f)
    run = _run_python(_READ_IN_ANOTHER_PROCESS % (str(tmp_path / "job.pkl"), str(tmp_path / "got.pkl")), {})
    assert run.returncode == 0, run.stderr
    with open(tmp_path / "got.pkl", "rb") as f:
        got, hits, misses = pickle.load(f)
    assert (hits, misses) == (3, 0)
    for a, b in zip(got, want):
        assert (a is None and b is None) or np.array_equal(a, b)
    # another column set: the old files go; a bound of one file's bytes keeps one file
    used = cache.nbytes
    list(cache.batches(shards, 0, ("g0",), 64))
    assert len(os.listdir(cache.folder)) == 1 and cache.nbytes < used
    small = SharedCache.create(os.path.getsize(os.path.join(cache.folder, os.listdir(cache.folder)[0])) + 1)
    for i in (0, 2):
        assert sum(b.num_rows for b, _ in small.batches(shards, i, ("g0",), 64)) == shards.rows[i]
    assert small.written == 1 and len(os.listdir(small.folder)) == 1
    cache.close()
    small.close()
    assert os.listdir(tmp_path / "cache" / f"pym4-shard-cache-{os.getuid()}") == []


_LEAVE = """
import os, signal, sys
from pym4.engines.shared_cache import SharedCache
from pym4.engines import list_shards
cache = SharedCache.create(1 << 20)
shards = list_shards(%r)
shards.identity
list(cache.batches(shards, 0, ("g0",), 64))
print(cache.folder, flush=True)
if sys.argv[-1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_shared_cache_left_by_a_driver_is_removed(table, tmp_path, how):
    """A driver that exits without close() removes its folder at exit; one killed outright
    (kill -9) leaves it, and the next cache made on this host sweeps it."""
    from pym4.engines.shared_cache import SharedCache
    env = {"PYM4_SHARD_CACHE_DIR": str(tmp_path / "cache")}
    write_shards(table, str(tmp_path / "d"), [N])
    code = _LEAVE % str(tmp_path / "d")
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", code, how], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120)
    folder = run.stdout.strip()
    assert folder.startswith(str(tmp_path / "cache")), run.stderr
    if how == "exit":
        assert run.returncode == 0 and not os.path.exists(folder)
        return
    assert run.returncode == -9 and len(os.listdir(folder)) == 1
    os.environ["PYM4_SHARD_CACHE_DIR"] = env["PYM4_SHARD_CACHE_DIR"]
    try:
        fresh = SharedCache.create(1 << 20)
    finally:
        del os.environ["PYM4_SHARD_CACHE_DIR"]
    assert not os.path.exists(folder) and os.path.isdir(fresh.folder)
    fresh.close()
    assert not os.path.exists(fresh.folder)


def test_batch_cache_keeps_one_dataset_and_column_set(table, tmp_path):
    """The local engine's cache is dropped for other columns or other files,
    and a file rewritten in place is read again."""
    from pym4.engines.local import BatchCache
    write_shards(table, str(tmp_path / "a"), [500, 497])
    shards = list_shards(str(tmp_path / "a"))
    cache = BatchCache(1 << 20)
    first = [b for b, _ in cache.batches(shards, 0, ("g0", "l1"), 128)]
    assert len(cache._files) == 1 and cache.nbytes == sum(b.nbytes for b in first)
    again = [b for b, _ in cache.batches(shards, 0, ("g0", "l1"), 128)]
    assert all(a is b for a, b in zip(first, again))  # from memory
    other = [b for b, _ in cache.batches(shards, 0, ("g0",), 128)]
    assert other[0].schema.names == ["g0"] and len(cache._files) == 1
    t = pq.read_table(shards.paths[0])
    pq.write_table(t.set_column(0, "g0", pa.array(np.ones(t.num_rows, bool))), shards.paths[0])
    os.utime(shards.paths[0], ns=(0, os.stat(shards.paths[0]).st_mtime_ns + 10**9))
    fresh = [b for b, _ in cache.batches(list_shards(str(tmp_path / "a")), 0, ("g0",), 128)]
    assert all(b.column(0).to_numpy(zero_copy_only=False).all() for b in fresh)


_BINARY = dict(sensitive=["g0", "g1"], labels=["l0", "l2"], utility="u")


def test_spark_dataframe_passes_run_packed(spark, seven, table):
    """A DataFrame's 0/1 columns (bool, int8, float) go to the workers packed into int64
    words, persisted between passes: the same counts, plain and weighted, as local; the
    frame is unpersisted by close()."""
    src, _, _, model, _ = seven
    rs = ColumnSpec.make(**_BINARY).resolve()
    eng = engine_for(spark.read.parquet(src))
    want = weighted_counts(LocalEngine(src), rs)
    np.testing.assert_allclose(weighted_counts(eng, rs), want, rtol=0, atol=1e-9)
    assert eng._packed is not None and eng._packed[1].storageLevel.useMemory
    m2 = M4Model.from_duals(rs, target=[0.3, 0.3], budget=0.8, eps_rep=0.02, eps_assoc=0.05,
                            v_plus=np.abs(model.v_plus[:, :3]), v_minus=np.abs(model.v_minus[:, :3]), mu=model.mu)
    np.testing.assert_allclose(weighted_counts(eng, rs, m2), weighted_counts(LocalEngine(src), rs, m2),
                               rtol=0, atol=1e-9)
    frame = eng._packed[1]
    eng.close()
    assert eng._packed is None and not frame.storageLevel.useMemory
    fitted = pym4.m4.fit_dataset(spark.read.parquet(src), **_BINARY, target=0.3, budget=0.8, eps_rep=0.02,
                                 eps_assoc=0.05, progress=False)
    local = pym4.m4.fit_dataset(src, **_BINARY, target=0.3, budget=0.8, eps_rep=0.02, eps_assoc=0.05,
                                progress=False)
    assert fitted.info["status"] == local.info["status"] == "optimal"
    np.testing.assert_allclose(fitted.w, local.w, rtol=0, atol=1e-9)
    assert abs(fitted.mu - local.mu) <= 1e-9


@pytest.mark.parametrize("case", ["value", "null", "null_later_batch"])
def test_spark_dataframe_packed_bad_value_named(spark, table, tmp_path, case):
    """A null or a value other than 0/1 met by the packing is reported as the raw columns
    report it: the column, the partition and the row within the partition (the session's
    Arrow batches hold 200 rows: row 277 is in the second)."""
    t = table.slice(0, 300)
    if case == "value":
        l0 = t.column("l0").to_numpy().copy()
        l0[123] = 0.5
        t = t.set_column(t.schema.get_field_index("l0"), "l0", pa.array(l0))
        match = r"^spark partition 0: column 'l0' is not binary: row 123 has value 0\.5"
    else:
        bad = 77 if case == "null" else 277
        g0 = t.column("g0").to_pylist()
        g0[bad] = None
        t = t.set_column(0, "g0", pa.array(g0, pa.bool_()))
        match = rf"^spark partition 0: column 'g0' has a missing value \(null\) at row {bad}\b"
    pq.write_table(t, str(tmp_path / "one.parquet"))
    eng = engine_for(spark.read.parquet(str(tmp_path / "one.parquet")))
    with pytest.raises(DataError, match=match):
        weighted_counts(eng, ColumnSpec.make(**_BINARY).resolve())


# ----- fit_dataset on every input kind equal to local (duals and q at 1e-9) ----------------------------

_FIT = dict(target=0.3, budget=0.8, eps_rep=0.02, eps_assoc=0.05, progress=False)
_FIT_TOL = 1e-9  # fit_dataset's default tol


def _same_fit(got, want, table, atol=1e-9):
    """The same duals (w, mu) and the same q on every row as the local fit, at ``atol``."""
    assert got.info["status"] == want.info["status"] == "optimal"
    assert got.info["compressed"] == want.info["compressed"]
    np.testing.assert_allclose(got.w, want.w, rtol=0, atol=atol)
    assert abs(got.mu - want.mu) <= atol
    q_got, q_want = got.transform(table).column("q").to_numpy(), want.transform(table).column("q").to_numpy()
    np.testing.assert_allclose(q_got, q_want, rtol=0, atol=atol)
    assert 0 < q_want.mean() < 1  # q moved: a fit that kept or dropped every row would prove little


@pytest.mark.parametrize("utility", [None, "u"], ids=["compressed", "passes"])
def test_fit_ray_dataset_equals_local(ray_session, seven, table, utility):
    import ray.data
    src = seven[0]
    kw = dict(_BINARY, utility=utility, **_FIT)
    local = pym4.m4.fit_dataset(src, **kw)
    assert local.info["compressed"] == (utility is None)
    _same_fit(pym4.m4.fit_dataset(ray.data.read_parquet(src), **kw), local, table)


@pytest.mark.parametrize("utility", [None, "u"], ids=["compressed", "passes"])
def test_fit_spark_dataframe_equals_local(spark, seven, table, utility):
    src = seven[0]
    kw = dict(_BINARY, utility=utility, **_FIT)
    local = pym4.m4.fit_dataset(src, **kw)
    _same_fit(pym4.m4.fit_dataset(spark.read.parquet(src), **kw), local, table)


# A Ray Dataset's blocks depend on Ray's scheduling, so its sample differs between runs. One CI
# run's blocks once gave an infeasible sample whose duals (a ray) the exact solve started from
# and stopped at max_iter (violation 2e-6); such a sample now leaves the data a cold start.
@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_fit_handed_in_with_warm_start_sample_equals_local(engine, request, seven, table, monkeypatch):
    """With the warm-start sample on (the core samples 64-row blocks by row number once the data
    has 4x the sample's rows: forced here at N = 997), a DataFrame or Dataset has no file
    offsets, so its rows are numbered within each partition or block and the sample takes other
    rows than local's: another path to the optimum (other pass counts), the same duals and q.
    Another path stops at another point within tol = 1e-9 of every constraint (Spark's sample
    of this data is infeasible, so its fit starts cold and stops at violation 4.5e-10, where
    local's stops at 5e-16): duals and q agree to 1e-8 (measured 3.1e-9 and 2.3e-9), not 1e-9."""
    import pym4.m4._dataset as fitting
    session = request.getfixturevalue("ray_session" if engine == "ray" else "spark")
    src = seven[0]
    kw = dict(_BINARY, **_FIT)
    unsampled = pym4.m4.fit_dataset(src, **kw)
    monkeypatch.setattr(fitting, "_SAMPLE_ROWS", 32)
    local = pym4.m4.fit_dataset(src, **kw)
    assert local.info["solver_passes"] > unsampled.info["solver_passes"]  # the sample's passes were taken
    data = session.data.read_parquet(src) if engine == "ray" else session.read.parquet(src)
    got = pym4.m4.fit_dataset(data, **kw)
    for fit in (got, local):
        assert fit.info["max_violation"] <= _FIT_TOL, fit.info["message"]
    _same_fit(got, local, table, atol=1e-8)


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_fit_files_compressed_on_engine_equals_local(engine, request, seven, table):
    """Files run on Ray/Spark with the pattern table allowed: the table is built on the
    engine (a group-by of its tasks' tables) and solved on the driver, as local does."""
    request.getfixturevalue("ray_session" if engine == "ray" else "spark")
    src = seven[0]
    kw = dict(_BINARY, utility=None, **_FIT)
    local = pym4.m4.fit_dataset(src, **kw)
    got = pym4.m4.fit_dataset(src, engine=engine, **kw)
    assert got.info["engine"] == engine and got.info["compressed"]
    assert got.info["patterns"] == local.info["patterns"]
    _same_fit(got, local, table)


# ----- a checkpoint of a dataset handed in is resumed only for the same data -------------------------

def _leave_checkpoint(data, path, kw, columns=_BINARY):
    """A fit on ``data`` that leaves its checkpoint (as a killed run would: every pass saved)."""
    from pym4.m4._dataset import _fit
    eng = engine_for(data)
    try:
        _fit(eng, ColumnSpec.make(**columns), checkpoint=path, keep_checkpoint=True, max_passes=100,
             max_patterns=1 << 20, tol=1e-9, **kw)
    finally:
        eng.close()
    assert os.path.exists(path)


def test_spark_dataframe_checkpoint_not_resumed_for_other_data(spark, seven, table, tmp_path, capsys):
    """A DataFrame is identified by its plan's semantic hash, schema and files: the same read
    resumes; another frame (other rows) with the same checkpoint path starts afresh and gets
    its own answer, not the saved one."""
    src = seven[0]
    kw = dict(target=0.3, budget=0.8, eps_rep=0.02, eps_assoc=0.05, progress=False)
    ck = str(tmp_path / "fit.ckpt.json")
    _leave_checkpoint(spark.read.parquet(src), ck, kw)
    again = pym4.m4.fit_dataset(spark.read.parquet(src), **_BINARY, checkpoint=ck, **kw)
    assert "resumed_after_pass" in again.info  # the control: the same data does resume
    _leave_checkpoint(spark.read.parquet(src), ck, kw)
    other = spark.read.parquet(src).filter("l1")
    capsys.readouterr()
    got = pym4.m4.fit_dataset(other, **_BINARY, checkpoint=ck, **kw)
    assert "resumed_after_pass" not in got.info and "belongs to another run" in capsys.readouterr().err
    own = pym4.m4.fit_dataset(other, **_BINARY, **kw)
    np.testing.assert_allclose(got.w, own.w, rtol=0, atol=1e-12)
    assert np.abs(own.w - again.w).max() > 1e-3  # the saved state would have been a different answer


def test_spark_dataframe_identity_kinds(spark, seven):
    """A read of files with Spark SQL on top is identified by its plan text (the same in every
    session: a killed driver's checkpoint resumes); a Python function or driver data adds
    the session-bound semanticHash, as the text does not show them."""
    from pyspark.sql import functions as F
    src = seven[0]
    plain = engine_for(spark.read.parquet(src).filter("l1")).identity()
    assert plain == engine_for(spark.read.parquet(src).filter("l1")).identity()
    assert "semantic_hash" not in plain and "Filter" in plain["plan"]
    assert len(plain["files"]) == len(LAYOUTS["seven"]) and all(size > 0 for _, size, _ in plain["files"])
    flag = F.udf(lambda x: bool(x), "boolean")
    assert "semantic_hash" in engine_for(spark.read.parquet(src).filter(flag("l1"))).identity()
    assert "semantic_hash" in engine_for(spark.createDataFrame([(True, 1)], "g0 boolean, g1 int")).identity()


def test_spark_dataframe_file_rewritten_not_resumed(spark, table, tmp_path):
    """The same read of files rewritten in place (same paths, same plan hash) is other data."""
    write_shards(table, str(tmp_path / "d"), [500, 497])
    kw = dict(target=0.3, budget=0.8, eps_rep=0.02, eps_assoc=0.05, progress=False)
    ck = str(tmp_path / "fit.ckpt.json")
    _leave_checkpoint(spark.read.parquet(str(tmp_path / "d")), ck, kw)
    p = str(tmp_path / "d" / "shard-001.parquet")
    pq.write_table(table.slice(0, 497), p)  # other rows, same path
    os.utime(p, ns=(0, os.stat(p).st_mtime_ns + 10**9))
    got = pym4.m4.fit_dataset(spark.read.parquet(str(tmp_path / "d")), **_BINARY, checkpoint=ck, **kw)
    assert "resumed_after_pass" not in got.info
    own = pym4.m4.fit_dataset(str(tmp_path / "d"), **_BINARY, **kw)
    np.testing.assert_allclose(got.w, own.w, rtol=0, atol=1e-9)


def test_ray_dataset_checkpoint_never_trusted_unidentified(ray_session, seven, tmp_path, capsys):
    """A Ray Dataset whose files Ray does not list (or one transformed after its read) has
    nothing that identifies it: its checkpoint is not resumed, and the fit says so."""
    import ray.data
    src = seven[0]
    kw = dict(target=0.3, budget=0.8, eps_rep=0.02, eps_assoc=0.05, progress=False)
    ck = str(tmp_path / "fit.ckpt.json")
    cols = dict(_BINARY, utility=None)  # the pattern table: few Ray passes
    _leave_checkpoint(ray.data.read_parquet(src), ck, kw, cols)
    other = ray.data.read_parquet(src).map_batches(lambda b: b.filter(b["l1"]), batch_format="pyarrow")
    assert engine_for(other).identity() is None
    capsys.readouterr()
    got = pym4.m4.fit_dataset(other, **cols, checkpoint=ck, **kw)
    assert "resumed_after_pass" not in got.info and "nothing identifies this dataset" in capsys.readouterr().err
    own = pym4.m4.fit_dataset(other, **cols, **kw)
    np.testing.assert_allclose(got.w, own.w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("include_paths", [False, True])
def test_ray_dataset_bad_value_row_of_block(ray_session, table, tmp_path, include_paths):
    """A Ray Dataset's bad row is named by its row in the block (map_batches hands a whole
    block at once), and by its file when the dataset carries the paths; the file's three
    row groups make one block here, so that row is the file's."""
    import ray.data
    t = table.slice(0, 900)
    g0 = t.column("g0").to_pylist()
    g0[700] = None
    pq.write_table(t.set_column(0, "g0", pa.array(g0, pa.bool_())), str(tmp_path / "one.parquet"), row_group_size=300)
    ds = ray.data.read_parquet(str(tmp_path / "one.parquet"), include_paths=include_paths)
    where = f"ray dataset block of {tmp_path / 'one.parquet'}" if include_paths else "ray dataset block"
    with pytest.raises(DataError, match="^" + where.replace(".", r"\.") +
                       r": column 'g0' has a missing value \(null\) at row 700\b"):
        pym4.m4.fit_dataset(ds, sensitive=["g0", "g1"], labels=["l0"], progress=False)
