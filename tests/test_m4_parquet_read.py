"""The engines' Parquet read (pym4.engines._parquet): polars for boolean and integer columns of
local files, pyarrow for everything else, the same record batches either way."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pym4.engines import _parquet
from pym4.m4 import fit_dataset

pl = pytest.importorskip("polars")


def write_hive(folder, seed=0):
    """Two hive partitions, three files, row groups of 37 rows (so a file has several), and
    every kind of column the M4 stages read."""
    rng = np.random.default_rng(seed)
    for region, n_files in (("east", 2), ("west", 1)):
        os.makedirs(os.path.join(folder, f"region={region}"))
        for f in range(n_files):
            n = int(rng.integers(50, 200))
            nullable_flag = pa.array(rng.random(n) < 0.3)
            t = pa.table({
                "id": pa.array(rng.integers(0, 1 << 40, n), pa.int64()),
                "g0": pa.array(rng.random(n) < 0.4),
                "g1": nullable_flag,
                "l0": pa.array((rng.random(n) < 0.5).astype(np.int8)),
                "l1": pa.array((rng.random(n) < 0.2).astype(np.uint16)),
                "tags": pa.array([["doctor"] if rng.random() < 0.3 else ["pilot", "nurse"] for _ in range(n)]),
            }).cast(pa.schema([pa.field("id", pa.int64()), pa.field("g0", pa.bool_(), nullable=False),
                               pa.field("g1", pa.bool_()), pa.field("l0", pa.int8()), pa.field("l1", pa.uint16()),
                               pa.field("tags", pa.list_(pa.string()))]))
            pq.write_table(t, os.path.join(folder, f"region={region}", f"part-{f}.parquet"), row_group_size=37)
    return pads.dataset(folder, format="parquet", partitioning="hive")


@pytest.fixture
def polars_reads(monkeypatch):
    """Counts the files polars was asked to read."""
    calls = []
    real = pl.scan_parquet

    def counting(path, **kw):
        calls.append(path)
        return real(path, **kw)
    monkeypatch.setattr(pl, "scan_parquet", counting)
    return calls


def read_all(ds, columns, batch_rows):
    out = []
    for frag in sorted(ds.get_fragments(), key=lambda f: f.path):
        for batch in _parquet.fragment_batches(frag, ds.schema, columns, batch_rows):
            assert 0 < batch.num_rows <= batch_rows
            out.append(batch)
    return pa.Table.from_batches(out, schema=pa.schema([ds.schema.field(c) for c in columns]))


@pytest.mark.parametrize("columns", [["g0", "g1", "l0", "l1"], ["l1", "id", "g0"], ["g0", "tags"],
                                     ["region", "g0"]])
def test_polars_and_pyarrow_read_the_same_batches(tmp_path, monkeypatch, polars_reads, columns):
    ds = write_hive(str(tmp_path))
    with_polars = read_all(ds, columns, batch_rows=16)
    numeric = all(c not in ("tags", "region") for c in columns)
    # polars reads exactly the files whose asked-for columns are all boolean/integer in the file.
    assert len(polars_reads) == (3 if numeric else 0)
    monkeypatch.setattr(_parquet, "polars_module", lambda: None)
    with_pyarrow = read_all(ds, columns, batch_rows=16)
    assert with_polars.schema == with_pyarrow.schema
    assert with_polars.equals(with_pyarrow)
    # and both are the files' rows, in order, read independently of either path
    ref = pa.concat_tables([pq.read_table(f.path, columns=[c for c in columns if c != "region"])
                            for f in sorted(ds.get_fragments(), key=lambda f: f.path)])
    for c in columns:
        if c != "region":
            assert with_polars.column(c).to_pylist() == ref.column(c).to_pylist(), c


def test_nulls_reach_the_stages_and_are_reported(tmp_path, polars_reads):
    t = pa.table({"g0": pa.array([True, False, None, True] * 25), "g1": pa.array([False, True] * 50)})
    pq.write_table(t, tmp_path / "shard-0.parquet", row_group_size=30)
    with pytest.raises(ValueError, match=r"shard-0\.parquet: column 'g0' has a missing value \(null\) at row 2"):
        fit_dataset(str(tmp_path), sensitive=["g0", "g1"], budget=0.5, eps_rep=0.05, progress=False)
    assert polars_reads  # the read that met the null was polars'


def test_fit_is_the_same_with_either_reader(tmp_path, monkeypatch, polars_reads):
    rng = np.random.default_rng(5)
    for k in range(3):
        n = 3000 + 1000 * k
        pq.write_table(pa.table({f"g{j}": pa.array(rng.random(n) < 0.3 + 0.1 * j) for j in range(2)}
                                | {f"l{r}": pa.array(rng.random(n) < 0.2 + 0.2 * r) for r in range(3)}),
                       tmp_path / f"part-{k}.parquet", row_group_size=1000)
    kw = dict(sensitive=["g0", "g1"], labels=["l0", "l1", "l2"], budget=0.6, eps_rep=0.02, eps_assoc=0.02,
              progress=False, max_patterns=1)  # passes over the files, not a table
    fast = fit_dataset(str(tmp_path), **kw)
    assert len(polars_reads) >= 3
    monkeypatch.setattr(_parquet, "polars_module", lambda: None)
    slow = fit_dataset(str(tmp_path), **kw)
    assert fast.info["status"] == slow.info["status"]
    np.testing.assert_allclose(fast.w, slow.w, rtol=0, atol=1e-12)
    assert abs(fast.mu - slow.mu) <= 1e-12
