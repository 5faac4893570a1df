"""Atomic output files: every file pym4 writes (CLI tables and reports, demo summaries,
plots, benchmark CSVs) appears whole or not at all, and never replaces a file half-way.

Temporaries live in the destination's folder (so the final ``os.replace`` is one step on
one file system) and are named ``.pym4-<pid>-<host>-<random>.tmp``: a later run can tell
the leftovers of a crashed (``kill -9``) run, whose process is gone, from the files of a
run still in progress, and :func:`clean_stale` removes only those.

Files that must change together (a CLI table and its report) are written into one
temporary folder, :class:`Staging`, and committed as a unit: a ``COMMIT`` manifest is
written into the folder, then the old marker file (the report's JSON) is removed, the
other files are moved into place and the marker last. So whenever the marker exists it
describes the files beside it, and a run killed half-way through the moves is finished
by the next :func:`clean_stale` of that folder (the manifest says what is left to do).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Iterator, List, Sequence

__all__ = ["atomic_output", "Staging", "clean_stale", "check_writable_folder", "temp_prefix"]

_COMMIT = "COMMIT"
_COMMIT_FORMAT = "pym4.commit/1"
# .pym4-<pid>-<host tag>-<anything>.tmp: the pid and host of the process that made it.
_TEMP_NAME = re.compile(r"^\.pym4-(\d+)-([0-9a-f]{8})-.*\.tmp$")


def _default_file_mode() -> int:
    # What open() would give a new file: 0o666 less the process umask (mkstemp uses 0o600).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _host_tag() -> str:
    # A folder may be shared between machines (NFS): a pid is only meaningful on its host.
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_prefix() -> str:
    """The name prefix of this process's temporaries (``.pym4-<pid>-<host>-``)."""
    return f".pym4-{os.getpid()}-{_host_tag()}-"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: never call a file stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_output(path) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder to write to; when the block succeeds it
    replaces ``path`` in one step (``os.replace``) with ordinary permissions, and when it
    fails it is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable_folder(folder: str) -> None:
    """Raise OSError unless a file can be created in ``folder`` (a probe file, created and
    removed at once: permission bits do not tell, e.g. for root or a read-only mount)."""
    fd, probe = tempfile.mkstemp(prefix=temp_prefix(), suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock of the directory), held while files in it are
    committed or cleaned, so that two runs never interleave their moves. Where the platform
    or file system has no such lock, best effort without it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _roll_forward(staging: str) -> None:
    """Finish the commit of folder ``staging`` (its ``COMMIT`` manifest exists): every step
    is safe to repeat, so a commit cut short (kill -9) is finished by doing it again."""
    folder = os.path.dirname(staging)
    with open(os.path.join(staging, _COMMIT)) as f:
        manifest = json.load(f)
    if manifest.get("format") != _COMMIT_FORMAT:
        raise ValueError(f"{staging}: not a pym4 commit manifest")
    moves, remove = list(manifest["moves"]), list(manifest["remove"])
    for name in moves + remove:  # plain names: a commit only ever touches its own folder
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{staging}: bad file name {name!r} in its manifest")
    marker = moves[-1]
    if os.path.exists(os.path.join(staging, marker)):  # the new marker is not in place yet
        for name in [marker] + remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
        for name in moves:
            src = os.path.join(staging, name)
            if os.path.exists(src):
                os.replace(src, os.path.join(folder, name))
        with contextlib.suppress(OSError):
            _fsync(folder)
    shutil.rmtree(staging)


class Staging:
    """A temporary folder beside the destination files, for files replaced together.

    ``path(name)`` is where to write the new ``name`` (a plain file name in the folder);
    :meth:`commit` moves them into place as a unit (see the module docstring); leaving the
    ``with`` block without a commit removes the folder and changes nothing."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.dir = tempfile.mkdtemp(prefix=temp_prefix(), suffix=".tmp", dir=self.folder)
        self.committed = False

    def path(self, name: str) -> str:
        if os.path.basename(name) != name:
            raise ValueError(f"Staging.path: expected a plain file name, got {name!r}")
        return os.path.join(self.dir, name)

    def commit(self, moves: Sequence[str], remove: Sequence[str] = ()) -> None:
        """Move the staged files ``moves`` into the folder, the last one (the marker) last,
        after removing the old marker and the files ``remove``."""
        moves, remove = list(moves), list(remove)
        if not moves:
            raise ValueError("Staging.commit: nothing to move")
        for name in moves:
            _fsync(self.path(name))  # the data is on disk before the manifest says "done"
            os.chmod(self.path(name), _default_file_mode())
        with _folder_lock(self.folder):
            tmp = os.path.join(self.dir, _COMMIT + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"format": _COMMIT_FORMAT, "moves": moves, "remove": remove}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.dir, _COMMIT))
            _roll_forward(self.dir)
        self.committed = True

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def clean_stale(folder: str) -> List[str]:
    """Remove the temporaries that crashed pym4 runs left in ``folder``: names of our form
    whose process (on this host) is gone. A staged commit that was cut short is finished
    first (its manifest exists: the new files are complete), an unfinished one is dropped.
    Returns the names removed; files of live runs and anything else are left alone."""
    folder = os.path.abspath(folder)
    host, removed = _host_tag(), []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    stale = [n for n in names if (m := _TEMP_NAME.match(n)) and m.group(2) == host and not _alive(int(m.group(1)))]
    if not stale:
        return removed
    with _folder_lock(folder):
        for name in stale:
            path = os.path.join(folder, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    if os.path.exists(os.path.join(path, _COMMIT)):
                        _roll_forward(path)
                    else:
                        shutil.rmtree(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError):  # not ours after all, or not removable: leave it
                continue
            removed.append(name)
    return removed
