"""Plain dense attention written independently of qkcheck, for property tests.

Rotations are explicit ``(d_head × d_head)`` matrices built from float64 angles; GQA is an
explicit head map; nothing here imports qkcheck.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rotation_matrices(
    positions: Tensor, head_dim: int, rotary_dim: int, base: float, adjacent: bool
) -> Tensor:
    """``(pos, d_head, d_head)`` rotation matrices, float64, acting on column vectors."""
    half = rotary_dim // 2
    mats = torch.eye(head_dim, dtype=torch.float64).repeat(len(positions), 1, 1)
    for t_idx, t in enumerate(positions.tolist()):
        for i in range(half):
            angle = t / (base ** (i / half))
            a, b = (2 * i, 2 * i + 1) if adjacent else (i, i + half)
            c, s = math.cos(angle), math.sin(angle)
            mats[t_idx, a, a] = c
            mats[t_idx, a, b] = -s
            mats[t_idx, b, a] = s
            mats[t_idx, b, b] = c
    return mats


def dense_logits(
    x: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    b_Q: Tensor | None,
    b_K: Tensor | None,
    n_head: int,
    n_kv: int,
    head_dim: int,
    rotary_dim: int,
    base: float,
    adjacent: bool,
    scale: float,
    positions: Tensor | None = None,
    head_map=None,
    qk_norm: tuple[Tensor, Tensor, float] | None = None,
) -> Tensor:
    """``(batch, head, i, j)`` pre-softmax logits ``scale · (R_i q_i)·(R_j k_j)``, float64.

    ``qk_norm`` ``(gamma_q, gamma_k, eps)``: each head vector ``v`` becomes
    ``gamma ⊙ v / sqrt(mean(v²) + eps)`` before the rotation (Qwen3)."""
    x = x.double()
    batch, T, _ = x.shape
    q = x @ W_Q.double().T
    k = x @ W_K.double().T
    if b_Q is not None:
        q = q + b_Q.double()
    if b_K is not None:
        k = k + b_K.double()
    q = q.reshape(batch, T, n_head, head_dim)
    k = k.reshape(batch, T, n_kv, head_dim)
    if qk_norm is not None:
        gamma_q, gamma_k, eps = qk_norm
        q = gamma_q.double() * q / torch.sqrt((q * q).mean(dim=-1, keepdim=True) + eps)
        k = gamma_k.double() * k / torch.sqrt((k * k).mean(dim=-1, keepdim=True) + eps)
    if positions is None:
        positions = torch.arange(T)
    if rotary_dim:
        R = rotation_matrices(positions, head_dim, rotary_dim, base, adjacent)
        q = torch.einsum("tde,bthe->bthd", R, q)
        k = torch.einsum("tde,bthe->bthd", R, k)
    if head_map is None:
        head_map = [h // (n_head // n_kv) for h in range(n_head)]
    out = torch.empty(batch, n_head, T, T, dtype=torch.float64)
    for h in range(n_head):
        out[:, h] = scale * q[:, :, h] @ k[:, :, head_map[h]].transpose(1, 2)
    return out
