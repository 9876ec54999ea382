"""Pair contributions for one item (sample, layer, query position ``i``) and exact top-N.

Weighted mode (docs/design.md §2)::

    P[h, c, d, j] = s · a^Q_c(i) · a^K_d(j) · <R_i u^Q_{c,h}, R_j u^K_{d,g(h)}>

Binary mode (docs/design.md §6): the weight-only term ``s · <R_i u^Q_{c,h}, R_j u^K_{d,g(h)}>``
where ``CI^Q_c(i) > τ`` and ``CI^K_d(j) > τ``, else 0.

Both factor as ``P[h,c,d,j] = s · <q[h,c], k[g(h),d,j]>`` with a per-side factor
(:class:`ItemFactors`), so ``Σ_{c,d} P = s · <Σ_c q[h,c], Σ_d k[g,d,j]>`` — in weighted mode
the component sum ``S`` of decompose.py at row ``i`` (identity a test asserts).

Ranking (:func:`top_pairs`) is by peak ``|P|`` over key positions ``j ≤ i``, per head and
for the head mean; it walks query components in chunks sized from a memory budget, so the
``(head, C_q, C_k, key)`` tensor is never materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qkcheck.decompose import HeadLayout
from qkcheck.rotary import rotate

#: default working-memory budget for :func:`top_pairs` (bytes)
DEFAULT_BUDGET = 64 * 2**20


@dataclass(frozen=True)
class ItemFactors:
    """Per-side factors of one item's pair contributions.

    ``q``: ``(head, C_q, d_head)``; ``k``: ``(kv_head, C_k, key_pos, d_head)``;
    ``P[h,c,d,j] = scale · <q[h,c], k[g(h),d,j]>``.
    """

    q: Tensor
    k: Tensor
    scale: float

    @property
    def n_head(self) -> int:
        return self.q.shape[0]

    @property
    def group(self) -> int:
        return self.q.shape[0] // self.k.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(head, C_q, C_k, key_pos)`` of the (never built) pair tensor."""
        return (self.q.shape[0], self.q.shape[1], self.k.shape[1], self.k.shape[2])


def _rotated_writes(
    U: Tensor, n: int, layout: HeadLayout, positions: Tensor, gamma: Tensor | None = None
) -> Tensor:
    """``R_t (γ ⊙ u_{c,h})`` for every head, component and position: ``(n, C, pos, d_head)``
    (``γ``: QK-norm's gain, or None)."""
    u = U.reshape(U.shape[0], n, layout.head_dim).transpose(0, 1)  # (n, C, d)
    if gamma is not None:
        u = u * gamma.to(u.dtype)
    u = u[:, :, None, :].expand(-1, -1, positions.shape[0], -1)
    return rotate(u, positions, layout.rotary)


def _key_positions(query_pos: int, key_positions: Tensor | None, device) -> Tensor:
    if key_positions is None:
        return torch.arange(query_pos + 1, device=device)
    return key_positions


def weighted_factors(
    x_query: Tensor,
    x_keys: Tensor,
    V_Q: Tensor,
    U_Q: Tensor,
    V_K: Tensor,
    U_K: Tensor,
    layout: HeadLayout,
    query_pos: int,
    key_positions: Tensor | None = None,
    gamma_q: Tensor | None = None,
    gamma_k: Tensor | None = None,
    sigma_q: Tensor | None = None,
    sigma_k: Tensor | None = None,
) -> ItemFactors:
    """Factors for weighted mode. ``x_query``: ``(d_model,)`` at position ``query_pos``;
    ``x_keys``: ``(key_pos, d_model)`` at ``key_positions`` (default ``0..query_pos``).

    QK-norm (Qwen3): gains ``gamma_q``/``gamma_k`` ``(head_dim,)`` scale the writes before
    rotation and the norm's factors ``sigma_q`` ``(head,)`` (at the query) and ``sigma_k``
    ``(kv_head, key_pos)`` (from :func:`qkcheck.decompose.qk_norm_scales`) after it."""
    kp = _key_positions(query_pos, key_positions, x_keys.device)
    qp = torch.tensor([query_pos], device=x_query.device)
    a_q = x_query @ V_Q  # (C_q,)
    a_k = x_keys @ V_K  # (J, C_k)
    q = _rotated_writes(U_Q, layout.n_head, layout, qp, gamma_q)[:, :, 0] * a_q[None, :, None]
    k = _rotated_writes(U_K, layout.n_kv_heads, layout, kp, gamma_k) * a_k.T[None, :, :, None]
    if sigma_q is not None:
        q = q * sigma_q.to(q.dtype)[:, None, None]
    if sigma_k is not None:
        k = k * sigma_k.to(k.dtype)[:, None, :, None]
    return ItemFactors(q=q, k=k, scale=layout.scale)


