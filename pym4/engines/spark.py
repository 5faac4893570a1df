"""The Spark engine (``pip install 'pym4[spark]'``), DataFrame API only, so it works on
Spark Connect (no RDDs). Nothing is shuffled: each task's result (a few KB) is collected.

- Parquet files (a path, glob, directory or list): ``spark.range(n_files,
  numPartitions=tasks).mapInArrow(...)``, each task a run of consecutive files, runs the
  same per-file code as the local engine (pyarrow reads the file in record batches, hive
  partition columns from the path) and sends one result per file. ``tasks`` defaults to
  Spark's default parallelism (the cores it has), at most one per file: a Spark task
  costs 0.1-0.3 s of its slot whatever it does (measured on local[2] at load ~5: an empty
  10-task job took 0.7-1.3 s, a 2-task one 0.2-0.3 s), against ~0.05 s for a cached
  1e6-row file, so a task per file made a warm pass 3-5x local's. Rows are numbered exactly
  as local numbers them, and the final
  pass writes one part per input file, named as local names it (``part-NNNNN.parquet``),
  into the output folder (which the executors must see, as for any Spark write).
  ``spark.read.parquet`` is not used: it splits large files and packs small ones into
  partitions (``spark.sql.files.maxPartitionBytes``), so a part per partition would not
  be a part per file, and its JVM-to-Arrow conversion costs more per pass than pyarrow's read.
- a Spark ``DataFrame`` handed in: ``df.mapInArrow`` runs the stage over each partition's
  Arrow batches and yields one pickled partial result per partition; a write pass is
  ``mapInArrow`` + ``df.write.parquet`` (one part per partition: a DataFrame has no files).

Between passes (the solver reads the same columns pass after pass):

- over files, the first task on a host to read a file leaves its decoded Arrow batches in
  the host's shared cache, and every later pass's task for it, in whichever Python
  worker, memory-maps them (:class:`pym4.engines.shared_cache.SharedCache`, ``cache_bytes``
  per host; pyarrow's boolean decode is ~10x the core's work on the rows). Removed by
  :meth:`SparkEngine.close`.
- a DataFrame handed in is packed: its 0/1 columns become int64 words by a Spark SQL
  expression in the JVM (the layout of :class:`~pym4.m4._columns.PackedLayout`; a null or
  non-0/1 value sets the word's top bit), and that small frame is persisted (MEMORY_ONLY, 8
  bytes a row per 63 columns) by the first pass, so ``mapInArrow`` converts one long a row
  to Arrow, not 34 booleans (Spark converts row by row: measured at N = 1e7, c = 32, a pass
  took 20-47 s with the boolean columns, 2.8-5 s packed, at load 3.4-5). A bad value found by the packing makes
  the pass run again on the raw columns, for the error naming the column and the row.
  :meth:`SparkEngine.close` unpersists. Over files, packing in the JVM measured slower than
  the workers' caches (``spark.read.parquet`` + pack + persist, then 5 s a pass against 2-3
  s), so files keep pyarrow and the per-file tasks.

Progress: while a pass runs, the driver polls Spark's status tracker and advances the bar
by the finished tasks' share of the rows: over files from the first pass, over a DataFrame
from its second (each partition task reports its rows, so the first pass learns the count;
its bar moves once, when it ends), the final write included. Ctrl-C cancels the pass's jobs.
"""
from __future__ import annotations

import os
import pickle
import sys
import threading
import uuid
from typing import Any, Callable, Iterable, List, Optional


from ..m4._columns import ColumnSpec, DataError, check_schema
from . import Engine, _check_out, file_identity, list_shards, require_local, reraise_data_errors
from .local import part_name, reduce_shard, write_shard
from .shared_cache import SharedCache

__all__ = ["SparkEngine"]

# Starts the message of a packed task that met a row with a bad value (the driver then runs
# the pass the per-file way, for the error that names the column).
_PACKED_BAD = "pym4 packed pass: "


def _data_errors(run):
    from pyspark.errors import PythonException
    return reraise_data_errors(run, PythonException)


