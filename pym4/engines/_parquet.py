"""A Parquet shard's columns as record batches: the read every engine's pass starts with.

pyarrow's Parquet reader decodes boolean columns value by value: the 34 boolean columns of
the M4 benchmark read at 5-7 M rows/s on one core here, whatever the file layout
(benchmarks/bench_parquet_read.py). polars copies Parquet's bit-packed booleans straight into
Arrow bitmaps and reads the same files at a few hundred M rows/s. So when polars is installed
(it comes with the ``data``, ``ray`` and ``spark`` extras), the columns of a local Parquet file
that are boolean or integer are read with it, one row group at a time (memory stays bounded
by a row group, as with pyarrow's scan), and handed on as the pyarrow RecordBatches the
stages take, typed as the dataset's schema says. Everything else (hive partition columns,
which come from the path; strings and lists; files on other filesystems; a type the file
stores differently from the dataset's schema) is read by pyarrow.dataset, as before.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional

__all__ = ["fragment_batches", "polars_module"]


def polars_module() -> Optional[Any]:
    """polars if it is importable, else None (it is optional: pyarrow reads every file too)."""
    try:
        import polars
    except ImportError:
        return None
    return polars


def _polars_can_read(frag, schema, columns: List[str]) -> bool:
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not columns or not isinstance(frag.filesystem, pafs.LocalFileSystem) or frag.metadata is None:
        return False
    physical = frag.physical_schema
    for name in columns:
        if physical.get_field_index(name) < 0:  # a partition column, or absent: pyarrow fills or reports it
            return False
        want = schema.field(name).type
        if not (pa.types.is_boolean(want) or pa.types.is_integer(want)) or physical.field(name).type != want:
            return False
    return True


def _pyarrow_batches(frag, schema, columns: List[str], batch_rows: int) -> Iterator[Any]:
    # One batch read ahead per file: memory stays bounded by batch_rows, not the file size.
    return iter(frag.to_batches(schema=schema, columns=columns, batch_size=batch_rows,
                                batch_readahead=1, fragment_readahead=1))


def _polars_batches(pl, frag, schema, columns: List[str], batch_rows: int) -> Iterator[Any]:
    import pyarrow as pa

    out_schema = pa.schema([schema.field(name) for name in columns])
    # hive_partitioning=False: the path's key=value folders are the dataset's business (pyarrow
    # fills partition columns); polars must read the file's own columns only.
    scan = pl.scan_parquet(frag.path, hive_partitioning=False).select(columns)
    metadata = frag.metadata
    start = 0
    for g in range(metadata.num_row_groups):
        rows = metadata.row_group(g).num_rows
        if rows == 0:
            continue
        try:
            # A slice that is exactly one row group: polars decodes that row group and no other.
            table = scan.slice(start, rows).collect().to_arrow()
        except pl.exceptions.PolarsError as e:
            if start == 0:  # nothing handed on yet: pyarrow reads the file (or says what is wrong with it)
                yield from _pyarrow_batches(frag, schema, columns, batch_rows)
                return
            raise OSError(f"{frag.path}: row group {g} could not be read: {e}") from e
        if table.num_rows != rows:
            raise OSError(f"{frag.path}: row group {g} has {rows} rows in its metadata, {table.num_rows} were read")
        table = pa.Table.from_arrays([table.column(name) for name in columns], schema=out_schema)
        start += rows
        yield from table.to_batches(max_chunksize=batch_rows)


def fragment_batches(frag, schema, columns: List[str], batch_rows: int) -> Iterator[Any]:
    """The record batches (at most ``batch_rows`` rows each, in file order) of ``columns`` of
    the Parquet fragment ``frag``, typed as ``schema`` (the dataset's) says."""
    pl = polars_module()
    if pl is not None and _polars_can_read(frag, schema, columns):
        return _polars_batches(pl, frag, schema, columns, batch_rows)
    return _pyarrow_batches(frag, schema, columns, batch_rows)