def binary_factors(
    ci_query: Tensor,
    ci_keys: Tensor,
    U_Q: Tensor,
    U_K: Tensor,
    layout: HeadLayout,
    query_pos: int,
    threshold: float,
    key_positions: Tensor | None = None,
) -> ItemFactors:
    """Factors for binary mode. ``ci_query``: ``(C_q,)`` lower CI at ``query_pos``;
    ``ci_keys``: ``(key_pos, C_k)``. A pair survives only where both CIs exceed τ."""
    kp = _key_positions(query_pos, key_positions, ci_keys.device)
    qp = torch.tensor([query_pos], device=ci_query.device)
    gate_q = (ci_query > threshold).to(U_Q.dtype)
    gate_k = (ci_keys > threshold).to(U_K.dtype)
    q = _rotated_writes(U_Q, layout.n_head, layout, qp)[:, :, 0] * gate_q[None, :, None]
    k = _rotated_writes(U_K, layout.n_kv_heads, layout, kp) * gate_k.T[None, :, :, None]
    return ItemFactors(q=q, k=k, scale=layout.scale)


def _contract(f: ItemFactors, q: Tensor) -> Tensor:
    """``scale · <q[h,c], k[g(h),d,j]>`` for a slice ``q`` ``(head, c, d)``, laid out as
    ``(kv_head, C_k, key_pos, group, c)`` with head ``h = kv_head·group + g`` — the order a
    single batched product writes without copying the (large) key factor."""
    _, cc, dh = q.shape
    KV, Ck, J, _ = f.k.shape
    qg = q.reshape(KV, f.group * cc, dh).transpose(1, 2)  # (KV, d, group·c): small
    out = f.k.reshape(KV, Ck * J, dh) @ qg  # (KV, Ck·J, group·c)
    return out.mul_(f.scale).reshape(KV, Ck, J, f.group, cc)


def dense_contributions(f: ItemFactors) -> Tensor:
    """The full ``(head, C_q, C_k, key_pos)`` pair tensor — for small cases and references."""
    _, Ck, J, _ = f.k.shape
    raw = _contract(f, f.q)  # (KV, Ck, J, group, C_q)
    return raw.permute(0, 3, 4, 1, 2).reshape(f.n_head, f.q.shape[1], Ck, J)


def component_sum(f: ItemFactors) -> Tensor:
    """``Σ_{c,d} P[h,c,d,j]`` per head and key: ``(head, key_pos)``, without the pair tensor."""
    qs = f.q.sum(dim=1)  # (H, d)
    ks = f.k.sum(dim=1)  # (KV, J, d)
    ks_h = ks.repeat_interleave(f.group, dim=0)
    return f.scale * (ks_h @ qs[:, :, None])[..., 0]


def pair_curves(f: ItemFactors, pairs: Tensor) -> Tensor:
    """Contributions of selected pairs over key positions: ``pairs`` ``(m, 2)`` of
    (q-component, k-component) → ``(head, m, key_pos)``."""
    q = f.q[:, pairs[:, 0]]  # (H, m, d)
    k = f.k[:, pairs[:, 1]]  # (KV, m, J, d)
    k_h = k.repeat_interleave(f.group, dim=0)
    return f.scale * torch.einsum("hmd,hmjd->hmj", q, k_h)


