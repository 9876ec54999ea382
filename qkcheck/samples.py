"""Samples (token ids, ``batch pos``) for a run, and token strings for plot labels.

Where samples come from (:func:`load_samples`):

* a file of token ids, ``.pt`` (a tensor, or a dict with ``"tokens"``/``"input_ids"``) or
  ``.npy``, shape ``(n, T)``;
* a ``.txt`` file, one sample per line, tokenized with the run's tokenizer (the ``tokenizers``
  package); lines are cut to the shortest line's length so they stack into ``(n, T)``;
* ``"dataset"``: the run's own ``task_config`` dataset, through the ``datasets`` package;
* the samples file a run ships (``samples.pt`` in the run directory; the demo run has one).

Every path ends in :func:`check_tokens`: integer ids in ``[0, vocab_size)``, at most
``n_ctx`` per sample, else a :class:`~qkcheck.errors.SamplesError` naming the source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from qkcheck.errors import SamplesError

if TYPE_CHECKING:
    from qkcheck.runs.config import TaskConfig
    from qkcheck.runs.run import Run

TOKEN_FILE_SUFFIXES = (".pt", ".npy")
TEXT_SUFFIXES = (".txt",)


def check_tokens(tokens: Any, *, vocab_size: int, n_ctx: int, source: str = "tokens") -> Tensor:
    """``tokens`` as an int64 ``(batch, pos)`` tensor, or SamplesError naming ``source``.

    A 1-D sequence is taken as one sample.
    """
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens)
    if not isinstance(tokens, Tensor):
        raise SamplesError(
            f"{source}: expected a tensor of token ids (n, T), got {type(tokens).__name__}"
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise SamplesError(
            f"{source}: expected integer token ids of shape (n, T), got {tokens.dtype} "
            f"{tuple(tokens.shape)}"
        )
    if tokens.dtype == torch.bool:
        raise SamplesError(f"{source}: expected integer token ids, got a bool tensor")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise SamplesError(f"{source}: no tokens (shape {tuple(tokens.shape)})")
    if tokens.shape[1] > n_ctx:
        raise SamplesError(
            f"{source}: samples have {tokens.shape[1]} tokens, longer than the model's context "
            f"n_ctx={n_ctx}; cut them to at most {n_ctx} tokens"
        )
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        sample, pos = (int(i) for i in bad.nonzero()[0])
        raise SamplesError(
            f"{source}: token id {int(tokens[sample, pos])} at sample {sample}, position {pos} "
            f"is out of vocabulary: ids must lie in [0, {vocab_size}) "
            f"({int(bad.sum())} such ids)"
        )
    return tokens.to(torch.int64)


def read_token_file(path: Path, *, vocab_size: int, n_ctx: int) -> Tensor:
    """Token ids from a ``.pt`` or ``.npy`` file, checked."""
    if not path.is_file():
        raise SamplesError(f"{path}: no such samples file")
    try:
        if path.suffix == ".npy":
            data: Any = np.load(path, allow_pickle=False)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SamplesError(f"{path}: unreadable samples file: {type(e).__name__}: {e}") from e
    if isinstance(data, Mapping):
        key = next((k for k in ("tokens", "input_ids") if k in data), None)
        if key is None:
            raise SamplesError(
                f"{path}: a dict of samples needs a 'tokens' or 'input_ids' key, got keys "
                f"{sorted(map(str, data))}"
            )
        data = data[key]
    return check_tokens(data, vocab_size=vocab_size, n_ctx=n_ctx, source=str(path))


def read_text_file(path: Path, tokenizer: Path, *, vocab_size: int, n_ctx: int) -> Tensor:
    """One sample per non-empty line, tokenized, cut to the shortest line's length."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SamplesError(f"{path}: cannot read samples text: {e}") from e
    if not lines:
        raise SamplesError(f"{path}: no non-empty lines to tokenize")
    encode = _encoder(tokenizer)
    ids = [encode(line) for line in lines]
    for i, row in enumerate(ids):
        if len(row) > n_ctx:
            raise SamplesError(
                f"{path}: line {i + 1} has {len(row)} tokens, longer than the model's context "
                f"n_ctx={n_ctx}; shorten it"
            )
    length = min(len(row) for row in ids)
    tokens = torch.tensor([row[:length] for row in ids], dtype=torch.int64)
    return check_tokens(tokens, vocab_size=vocab_size, n_ctx=n_ctx, source=str(path))


