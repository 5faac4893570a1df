"""Atomic output files: every file pym4 writes (CLI tables and reports, demo summaries,
plots, benchmark CSVs) appears whole or not at all, and never replaces a file half-way."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def _default_file_mode() -> int:
    # What open() would give a new file: 0o666 less the process umask (mkstemp uses 0o600).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder to write to; when the block succeeds it
    replaces ``path`` in one step (``os.replace``) with ordinary permissions, and when it
    fails it is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pym4-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