@dataclass
class TopPairs:
    """Top-N pairs by peak |contribution| over key positions.

    ``head_pairs``: ``(head, n, 2)`` (q-component, k-component), strongest first;
    ``head_peaks``: ``(head, n)``; ``mean_pairs``/``mean_peaks``: the same for the head
    mean ``(1/H) Σ_h P[h]``. ``chunk``: query components per evaluated block (the memory
    budget's); ``evaluated``: pairs whose peak was computed, over every head and the mean
    (at most ``(H + 1) · C_q · C_k``; the others were ruled out by their bound).
    """

    head_pairs: Tensor
    head_peaks: Tensor
    mean_pairs: Tensor
    mean_peaks: Tensor
    chunk: int
    evaluated: int = 0


#: key components per evaluated block of :func:`top_pairs`
KEY_BLOCK = 8


def chunk_size(f: ItemFactors, budget_bytes: int) -> int:
    """Query components per evaluated block so that its working set fits the budget.

    A block holds the contributions ``(chunk, KEY_BLOCK, J)`` of one head (or the head
    mean) and the key factors ``(kv_head, KEY_BLOCK, J, d_head)``:
    ``KEY_BLOCK · J · (chunk + kv_head · d)`` elements.
    """
    _, Cq, _, J = f.shape
    per_row = KEY_BLOCK * J * f.q.element_size()
    room = budget_bytes - per_row * f.k.shape[0] * f.q.shape[-1]
    return max(1, min(Cq, room // per_row))


#: relative margin on the Cauchy–Schwarz bounds, above float rounding of a dot product
_BOUND_MARGIN = 1e-3


def _search(bound: Tensor, evaluate, n: int) -> tuple[Tensor, int]:
    """Exact peaks of every pair that can be among the top ``n``, as a ``(C_q, C_k)``
    table with ``-inf`` where ruled out, and how many pairs were evaluated.

    ``bound[c, d]`` ≥ the pair's peak, its rows and columns sorted by their largest bound
    (descending); ``evaluate(m, d0, d1)`` the exact peaks of query components ``0..m-1``
    and key components ``d0..d1-1`` (in that order). Key components are walked in blocks;
    a block evaluates the query components up to the last one whose bound reaches ``τ``,
    the n-th largest peak evaluated so far (≤ the true n-th peak, so a pair below it can
    never rank — not even as a tie). Everything is evaluated while ``τ`` is 0 (e.g. fewer
    than ``n`` non-zero pairs), so ties at zero are ranked as on the dense table."""
    Cq, Ck = bound.shape
    peaks = torch.full((Cq, Ck), -math.inf, dtype=bound.dtype, device=bound.device)
    tau, evaluated = -math.inf, 0
    for d0 in range(0, Ck, KEY_BLOCK):
        d1 = min(Ck, d0 + KEY_BLOCK)
        reach = (bound[:, d0:d1].amax(dim=1) >= tau).nonzero()
        if reach.numel() == 0:
            break  # later blocks have smaller bounds
        m = int(reach[-1]) + 1
        peaks[:m, d0:d1] = evaluate(m, d0, d1)
        evaluated += m * (d1 - d0)
        if evaluated >= n:
            tau = float(peaks.view(-1).topk(n).values[-1])
    return peaks, evaluated


def _sorted_search(bound: Tensor, co: Tensor, evaluate, n: int) -> tuple[Tensor, int]:
    """:func:`_search` on ``bound`` with its rows sorted by their largest bound and its
    columns in the order ``co`` (by largest bound, chosen by the caller, which may have
    sorted its key factors so); ``evaluate(rows, d0, d1)`` gets the query components
    (original indices) and the range of key components in that order. The table comes
    back in the original order, so that ``topk`` ranks ties as on the dense table."""
    ro = bound.amax(dim=1).argsort(descending=True)
    peaks, count = _search(bound[ro][:, co], lambda m, d0, d1: evaluate(ro[:m], d0, d1), n)
    out = torch.empty_like(peaks)
    out[ro[:, None], co[None, :]] = peaks
    return out, count


def top_pairs(f: ItemFactors, n: int, budget_bytes: int = DEFAULT_BUDGET) -> TopPairs:
    """Exact top-``n`` pairs per head and for the head mean, in bounded memory.

    Equals ranking the dense tensor (:func:`dense_contributions`) by
    ``amax(|P|, key_pos)`` without building it: a branch and bound (:func:`_search`) over
    Cauchy–Schwarz bounds. Per head, ``|P[h,c,d,j]| ≤ |s|·‖q[h,c]‖·max_j ‖k[g,d,j]‖``;
    for the head mean, ``|(1/H) Σ_h P[h]| ≤ (1/H) Σ_h peak_h``, each head's peak exact
    where evaluated and otherwise below both its bound and that head's n-th peak. Only
    pairs whose bound reaches the running n-th peak are evaluated, in blocks of
    ``(chunk, KEY_BLOCK)`` pairs as products over contiguous key axes; the head mean is
    contracted from each key head's summed query heads.
    """
    H, Cq, Ck, J = f.shape
    KV, G, dh = f.k.shape[0], f.group, f.q.shape[-1]
    n = min(n, Cq * Ck)
    step = chunk_size(f, budget_bytes)
    scale = abs(f.scale)
    margin = scale * (1 + _BOUND_MARGIN)
    key_norm = torch.linalg.vector_norm(f.k, dim=-1).amax(dim=-1)  # (KV, Ck)
    q_norm = torch.linalg.vector_norm(f.q, dim=-1)  # (H, Cq)

    def peaks_of(parts: list[tuple[Tensor, Tensor]], rows: Tensor) -> Tensor:
        """``|s| · max_j |Σ_parts <q[c], k[d, j]>|`` for c in ``rows``, every d of the
        parts' key blocks ``(d, J, d_head)``."""
        d = parts[0][1].shape[0]
        out = torch.empty(rows.numel(), d, dtype=f.q.dtype, device=f.q.device)
        for r0 in range(0, rows.numel(), step):
            r = rows[r0 : r0 + step]
            acc = None
            for q, keys in parts:
                term = q.index_select(0, r) @ keys.reshape(-1, dh).T  # (r, d·J)
                acc = term if acc is None else acc.add_(term)
            acc = acc.view(r.numel(), d, J)
            out[r0 : r0 + r.numel()] = torch.linalg.vector_norm(acc, ord=math.inf, dim=-1)
        return out.mul_(scale)

    head_peak = torch.empty(H, n, dtype=f.q.dtype, device=f.q.device)
    head_idx = torch.empty(H, n, dtype=torch.long, device=f.q.device)
    mean_bound = torch.zeros(Cq, Ck, dtype=f.q.dtype, device=f.q.device)
    evaluated = 0
    for g in range(KV):
        co = key_norm[g].argsort(descending=True)
        keys = f.k[g].index_select(0, co)  # key components by bound, shared by the group
        for h in range(g * G, (g + 1) * G):
            bound = q_norm[h, :, None] * key_norm[g] * margin  # rank one: a staircase

            def head(rows, d0, d1, h=h, keys=keys):
                return peaks_of([(f.q[h], keys[d0:d1])], rows)

            peaks, count = _sorted_search(bound, co, head, n)
            evaluated += count
            head_peak[h], head_idx[h] = peaks.view(-1).topk(n)
            # a pair ruled out here peaks below this head's n-th peak and below its bound
            limit = head_peak[h, -1] * (1 + _BOUND_MARGIN)
            mean_bound += torch.where(peaks > -math.inf, peaks, bound.clamp(max=limit))
        del keys
    mean_bound *= (1 + _BOUND_MARGIN) / H
    q_sum = f.q.reshape(KV, G, Cq, dh).sum(dim=1) / H  # (KV, Cq, d)
    co = mean_bound.amax(dim=0).argsort(descending=True)

    def mean(rows, d0, d1):
        cols = co[d0:d1]
        return peaks_of([(q_sum[g], f.k[g].index_select(0, cols)) for g in range(KV)], rows)

    peaks, count = _sorted_search(mean_bound, co, mean, n)
    evaluated += count
    mp, mi = peaks.view(-1).topk(n)
    return TopPairs(
        head_pairs=_unravel(head_idx, Ck),
        head_peaks=head_peak,
        mean_pairs=_unravel(mi, Ck),
        mean_peaks=mp,
        chunk=step,
        evaluated=evaluated,
    )


def _unravel(flat: Tensor, n_k: int) -> Tensor:
    return torch.stack((flat // n_k, flat % n_k), dim=-1)
