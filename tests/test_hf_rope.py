"""RoPE from HF configs, computed by qkcheck, against transformers' own rotary code."""

from __future__ import annotations

import pytest
import torch

from qkcheck.errors import ConfigError, UnsupportedError
from qkcheck.models.hf_rope import hf_rotary
from qkcheck.rotary import RotaryConfig, rotate

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    "default": dict(hidden_size=64, num_attention_heads=4),
    "linear": dict(
        hidden_size=64,
        num_attention_heads=4,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ),
    # a short original context so every llama3 regime (kept, interpolated, divided) occurs
    "llama3": dict(hidden_size=256, num_attention_heads=2, rope_parameters=LLAMA3),
    "qwen3-style head_dim": dict(
        hidden_size=64, num_attention_heads=4, head_dim=32, rope_parameters={"rope_theta": 1e6}
    ),
}


def _hf(name: str):
    return transformers.LlamaConfig(**CASES[name], max_position_embeddings=512)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rotating_with_the_configs_frequencies_matches_transformers(name):
    hf = _hf(name)
    ours = hf_rotary(hf.to_dict())
    emb = LlamaRotaryEmbedding(hf)
    assert torch.allclose(torch.tensor(ours.inv_freq), emb.inv_freq, rtol=1e-6, atol=0)
    d = ours.rotary_dim
    q, k = torch.randn(2, 1, 2, 300, d, dtype=torch.float32).unbind(0)
    pos = torch.arange(300)
    cos, sin = emb(q, pos[None])
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.allclose(rotate(q, pos, ours), hq, atol=2e-4)
    assert torch.allclose(rotate(k, pos, ours), hk, atol=2e-4)


def test_llama3_scaling_is_not_the_default_rope_and_ignoring_it_is_caught():
    cfg = _hf("llama3").to_dict()
    ours = hf_rotary(cfg)
    plain = RotaryConfig(rotary_dim=ours.rotary_dim, base=ours.base)
    ratio = torch.tensor(plain_freqs(plain)) / torch.tensor(ours.inv_freq)
    assert ratio.max() == pytest.approx(8.0, rel=1e-5)  # the low frequencies divided by 8
    assert ratio.min() == pytest.approx(1.0, rel=1e-6)  # the high ones kept
    assert ((ratio > 1.01) & (ratio < 7.99)).any()  # and some interpolated
    x = torch.randn(1, 1, 200, ours.rotary_dim)
    pos = torch.arange(200)
    assert (rotate(x, pos, ours) - rotate(x, pos, plain)).abs().max() > 0.1


def plain_freqs(cfg: RotaryConfig) -> list[float]:
    half = cfg.rotary_dim // 2
    return (1.0 / cfg.base ** (torch.arange(half, dtype=torch.float64) / half)).tolist()


def test_transformers_4_layout_reads_the_same():
    five = _hf("llama3").to_dict()
    four = {k: v for k, v in five.items() if k != "rope_parameters"}
    four["rope_theta"] = LLAMA3["rope_theta"]
    four["rope_scaling"] = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    assert hf_rotary(four) == hf_rotary(five)


def test_unsupported_and_incomplete_rope_settings_say_which_field():
    with pytest.raises(UnsupportedError, match=r"c\.json: field 'rope_type' 'dynamic' is not"):
        hf_rotary(
            {"hidden_size": 8, "num_attention_heads": 1, "rope_scaling": {"type": "dynamic"}},
            "c.json",
        )
    broken = {"hidden_size": 8, "num_attention_heads": 1, "rope_parameters": {**LLAMA3}}
    del broken["rope_parameters"]["low_freq_factor"]
    with pytest.raises(ConfigError, match="needs field 'low_freq_factor'"):
        hf_rotary(broken, "c.json")
