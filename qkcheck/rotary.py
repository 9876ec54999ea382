"""Rotary position embeddings (RoPE), as SPD's target models build them.

Convention: a head vector ``v`` (last axis ``d_head``) at position ``t`` is rotated on its
first ``rotary_dim`` coordinates; the rest pass through. Frequencies are
``freq_i = base ** (i / (rotary_dim / 2))`` for ``i < rotary_dim / 2`` and the angle is
``t / freq_i`` (tables built in float32, as the target models do).

Layouts pair coordinates differently:

* ``halves`` (default): coordinate ``i`` rotates against ``i + rotary_dim/2``;
* ``adjacent_pairs``: coordinate ``2i`` rotates against ``2i + 1``.

Identity a test can assert: ``<R_i a, R_j b> == <R_{i+k} a, R_{j+k} b>`` — only the
relative position matters, and each ``R_t`` is orthogonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RotaryConfig:
    """How a model rotates its query/key head vectors."""

    rotary_dim: int
    base: float = 10000.0
    adjacent_pairs: bool = False
    #: positions at or above this are clamped to ``n_ctx - 1`` (as LlamaSimple does); None: no clamp
    n_ctx: int | None = None
    #: explicit inverse frequencies ``(rotary_dim // 2,)`` (angle ``t · inv_freq_i``), as
    #: Hugging Face models derive them from ``rope_parameters`` (llama3, linear scaling…);
    #: None: ``1 / base ** (i / (rotary_dim / 2))``
    inv_freq: tuple[float, ...] | None = None
    #: cos and sin are multiplied by this (HF's ``attention_scaling``; 1 for default/llama3)
    attention_scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        if self.inv_freq is not None and len(self.inv_freq) != self.rotary_dim // 2:
            raise ValueError(
                f"inv_freq has {len(self.inv_freq)} entries, rotary_dim {self.rotary_dim} "
                f"needs {self.rotary_dim // 2}"
            )


def rotary_tables(
    config: RotaryConfig, positions: Tensor, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin tables, shape ``(*positions.shape, rotary_dim // 2)``, one entry per pair.

    Angles are computed in float32 (float64 when ``dtype`` is float64), then cast.
    """
    high = torch.float64 if dtype == torch.float64 else torch.float32
    pos = positions.to(high)
    if config.n_ctx is not None:
        pos = pos.clamp(max=config.n_ctx - 1)
    half = config.rotary_dim // 2
    if config.inv_freq is not None:
        inv = torch.tensor(config.inv_freq, dtype=high, device=positions.device)
        angles = pos[..., None] * inv
    else:
        freq = config.base ** (torch.arange(half, dtype=high, device=positions.device) / half)
        angles = pos[..., None] / freq
    a = config.attention_scaling
    return (torch.cos(angles) * a).to(dtype), (torch.sin(angles) * a).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, config: RotaryConfig) -> Tensor:
    """Rotate head vectors ``x`` (``... pos d_head``) with tables from :func:`rotary_tables`.

    ``cos``/``sin`` have shape ``(pos, rotary_dim // 2)`` (or broadcast to ``... pos half``).
    """
    r = config.rotary_dim
    if r > x.shape[-1]:
        raise ValueError(f"rotary_dim {r} exceeds head dimension {x.shape[-1]}")
    half = r // 2
    rot, rest = x[..., :r], x[..., r:]
    if config.adjacent_pairs:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., :half], rot[..., half:]
    ra = a * cos - b * sin
    rb = b * cos + a * sin
    if config.adjacent_pairs:
        rotated = torch.stack((ra, rb), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((ra, rb), dim=-1)
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


def rotate(x: Tensor, positions: Tensor, config: RotaryConfig | None) -> Tensor:
    """Rotate ``x`` (``... pos d_head``) at ``positions`` (``pos``); identity without config."""
    if config is None:
        return x
    cos, sin = rotary_tables(config, positions, dtype=x.dtype)
    return apply_rotary(x, cos, sin, config)
