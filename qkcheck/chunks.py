"""Query chunks: a (layer, sample) group walked in blocks of query rows of bounded memory.

A causal query row ``i`` needs keys ``0..i`` only, so rows ``i0 ≤ i < i1`` need the
``(head, i1 − i0, i1)`` block of each per-entry tensor, never the ``(head, pos, pos)``
square: at ``pos`` 2048 and 32 heads one float32 square is 512 MiB, and a group's
decomposition and reduction keep about :data:`LIVE_BLOCKS` of them alive. Chunks are
sized so that ``LIVE_BLOCKS · heads · rows · keys · itemsize`` stays under the budget
(``--chunk-mib``); early rows have fewer keys, so their chunks hold more rows. Every row is
computed exactly as without chunks: per-row verdicts are reductions over that row only,
and the run-level statistics (|r| sketch, logit moments) are sums over the rows.
"""

from __future__ import annotations

import math

#: default budget of a group's per-entry working memory, MiB (``--chunk-mib``)
DEFAULT_MIB = 256
#: at most this many query rows per chunk, however large the budget: blocks that stay in the
#: caches are faster than one pass over the square (bench/chunk_rows.py at the reference
#: scale, 6 heads × 512 positions: 42 ms per group at 128 rows, 44 at 64, 111 for the
#: whole square, single-threaded)
MAX_ROWS = 128
#: ``(head, rows, keys)`` blocks alive at once while a chunk is decomposed and reduced: the
#: decomposition's terms, residual, bounds, magnitude, the target block, closure error,
#: ratio and their temporaries (measured by bench/llama8b_layer.py: peak ≈ budget)
LIVE_BLOCKS = 16


def query_chunks(
    n_pos: int, entry_bytes: int, budget_bytes: int, max_rows: int = MAX_ROWS
) -> list[tuple[int, int]]:
    """Consecutive ``(i0, i1)`` covering ``0..n_pos`` with ``(i1 − i0) · i1 · entry_bytes``
    at most ``budget_bytes`` (at least one row per chunk however small the budget), each
    chunk as many rows as fit, at most ``max_rows``: ``r`` rows from ``i0`` fit when
    ``r (i0 + r) ≤ cap``, ``cap = budget // entry_bytes``, i.e.
    ``r = ⌊(√(i0² + 4 cap) − i0) / 2⌋``."""
    cap = max(budget_bytes // max(entry_bytes, 1), 1)
    out, i0 = [], 0
    while i0 < n_pos:
        r = int((math.isqrt(i0 * i0 + 4 * cap) - i0) // 2)
        while r > 1 and r * (i0 + r) > cap:  # integer square root: at most a step off
            r -= 1
        while (r + 1) * (i0 + r + 1) <= cap:
            r += 1
        r = max(1, min(r, max_rows, n_pos - i0))
        out.append((i0, i0 + r))
        i0 += r
    return out


def group_chunks(
    n_pos: int, n_head: int, itemsize: int, budget_mib: float
) -> list[tuple[int, int]]:
    """:func:`query_chunks` of a group of ``n_head`` heads in a dtype of ``itemsize`` bytes
    under ``budget_mib`` MiB (:data:`LIVE_BLOCKS` blocks alive)."""
    return query_chunks(n_pos, LIVE_BLOCKS * n_head * itemsize, int(budget_mib * 2**20))
