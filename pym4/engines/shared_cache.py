"""A host-level cache of decoded Parquet shards, shared by every worker process on a machine.

The solver reads the same columns of the same files pass after pass, and decoding Parquet
costs far more than the core's work on the decoded rows. The local engine keeps the decoded
batches in its own memory (:class:`~pym4.engines.local.BatchCache`: its threads share it).
Ray's and Spark's workers are separate processes, and a pass's task for a file seldom
lands on the worker that read the file the pass before; a cache per process therefore
re-read most files during a fit's first passes (measured at N = 1e7 in 10 files, c = 32:
Spark's first fit took 4.8 3.9 2.1 1.8 1.5 1.4 s per pass, its second 1.2 0.6 0.6 1.2 1.5
1.8 s, against local's 1.6 0.1 0.1 0.5 0.3 0.3 s).

So the first task on a host to read a file writes its decoded Arrow batches once, as an
Arrow IPC file (uncompressed: booleans stay bits, 34 boolean columns are 4.25 bytes a row),
into a folder of this engine run; every later task on that host, in any worker process,
memory-maps the file (``pa.memory_map``: no copy, no decode, and the pages are the page
cache's, counted once however many workers map them). A file is written under a temporary
name and renamed into place, so a reader sees it whole or not at all; two tasks that race
on a file both write it and the last rename wins (the same bytes).

- Key: the shard's (absolute path, size, mtime in ns), as the driver saw them
  (:attr:`Shards.identity`), and the column set and batch size of the pass. The folder
  holds one column set, the latest pass's: a task that writes one removes the files of
  the others (as the local cache drops an earlier column set).
- Bound: ``limit`` bytes in the folder, and at most half the free space of its file
  system; a file that would pass it is not kept (the task reads its shard from Parquet,
  as without a cache).
- Where: ``$PYM4_SHARD_CACHE_DIR`` if set, else ``/dev/shm`` (memory) when it is writable,
  else the temp folder; in it ``pym4-shard-cache-<uid>/.pym4-<driver pid>-<host>-<random>.tmp``
  (pym4._io's temporary names).
- Lifetime: made by the driver at the engine's first pass; removed by
  :meth:`SharedCache.close` (``Engine.close()``, called at the end of every fit) or at the
  driver's exit; after a driver killed outright (``kill -9``), by the next engine started on
  that host (:func:`pym4._io.clean_stale`: the driver's pid is gone). A worker on the
  driver's host never creates the folder (it is gone: the run is over, and it must not
  come back); a worker on another host creates it there. Those other hosts' folders are
  not swept by this host's driver: on a multi-host cluster point ``PYM4_SHARD_CACHE_DIR``
  at a folder that the cluster cleans, or set ``cache_bytes=0``.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
from typing import Any, Iterator, Optional, Tuple

from .._io import _host_tag, clean_stale, temp_prefix

__all__ = ["SharedCache", "cache_root", "ROOT_ENV"]

ROOT_ENV = "PYM4_SHARD_CACHE_DIR"
_SUFFIX = ".arrow"


def cache_root() -> str:
    """The folder that holds every run's cache folder on this host."""
    base = os.environ.get(ROOT_ENV)
    if not base:
        shm = "/dev/shm"
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else tempfile.gettempdir()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(base, f"pym4-shard-cache-{uid}")


def _remove_at_exit(folder: str, pid: int) -> None:
    # Only the process that made the folder: a child forked from the driver inherits its
    # exit handlers, and its exit is not the end of the run.
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


def _digest(obj) -> str:
    return hashlib.sha1(repr(obj).encode("utf-8", "surrogatepass")).hexdigest()


