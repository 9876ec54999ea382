"""Certified bounds on the residual ``r = ℓ_target − S`` from the weight delta (docs/design.md §4).

Rotations are orthogonal, so Cauchy–Schwarz gives, per (head h, query i, key j)::

    |r| ≤ B_data   = |s| (|q̂_i||Δk_j| + |Δq_i||k̂_j| + |Δq_i||Δk_j|)
    |r| ≤ B_weight = |s| ((‖Ŵ_Q[h]‖|x_i| + |b_Q[h]|) ‖Δ_K[g]‖|x_j|
                          + ‖Δ_Q[h]‖|x_i| (‖Ŵ_K[g]‖|x_j| + |b_K[g]|)
                          + ‖Δ_Q[h]‖‖Δ_K[g]‖|x_i||x_j|)

``q̂``/``k̂`` are the component projections including the bias. ``B_data ≤ B_weight``
always (|q̂_i| ≤ ‖Ŵ_Q[h]‖|x_i| + |b_Q[h]|, |Δk_j| ≤ ‖Δ_K[g]‖|x_j|). Replacing the
measured ‖Δ‖ by ``f · ‖W‖`` gives the *budget* bound: what |r| may be if the delta were
as large as a fraction ``f`` of the target weight.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

NormKind = Literal["spectral", "frobenius"]


def head_norms(weight: Tensor, n_heads: int, kind: NormKind = "spectral") -> Tensor:
    """Operator norm of each head's row block of ``weight`` (``n_heads*d_head × d_model``).

    Returns ``(n_heads,)``. Spectral is the tight choice; Frobenius is a valid, looser one.
    """
    blocks = weight.reshape(n_heads, -1, weight.shape[-1])
    ord_ = 2 if kind == "spectral" else "fro"
    return torch.linalg.matrix_norm(blocks, ord=ord_)


def data_bound(q_hat: Tensor, k_hat: Tensor, dq: Tensor, dk: Tensor, scale: float) -> Tensor:
    """``B_data`` from head vectors: q-side ``(batch, head, i, d_head)`` at the query rows
    wanted, k-side already expanded to query heads ``(batch, head, j, d_head)`` at their
    keys. Returns ``(batch, head, i, j)``."""
    return data_bound_norms(
        q_hat.norm(dim=-1), k_hat.norm(dim=-1), dq.norm(dim=-1), dk.norm(dim=-1), scale
    )


def data_bound_norms(nq: Tensor, nk: Tensor, ndq: Tensor, ndk: Tensor, scale: float) -> Tensor:
    """``B_data`` from the vectors' norms ``|q̂_i|``, ``|k̂_j|``, ``|Δq_i|``, ``|Δk_j|``
    (``(batch, head, i)`` and ``(batch, head, j)``). Returns ``(batch, head, i, j)``."""
    outer = _outer
    return abs(scale) * (outer(nq, ndk) + outer(ndq, nk) + outer(ndq, ndk))


def weight_bound(
    x_norm: Tensor,
    comp_norm_q: Tensor,
    comp_norm_k: Tensor,
    delta_norm_q: Tensor,
    delta_norm_k: Tensor,
    bias_norm_q: Tensor,
    bias_norm_k: Tensor,
    scale: float,
    x_norm_k: Tensor | None = None,
) -> Tensor:
    """``B_weight`` from ``|x|`` ``(batch, pos)`` and per-head norms, all ``(head,)`` with the
    key-side ones already indexed by ``g(h)``. Returns ``(batch, head, i, j)``. ``x_norm_k``:
    the keys' ``|x_j|`` when they are other positions than the queries' (a block of query
    rows against its keys), default ``x_norm``."""
    xi = x_norm[:, None, :, None]
    xj = (x_norm if x_norm_k is None else x_norm_k)[:, None, None, :]

    def per_head(v: Tensor) -> Tensor:
        return v[None, :, None, None]

    q_side = per_head(comp_norm_q) * xi + per_head(bias_norm_q)
    k_side = per_head(comp_norm_k) * xj + per_head(bias_norm_k)
    dq = per_head(delta_norm_q) * xi
    dk = per_head(delta_norm_k) * xj
    return abs(scale) * (q_side * dk + dq * k_side + dq * dk)


def _outer(a: Tensor, b: Tensor) -> Tensor:
    return a[..., :, None] * b[..., None, :]
