"""RoPE as a Hugging Face ``config.json`` describes it, computed by qkcheck (not transformers).

The decomposition rotates component writes with these frequencies, while the ground truth
runs transformers' own rotary code; a frequency computed wrongly here breaks closure.

Read from transformers 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``:

* ``default``: ``inv_freq_i = 1 / θ^(2i / d)`` for ``i < d/2``, ``d`` the rotary dimension
  (``head_dim · partial_rotary_factor``; ``head_dim`` from the config when given, as Qwen3
  sets it, else ``hidden_size / num_attention_heads``);
* ``linear``: the default frequencies divided by ``factor``;
* ``llama3`` (Llama 3.1): with wavelength ``λ_i = 2π / inv_freq_i``, ``L`` the original
  context, ``λ_lo = L / low_freq_factor`` and ``λ_hi = L / high_freq_factor``: frequencies with
  ``λ > λ_lo`` are divided by ``factor``, those with ``λ < λ_hi`` kept, and those between
  interpolated: ``(1 − t) inv/factor + t inv`` with ``t = (L/λ − low) / (high − low)``.

Other types (``dynamic``, ``yarn``, ``longrope``…) change with sequence length or scale the
logits and are refused by name. Frequencies are computed in float32, as transformers does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from qkcheck.errors import ConfigError, UnsupportedError
from qkcheck.rotary import RotaryConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """One dict of RoPE settings from either transformers layout (5.x wins where both are)."""
    legacy = dict(config.get("rope_scaling") or {})
    if "type" in legacy and "rope_type" not in legacy:
        legacy["rope_type"] = legacy.pop("type")
    merged = {**legacy, **dict(config.get("rope_parameters") or {})}
    merged.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    merged.setdefault("rope_type", "default")
    if "partial_rotary_factor" in config:
        merged.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return merged


def head_dim_of(config: Mapping[str, Any]) -> int:
    """``head_dim`` as the config sets it, else ``hidden_size / num_attention_heads``."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def hf_rotary(config: Mapping[str, Any], source: str = "config.json") -> RotaryConfig:
    """The :class:`~qkcheck.rotary.RotaryConfig` (halves layout, explicit ``inv_freq``) of an
    HF Llama-family config. Raises ConfigError / UnsupportedError naming ``source``."""
    rope = rope_settings(config)
    kind = str(rope["rope_type"])
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedError(
            f"{source}: field 'rope_type' {kind!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}",
            field="rope_type",
        )
    dim = int(head_dim_of(config) * float(rope.get("partial_rotary_factor", 1.0)))
    if dim <= 0 or dim % 2:
        raise ConfigError(f"{source}: the rotary dimension {dim} must be a positive even number")
    theta = float(rope["rope_theta"])
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv = inv / float(_need(rope, "factor", source))
    elif kind == "llama3":
        inv = _llama3(inv, rope, config, source)
    return RotaryConfig(rotary_dim=dim, base=theta, inv_freq=tuple(inv.tolist()))


def _need(rope: Mapping[str, Any], key: str, source: str) -> Any:
    if rope.get(key) is None:
        raise ConfigError(
            f"{source}: rope type {rope['rope_type']!r} needs field '{key}'", field=key
        )
    return rope[key]


def _llama3(
    inv: torch.Tensor, rope: Mapping[str, Any], config: Mapping[str, Any], source: str
) -> torch.Tensor:
    factor = float(_need(rope, "factor", source))
    low = float(_need(rope, "low_freq_factor", source))
    high = float(_need(rope, "high_freq_factor", source))
    context = rope.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    if context is None:
        raise ConfigError(
            f"{source}: rope type 'llama3' needs field 'original_max_position_embeddings'",
            field="original_max_position_embeddings",
        )
    context = float(context)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > context / low, inv / factor, inv)
    t = (context / wavelen - low) / (high - low)
    smoothed = (1 - t) * scaled / factor + t * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)
