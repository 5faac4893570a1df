"""The Spark engine (``pip install 'pym4[spark]'``), DataFrame API only, so it works on
Spark Connect (no RDDs). Nothing is shuffled: each task's result (a few KB) is collected.

- Parquet files (a path, glob, directory or list): one Spark task per file,
  ``spark.range(n_files, numPartitions=n_files).mapInArrow(...)``, runs the same per-file
  code as the local engine (pyarrow reads the file in record batches, hive partition
  columns from the path). So rows are numbered exactly as local numbers them, and the final
  pass writes one part per input file, named as local names it (``part-NNNNN.parquet``),
  into the output folder (which the executors must see, as for any Spark write).
  ``spark.read.parquet`` is not used: it splits large files and packs small ones into
  partitions (``spark.sql.files.maxPartitionBytes``), so a part per partition would not
  be a part per file, and its JVM-to-Arrow conversion costs more per pass than pyarrow's read.
- a Spark ``DataFrame`` handed in: ``df.mapInArrow`` runs the stage over each partition's
  Arrow batches and yields one pickled partial result per partition; a write pass is
  ``mapInArrow`` + ``df.write.parquet`` (one part per partition: a DataFrame has no files).

Progress: while a pass over files runs, the driver polls Spark's status tracker and
advances by the finished tasks' share of the rows.
"""
from __future__ import annotations

import os
import pickle
import sys
import threading
import uuid
from typing import Any, Callable, Iterable, List, Optional

from ..m4._columns import ColumnSpec, DataError, check_schema
from . import Engine, _check_out, list_shards, reraise_data_errors
from .local import part_name, reduce_shard, write_shard

__all__ = ["SparkEngine"]


def _data_errors(run):
    from pyspark.errors import PythonException
    return reraise_data_errors(run, PythonException)


class _ShardTasks:
    """mapInArrow over shard numbers: per file, the partial result (reduce) or the part
    written (write), as one pickled row."""

    def __init__(self, shards, stage, batch_rows: int, out: Optional[str] = None):
        self.shards, self.stage, self.batch_rows, self.out = shards, stage, batch_rows, out

    def __call__(self, batches):
        import pyarrow as pa
        for batch in batches:
            for i in batch.column(0).to_pylist():
                if self.out is None:
                    r = reduce_shard(self.shards, i, self.stage, self.batch_rows)
                else:
                    r = write_shard(self.shards, i, self.stage, self.batch_rows, os.path.join(self.out, part_name(i)))
                yield pa.RecordBatch.from_pydict({"result": pa.array([pickle.dumps(r)], type=pa.binary())})


class _Partials:
    """mapInArrow over a DataFrame's partitions: the merged partial result of a partition."""

    def __init__(self, stage):
        self.stage = stage

    def __call__(self, batches):
        import pyarrow as pa
        from pyspark import TaskContext
        ctx = TaskContext.get()
        where = f"spark partition {ctx.partitionId() if ctx else '?'}"
        acc = None
        for batch in batches:
            part = self.stage.partial(batch.select(self.stage.columns), where, 0)
            acc = part if acc is None else self.stage.merge(acc, part)
        yield pa.RecordBatch.from_pydict({"result": pa.array([pickle.dumps(acc)], type=pa.binary())})


class _Transform:
    def __init__(self, stage):
        self.stage = stage

    def __call__(self, batches):
        for batch in batches:
            yield from self.stage.transform(batch.select(self.stage.columns), "spark dataframe", 0).to_batches()


def _raise(error):
    raise error


def _collect_with_progress(spark, df, total: int, progress: Optional[Callable[[int], None]]):
    """``df.collect()``; meanwhile (classic Spark, not Connect) ``progress`` gets the finished
    tasks' share of ``total`` rows, polled from the status tracker every 0.2 s."""
    sc = getattr(spark, "sparkContext", None) if progress is not None else None
    try:
        tracker = sc.statusTracker() if sc is not None else None
    except Exception:  # Spark Connect: no SparkContext on the client
        tracker = None
    if tracker is None:
        rows = _data_errors(df.collect)
        if progress is not None:
            progress(total)
        return rows
    group, result, done = f"pym4-{uuid.uuid4().hex}", {}, threading.Event()

    def run():
        try:
            sc.setJobGroup(group, "pym4 pass", interruptOnCancel=False)
            result["rows"] = df.collect()
        except BaseException as e:  # handed to the driver thread below
            result["error"] = e
        finally:
            done.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    shown = 0
    while not done.wait(0.2):
        finished = tasks = 0
        for job in tracker.getJobIdsForGroup(group):
            info = tracker.getJobInfo(job)
            for stage in (info.stageIds if info else ()):
                st = tracker.getStageInfo(stage)
                if st is not None:
                    finished, tasks = finished + st.numCompletedTasks, tasks + st.numTasks
        now = total * finished // tasks if tasks else 0
        if now > shown:
            progress(now - shown)
            shown = now
    t.join()
    if "error" in result:
        return _data_errors(lambda: _raise(result["error"]))
    progress(total - shown)
    return result["rows"]


class SparkEngine(Engine):
    """data: a Spark ``DataFrame``, or Parquet files as for :class:`LocalEngine` (run with
    ``spark``, default: the active session, else a local one). batch_rows: rows per record
    batch of a file."""
    name = "spark"

    def __init__(self, data, *, spark=None, batch_rows: int = 1 << 16):
        from pyspark.sql import DataFrame, SparkSession

        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows: must be an integer >= 1, got {batch_rows!r}")
        self.batch_rows = batch_rows
        self.shards = None
        if isinstance(data, DataFrame) or type(data).__module__.startswith("pyspark.sql"):
            self.df, self.source = data, "spark dataframe"
            self.spark = data.sparkSession
        else:
            self.shards = list_shards(data)
            self.source = self.shards.source
            if spark is None:
                spark = SparkSession.getActiveSession()
            if spark is None:
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                spark = SparkSession.builder.master("local[*]").getOrCreate()
            self.spark, self.df = spark, None

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

    def _over_shards(self, task, progress=None) -> List[Any]:
        n = len(self.shards.fragments)
        self.shards.offsets  # read every footer once here, not again in each task
        df = self.spark.range(0, n, 1, numPartitions=max(n, 1)).mapInArrow(task, "result binary")
        rows = _collect_with_progress(self.spark, df, sum(self.shards.rows), progress)
        return [pickle.loads(r["result"]) for r in rows]

    def partials(self, stage, progress=None) -> List[Any]:
        if self.shards is not None:
            return self._over_shards(_ShardTasks(self.shards, stage, self.batch_rows), progress)
        from pyspark.sql import functions as F
        df = self.df.select(*[F.col(f"`{c}`") for c in stage.columns]).mapInArrow(_Partials(stage), "result binary")
        rows = _data_errors(df.collect)
        return [pickle.loads(r["result"]) for r in rows]

    def write(self, stage, out: str) -> List[str]:
        from pyspark.sql import functions as F
        from pyspark.sql.pandas.types import from_arrow_schema

        out = _check_out(out)
        if self.shards is not None:
            os.makedirs(out)
            return sorted(self._over_shards(_ShardTasks(self.shards, stage, self.batch_rows, os.path.abspath(out))))
        if stage.needs_rows:
            raise DataError(f"{self.source}: a Spark DataFrame has no file order to number rows by; "
                            f"give an id column (id=...)")
        df = self.df.select(*[F.col(f"`{c}`") for c in stage.columns]).mapInArrow(
            _Transform(stage), from_arrow_schema(stage.output_schema))
        _data_errors(lambda: df.write.parquet(out))
        return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet"))
