"""Executors: where a stage runs. One interface, three adapters (DESIGN.md §3b).

A *stage* says what to compute on a batch; an *engine* says where batches come from and
how the per-task results get back to the driver. Swapping the engine changes no stage.

A stage is any object with

    columns                          the columns it reads
    needs_rows                       whether batches must carry the ``row`` column
    partial(batch, where, row0)      a small result of one pyarrow batch (reduce passes)
    merge(a, b)                      associative, order-independent merge of two results
    transform(batch, where, row0)    the output rows of one batch (write passes)
    output_schema                    the pyarrow schema ``transform`` returns
    packing                          optional: a PackedLayout (pym4/m4/_columns.py) when the
                                     stage also takes its 0/1 columns packed into int64 words

``where`` names the shard (a file path, or a partition/block of an engine's dataset) and
``row0`` is the row number of the batch's first row within it, both for error messages.

Row numbers. When a write pass has no id column, each row gets ``row``, its number within
the dataset: the Parquet files are ordered by path (as :func:`list_shards` sorts them),
and ``row = (rows of all earlier files) + (position of the row within its file)``. Every
engine computes exactly this (each runs the same per-file code: local in a thread, Ray and
Spark in one task per file), so the same row gets the same number everywhere. A Ray Dataset or
Spark DataFrame handed in has no file order: a write pass over one needs an id column.

Engines: :class:`~pym4.engines.local.LocalEngine` (pyarrow.dataset, a thread pool over
files; the core releases the GIL), :class:`~pym4.engines.ray.RayEngine` (``pym4[ray]``),
:class:`~pym4.engines.spark.SparkEngine` (``pym4[spark]``). Ray and pyspark are imported
only when their engine is chosen.
"""
from __future__ import annotations

import abc
import functools
import glob
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from ..m4._columns import ROW, ColumnSpec, DataError, check_same_schema

__all__ = ["Engine", "Shards", "list_shards", "is_uri", "require_local", "engine_for", "ENGINES", "ROW"]

ENGINES = ("local", "ray", "spark")


class Engine(abc.ABC):
    """Runs stages over a dataset; see the module docstring."""
    name: str = ""
    source: str = ""  # how the data was named, for messages

    @abc.abstractmethod
    def field(self, name: str):
        """The pyarrow field of column ``name``."""

    @abc.abstractmethod
    def check(self, spec: ColumnSpec) -> None:
        """Schema checks (missing / duplicate columns, types, shards that disagree), before any pass."""

    @abc.abstractmethod
    def partials(self, stage, progress: Optional[Callable[[int], None]] = None) -> Iterable[Any]:
        """``stage.partial`` over every batch, merged within each task; one result per task,
        in task order (an iterable that may yield them as they arrive). ``progress(rows)``
        is called as rows are done, during the pass (from any thread: it must be
        thread-safe), so that the rows it is given add up to the dataset's."""

    def reduce(self, stage, progress: Optional[Callable[[int], None]] = None) -> Any:
        """The merge of every task's partial result, in task order, as they arrive (the
        driver holds one merged result, not one per task); None when the dataset has no batch."""
        acc = None
        for part in self.partials(stage, progress):
            if part is not None:
                acc = part if acc is None else stage.merge(acc, part)
        return acc

    def identity(self) -> Optional[dict]:
        """What identifies a dataset that was handed in (not files): a JSON-able dict that
        changes when the data does, or None when the engine cannot tell (a checkpoint is then
        never resumed). Engines over files are identified by the files themselves."""
        return None

    def close(self) -> None:
        """Drop what the engine holds between passes (a cache); it reads the data again after."""

    @abc.abstractmethod
    def write(self, stage, out: str, progress: Optional[Callable[[int], None]] = None) -> List[str]:
        """``stage.transform`` over every batch, written as Parquet parts into folder ``out``
        (created; it must not exist yet); returns the part paths. ``progress(rows)`` as batches
        or tasks finish, as in :meth:`reduce`."""


def file_identity(paths) -> Optional[list]:
    """[[path, size, mtime_ns]] of files named by local paths or ``file:`` URIs; None when one
    cannot be looked at here (a remote URI, a file gone), since then a rewrite in place
    would go unseen."""
    from urllib.parse import unquote, urlparse
    out = []
    for p in paths:
        if p.startswith("file:"):
            local = unquote(urlparse(p).path)
        elif "://" in p:
            return None
        else:
            local = p
        try:
            out.append(_stat_entry(local))
        except OSError:
            return None
    return out


