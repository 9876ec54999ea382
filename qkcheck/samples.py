r"""Samples (token ids, ``batch pos``) and token strings for plot labels: leaf readers.

Where samples come from (:meth:`qkcheck.runs.run.Run.load_samples` picks one):

* a file of token ids (:func:`read_token_file`), ``.pt`` (a tensor, or a dict with
  ``"tokens"``/``"input_ids"``) or ``.npy``, shape ``(n, T)``, of any integer dtype
  (int8…int64, uint8…uint64, either byte order) whose values are valid ids;
* a ``.txt`` file (:func:`read_text_file`), UTF-8 (a BOM is dropped), one sample per line —
  lines end at ``\n`` only (a trailing ``\r`` is dropped), never at the other characters
  ``str.splitlines`` breaks on (``\x0c``, ``\u2028``…) — tokenized with the run's tokenizer
  (the ``tokenizers`` package); lines are cut to the shortest line's length so they stack
  into ``(n, T)``, and the returned :class:`Samples` says so in its ``note``;
* ``"dataset"``: the run's own ``task_config`` dataset (:func:`dataset_samples`), through
  the ``datasets`` package;
* the samples file a run ships (``samples.pt`` in the run directory; the demo run has one).

Every path ends in :func:`check_tokens`: integer ids in ``[0, vocab_size)``, at most
``n_ctx`` per sample, as int64, else a one-line :class:`~qkcheck.errors.SamplesError`
naming the source. Nothing here knows about runs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from qkcheck.errors import SamplesError

if TYPE_CHECKING:
    from qkcheck.runs.config import TaskConfig

TOKEN_FILE_SUFFIXES = (".pt", ".npy")
TEXT_SUFFIXES = (".txt",)
#: what a token file may hold, for messages
_INTEGER_DTYPES = "int8, int16, int32, int64, uint8, uint16, uint32 or uint64"
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Samples:
    """Checked token ids ``(batch, pos)`` (int64), where they came from, and a note the user
    should read (e.g. that text lines were cut to one length), or None."""

    tokens: Tensor
    source: str
    note: str | None = None


def as_token_ids(tokens: Any, source: str = "tokens") -> Tensor:
    """``tokens`` (a tensor or numpy array of any integer dtype) as an int64 tensor.

    Anything else — floats, bools, strings, objects, sparse or quantized tensors, integer
    values beyond int64 — is a one-line SamplesError naming ``source``, what it got and what
    it expects.
    """
    expected = "expected integer token ids of shape (n, T)"
    dtypes = f"; token ids may be {_INTEGER_DTYPES}"
    if isinstance(tokens, Tensor):
        if tokens.layout != torch.strided:
            raise SamplesError(
                f"{source}: got a {tokens.layout} tensor; {expected} as a dense tensor (a sparse "
                "tensor's implicit zeros would silently be token 0)"
            )
        if tokens.is_quantized or tokens.is_nested or tokens.is_meta:
            kind = "quantized" if tokens.is_quantized else "nested" if tokens.is_nested else "meta"
            raise SamplesError(f"{source}: got a {kind} tensor; {expected}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise SamplesError(
                f"{source}: {expected}, got {tokens.dtype} {tuple(tokens.shape)}{dtypes}"
            )
        if tokens.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            return tokens.detach().to(device="cpu", dtype=torch.int64)
        try:
            tokens = tokens.detach().cpu().numpy()  # uint16/32/64: torch lacks their comparisons
        except (TypeError, RuntimeError):
            raise SamplesError(
                f"{source}: {expected}, got {tokens.dtype} {tuple(tokens.shape)}{dtypes}"
            ) from None
    if not isinstance(tokens, np.ndarray):
        raise SamplesError(
            f"{source}: expected a tensor of token ids (n, T), got {type(tokens).__name__}"
        )
    if tokens.dtype.kind not in "iu":
        raise SamplesError(
            f"{source}: {expected}, got a numpy array of dtype {tokens.dtype.name} "
            f"{tuple(tokens.shape)}{dtypes}"
        )
    if tokens.dtype.kind == "u" and tokens.dtype.itemsize == 8 and tokens.size:
        big = tokens > _INT64_MAX
        if big.any():
            where = tuple(int(i) for i in np.argwhere(big)[0])
            raise SamplesError(
                f"{source}: token id {int(tokens[where])} at index {where} does not fit int64; "
                "token ids must be small non-negative integers"
            )
    return torch.from_numpy(np.ascontiguousarray(tokens.astype(np.int64)))


def check_tokens(tokens: Any, *, vocab_size: int, n_ctx: int, source: str = "tokens") -> Tensor:
    """``tokens`` as an int64 ``(batch, pos)`` tensor, or SamplesError naming ``source``.

    A 1-D sequence is taken as one sample. Every integer dtype is accepted (see
    :func:`as_token_ids`); the range check runs in int64, so a uint8 file is not misread.
    """
    tokens = as_token_ids(tokens, source)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise SamplesError(
            f"{source}: expected integer token ids of shape (n, T), got {tokens.dtype} "
            f"{tuple(tokens.shape)}"
        )
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
    return tokens


def read_token_file(path: Path, *, vocab_size: int, n_ctx: int) -> Tensor:
    """Token ids from a ``.pt`` or ``.npy`` file, checked (weights-only / no-pickle loads)."""
    _check_is_file(path)
    data = _load_npy(path) if path.suffix == ".npy" else _load_pt(path)
    if isinstance(data, Mapping):
        key = next((k for k in ("tokens", "input_ids") if k in data), None)
        if key is None:
            raise SamplesError(
                f"{path}: a dict of samples needs a 'tokens' or 'input_ids' key, got keys "
                f"{sorted(map(str, data))}"
            )
        data = data[key]
    return check_tokens(data, vocab_size=vocab_size, n_ctx=n_ctx, source=str(path))


def _load_pt(path: Path) -> Any:
    """``torch.load(weights_only=True)``; torch's advice to retry with ``weights_only=False``
    (which runs the file's code) is never passed on."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        if what is None:  # not a pickle torch wrote: say what the bytes are
            raise SamplesError(f"{path}: unreadable samples file: {_head(path)}") from None
        raise SamplesError(
            f"{path}: refused to load: the file is a pickle that needs code execution (it "
            f"references {what.group(1)}); qkcheck reads samples with "
            "torch.load(weights_only=True) only. Expected a tensor of token ids, or a dict with "
            "'tokens' or 'input_ids'"
        ) from None
    except Exception as e:  # RuntimeError, EOFError... on a broken archive
        raise SamplesError(f"{path}: unreadable samples file: {_head(path)}") from e


def _load_npy(path: Path) -> Any:
    """``np.load(allow_pickle=False)``; numpy's advice to load pickled data unsafely is never
    passed on."""
    with path.open("rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise SamplesError(f"{path}: unreadable samples file: not a .npy file ({_head(path)})")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickled" in str(e):
            raise SamplesError(
                f"{path}: the array holds Python objects (dtype object), which qkcheck never "
                "unpickles; expected integer token ids"
            ) from None
        raise SamplesError(f"{path}: unreadable samples file: {_first_line(e)}") from e
    except Exception as e:
        raise SamplesError(f"{path}: unreadable samples file: {_first_line(e)}") from e


def _head(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK"):
        return f"a damaged torch.save archive ({path.stat().st_size} bytes; truncated?)"
    return f"not a file written by torch.save or np.save (starts with {head!r})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise SamplesError(f"{path}: is a directory; expected a samples file")
    if not path.is_file():
        raise SamplesError(f"{path}: no such samples file")


def text_lines(text: str) -> list[str]:
    r"""The non-blank lines of a text: split at ``\n`` only, a leading BOM and each line's
    trailing ``\r`` dropped. Form feeds, ``\u2028`` and the like stay inside their line."""
    lines = text.removeprefix("\ufeff").split("\n")
    return [line.removesuffix("\r") for line in lines if line.strip()]


def read_text_file(path: Path, tokenizer: Path, *, vocab_size: int, n_ctx: int) -> Samples:
    """One sample per non-blank line (see :func:`text_lines`), tokenized, cut to the shortest
    line's length; the note says how many lines were cut, and to what length."""
    _check_is_file(path)
    try:
        lines = text_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SamplesError(f"{path}: cannot read samples text (UTF-8 expected): {e}") from e
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
        if not row:
            raise SamplesError(f"{path}: line {i + 1} gives no tokens")
    length = min(len(row) for row in ids)
    cut = sum(len(row) > length for row in ids)
    note = None
    if cut:
        note = (
            f"{path}: {cut} of {len(ids)} lines cut to {length} tokens, the shortest line's "
            f"length (the longest had {max(len(row) for row in ids)})"
        )
    tokens = torch.tensor([row[:length] for row in ids], dtype=torch.int64)
    checked = check_tokens(tokens, vocab_size=vocab_size, n_ctx=n_ctx, source=str(path))
    return Samples(checked, str(path), note)


def read_samples_file(
    path: Path, *, vocab_size: int, n_ctx: int, tokenizer: Path | None, no_tokenizer: str = ""
) -> Samples:
    """Samples from a token file or a text file, by suffix. ``no_tokenizer``: where a missing
    tokenizer was looked for, for the message a text file then gets."""
    limits = {"vocab_size": vocab_size, "n_ctx": n_ctx}
    if path.suffix in TOKEN_FILE_SUFFIXES:
        return Samples(read_token_file(path, **limits), str(path))
    if path.suffix in TEXT_SUFFIXES:
        _check_is_file(path)
        if tokenizer is None:
            raise SamplesError(
                f"{path}: tokenizing text needs the run's tokenizer.json, and none was found"
                f"{f' ({no_tokenizer})' if no_tokenizer else ''}; pass token ids (.pt/.npy) "
                "instead"
            )
        return read_text_file(path, tokenizer, **limits)
    raise SamplesError(
        f"{path}: unknown samples format {path.suffix!r}; expected one of "
        f"{[*TOKEN_FILE_SUFFIXES, *TEXT_SUFFIXES]} or 'dataset'"
    )


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
