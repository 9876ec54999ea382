"""Pair contributions for one item (sample, layer, query position ``i``) and exact top-N.

Weighted mode (DESIGN §2)::

    P[h, c, d, j] = s · a^Q_c(i) · a^K_d(j) · <R_i u^Q_{c,h}, R_j u^K_{d,g(h)}>

Binary mode (DESIGN §4): the weight-only term ``s · <R_i u^Q_{c,h}, R_j u^K_{d,g(h)}>``
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


def _rotated_writes(U: Tensor, n: int, layout: HeadLayout, positions: Tensor) -> Tensor:
    """``R_t u_{c,h}`` for every head, component and position: ``(n, C, pos, d_head)``."""
    u = U.reshape(U.shape[0], n, layout.head_dim).transpose(0, 1)  # (n, C, d)
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
) -> ItemFactors:
    """Factors for weighted mode. ``x_query``: ``(d_model,)`` at position ``query_pos``;
    ``x_keys``: ``(key_pos, d_model)`` at ``key_positions`` (default ``0..query_pos``)."""
    kp = _key_positions(query_pos, key_positions, x_keys.device)
    qp = torch.tensor([query_pos], device=x_query.device)
    a_q = x_query @ V_Q  # (C_q,)
    a_k = x_keys @ V_K  # (J, C_k)
    q = _rotated_writes(U_Q, layout.n_head, layout, qp)[:, :, 0] * a_q[None, :, None]
    k = _rotated_writes(U_K, layout.n_kv_heads, layout, kp) * a_k.T[None, :, :, None]
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
    """``scale · <q[h,c], k[g(h),d,j]>`` for a slice ``q`` ``(head, c, d)``.

    Returns ``(head, c, C_k, key_pos)``."""
    H, cc, dh = q.shape
    KV, Ck, J, _ = f.k.shape
    qg = q.reshape(KV, f.group * cc, dh)
    out = qg @ f.k.reshape(KV, Ck * J, dh).transpose(1, 2)
    return f.scale * out.reshape(H, cc, Ck, J)


def dense_contributions(f: ItemFactors) -> Tensor:
    """The full ``(head, C_q, C_k, key_pos)`` pair tensor — for small cases and references."""
    return _contract(f, f.q)


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
    mean ``(1/H) Σ_h P[h]``. ``rows_evaluated`` of ``rows_total`` query-component rows
    (per head, plus one per component for the mean) had their contributions computed;
    the rest were ruled out by their bound.
    """

    head_pairs: Tensor
    head_peaks: Tensor
    mean_pairs: Tensor
    mean_peaks: Tensor
    rows_evaluated: int
    rows_total: int


def chunk_size(f: ItemFactors, budget_bytes: int) -> int:
    """Query-component rows per batch so that a batch's working set fits the budget.

    A batch of the head-mean pass holds the contributions ``(head, rows, C_k, J)``, their
    mean and its absolute value: about ``(H + 2) · rows · C_k · J`` elements (the per-head
    pass needs less).
    """
    H, Cq, Ck, J = f.shape
    per_row = (H + 2) * Ck * J * f.q.element_size()
    return max(1, min(Cq, budget_bytes // max(per_row, 1)))


def _best(bounds: Tensor, exact_peaks, n: int, n_k: int, step: int) -> tuple[Tensor, Tensor, int]:
    """Exact top-``n`` of all ``(row, d)`` pairs by peak, visiting rows by descending bound.

    ``bounds[row]`` must bound every peak in that row; ``exact_peaks(rows) -> (rows, C_k)``.
    Rows are evaluated in batches of ``step`` until the next row's bound falls below the
    n-th best peak found: no pair in it or after it can enter the top-n.
    Returns ``(peaks, flat indices row·C_k + d, rows evaluated)``.
    """
    order = bounds.argsort(descending=True)
    best_v = bounds.new_empty(0)
    best_i = torch.empty(0, dtype=torch.long, device=bounds.device)
    done = 0
    ks = torch.arange(n_k, device=bounds.device)
    for start in range(0, order.numel(), step):
        rows = order[start : start + step]
        if best_v.numel() >= n and bounds[rows[0]] < best_v[-1]:
            break
        peaks = exact_peaks(rows)  # (len(rows), C_k)
        done += rows.numel()
        cand_v = torch.cat((best_v, peaks.flatten()))
        cand_i = torch.cat((best_i, (rows[:, None] * n_k + ks).flatten()))
        best_v, pos = cand_v.topk(min(n, cand_v.numel()))
        best_i = cand_i[pos]
    return best_v, best_i, done


def top_pairs(f: ItemFactors, n: int, budget_bytes: int = DEFAULT_BUDGET) -> TopPairs:
    """Exact top-``n`` pairs per head and for the head mean, in bounded memory.

    Equals ranking the dense tensor (:func:`dense_contributions`) by
    ``amax(|P|, key_pos)``. By Cauchy–Schwarz every pair of query row ``(h, c)`` has
    ``|P| ≤ |s|·|q[h,c]|·max_{d,j}|k[g(h),d,j]|`` (and the head mean the mean of these), so
    rows are computed strongest-bound first and the walk stops once no remaining row can
    reach the top-n. Sparse activations — the SPD case — rule out most rows.
    """
    H, Cq, Ck, J = f.shape
    step = chunk_size(f, budget_bytes)
    s = abs(f.scale)
    n = min(n, Cq * Ck)
    k_max = f.k.norm(dim=-1).amax(dim=(1, 2))  # (KV,) largest key vector per key head
    key_of = torch.arange(H, device=f.q.device) // f.group
    row_bound = s * f.q.norm(dim=-1) * k_max[key_of][:, None]  # (H, Cq)
    k_flat = f.k.reshape(f.k.shape[0], Ck * J, -1)

    head_pairs, head_peaks, evaluated = [], [], 0
    for h in range(H):
        kh = k_flat[key_of[h]].T  # (d, Ck·J)

        def head_row_peaks(rows: Tensor, h: int = h, kh: Tensor = kh) -> Tensor:
            return (f.q[h, rows] @ kh).reshape(-1, Ck, J).abs_().amax(dim=-1) * s

        v, i, done = _best(row_bound[h], head_row_peaks, n, Ck, step)
        head_pairs.append(_unravel(i, Ck))
        head_peaks.append(v)
        evaluated += done

    def mean_row_peaks(rows: Tensor) -> Tensor:
        return _contract(f, f.q[:, rows]).mean(dim=0).abs_().amax(dim=-1)

    mv, mi, done = _best(row_bound.mean(dim=0), mean_row_peaks, n, Ck, step)
    return TopPairs(
        head_pairs=torch.stack(head_pairs),
        head_peaks=torch.stack(head_peaks),
        mean_pairs=_unravel(mi, Ck),
        mean_peaks=mv,
        rows_evaluated=evaluated + done,
        rows_total=(H + 1) * Cq,
    )


def _unravel(flat: Tensor, n_k: int) -> Tensor:
    return torch.stack((flat // n_k, flat % n_k), dim=-1)
