"""The embedded engine: pyarrow.dataset over Parquet files, one thread-pool task per file,
each file streamed in record batches (memory is a few batches per worker, whatever the
file size, plus the bounded cache of decoded batches between passes: see LocalEngine).
The stage's work is in the compiled core, which releases the GIL, so threads run it in
parallel."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..m4._columns import ROW, ColumnSpec
from . import Engine, Shards, _check_out, list_shards
from ._parquet import fragment_batches

__all__ = ["LocalEngine", "BatchCache", "scan_shard", "reduce_shard", "write_shard"]


def scan_shard(shards: Shards, i: int, columns: List[str], batch_rows: int, with_rows: bool) -> Iterator[Tuple[Any, int]]:
    """(batch, row0) over file ``i``: the columns asked for (hive partition columns filled
    from the path), plus ``row`` (int64, the row's number within the dataset) if asked."""
    import numpy as np
    import pyarrow as pa

    it = fragment_batches(shards.fragments[i], shards.dataset.schema, columns, batch_rows)
    row0 = 0
    base = shards.offsets[i]
    for batch in it:
        if with_rows:
            batch = batch.append_column(pa.field(ROW, pa.int64()),
                                        pa.array(np.arange(base + row0, base + row0 + batch.num_rows, dtype=np.int64)))
        yield batch, row0
        row0 += batch.num_rows


def _empty_batch(shards: Shards, columns: List[str], with_rows: bool):
    import pyarrow as pa
    schema = pa.schema([shards.dataset.schema.field(c) for c in columns])
    if with_rows:
        schema = schema.append(pa.field(ROW, pa.int64()))
    return pa.RecordBatch.from_pylist([], schema=schema)


def reduce_shard(shards: Shards, i: int, stage, batch_rows: int, progress: Optional[Callable[[int], None]] = None,
                 batches: Optional[Iterable[Tuple[Any, int]]] = None):
    """The merged ``stage.partial`` of file ``i`` (None when it has no rows); ``progress(rows)``
    after each batch. ``batches``: the file's (batch, row0) from elsewhere than the file."""
    acc = None
    where = shards.paths[i]
    if batches is None:
        batches = scan_shard(shards, i, stage.columns, batch_rows, False)
    for batch, row0 in batches:
        part = stage.partial(batch, where, row0)
        acc = part if acc is None else stage.merge(acc, part)
        if progress is not None:
            progress(batch.num_rows)
    return acc


def write_shard(shards: Shards, i: int, stage, batch_rows: int, path: str,
                progress: Optional[Callable[[int], None]] = None) -> str:
    """``stage.transform`` of file ``i`` written to one Parquet file at ``path`` (an empty
    file with the output schema when the shard has no rows); ``progress(rows)`` after each batch."""
    import pyarrow.parquet as pq

    where = shards.paths[i]
    with pq.ParquetWriter(path, stage.output_schema) as writer:
        wrote = False
        for batch, row0 in scan_shard(shards, i, stage.columns, batch_rows, stage.needs_rows):
            writer.write(stage.transform(batch, where, row0))
            wrote = True
            if progress is not None:
                progress(batch.num_rows)
        if not wrote:
            writer.write(stage.transform(_empty_batch(shards, stage.columns, stage.needs_rows), where, 0))
    return path


class BatchCache:
    """Decoded Arrow batches of files, kept between passes while their total stays under
    ``limit`` bytes (see :class:`LocalEngine`). It holds one column set of one dataset (files,
    sizes and mtimes: :attr:`Shards.identity`), the latest pass's: a pass over other columns,
    or over other files, drops it, so an earlier pass's columns never take the room of the
    ones read again, and a file rewritten in place is read again. Thread-safe."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._files: Dict[int, list] = {}
        self._bytes = 0
        self._key: Optional[tuple] = None
        self._lock = threading.Lock()

    def use(self, shards: Shards, columns: Tuple[str, ...], batch_rows: int) -> None:
        """Start a pass over ``columns`` of ``shards``: the cache is dropped unless it holds them."""
        key = (shards.identity, tuple(columns), int(batch_rows))
        with self._lock:
            if key != self._key:
                self._files.clear()
                self._bytes, self._key = 0, key

    def batches(self, shards: Shards, i: int, columns: Tuple[str, ...], batch_rows: int) -> Iterator[Tuple[Any, int]]:
        """File ``i``'s (batch, row0): from the cache, or read (and kept if they fit)."""
        self.use(shards, columns, batch_rows)
        hit = self._files.get(i)
        if hit is not None:
            yield from hit
            return
        kept: Optional[list] = [] if self.limit > 0 else None
        size = 0
        for batch, row0 in scan_shard(shards, i, list(columns), batch_rows, False):
            if kept is not None:
                size += batch.nbytes
                if self._bytes + size > self.limit:
                    kept = None  # does not fit: stop holding on to this file's batches
                else:
                    kept.append((batch, row0))
            yield batch, row0
        if kept is not None:
            with self._lock:
                if self._bytes + size <= self.limit and self._key == (shards.identity, tuple(columns), int(batch_rows)):
                    self._files[i] = kept
                    self._bytes += size

    @property
    def nbytes(self) -> int:
        return self._bytes


def _serial_core() -> None:
    """Run in each pool thread: its calls into the core use one OpenMP thread. The pool
    already runs a file per core; a core call that forks its own team from every pool
    thread puts 2 T threads on T cores (nested parallelism: an earlier session measured
    ~20 ms of fork/join per 65536-row call under load; with the core's short spin, this
    one measured the same CPU per row either way, 135 ns, so it is kept for what it rules
    out). OpenMP's thread count is per calling thread: the driver thread (one file, or the
    in-memory solvers) keeps all of them."""
    from .. import _backend
    core = _backend.core()
    if core is not None:
        core.set_thread_limit(1)


def part_name(i: int) -> str:
    """The output part of input file ``i`` (the same name on every engine that writes per file)."""
    return f"part-{i:05d}.parquet"


class LocalEngine(Engine):
    """data: a Parquet file, a directory (hive partitions included), a glob, a list of files
    or a pyarrow FileSystemDataset. workers: threads (default: the CPU count); batch_rows:
    rows per record batch; cache_bytes: memory for decoded batches kept between passes.

    The cache: the solver reads the same columns pass after pass, and decoding Parquet
    costs far more than the core's work on the decoded rows (measured: reading and decoding
    34 boolean columns is ~10x the core's partial). So each file's decoded Arrow batches are
    kept as a pass reads them, while their total stays under ``cache_bytes``, and later
    passes over the same columns read them from memory (a fit's first pass, the counting
    one, reads the solver's columns: kept from it, the solver's passes read no Parquet at
    all when the data fits; measured at N = 1e7, c = 32: one whole pass saved). Arrow keeps
    booleans as bits: 34 boolean columns are 4.25 bytes a row, so the default 1 GiB holds
    ~250 M such rows; the files beyond the bound are read again each pass (0: no cache).
    The cache holds one column set, the latest pass's: a pass over other columns (the tag
    vocabulary's pass, then the fit's, say) drops it, so an earlier pass's columns never
    take the room of the ones read again."""
    name = "local"

    def __init__(self, data, *, workers: Optional[int] = None, batch_rows: int = 1 << 16,
                 cache_bytes: int = 1 << 30):
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows: must be an integer >= 1, got {batch_rows!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"cache_bytes: must be an integer >= 0, got {cache_bytes!r}")
        self.shards = list_shards(data)
        self.source = self.shards.source
        self.workers = workers or os.cpu_count() or 1
        self.batch_rows = batch_rows
        self.cache_bytes = cache_bytes
        self._cache = BatchCache(cache_bytes)

    def field(self, name: str):
        return self.shards.dataset.schema.field(name)

    def check(self, spec: ColumnSpec) -> None:
        self.shards.check(spec)

    def _map(self, fn) -> Iterator[Any]:
        """fn(i) of every file, yielded in file order as they are done."""
        n = len(self.shards.fragments)
        if self.workers == 1 or n <= 1:
            yield from (fn(i) for i in range(n))
            return
        with ThreadPoolExecutor(min(self.workers, n), initializer=_serial_core) as pool:
            yield from pool.map(fn, range(n))

    def partials(self, stage, progress: Optional[Callable[[int], None]] = None) -> Iterator[Any]:
        columns = tuple(stage.columns)
        self._cache.use(self.shards, columns, self.batch_rows)
        return self._map(lambda i: reduce_shard(self.shards, i, stage, self.batch_rows, progress,
                                                self._cache.batches(self.shards, i, columns, self.batch_rows)))

    def write(self, stage, out: str, progress: Optional[Callable[[int], None]] = None) -> List[str]:
        out = _check_out(out)
        os.makedirs(out)
        return list(self._map(lambda i: write_shard(self.shards, i, stage, self.batch_rows,
                                                    os.path.join(out, part_name(i)), progress)))
