"""Small helpers several modules share, in one place: atomic writes, item ids, file names.

Nothing here imports torch, pytest or another qkcheck module.

* :func:`write_atomic` / :func:`atomic_path` — a file appears whole or not at all: it is
  written to a temporary file beside its destination, then renamed over it (``os.replace``
  is atomic within one file system), so a reader, a parallel worker or a crash never sees a
  half-written summary, baseline, figure or run file. Files get mode ``0o644``.
* :func:`item_id` — the test id of a per-item check, ``L{layer}-S{sample}-Q{query_pos}``.
* :func:`safe_name` — a run name made safe as one path component.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: permissions of every file written atomically (``mkstemp`` alone would give 0o600)
FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) to write; on success it is moved
    onto ``path``, on any error removed. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def item_id(layer: int, sample: int, query_pos: int) -> str:
    """Test id of an item, e.g. ``L1-S3-Q17`` (select with ``-k``)."""
    return f"L{layer}-S{sample}-Q{query_pos}"


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``-``."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)