class _ShardTasks:
    """mapInArrow over shard numbers: per file, the partial result (reduce) or the part
    written (write), as one pickled row."""

    def __init__(self, shards, stage, batch_rows: int, out: Optional[str] = None,
                 cache: Optional[SharedCache] = None):
        self.shards, self.stage, self.batch_rows, self.out = shards, stage, batch_rows, out
        self.cache = cache

    def __call__(self, batches):
        import pyarrow as pa
        cache = self.cache
        columns = tuple(self.stage.columns)
        for batch in batches:
            for i in batch.column(0).to_pylist():
                if self.out is None:
                    r = reduce_shard(self.shards, i, self.stage, self.batch_rows, None,
                                     None if cache is None else cache.batches(self.shards, i, columns, self.batch_rows))
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
        # Rows are numbered within the partition (Arrow batches are split from it at
        # spark.sql.execution.arrow.maxRecordsPerBatch rows): an error names the partition's row,
        # and the warm-start sample takes blocks spread over the partition, not the first rows
        # of every batch.
        acc, row = None, 0
        for batch in batches:
            part = self.stage.partial(batch.select(self.stage.columns), where, row)
            row += batch.num_rows
            acc = part if acc is None else self.stage.merge(acc, part)
        yield _partition_result(acc, row)


class _PackedPartials:
    """mapInArrow over a packed frame (module docstring): the merged partial result of a
    partition, its rows numbered within the partition as _Partials numbers them."""

    def __init__(self, stage, columns: List[str]):
        self.stage, self.columns = stage, columns

    def __call__(self, batches):
        import pyarrow as pa
        from pyspark import TaskContext
        ctx = TaskContext.get()
        where = f"spark partition {ctx.partitionId() if ctx else '?'}"
        acc, row = None, 0
        for batch in batches:
            try:
                part = self.stage.partial(batch.select(self.columns), where, row)
            except DataError as e:
                raise DataError(_PACKED_BAD + str(e)) from None
            row += batch.num_rows
            acc = part if acc is None else self.stage.merge(acc, part)
        yield _partition_result(acc, row)


# A partition task's one output row: its merged partial result and its row count (the
# driver's progress and the DataFrame's size, learnt on the first pass).
_PARTITION_RESULT = "result binary, rows long"


def _partition_result(acc, rows: int):
    import pyarrow as pa
    return pa.RecordBatch.from_pydict({"result": pa.array([pickle.dumps(acc)], type=pa.binary()),
                                       "rows": pa.array([rows], type=pa.int64())})


class _Transform:
    """mapInArrow over a DataFrame's partitions: the output rows of each batch, its rows
    numbered within the partition for errors (as _Partials numbers them)."""

    def __init__(self, stage):
        self.stage = stage

    def __call__(self, batches):
        from pyspark import TaskContext
        ctx = TaskContext.get()
        where = f"spark partition {ctx.partitionId() if ctx else '?'}"
        row = 0
        for batch in batches:
            yield from self.stage.transform(batch.select(self.stage.columns), where, row).to_batches()
            row += batch.num_rows


def _raise(error):
    raise error


def _word(layout, i: int, types):
    """Spark SQL expression of packed word ``i`` (PackedLayout): bit b set where its column is
    1, bit 63 where one of its columns is null or neither 0 nor 1 (NaN included)."""
    import pyarrow as pa
    from pyspark.sql import functions as F
    value, bad = F.lit(0).cast("long"), F.lit(False)
    for c, b in layout.word_columns(i):
        col = F.col(f"`{c}`")
        if pa.types.is_boolean(types[c]):
            one, wrong = col, col.isNull()
        else:
            one, wrong = col == 1, col.isNull() | ((col != 0) & (col != 1))
        value = value + F.when(one, F.lit(1 << b).cast("long")).otherwise(F.lit(0).cast("long"))
        bad = bad | wrong
    return value + F.when(bad, F.lit(-(1 << 63)).cast("long")).otherwise(F.lit(0).cast("long"))


def _run_with_progress(spark, action: Callable[[], Any], total: Optional[int],
                       progress: Optional[Callable[[int], None]], rows_done: Callable[[Any], int]):
    """``action()`` (a Spark action: a collect, a write), its data errors raised as
    DataError; ``progress`` meanwhile gets the finished tasks' share of ``total`` rows, polled
    from the status tracker every 0.2 s (classic Spark with ``total`` known), and at the end
    the rest of ``rows_done(result)``, the rows the action did. Ctrl-C (or any exception in
    the driver while waiting) cancels the action's jobs, and is raised."""
    sc = getattr(spark, "sparkContext", None) if progress is not None and total is not None else None
    try:
        tracker = sc.statusTracker() if sc is not None else None
    except Exception:  # Spark Connect: no SparkContext on the client
        tracker = None
    if tracker is None:
        result = _data_errors(action)
        if progress is not None:
            progress(rows_done(result))
        return result
    group, result, done = f"pym4-{uuid.uuid4().hex}", {}, threading.Event()

    def run():
        try:
            sc.setJobGroup(group, "pym4 pass", interruptOnCancel=False)
            result["value"] = action()
        except BaseException as e:  # handed to the driver thread below
            result["error"] = e
        finally:
            done.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    shown = 0
    try:
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
    except BaseException:
        sc.cancelJobGroup(group)
        raise
    t.join()
    if "error" in result:
        return _data_errors(lambda: _raise(result["error"]))
    progress(max(0, rows_done(result["value"]) - shown))
    return result["value"]


