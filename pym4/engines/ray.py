"""The Ray Data engine (``pip install 'pym4[ray]'``).

- A Ray ``Dataset`` handed in (from ``ray.data.read_parquet`` or any pipeline):
  ``map_batches(batch_format="pyarrow")`` computes each block's partial result, which comes
  back to the driver as one pickled row and is merged there (never ``Dataset.aggregate``,
  which materialises its inputs); a write pass is ``map_batches`` + ``write_parquet``.
- Parquet files (a path, glob, directory or list): Ray tasks over runs of consecutive
  files (``tasks`` of them, default: the cluster's CPUs, at most one per file; a task
  costs its slot a fixed time whatever it does, as on Spark) run the same per-file code as
  the local engine (streamed in record batches) and send one result per file, so row numbers are
  exact (``read_parquet`` does not say where in its file a row was) and the final pass
  writes one part per input file, named as the local engine names it. The first task on a
  host to read a file leaves its decoded batches in the host's shared cache, and every
  later pass's task for it, in whichever worker, memory-maps them
  (:class:`pym4.engines.shared_cache.SharedCache`, ``cache_bytes`` per host; removed by
  :meth:`RayEngine.close`).
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Iterable, List, Optional

from ..m4._columns import ColumnSpec, DataError, check_schema
from . import Engine, _check_out, file_identity, list_shards, require_local, reraise_data_errors
from .local import part_name, reduce_shard, write_shard
from .shared_cache import SharedCache

__all__ = ["RayEngine"]


def _result_table(obj, rows: int):
    import pyarrow as pa
    return pa.table({"rows": pa.array([rows], type=pa.int64()), "result": pa.array([pickle.dumps(obj)], type=pa.binary())})


_END = object()


def _collect(ds, rows_of, progress):
    """The ``result`` column of ``ds`` unpickled, yielded as the tasks finish (streaming
    execution), with ``progress(rows_of(row))`` per result row."""
    it = iter(ds.iter_rows())
    while True:
        r = _data_errors(lambda: next(it, _END))
        if r is _END:
            return
        if progress is not None:
            progress(rows_of(r))
        yield pickle.loads(r["result"])


def _data_errors(run):
    from ray.exceptions import RayTaskError
    return reraise_data_errors(run, RayTaskError)


class _ShardTask:
    """A Ray task over one file: the partial result (reduce) or the part written (write)."""

    def __init__(self, shards, stage, batch_rows: int, out: Optional[str] = None,
                 cache: Optional[SharedCache] = None):
        self.shards, self.stage, self.batch_rows, self.out = shards, stage, batch_rows, out
        self.cache = cache

    def __call__(self, batch):
        results = []
        cache = self.cache
        columns = tuple(self.stage.columns)
        for i in batch.column("shard").to_pylist():
            if self.out is None:
                results.append(reduce_shard(self.shards, i, self.stage, self.batch_rows, None, None if cache is None
                                            else cache.batches(self.shards, i, columns, self.batch_rows)))
            else:
                results.append(write_shard(self.shards, i, self.stage, self.batch_rows,
                                           os.path.join(self.out, part_name(i))))
        import pyarrow as pa
        return pa.table({"shard": batch.column("shard"),
                         "result": pa.array([pickle.dumps(r) for r in results], type=pa.binary())})


class _BlockTask:
    """A Ray map over the blocks of a Dataset: the merged partial result of a block."""

    def __init__(self, stage):
        self.stage = stage

    def __call__(self, batch):
        # map_batches(batch_size=None) hands the whole block in one call, so row numbers count
        # from the block's first row. Ray does not say where in its file (or in the dataset) a
        # block starts, so an error names the block's row; with read_parquet(include_paths=True)
        # it also names the file of the bad row: the block is taken in runs of one file each
        # (a block may hold rows of several small files), numbered on from the block's start.
        data = batch.select(self.stage.columns)
        runs = [("ray dataset block", 0, batch.num_rows)]
        if "path" in batch.schema.names and "path" not in self.stage.columns and batch.num_rows:
            paths = batch.column("path").to_pylist()
            starts = [0] + [i for i in range(1, len(paths)) if paths[i] != paths[i - 1]]
            runs = [(f"ray dataset block of {paths[a]}", a, b) for a, b in zip(starts, starts[1:] + [len(paths)])]
        acc = None
        for where, a, b in runs:
            part = self.stage.partial(data.slice(a, b - a), where, a)
            acc = part if acc is None else self.stage.merge(acc, part)
        return _result_table(acc, batch.num_rows)


class _TransformTask:
    def __init__(self, stage):
        self.stage = stage

    def __call__(self, batch):
        return self.stage.transform(batch.select(self.stage.columns), "ray dataset block", 0)


class RayEngine(Engine):
    """data: a ``ray.data.Dataset``, or Parquet files as for :class:`LocalEngine`
    (batch_rows: rows per record batch of a file; cache_bytes: the bound of the host's shared
    cache of decoded files, 0: none; tasks: Ray tasks per pass over files, default: the
    cluster's CPUs; see the module docstring).
    Ray must be initialised (``ray.init``) by the caller, or is started locally."""
    name = "ray"

    def __init__(self, data, *, batch_rows: int = 1 << 16, cache_bytes: int = 1 << 30, tasks: Optional[int] = None):
        import ray
        import ray.data

        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows: must be an integer >= 1, got {batch_rows!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"cache_bytes: must be an integer >= 0, got {cache_bytes!r}")
        if tasks is not None and (isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1):
            raise ValueError(f"tasks: must be an integer >= 1, got {tasks!r}")
        self.batch_rows = batch_rows
        self.cache_bytes = cache_bytes
        self.tasks = tasks
        self._shared: Optional[SharedCache] = None
        if isinstance(data, ray.data.Dataset):
            self.ds, self.shards, self.source = data, None, "ray dataset"
        else:
            require_local(data, "ray", "Ray Dataset")
            self.ds, self.shards = None, list_shards(data)
            self.source = self.shards.source

    def _schema(self):
        if self.shards is not None:
            return self.shards.dataset.schema
        schema = self.ds.schema()
        return getattr(schema, "base_schema", schema)

    def field(self, name: str):
        return self._schema().field(name)

    def identity(self):
        """A Dataset that only reads files (no transform after the read, which would change
        the rows and not the files): its ``input_files()`` with their sizes and mtimes, and its
        schema. None otherwise, and when Ray does not list the files (Ray 2.60 lists none
        before the dataset runs): a checkpoint of such a dataset is never resumed."""
        if self.ds is None:
            return None
        try:
            dag = self.ds._logical_plan.dag  # Ray's own plan; its layout is not public API
            reads_only = type(dag).__name__.startswith("Read")
            files = file_identity(sorted(self.ds.input_files())) if reads_only else None
        except Exception:
            return None
        if not files:
            return None
        return {"files": files, "schema": str(self._schema())}

    def check(self, spec: ColumnSpec) -> None:
        if self.shards is not None:
            self.shards.check(spec)
        else:
            check_schema(spec, self._schema(), self.source)

    def _over_shards(self, task, progress=None) -> Iterable[Any]:
        import ray.data
        n = len(self.shards.fragments)
        rows = self.shards.rows
        tasks = self.tasks
        if tasks is None:
            import ray
            tasks = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else n
        # from_items splits the files into runs of consecutive numbers, one block (a task) each.
        items = ray.data.from_items([{"shard": i} for i in range(n)], override_num_blocks=max(1, min(n, tasks)))
        return _collect(items.map_batches(task, batch_size=None, batch_format="pyarrow"), lambda r: rows[r["shard"]],
                        progress)

    def partials(self, stage, progress=None) -> Iterable[Any]:
        if self.shards is not None:
            self.shards.identity  # stat every file once here (the shared cache is keyed by it)
            if self._shared is None and self.cache_bytes:
                self._shared = SharedCache.create(self.cache_bytes)
            return self._over_shards(_ShardTask(self.shards, stage, self.batch_rows, cache=self._shared), progress)
        return _collect(self.ds.map_batches(_BlockTask(stage), batch_size=None, batch_format="pyarrow"),
                        lambda r: r["rows"], progress)

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None

    def write(self, stage, out: str, progress=None) -> List[str]:
        out = _check_out(out)
        if self.shards is not None:
            self.shards.offsets  # read every footer once here, not again in each task
            os.makedirs(out)
            return sorted(self._over_shards(_ShardTask(self.shards, stage, self.batch_rows, os.path.abspath(out)),
                                            progress))
        if stage.needs_rows:
            raise DataError(f"{self.source}: a Ray Dataset has no file order to number rows by; "
                            f"give an id column (id=...)")
        ds = self.ds.map_batches(_TransformTask(stage), batch_size=None, batch_format="pyarrow")
        _data_errors(lambda: ds.write_parquet(out))
        return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet"))
