"""The embedded engine: pyarrow.dataset over Parquet files, one thread-pool task per file,
each file streamed in record batches (memory is a few batches per worker, whatever the
file size). The stage's work is in the compiled core, which releases the GIL, so threads
run it in parallel."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, List, Optional, Tuple

from ..m4._columns import ROW, ColumnSpec
from . import Engine, Shards, _check_out, list_shards

__all__ = ["LocalEngine", "scan_shard", "reduce_shard", "write_shard"]


def scan_shard(shards: Shards, i: int, columns: List[str], batch_rows: int, with_rows: bool) -> Iterator[Tuple[Any, int]]:
    """(batch, row0) over file ``i``: the columns asked for (hive partition columns filled
    from the path), plus ``row`` (int64, the row's number within the dataset) if asked."""
    import numpy as np
    import pyarrow as pa

    frag = shards.fragments[i]
    # One batch read ahead per file: memory stays bounded by batch_rows, not the file size.
    it = frag.to_batches(schema=shards.dataset.schema, columns=columns, batch_size=batch_rows,
                         batch_readahead=1, fragment_readahead=1)
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


def reduce_shard(shards: Shards, i: int, stage, batch_rows: int):
    """The merged ``stage.partial`` of file ``i`` (None when it has no rows)."""
    acc = None
    where = shards.paths[i]
    for batch, row0 in scan_shard(shards, i, stage.columns, batch_rows, False):
        part = stage.partial(batch, where, row0)
        acc = part if acc is None else stage.merge(acc, part)
    return acc


def write_shard(shards: Shards, i: int, stage, batch_rows: int, path: str) -> str:
    """``stage.transform`` of file ``i`` written to one Parquet file at ``path`` (an empty
    file with the output schema when the shard has no rows)."""
    import pyarrow.parquet as pq

    where = shards.paths[i]
    with pq.ParquetWriter(path, stage.output_schema) as writer:
        wrote = False
        for batch, row0 in scan_shard(shards, i, stage.columns, batch_rows, stage.needs_rows):
            writer.write(stage.transform(batch, where, row0))
            wrote = True
        if not wrote:
            writer.write(stage.transform(_empty_batch(shards, stage.columns, stage.needs_rows), where, 0))
    return path


def part_name(i: int) -> str:
    """The output part of input file ``i`` (the same name on every engine that writes per file)."""
    return f"part-{i:05d}.parquet"


class LocalEngine(Engine):
    """data: a Parquet file, a directory (hive partitions included), a glob, a list of files
    or a pyarrow FileSystemDataset. workers: threads (default: the CPU count); batch_rows:
    rows per record batch."""
    name = "local"

    def __init__(self, data, *, workers: Optional[int] = None, batch_rows: int = 1 << 16):
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows: must be an integer >= 1, got {batch_rows!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
        self.shards = list_shards(data)
        self.source = self.shards.source
        self.workers = workers or os.cpu_count() or 1
        self.batch_rows = batch_rows

    def field(self, name: str):
        return self.shards.dataset.schema.field(name)

    def check(self, spec: ColumnSpec) -> None:
        self.shards.check(spec)

    def _map(self, fn) -> list:
        n = len(self.shards.fragments)
        if self.workers == 1 or n <= 1:
            return [fn(i) for i in range(n)]
        with ThreadPoolExecutor(min(self.workers, n)) as pool:
            return list(pool.map(fn, range(n)))

    def partials(self, stage) -> List[Any]:
        return self._map(lambda i: reduce_shard(self.shards, i, stage, self.batch_rows))

    def write(self, stage, out: str) -> List[str]:
        out = _check_out(out)
        os.makedirs(out)
        return self._map(lambda i: write_shard(self.shards, i, stage, self.batch_rows,
                                               os.path.join(out, part_name(i))))