def _stat_entry(path: str) -> list:
    """[absolute path, size, mtime in ns] of a local file: what identifies its contents."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _check_out(out: str) -> str:
    out = os.fspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"out: {out!r} already exists")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"out: folder {os.path.dirname(os.path.abspath(out))!r} does not exist")
    return out


def reraise_data_errors(run, worker_error):
    """``run()``, an engine action. A DataError raised in a worker comes back to the driver
    as ``worker_error`` (Ray's RayTaskError, Spark's PythonException) carrying the worker's
    traceback as text: raise it as the DataError it was, shard and column named."""
    try:
        return run()
    except worker_error as e:
        mark = DataError.__module__ + ".DataError: "
        text = str(e)
        if mark not in text:
            raise
        raise DataError(text.split(mark, 1)[1].split("\n", 1)[0]) from e


# ----- Parquet files as shards ---------------------------------------------------------------------

@dataclass
class Shards:
    """The Parquet files of a dataset, in row-number order, with what every engine needs:
    paths, per-file row counts and offsets, the schemas of the files (partition columns
    included), and the hive partitioning base folder if any."""
    dataset: Any                        # pyarrow.dataset.Dataset
    fragments: list                     # pyarrow.dataset.ParquetFileFragment, sorted by path
    base: Optional[str]                 # the directory given (hive partitions are read from it)
    source: str                         # how the user named it, for messages

    @property
    def local(self) -> bool:
        """Whether the files are on the local filesystem (their paths are then os paths)."""
        import pyarrow.fs as pafs
        return isinstance(self.dataset.filesystem, pafs.LocalFileSystem)

    @property
    def paths(self) -> List[str]:
        return [f.path for f in self.fragments]

    @functools.cached_property
    def rows(self) -> List[int]:
        return [f.metadata.num_rows if f.metadata is not None else f.count_rows() for f in self.fragments]

    @functools.cached_property
    def identity(self) -> tuple:
        """(path, size, mtime in ns) of every file: what a cache of their batches (and a
        checkpoint) is valid for. Local files by os.stat, as always; on another filesystem
        (an object store) the path is prefixed by the filesystem's name, so that equal paths
        on two stores differ, and size and mtime come from the filesystem (mtime None where
        the store keeps none)."""
        if self.local:
            return tuple(tuple(_stat_entry(p)) for p in self.paths)
        fs = self.dataset.filesystem
        name = _fs_name(fs)
        # One call for the whole list, not one per file: on an object store each file is a request.
        return tuple((f"{name}:{info.path}", info.size, info.mtime_ns)
                     for info in fs.get_file_info(self.paths))

    @functools.cached_property
    def offsets(self) -> List[int]:
        out, acc = [], 0
        for r in self.rows:
            out.append(acc)
            acc += r
        return out

    def schema_of(self, i: int):
        """File ``i``'s own schema plus the hive partition columns its path gives."""
        import pyarrow.dataset as pads
        frag = self.fragments[i]
        schema = frag.physical_schema
        for key in pads.get_partition_keys(frag.partition_expression):
            if key not in schema.names:
                schema = schema.append(self.dataset.schema.field(key))
        return schema

    def check(self, spec: ColumnSpec) -> None:
        check_same_schema(spec, [(self.paths[i], self.schema_of(i)) for i in range(len(self.fragments))])
        if not self.fragments:
            raise DataError(f"{self.source}: no Parquet files")


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?[]")


def is_uri(source) -> bool:
    """Whether ``source`` is a filesystem URI (``s3://``, ``gs://``, ``file://``, ...), which
    pyarrow's filesystems read; plain paths (no ``scheme://``) keep the os path code."""
    return isinstance(source, str) and _URI.match(source) is not None


def _fs_name(fs) -> str:
    """A filesystem's name for identities: its type, and for a subtree the folder it is rooted at."""
    import pyarrow.fs as pafs
    if isinstance(fs, pafs.SubTreeFileSystem):
        return f"{_fs_name(fs.base_fs)}/{fs.base_path}"
    return fs.type_name


