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
    mean ``(1/H) Σ_h P[h]``. ``chunk``: query components per chunk used.
    """

    head_pairs: Tensor
    head_peaks: Tensor
    mean_pairs: Tensor
    mean_peaks: Tensor
    chunk: int


def chunk_size(f: ItemFactors, budget_bytes: int) -> int:
    """Query components per chunk so that the chunk's working set fits the budget.

    A chunk holds the contributions ``(head, chunk, C_k, J)`` and those of each key head's
    summed query heads (for the head mean): ``(H + KV) · chunk · C_k · J`` elements.
    """
    H, Cq, Ck, J = f.shape
    per_component = (H + f.k.shape[0]) * Ck * J * f.q.element_size()
    return max(1, min(Cq, budget_bytes // max(per_component, 1)))


def top_pairs(f: ItemFactors, n: int, budget_bytes: int = DEFAULT_BUDGET) -> TopPairs:
    """Exact top-``n`` pairs per head and for the head mean, in bounded memory.

    Equals ranking the dense tensor (:func:`dense_contributions`) by
    ``amax(|P|, key_pos)``; walks the query components in chunks and keeps only each
    pair's peak, ``(head, C_q, C_k)``. The head mean ``(1/H) Σ_h P[h]`` is contracted
    directly from each key head's summed query heads, ``(1/H) Σ_g <Σ_{h∈g} q[h,c], k[g]>``,
    in the same product as the heads (no reduction over the head axis), and peaks are
    ``max |·|`` in one pass (``vector_norm`` of order ∞).
    """
    H, Cq, Ck, J = f.shape
    KV, G, dh = f.k.shape[0], f.group, f.q.shape[-1]
    step = chunk_size(f, budget_bytes)
    opts = {"dtype": f.q.dtype, "device": f.q.device}
    head_peak = torch.empty(H, Cq, Ck, **opts)
    mean_peak = torch.empty(Cq, Ck, **opts)
    keys = f.k.reshape(KV, Ck * J, dh)
    inf = float("inf")
    for c0 in range(0, Cq, step):
        q = f.q[:, c0 : c0 + step]
        cc = q.shape[1]
        qg = q.reshape(KV, G, cc, dh)
        cols = torch.cat([qg, qg.sum(dim=1, keepdim=True) / H], dim=1)  # (KV, G+1, cc, d)
        raw = keys @ cols.reshape(KV, (G + 1) * cc, dh).transpose(1, 2)
        raw = raw.reshape(KV, Ck, J, G + 1, cc)
        peaks = torch.linalg.vector_norm(raw[..., :G, :], ord=inf, dim=2)  # (KV, Ck, G, cc)
        head_peak[:, c0 : c0 + cc] = peaks.permute(0, 2, 3, 1).reshape(H, cc, Ck)
        mean = raw[..., G, :].sum(dim=0)  # (Ck, J, cc)
        mean_peak[c0 : c0 + cc] = torch.linalg.vector_norm(mean, ord=inf, dim=1).T
        del raw, peaks, mean
    scale = abs(f.scale)
    head_peak.mul_(scale)
    mean_peak.mul_(scale)
    n = min(n, Cq * Ck)
    hp, hi = head_peak.reshape(H, -1).topk(n, dim=-1)
    mp, mi = mean_peak.reshape(-1).topk(n)
    return TopPairs(
        head_pairs=_unravel(hi, Ck),
        head_peaks=hp,
        mean_pairs=_unravel(mi, Ck),
        mean_peaks=mp,
        chunk=step,
    )


def _unravel(flat: Tensor, n_k: int) -> Tensor:
    return torch.stack((flat // n_k, flat % n_k), dim=-1)