def dataset_samples(
    task: TaskConfig,
    *,
    n: int,
    seq_len: int,
    tokenizer: Path | None,
    vocab_size: int,
    n_ctx: int,
    dataset: str | None = None,
    split: str | None = None,
) -> Tensor:
    """The first ``n`` rows with at least ``seq_len`` tokens of the run's dataset (eval split).

    ``dataset`` overrides ``task.dataset_name``: a hub name or a local folder (one written
    by ``Dataset.save_to_disk``, or data files ``load_dataset`` reads).
    """
    try:
        import datasets  # optional extra: pip install 'qkcheck[datasets]'
    except ImportError:
        raise SamplesError(
            "reading the run's dataset needs the `datasets` package: "
            "pip install 'qkcheck[datasets]' (or pass a samples file)"
        ) from None
    name = dataset or task.dataset_name
    split = split or task.eval_data_split
    if not name:
        raise SamplesError("the run's task_config names no dataset_name; pass a samples file")
    local = Path(name).expanduser()
    try:
        if local.is_dir() and any((local / f).is_file() for f in _SAVED_DATASET_FILES):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
        rows = _take_rows(ds, task, n, seq_len, tokenizer)
    except SamplesError:
        raise
    except Exception as e:  # network, missing split, bad files: all the same to the caller
        raise SamplesError(
            f"dataset {name!r} (split {split!r}): cannot load: {type(e).__name__}: {e}"
        ) from e
    if not rows:
        raise SamplesError(
            f"dataset {name!r} (split {split!r}): no row of column {task.column_name!r} has "
            f"{seq_len} tokens"
        )
    tokens = torch.tensor(rows, dtype=torch.int64)
    return check_tokens(tokens, vocab_size=vocab_size, n_ctx=n_ctx, source=f"dataset {name!r}")


_SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")


def _take_rows(
    ds: Iterable[Mapping[str, Any]], task: TaskConfig, n: int, seq_len: int, tokenizer: Path | None
) -> list[list[int]]:
    encode = None if task.is_tokenized else _encoder(tokenizer)
    rows: list[list[int]] = []
    for row in ds:
        if task.column_name not in row:
            raise SamplesError(
                f"dataset {task.dataset_name!r}: no column {task.column_name!r} "
                f"(task_config.column_name); columns: {sorted(row)}"
            )
        value = row[task.column_name]
        ids = [int(i) for i in value] if encode is None else encode(value)
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
        if len(rows) == n:
            break
    return rows


def load_samples(
    run: Run,
    source: str | os.PathLike[str] | None = None,
    *,
    n: int = 8,
    seq_len: int | None = None,
) -> Tensor:
    """Samples for ``run``: from ``source`` (a file or ``"dataset"``), else the run's own.

    ``n``/``seq_len`` apply to the dataset (``seq_len`` defaults to the smaller of the
    task's ``max_seq_len`` and the model's ``n_ctx``).
    """
    if hasattr(run, "load_samples"):  # a param-decomp run reads its own
        return run.load_samples(source, n=n, seq_len=seq_len)
    limits = {"vocab_size": run.vocab_size, "n_ctx": run.n_ctx}
    if source is None and run.samples is not None:
        return run.samples
    if source is None or os.fspath(source) == "dataset":
        task = run.config.task_config
        if task is None:
            raise SamplesError(
                f"{run.config.path}: no task_config to read a dataset from; pass a samples file"
            )
        length = seq_len or min(task.max_seq_len, run.n_ctx)
        return dataset_samples(task, n=n, seq_len=length, tokenizer=run.files.tokenizer, **limits)
    path = Path(source).expanduser()
    if path.suffix in TOKEN_FILE_SUFFIXES:
        return read_token_file(path, **limits)
    if path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise SamplesError(f"{path}: no such samples file")
        tokenizer = run.files.tokenizer
        if tokenizer is None:
            raise SamplesError(
                f"{path}: tokenizing text needs the run's tokenizer.json, and none was found "
                f"(looked in {run.files.pretrain_dir} and for tokenizer_name "
                f"{run.config.tokenizer_name!r}); pass token ids (.pt/.npy) instead"
            )
        return read_text_file(path, tokenizer, **limits)
    raise SamplesError(
        f"{path}: unknown samples format {path.suffix!r}; expected one of "
        f"{[*TOKEN_FILE_SUFFIXES, *TEXT_SUFFIXES]} or 'dataset'"
    )