def _uri_dataset(uri: str):
    """(dataset, base) of a URI naming a directory (hive partitions read), one file, or a glob
    on the path part (matched with fnmatch against the files listed under the glob's fixed
    folder, so ``*`` also crosses ``/``), all listed through the URI's own filesystem."""
    import fnmatch
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError) as e:  # pyarrow's ArrowInvalid / ArrowNotImplementedError: an unknown scheme
        raise ValueError(f"data: cannot open {uri!r}: {e}") from e
    except OSError as e:  # a store that cannot be reached (an S3 bucket's region looked up, say)
        raise OSError(f"data: cannot open {uri!r}: {e}") from e
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        # pyarrow lists the folder itself (FileSelector, recursive), skipping _ and . files as a local folder's.
        return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive"), uri
    if info.type == pafs.FileType.File:
        return pads.dataset([path], filesystem=fs, format="parquet"), None
    m = _GLOB_CHARS.search(path)
    if m is not None:
        root = path[:m.start()].rpartition("/")[0]
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        paths = sorted(i.path for i in listed if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path))
        if paths:
            return pads.dataset(paths, filesystem=fs, format="parquet"), None
        raise FileNotFoundError(f"data: no file matches {uri!r}")
    raise FileNotFoundError(f"data: no such file or folder {uri!r}")


def require_local(source, engine: str, handed: str) -> None:
    """Ray and Spark read shards by path in their workers, which holds for local files only (a
    pyarrow filesystem object need not reach, or mean the same store in, another process):
    refuse a URI or a pyarrow Dataset on another filesystem before any work, naming both."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs
    if is_uri(source) and not source.lower().startswith("file://"):
        what = repr(source)
    elif isinstance(source, pads.FileSystemDataset) and not isinstance(source.filesystem, pafs.LocalFileSystem):
        what = f"a pyarrow Dataset on {source.filesystem.type_name!r}"
    else:
        return
    raise ValueError(f"data: engine={engine!r} reads local paths only, not {what}; "
                     f"use engine='local' or hand in a {handed}")


def list_shards(source) -> Shards:
    """The Parquet shards of ``source``: a file, a directory (hive partitions ``key=value/``
    included), a glob, a list of files, a URI of any of the first three (``s3://``, ``gs://``,
    ``file://``: whatever ``pyarrow.fs.FileSystem.from_uri`` opens), or a
    ``pyarrow.dataset.Dataset`` of files on any pyarrow filesystem. The
    files are always ordered by path (that order defines the row numbers)."""
    import pyarrow.dataset as pads

    if isinstance(source, pads.Dataset):
        if not isinstance(source, pads.FileSystemDataset):
            raise TypeError(f"data: a pyarrow Dataset of files is needed, got {type(source).__name__}")
        ds, base, name = source, None, "dataset"
    elif is_uri(source):
        ds, base = _uri_dataset(source)
        name = source
    else:
        if isinstance(source, (list, tuple)):
            paths = [os.fspath(p) for p in source]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"data: no such file {missing[0]!r}")
            base, name = None, f"{len(paths)} files"
        else:
            if not isinstance(source, (str, os.PathLike)):
                raise TypeError(f"data: expected a path, glob, URI or list of Parquet files, a pyarrow Dataset, "
                                f"a Ray Dataset or a Spark DataFrame, got {type(source).__name__}")
            path = os.fspath(source)
            name = path
            if os.path.isdir(path):
                paths, base = path, path
            elif os.path.isfile(path):
                paths, base = [path], None
            else:
                paths, base = sorted(glob.glob(path, recursive=True)), None
                if not paths:
                    raise FileNotFoundError(f"data: no file matches {path!r}")
        import pyarrow as pa
        try:
            ds = pads.dataset(paths, format="parquet", partitioning="hive" if base else None)
        except pa.ArrowInvalid as e:  # a file that is not Parquet (a CSV, a stray text file)
            raise ValueError(f"data: {name}: not a Parquet dataset ({e}); pym4 reads datasets as Parquet "
                             f"(a single .csv file goes through m4.balance, or `pym4 balance FILE.csv`)") from None
    frags = sorted(ds.get_fragments(), key=lambda f: f.path)
    return Shards(ds, frags, base, name)


def engine_for(data, engine: Optional[str] = None, **options) -> Engine:
    """The engine for ``data``: "ray" for a Ray Dataset, "spark" for a Spark DataFrame,
    "local" for paths and pyarrow datasets unless ``engine`` says "ray" or "spark"."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    module = type(data).__module__
    kind = "ray" if module.startswith("ray.data") else "spark" if module.startswith("pyspark.sql") else None
    if kind is not None and engine not in (None, kind):
        raise ValueError(f"engine: data is a {kind} dataset ({type(data).__name__}); engine={engine!r} cannot read it")
    chosen = kind or engine or "local"
    if chosen == "local":
        from .local import LocalEngine
        return LocalEngine(data, **options)
    if chosen == "ray":
        from .ray import RayEngine
        return RayEngine(data, **options)
    from .spark import SparkEngine
    return SparkEngine(data, **options)