class SharedCache:
    """One engine run's cache folder (module docstring). Picklable: it travels to the
    workers inside the task; only the driver's :meth:`close` removes the folder.

    ``hits``, ``misses``, ``written``: this process's counts (files read from the cache,
    files read from Parquet, cache files written), for tests and profiles."""

    def __init__(self, folder: str, limit: int, host: str):
        self.folder, self.limit, self.host = folder, int(limit), host
        self.hits = self.misses = self.written = 0

    @classmethod
    def create(cls, limit: int) -> "SharedCache":
        """A new, empty cache folder of this process (the driver), removed at its exit if
        :meth:`close` was not called; the folders of dead drivers on this host are swept first."""
        root = cache_root()
        os.makedirs(root, exist_ok=True)
        clean_stale(root)
        folder = os.path.join(root, f"{temp_prefix()}{secrets.token_hex(4)}.tmp")
        os.makedirs(folder)
        atexit.register(_remove_at_exit, folder, os.getpid())
        return cls(folder, limit, _host_tag())

    def __getstate__(self):
        return {"folder": self.folder, "limit": self.limit, "host": self.host}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["limit"], state["host"])

    def close(self) -> None:
        """Remove the folder and every file in it (the driver, at the end of the run)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # ----- in a worker -----

    @staticmethod
    def _set_key(columns: Tuple[str, ...], batch_rows: int) -> str:
        return _digest((tuple(columns), int(batch_rows)))[:16]

    def path_of(self, identity: tuple, columns: Tuple[str, ...], batch_rows: int) -> str:
        """The cache file of one shard (``identity``: its (path, size, mtime_ns))."""
        return os.path.join(self.folder, f"{self._set_key(columns, batch_rows)}-{_digest(tuple(identity))[:24]}{_SUFFIX}")

    def batches(self, shards, i: int, columns: Tuple[str, ...], batch_rows: int) -> Iterator[Tuple[Any, int]]:
        """File ``i``'s (batch, row0): memory-mapped from the cache, or read from Parquet
        (and written to the cache when it fits)."""
        from .local import scan_shard
        columns = tuple(columns)
        path = self.path_of(shards.identity[i], columns, batch_rows)
        mapped = self._open(path)
        if mapped is not None:
            self.hits += 1
            yield from mapped
            return
        self.misses += 1
        writer = self._writer(path, columns, batch_rows)
        for batch, row0 in scan_shard(shards, i, list(columns), batch_rows, False):
            if writer is not None:
                writer = writer.add(batch)
            yield batch, row0
        if writer is not None:
            if writer.finish(shards, i, columns, batch_rows):
                self.written += 1

    def _open(self, path: str) -> Optional[list]:
        import pyarrow as pa
        try:
            source = pa.memory_map(path, "r")
        except FileNotFoundError:
            return None
        except OSError as e:  # pyarrow raises its own OSError subclasses for a missing file
            if not os.path.exists(path):
                return None
            raise e
        with contextlib.closing(source):
            reader = pa.ipc.open_file(source)
            # The batches point into the mapping; it stays valid after close() while they live.
            out, row0 = [], 0
            for k in range(reader.num_record_batches):
                b = reader.get_batch(k)
                out.append((b, row0))
                row0 += b.num_rows
        return out

    def _writer(self, path: str, columns, batch_rows: int) -> Optional["_Writer"]:
        """A writer of this file, or None when the cache cannot take it (full, or gone)."""
        if not os.path.isdir(self.folder):
            if self.host == _host_tag():
                return None  # the driver on this host closed the run: do not bring the folder back
            try:
                os.makedirs(self.folder, exist_ok=True)
            except OSError:
                return None
        used = self._evict_other_sets(self._set_key(columns, batch_rows))
        room = self.limit - used
        with contextlib.suppress(OSError, AttributeError):
            # At most half the file system's free space: /dev/shm is memory, and a container's
            # is often small (Docker's default: 64 MB); the cache must not fill it for others.
            st = os.statvfs(self.folder)
            room = min(room, st.f_bavail * st.f_frsize // 2)
        if room <= 0:
            return None
        return _Writer(self, path, room)

    def _evict_other_sets(self, keep: str) -> int:
        """Remove the files of other column sets; the bytes left in the folder."""
        used = 0
        try:
            names = os.listdir(self.folder)
        except OSError:
            return self.limit
        for name in names:
            p = os.path.join(self.folder, name)
            if name.endswith(_SUFFIX) and not name.startswith(keep):
                with contextlib.suppress(OSError):
                    os.unlink(p)
                continue
            with contextlib.suppress(OSError):
                used += os.stat(p).st_size
        return used

    @property
    def nbytes(self) -> int:
        """Bytes in the folder now (every process's files)."""
        total = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(self.folder):
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(self.folder, name)).st_size
        return total


class _Writer:
    """Writes one shard's batches to a temporary file beside the cache file; gives up (and
    removes it) when it would pass the room left."""

    def __init__(self, cache: SharedCache, path: str, room: int):
        self.cache, self.path, self.room = cache, path, room
        self.tmp = os.path.join(cache.folder, f"{temp_prefix()}{secrets.token_hex(4)}.tmp")
        self.sink = self.writer = None
        self.size = 0

    def add(self, batch) -> Optional["_Writer"]:
        import pyarrow as pa
        self.size += batch.nbytes
        if self.size > self.room:
            self.abort()
            return None
        try:
            if self.writer is None:
                self.sink = pa.OSFile(self.tmp, "wb")
                self.writer = pa.ipc.new_file(self.sink, batch.schema)
            self.writer.write_batch(batch)
        except OSError:  # the folder went away (closed), or the disk is full: no cache of this file
            self.abort()
            return None
        return self

    def finish(self, shards, i: int, columns, batch_rows: int) -> bool:
        """Close and rename into place; False when nothing could be kept."""
        try:
            if self.writer is None:  # an empty shard: a file of the schema and no batch
                from .local import _empty_batch
                import pyarrow as pa
                self.sink = pa.OSFile(self.tmp, "wb")
                self.writer = pa.ipc.new_file(self.sink, _empty_batch(shards, list(columns), False).schema)
            self.writer.close()
            self.sink.close()
            os.rename(self.tmp, self.path)
            return True
        except OSError:
            self.abort()
            return False

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self.writer is not None:
                self.writer.close()
        with contextlib.suppress(Exception):
            if self.sink is not None:
                self.sink.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        self.writer = self.sink = None