# --- tokenizers ------------------------------------------------------------------------------


def _encoder(tokenizer: Path | None):
    if tokenizer is None:
        raise SamplesError("tokenizing text needs the run's tokenizer.json, and none was found")
    try:
        from tokenizers import Tokenizer  # optional extra: pip install 'qkcheck[tokenizers]'
    except ImportError:
        raise SamplesError(
            "tokenizing text needs the `tokenizers` package: pip install 'qkcheck[tokenizers]'"
        ) from None
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as e:
        raise SamplesError(f"{tokenizer}: cannot read tokenizer: {e}") from e
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def find_tokenizer(candidates: Sequence[Path | None], tokenizer_name: str | None) -> Path | None:
    """The first ``tokenizer.json`` among ``candidates``, else one named by ``tokenizer_name``:
    a local file or folder, or a Hugging Face hub name already in the local hub cache."""
    for path in candidates:
        if path is not None and path.is_file():
            return path
    if not tokenizer_name:
        return None
    local = Path(tokenizer_name).expanduser()
    for path in (local, local / "tokenizer.json"):
        if path.is_file() and path.suffix == ".json":
            return path
    hub = (
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"
    )
    repo = Path(hub) / ("models--" + tokenizer_name.replace("/", "--")) / "snapshots"
    found = sorted(repo.glob("*/tokenizer.json")) if repo.is_dir() else []
    return found[-1] if found else None


class TokenLabels:
    """Token id → display string, from a ``tokenizer.json`` vocab (read as plain JSON).

    Byte-level BPE pieces (GPT-2's ``Ġ`` for a space) are shown as the text they decode
    to; SentencePiece's ``▁`` as a space. Unknown ids, or no vocab at all, show as the id.
    """

    def __init__(self, vocab: Mapping[int, str] | None = None) -> None:
        self.vocab = dict(vocab or {})

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> TokenLabels:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SamplesError(f"{path}: cannot read tokenizer vocabulary: {e}") from e
        model = data.get("model") or {}
        raw = model.get("vocab") or {}
        pieces = (
            {int(i): str(p) for p, i in raw.items()}
            if isinstance(raw, Mapping)
            else {i: str(entry[0]) for i, entry in enumerate(raw)}  # Unigram: [piece, score]
        )
        for added in data.get("added_tokens") or []:
            pieces[int(added["id"])] = str(added["content"])
        if _uses(data, "ByteLevel"):
            pieces = {i: _byte_level_text(p) for i, p in pieces.items()}
        if _uses(data, "Metaspace"):
            pieces = {i: p.replace("▁", " ") for i, p in pieces.items()}
        return cls(pieces)

    def __call__(self, ids: Iterable[int] | Tensor) -> list[str]:
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.vocab.get(int(i), str(int(i))) for i in values]


def _uses(data: Mapping[str, Any], kind: str) -> bool:
    """Whether the tokenizer's pre-tokenizer or decoder is (or contains) ``kind``."""

    def walk(node: Any) -> bool:
        if isinstance(node, Mapping):
            return node.get("type") == kind or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(data.get("pre_tokenizer")) or walk(data.get("decoder"))


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (printable stand-ins for raw bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _byte_level_text(piece: str) -> str:
    table = _unicode_to_byte()
    if not all(c in table for c in piece):
        return piece  # a special token such as <|endoftext|>: shown as written
    return bytes(table[c] for c in piece).decode("utf-8", errors="replace")
