"""fit_dataset on files that are not plain local paths: a pyarrow Dataset on another pyarrow
filesystem (a subtree of the local one, an in-memory fsspec store standing in for an object
store) and a file:// URI give the same duals and q as the plain local path; a missing URI
is named; Ray and Spark refuse a non-local source before any work. No network is needed."""
import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from m4_datasets import arrays_of, metadata, write_hive, write_shards
import pym4.m4 as m4
from pym4 import _backend
from pym4.engines import list_shards, require_local

pytestmark = pytest.mark.skipif(_backend.core() is None, reason="needs the compiled core")

N = 997
SEVEN = [1, 311, 40, 2, 500, 13, 130]  # uneven shards
PROBLEM = dict(budget=0.8, eps_rep=0.02, eps_assoc=0.05, tol=1e-10, progress=False)
FLAT = dict(sensitive=["g0", "g1"], labels=["l0", "l2"], labels_from="tags", target=0.3)
HIVE = dict(sensitive=["g0"], sensitive_from="region", labels=["l0"], labels_from="tags",
            target=[0.3, 1 / 3, 1 / 3, 1 / 3])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A local folder holding 'shards' (7 uneven files) and 'hive' (region=.../ partitions)."""
    root = str(tmp_path_factory.mktemp("lake"))
    table = metadata(N, seed=11)
    write_shards(table, os.path.join(root, "shards"), SEVEN)
    ordered = write_hive(table, os.path.join(root, "hive"))
    return root, table, ordered


def _memory_fs(root):
    """The files under ``root`` copied into a fresh in-memory fsspec store, as a pyarrow filesystem."""
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory", skip_instance_cache=True)
    mem.store.clear()
    mem.pseudo_dirs.clear()
    mem.pseudo_dirs.append("")
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                mem.pipe("/lake/" + os.path.relpath(p, root), f.read())
    return pafs.PyFileSystem(pafs.FSSpecHandler(mem))


def _same(a, b):
    np.testing.assert_allclose(a.w, b.w, rtol=0, atol=1e-12)
    assert abs(a.mu - b.mu) <= 1e-12


def _fit(src, cols):
    return m4.fit_dataset(src, **cols, **PROBLEM)


@pytest.mark.parametrize("kind", ["shards", "hive"])
def test_other_filesystems_fit_as_the_local_path(folders, kind):
    root, table, ordered = folders
    cols = FLAT if kind == "shards" else HIVE
    s, y = arrays_of(table if kind == "shards" else ordered, cols)
    ref = _fit(os.path.join(root, kind), cols)
    assert ref.info["status"] == "optimal" and ref.info["rows"] == N
    q = ref.keep_probability(s, y)
    part = dict(partitioning="hive") if kind == "hive" else {}
    sources = {
        "file uri": "file://" + os.path.join(root, kind),
        "subtree dataset": pads.dataset(kind, filesystem=pafs.SubTreeFileSystem(root, pafs.LocalFileSystem()),
                                        format="parquet", **part),
    }
    try:
        mem = _memory_fs(root)
    except pytest.skip.Exception:
        mem = None
    if mem is not None:
        sources["memory dataset"] = pads.dataset("/lake/" + kind, filesystem=mem, format="parquet", **part)
    local = list_shards(os.path.join(root, kind))
    assert len(local.fragments) == (7 if kind == "shards" else 3)
    for name, src in sources.items():
        sh = list_shards(src)
        assert sh.rows == local.rows, name  # the same files in the same order
        assert len(sh.identity) == len(sh.fragments) and all(i[1] > 0 for i in sh.identity), name
        fit = _fit(src, cols)
        assert fit.info["status"] == "optimal" and fit.info["rows"] == N, name
        _same(fit, ref)
        np.testing.assert_allclose(fit.keep_probability(s, y), q, rtol=0, atol=1e-12, err_msg=name)


def test_uri_file_and_glob(folders):
    root, table, _ = folders
    ref = list_shards(os.path.join(root, "shards"))
    one = list_shards("file://" + ref.paths[3])
    assert one.paths == [ref.paths[3]] and one.rows == [ref.rows[3]]
    globbed = list_shards("file://" + os.path.join(root, "shards", "*.parquet"))
    assert globbed.paths == ref.paths and globbed.identity == ref.identity  # local files: the os.stat identity
    a, b = _fit(globbed.paths, FLAT), _fit("file://" + os.path.join(root, "shards", "*.parquet"), FLAT)
    _same(a, b)


def test_identity_on_another_filesystem_names_it(folders):
    root = folders[0]
    sub = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem())
    sh = list_shards(pads.dataset("shards", filesystem=sub, format="parquet"))
    local = list_shards(os.path.join(root, "shards"))
    assert [i[1:] for i in sh.identity] == [i[1:] for i in local.identity]  # size, mtime from the filesystem
    assert all(i[0].startswith("local/") and root in i[0] for i in sh.identity)  # the subtree's root in the name


def test_missing_uri_is_named(tmp_path):
    missing = "file://" + str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        m4.fit_dataset(missing, sensitive=["g0"], labels=["l0"], target=0.3, budget=0.5, progress=False)
    with pytest.raises(FileNotFoundError, match=r"no file matches .*nowhere/\*\.parquet"):
        list_shards(missing + "/*.parquet")
    with pytest.raises(ValueError, match="cannot open 'nosuch://x'"):
        list_shards("nosuch://x")


def test_ray_and_spark_refuse_a_non_local_source(folders):
    root = folders[0]
    for engine, handed in (("ray", "Ray Dataset"), ("spark", "Spark DataFrame")):
        with pytest.raises(ValueError, match=rf"engine='{engine}' reads local paths only, not 's3://bucket/lake/'"):
            require_local("s3://bucket/lake/", engine, handed)
        sub = pads.dataset("shards", filesystem=pafs.SubTreeFileSystem(root, pafs.LocalFileSystem()), format="parquet")
        with pytest.raises(ValueError, match="SubTreeFileSystem|subtree"):
            require_local(sub, engine, handed)
        require_local("file://" + root, engine, handed)  # the local filesystem: allowed
        require_local(os.path.join(root, "shards"), engine, handed)


def test_spark_engine_refuses_a_uri_before_any_work():
    pytest.importorskip("pyspark")
    with pytest.raises(ValueError, match=r"engine='spark' reads local paths only, not 's3://bucket/lake/'; "
                                         r"use engine='local' or hand in a Spark DataFrame"):
        m4.fit_dataset("s3://bucket/lake/", sensitive=["g0"], labels=["l0"], target=0.3, engine="spark", progress=False)



class _Spec:
    def to_json(self):
        return {"columns": "stand-in"}


def test_checkpoint_fingerprint_on_another_filesystem(folders):
    """The checkpoint fingerprint is the engine's shards identity (the filesystem's file info):
    equal for the same files listed again, JSON-able as saved; None (never resumed) on a store
    that keeps no mtime (fsspec's memory store), as a same-size rewrite would go unseen."""
    import json
    from pym4.engines.local import LocalEngine
    from pym4.m4._dataset import _fingerprint
    root = folders[0]
    sub = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem())
    fps = [_fingerprint(LocalEngine(pads.dataset("shards", filesystem=sub, format="parquet")), _Spec(), {})
           for _ in range(2)]
    assert fps[0] is not None and fps[0] == fps[1] == json.loads(json.dumps(fps[0]))
    assert len(fps[0]["files"]) == 7
    local = _fingerprint(LocalEngine(os.path.join(root, "shards")), _Spec(), {})
    assert [f[1:] for f in local["files"]] == [f[1:] for f in fps[0]["files"]]
    assert local["files"] == [list(i) for i in list_shards(os.path.join(root, "shards")).identity]
    mem = _memory_fs(root)
    assert _fingerprint(LocalEngine(pads.dataset("/lake/shards", filesystem=mem, format="parquet")), _Spec(), {}) is None