def _rows_of_results(rows) -> int:
    return sum(r["rows"] for r in rows)


def _parquet_rows(parts: List[str]) -> int:
    """Rows in the Parquet files ``parts`` (their footers)."""
    import pyarrow.parquet as pq
    return sum(pq.read_metadata(p).num_rows for p in parts)


class SparkEngine(Engine):
    """data: a Spark ``DataFrame``, or Parquet files as for :class:`LocalEngine` (run with
    ``spark``, default: the active session, else a local one). batch_rows: rows per record
    batch of a file; cache_bytes: the bound of the host's shared cache of decoded files (0:
    none); tasks: Spark tasks per pass over files (default: Spark's default parallelism);
    see the module docstring."""
    name = "spark"

    def __init__(self, data, *, spark=None, batch_rows: int = 1 << 16, cache_bytes: int = 1 << 30,
                 tasks: Optional[int] = None):
        from pyspark.sql import DataFrame, SparkSession

        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows: must be an integer >= 1, got {batch_rows!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"cache_bytes: must be an integer >= 0, got {cache_bytes!r}")
        if tasks is not None and (isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1):
            raise ValueError(f"tasks: must be an integer >= 1, got {tasks!r}")
        self.batch_rows = batch_rows
        self.cache_bytes = cache_bytes
        self.tasks = tasks
        self.shards = None
        self._shared: Optional[SharedCache] = None  # over files (module docstring)
        self._packed = None  # (key, persisted packed frame) of the latest packed pass
        self._df_rows: Optional[int] = None  # a DataFrame's rows, once a pass has counted them
        if isinstance(data, DataFrame) or type(data).__module__.startswith("pyspark.sql"):
            self.df, self.source = data, "spark dataframe"
            self.spark = data.sparkSession
        else:
            require_local(data, "spark", "Spark DataFrame")
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

    def identity(self):
        """A DataFrame: its analysed plan, its schema and the files it reads with their sizes
        and mtimes (a plan names a file by path only, so a file rewritten in place keeps its
        plan); None when a file cannot be looked at here.

        The plan is its canonical text (column ids normalised) where that says everything:
        a read of files with Spark SQL on top, the same text in every session, so a driver
        killed mid-fit resumes. Python functions appear in that text by name only, and
        driver data (createDataFrame) not at all: then ``semanticHash()`` is added, which
        hashes the function's bytes and the relation itself, but differs from one session
        (or one createDataFrame) to the next: such a checkpoint is resumed only in the same
        session, and never for other data. Spark Connect has no plan text on the client:
        ``semanticHash()`` alone."""
        if self.df is None:
            return None
        try:
            files = file_identity(sorted(self.df.inputFiles()))
            if files is None:
                return None
            ident = {"schema": self.df.schema.json(), "files": files}
            try:
                analyzed = self.df._jdf.queryExecution().analyzed()
                ident["plan"] = analyzed.canonicalized().toString()
                tree = analyzed.toJSON().lower()
                plain = not any(k in tree for k in ("python", "logicalrdd", "localrelation"))
            except Exception:  # Spark Connect: no JVM plan on the client
                plain = False
            if not plain:
                ident["semantic_hash"] = int(self.df.semanticHash())
            return ident
        except Exception:  # a plan Spark cannot hash or list: nothing identifies it
            return None

    def _task_count(self, n: int) -> int:
        """Tasks of a pass over ``n`` files (module docstring)."""
        tasks = self.tasks
        if tasks is None:
            try:
                tasks = self.spark.sparkContext.defaultParallelism
            except Exception:  # Spark Connect: no SparkContext on the client
                tasks = int(self.spark.conf.get("spark.default.parallelism", str(n)) or n)
        return max(1, min(n, int(tasks)))

    def _over_shards(self, task, progress=None) -> List[Any]:
        n = len(self.shards.fragments)
        self.shards.offsets  # read every footer once here, not again in each task
        # spark.range splits 0..n-1 into runs of consecutive numbers, in partition order, and
        # collect keeps that order: the results come back in file order.
        df = self.spark.range(0, n, 1, numPartitions=self._task_count(n)).mapInArrow(task, "result binary")
        total = sum(self.shards.rows)
        rows = _run_with_progress(self.spark, df.collect, total, progress, lambda _: total)
        return [pickle.loads(r["result"]) for r in rows]

    def _over_partitions(self, df, progress=None) -> List[Any]:
        """A pass of partition tasks over the DataFrame (``df``: their mapInArrow), its bar
        moved by finished tasks from the second pass on (the first learns the row count)."""
        rows = _run_with_progress(self.spark, df.collect, self._df_rows, progress, _rows_of_results)
        self._df_rows = _rows_of_results(rows)
        return [pickle.loads(r["result"]) for r in rows]

    def partials(self, stage, progress=None) -> List[Any]:
        frame = self._packed_frame(stage)
        if frame is not None:
            layout = stage.packing
            columns = layout.words + [c for c in stage.columns if c not in layout.columns]
            df = frame.mapInArrow(_PackedPartials(stage, columns), _PARTITION_RESULT)
            try:
                return self._over_partitions(df, progress)
            except DataError as e:
                if not str(e).startswith(_PACKED_BAD):
                    raise
                # The packing saw a null or a value other than 0/1, but not which column holds
                # it: the raw columns say (the error names the shard, the column and the row).
                self._raw_partials(stage)
                raise DataError(str(e)[len(_PACKED_BAD):]) from None
        return self._raw_partials(stage, progress)

    def _raw_partials(self, stage, progress=None) -> List[Any]:
        if self.shards is not None:
            self.shards.identity  # stat every file once here (the shared cache is keyed by it)
            if self._shared is None and self.cache_bytes:
                self._shared = SharedCache.create(self.cache_bytes)
            return self._over_shards(_ShardTasks(self.shards, stage, self.batch_rows, cache=self._shared), progress)
        from pyspark.sql import functions as F
        df = self.df.select(*[F.col(f"`{c}`") for c in stage.columns]).mapInArrow(_Partials(stage), _PARTITION_RESULT)
        return self._over_partitions(df, progress)

    # ----- packed passes (module docstring) -----

    def _packed_frame(self, stage):
        """The persisted packed frame of a DataFrame's columns for the stage (made, and the
        previous one unpersisted, when the stage reads other columns than the last packed
        pass); None over files, or when the stage cannot take its columns packed."""
        layout = getattr(stage, "packing", None)
        if self.df is None or layout is None or not layout.columns:
            return None
        extras = [c for c in stage.columns if c not in layout.columns]
        key = (layout, tuple(extras))
        if self._packed is not None and self._packed[0] == key:
            return self._packed[1]
        self._unpersist()
        from pyspark import StorageLevel
        from pyspark.errors import PySparkException
        try:
            frame = self._pack(layout, extras)
        except PySparkException:  # a column Spark cannot compare with 0 and 1: the raw way names it
            return None
        frame = frame.persist(StorageLevel.MEMORY_ONLY)
        self._packed = (key, frame)
        return frame

    def _pack(self, layout, extras):
        from pyspark.sql import functions as F
        from pyspark.sql.pandas.types import to_arrow_schema
        schema = to_arrow_schema(self.df.select(*[F.col(f"`{c}`") for c in layout.columns]).schema)
        types = {c: schema.field(c).type for c in layout.columns}
        words = [_word(layout, i, types).alias(w) for i, w in enumerate(layout.words)]
        return self.df.select(*words, *[F.col(f"`{c}`") for c in extras])

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        self._unpersist()

    def _unpersist(self) -> None:
        if self._packed is not None:
            self._packed[1].unpersist()
            self._packed = None

    def write(self, stage, out: str, progress=None) -> List[str]:
        from pyspark.sql import functions as F
        from pyspark.sql.pandas.types import from_arrow_schema

        out = _check_out(out)
        if self.shards is not None:
            os.makedirs(out)
            return sorted(self._over_shards(_ShardTasks(self.shards, stage, self.batch_rows, os.path.abspath(out)),
                                            progress))
        if stage.needs_rows:
            raise DataError(f"{self.source}: a Spark DataFrame has no file order to number rows by; "
                            f"give an id column (id=...)")
        df = self.df.select(*[F.col(f"`{c}`") for c in stage.columns]).mapInArrow(
            _Transform(stage), from_arrow_schema(stage.output_schema))
        return _run_with_progress(self.spark, lambda: self._write_frame(df, out), self._df_rows, progress,
                                  _parquet_rows)

    @staticmethod
    def _write_frame(df, out: str) -> List[str]:
        df.write.parquet(out)
        return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet"))
