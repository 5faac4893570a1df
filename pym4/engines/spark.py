"""The Spark engine (``pip install 'pym4[spark]'``), DataFrame API only, so it works on
Spark Connect (no RDDs):

- reduce: ``df.mapInArrow`` runs the stage over each partition's Arrow batches and yields
  one pickled partial result per partition; ``collect()`` brings those (a few KB each) to
  the driver, which merges them. Nothing is shuffled.
- write: ``mapInArrow`` again for the output rows, then ``df.write.parquet``.

Parquet files are read with ``spark.read.parquet`` (hive partitions from the base folder);
``_metadata.file_path`` names the file in errors and ``_metadata.row_index`` gives each
row's position in its file, so ``row`` is the same as on the other engines.
"""
from __future__ import annotations

import os
import pickle
import sys
from typing import Any, Dict, List, Optional
from urllib.parse import unquote, urlparse

from ..m4._columns import ROW, ColumnSpec, DataError, check_schema
from . import Engine, _check_out, list_shards, reraise_data_errors

__all__ = ["SparkEngine"]

_PATH, _INDEX = "__pym4_file", "__pym4_row_index"


def _local_path(uri: str) -> str:
    """Spark's ``file:///a%20b/x.parquet`` as pyarrow names the file: ``/a b/x.parquet``."""
    p = urlparse(uri)
    return unquote(p.path) if p.scheme in ("", "file") else uri


def _runs(batch, stage, files: bool):
    """(sub-batch of the stage's columns, where, row0) per run of rows from one file."""
    import numpy as np
    import pyarrow.compute as pc

    if not files:
        from pyspark import TaskContext
        ctx = TaskContext.get()
        yield batch, f"spark partition {ctx.partitionId() if ctx else '?'}", 0, None
        return
    if batch.num_rows == 0:
        return
    enc = pc.dictionary_encode(batch.column(_PATH))
    codes = np.asarray(enc.indices)
    starts = np.concatenate([[0], np.flatnonzero(codes[1:] != codes[:-1]) + 1, [len(codes)]])
    index = np.asarray(batch.column(_INDEX), dtype=np.int64)
    names = enc.dictionary.to_pylist()
    for b, e in zip(starts[:-1], starts[1:]):
        yield batch.slice(b, e - b), _local_path(names[codes[b]]), int(index[b]), index[b:e]


def _data_errors(run):
    from pyspark.errors import PythonException
    return reraise_data_errors(run, PythonException)


class _Partials:
    def __init__(self, stage, files: bool):
        self.stage, self.files = stage, files

    def __call__(self, batches):
        import pyarrow as pa
        acc = None
        for batch in batches:
            for run, where, row0, _ in _runs(batch, self.stage, self.files):
                part = self.stage.partial(run.select(self.stage.columns), where, row0)
                acc = part if acc is None else self.stage.merge(acc, part)
        yield pa.RecordBatch.from_pydict({"result": pa.array([pickle.dumps(acc)], type=pa.binary())})


class _Transform:
    def __init__(self, stage, offsets: Optional[Dict[str, int]]):
        self.stage, self.offsets = stage, offsets

    def __call__(self, batches):
        import numpy as np
        import pyarrow as pa
        for batch in batches:
            for run, where, row0, index in _runs(batch, self.stage, self.offsets is not None):
                sub = run.select([c for c in self.stage.columns])
                if self.stage.needs_rows:
                    rows = self.offsets[where] + np.asarray(index, dtype=np.int64)
                    sub = sub.append_column(pa.field(ROW, pa.int64()), pa.array(rows))
                for out in self.stage.transform(sub, where, row0).to_batches():
                    yield out


class SparkEngine(Engine):
    """data: a Spark ``DataFrame``, or Parquet files as for :class:`LocalEngine` (read with
    ``spark``, default: the active session, else a local one)."""
    name = "spark"

    def __init__(self, data, *, spark=None):
        from pyspark.sql import DataFrame, SparkSession

        self.shards = None
        if isinstance(data, DataFrame) or type(data).__module__.startswith("pyspark.sql"):
            self.df, self.source = data, "spark dataframe"
        else:
            self.shards = list_shards(data)
            self.source = self.shards.source
            if spark is None:
                spark = SparkSession.getActiveSession()
            if spark is None:
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                spark = SparkSession.builder.master("local[*]").getOrCreate()
            reader = spark.read
            if self.shards.base:
                reader = reader.option("basePath", self.shards.base)
            self.df = reader.parquet(*self.shards.paths)

    def field(self, name: str):
        if self.shards is not None:
            return self.shards.dataset.schema.field(name)
        from pyspark.sql.pandas.types import to_arrow_schema
        return to_arrow_schema(self.df.select(name).schema).field(0)

    def check(self, spec: ColumnSpec) -> None:
        if self.shards is not None:
            self.shards.check(spec)
        else:
            from pyspark.sql.pandas.types import to_arrow_schema
            check_schema(spec, to_arrow_schema(self.df.schema), self.source)

    def _select(self, columns: List[str]):
        from pyspark.sql import functions as F
        cols = [F.col(f"`{c}`") for c in columns]
        if self.shards is not None:
            cols += [F.col("_metadata.file_path").alias(_PATH), F.col("_metadata.row_index").alias(_INDEX)]
        return self.df.select(*cols)

    def partials(self, stage) -> List[Any]:
        df = self._select(stage.columns).mapInArrow(_Partials(stage, self.shards is not None), "result binary")
        rows = _data_errors(df.collect)
        return [pickle.loads(r["result"]) for r in rows]

    def write(self, stage, out: str) -> List[str]:
        from pyspark.sql.pandas.types import from_arrow_schema

        out = _check_out(out)
        if stage.needs_rows and self.shards is None:
            raise DataError(f"{self.source}: a Spark DataFrame has no file order to number rows by; "
                            f"give an id column (id=...)")
        offsets = None
        if self.shards is not None:
            offsets = {os.path.abspath(p): o for p, o in zip(self.shards.paths, self.shards.offsets)}
        df = self._select(stage.columns).mapInArrow(_Transform(stage, offsets), from_arrow_schema(stage.output_schema))
        _data_errors(lambda: df.write.parquet(out))
        return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet"))
