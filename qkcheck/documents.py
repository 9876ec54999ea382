"""Document ids of packed samples: positions restarting per document, same-document masks.

A sample of ``pos`` tokens may pack several documents. ``document_ids`` ``(batch, pos)``
(integers) gives each token's document; ``-1`` marks padding, a token of no document.
Documents are the maximal runs of equal ids. As param-decomp trains:

* the rotary position of token ``t`` is its offset in its document:
  ``t − (first index of t's run)``, so positions restart at 0 at each document start;
* query ``i`` attends to key ``j`` iff ``j ≤ i`` and both lie in the same run (causal AND
  same document); a padding query (id ``-1``) attends to nothing, so it has no logits to
  check and no item is generated for it.

Without document ids every sample is one document: positions ``0..pos-1``, a causal mask.
Ids come from a file aligned with the samples (:func:`read_document_ids`) or from a
separator token that starts each new document (:func:`ids_from_separator`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qkcheck.errors import SamplesError

PADDING = -1


def segment_starts(document_ids: Tensor) -> Tensor:
    """Boolean ``(batch, pos)``: True where a document (a run of equal ids) begins."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: Tensor) -> Tensor:
    """Rotary positions ``(batch, pos)``: each token's offset from its document's start."""
    T = document_ids.shape[-1]
    t = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    start = torch.where(segment_starts(document_ids), t, torch.zeros_like(t))
    return t - start.cummax(dim=-1).values


def document_mask(document_ids: Tensor) -> Tensor:
    """Boolean ``(batch, query_pos, key_pos)``: True where the query attends to the key —
    causal, same document run, and not padding."""
    run = segment_starts(document_ids).cumsum(dim=-1)  # run index of every token
    T = document_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same = run[:, :, None] == run[:, None, :]
    real = (document_ids != PADDING)[:, :, None]
    return causal[None] & same & real


def ids_from_separator(tokens: Tensor, separator: int) -> Tensor:
    """Document ids when ``separator`` starts each new document (it belongs to the document
    it opens): ``(batch, pos)``, 0 before the first separator."""
    return (tokens == separator).long().cumsum(dim=-1)


def read_document_ids(path: Path, shape: tuple[int, ...]) -> Tensor:
    """Document ids from ``.npy``/``.pt`` (a tensor, or a dict with ``document_ids``),
    integer, of the samples' ``shape``, values ≥ -1."""
    if not path.is_file():
        raise SamplesError(f"{path}: no such document-ids file")
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(data, dict):
                data = data.get("document_ids")
    except Exception as e:
        raise SamplesError(f"{path}: unreadable document-ids file: {type(e).__name__}: {e}") from e
    if not isinstance(data, Tensor) or data.dtype.is_floating_point or data.dtype == torch.bool:
        got = f"{data.dtype}" if isinstance(data, Tensor) else type(data).__name__
        raise SamplesError(f"{path}: expected integer document ids, got {got}")
    if tuple(data.shape) != tuple(shape):
        raise SamplesError(
            f"{path}: document ids have shape {tuple(data.shape)}, but the samples are "
            f"{tuple(shape)}; give one id per token"
        )
    data = data.long()
    if bool((data < PADDING).any()):
        raise SamplesError(f"{path}: document ids must be >= -1 (-1 marks padding)")
    return data
