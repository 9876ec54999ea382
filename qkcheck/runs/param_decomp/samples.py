"""The run's own data set: pre-tokenized parquet files under ``<root>/datasets/<name>/``.

param-decomp trains on named pre-tokenized data sets (``data.train.name``,
``data.eval.name`` in the launch config) stored as parquet files. The token ids are the
first list-of-integers column (``input_ids`` or ``tokens`` when present); rows shorter than
``seq_len`` are skipped, longer ones cut. Read with pyarrow, only when present locally.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qkcheck.errors import SamplesError

PREFERRED_COLUMNS = ("input_ids", "tokens")


def find_dataset(name: str, roots: Sequence[Path]) -> Path:
    """The folder ``<root>/datasets/<name>/`` holding parquet files, first root first."""
    tried = []
    for root in roots:
        folder = root / "datasets" / name
        if folder.is_dir() and any(folder.rglob("*.parquet")):
            return folder
        tried.append(f"{folder} ({'no *.parquet' if folder.is_dir() else 'missing'})")
    raise SamplesError(
        f"the run's data set {name!r} is not present locally: tried {'; '.join(tried)}. Fix: "
        "put its parquet files there, or pass --samples-file with token ids (.npy/.pt)"
    )


def dataset_tokens(name: str, roots: Sequence[Path], *, n: int, seq_len: int) -> np.ndarray:
    """The first ``n`` rows of at least ``seq_len`` tokens, cut: ``(n', seq_len)``."""
    try:
        import pyarrow.parquet as pq  # optional extra: pip install 'qkcheck[param-decomp]'
    except ImportError:
        raise SamplesError(
            "reading the run's data set needs pyarrow: pip install 'qkcheck[param-decomp]'"
        ) from None
    folder = find_dataset(name, roots)
    rows: list[list[int]] = []
    for file in sorted(folder.rglob("*.parquet")):
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
            raise SamplesError(f"{file}: unreadable parquet file: {e}") from e
        column = _token_column(table, file)
        for ids in table.column(column).to_pylist():
            if ids is not None and len(ids) >= seq_len:
                rows.append([int(i) for i in ids[:seq_len]])
            if len(rows) == n:
                return np.asarray(rows, dtype=np.int64)
    if not rows:
        raise SamplesError(f"{folder}: no row has {seq_len} tokens")
    return np.asarray(rows, dtype=np.int64)


def _token_column(table, file: Path) -> str:
    import pyarrow as pa

    def is_ids(name: str) -> bool:
        t = table.schema.field(name).type
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(
            t.value_type
        )

    names = [c for c in PREFERRED_COLUMNS if c in table.column_names and is_ids(c)]
    names += [c for c in table.column_names if is_ids(c)]
    if not names:
        raise SamplesError(
            f"{file}: no column of token id lists; columns: {table.schema.to_string()!r}"
        )
    return names[0]
