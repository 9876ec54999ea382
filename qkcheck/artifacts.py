"""The artifacts directory of a validation session: checked at start, owned by one session.

Figures and ``summary.json`` go to one directory per run (``qk-artifacts/<run>/`` unless
``--artifacts-dir`` says otherwise). Before any test runs, :func:`check_artifacts_dir`
refuses a path that is a file, lies under a file, or cannot be written. A session then holds
an exclusive lock on the directory (:class:`ArtifactsLock`, ``fcntl.flock`` on
``.qkcheck.lock``) until it ends, so two sessions — say two ``--layers`` shards started with
the same directory — can never overwrite each other's summary or figures: the second one
stops at start with a usage error naming the directory and the fix (give each shard its own
``--artifacts-dir``, then merge the summaries). The lock dies with its process, so a killed
session never leaves the directory locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

from qkcheck.errors import QKCheckError

LOCK_NAME = ".qkcheck.lock"


class ArtifactsError(QKCheckError):
    """The artifacts directory cannot be used."""


def check_artifacts_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it writable; return it. Raises ArtifactsError."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == path else f"lies under the file {parent}"
            raise ArtifactsError(
                f"--artifacts-dir {path}: {where}; expected a directory (or a path to create)"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".qkcheck-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ArtifactsError(
            f"--artifacts-dir {path}: cannot write there ({e.strerror or e}); expected a "
            "writable directory"
        ) from None
    return path


class ArtifactsLock:
    """An exclusive, process-lifetime lock on an artifacts directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> ArtifactsLock:
        lock = self.path / LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ArtifactsError(f"--artifacts-dir {self.path}: cannot lock: {e}") from None
            raise ArtifactsError(
                f"--artifacts-dir {self.path}: in use by another qkcheck session (pid {owner}); "
                "give each concurrent session (e.g. each --layers shard) its own "
                "--artifacts-dir and merge the summaries with python -m qkcheck.merge"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
