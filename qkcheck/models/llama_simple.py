"""spd's LlamaSimple (``spd.pretrain.models.llama_simple``): RMSNorm, RoPE, GQA, SwiGLU MLP.

The attention here is the ground truth qkcheck checks decompositions against, so it follows
spd's module line by line and shares no code with :mod:`qkcheck.rotary`:

* ``q = x W_Qᵀ``, ``k = x W_Kᵀ`` split into heads; query head ``h`` reads key head
  ``h // (n_head / n_kv_heads)`` (``repeat_interleave``);
* RoPE on the whole head (spd sets ``rotary_dim = head_dim`` whatever the config says), tables
  in float32 for positions ``0..T-1`` clamped to ``n_ctx - 1``; ``x_rot = x·cos + r(x)·sin``
  with ``r`` pairing halves (``r(x) = [-x₂, x₁]``) or adjacent pairs;
* ``logits = (q_rot @ k_rotᵀ) · (1 / sqrt(head_dim))``, recorded before the causal mask.

Modules keep spd's names (``h.<i>.attn.q_proj``, ``h.<i>.mlp.gate_proj`` …) so spd state
dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkcheck.models.base import AttentionSpec
from qkcheck.models.common import CapturingAttention, ConfigReader, TargetModel
from qkcheck.rotary import RotaryConfig


@dataclass(frozen=True)
class LlamaSettings:
    """The fields of spd's LlamaSimple(MLP)Config that shape the computation."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_heads: int
    n_embd: int
    n_intermediate: int
    block_size: int = 1024
    n_ctx: int = 1024
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    rms_norm_eps: float = 1e-6
    attn_bias: bool = False
    mlp_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_config(cls, model_name: str, config: Mapping[str, Any], source: str = "") -> Self:
        """Read a model config; ``rotary_dim`` and ``flash_attention`` are read by spd but
        do not change the math (rotary covers the whole head; scores are computed explicitly)."""
        read = ConfigReader(model_name, config, source)
        if not read.bool("use_grouped_query_attention", True):
            raise read.unsupported(
                "use_grouped_query_attention",
                False,
                "the fused c_attn projection has no separate q_proj/k_proj to decompose",
            )
        n_embd = read.int("n_embd")
        n_head = read.int("n_head")
        n_kv_heads = read.int("n_key_value_heads")
        read.check(n_embd % n_head == 0, f"n_embd {n_embd} is not divisible by n_head {n_head}")
        read.check(
            n_head % n_kv_heads == 0,
            f"n_head {n_head} is not divisible by n_key_value_heads {n_kv_heads}",
        )
        read.check(
            (n_embd // n_head) % 2 == 0, f"head_dim {n_embd // n_head} must be even for RoPE"
        )
        return cls(
            vocab_size=read.int("vocab_size"),
            n_layer=read.int("n_layer"),
            n_head=n_head,
            n_kv_heads=n_kv_heads,
            n_embd=n_embd,
            n_intermediate=read.int("n_intermediate"),
            block_size=read.int("block_size", 1024),
            n_ctx=read.int("n_ctx", 1024),
            rotary_base=read.float("rotary_base", 10000.0),
            rotary_adjacent_pairs=read.bool("rotary_adjacent_pairs", False),
            rms_norm_eps=read.float("rms_norm_eps", 1e-6),
            attn_bias=read.bool("attn_bias", False),
            mlp_bias=read.bool("mlp_bias", False),
        )


class RMSNorm(nn.Module):
    """``weight · x / sqrt(mean(x²) + eps)``, computed in float32 (spd's LlamaRMSNorm)."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LlamaAttention(CapturingAttention):
    """Causal self-attention with grouped-query heads and rotary embeddings."""

    def __init__(self, s: LlamaSettings, layer: int) -> None:
        super().__init__(layer)
        self.n_head = s.n_head
        self.n_kv_heads = s.n_kv_heads
        self.head_dim = s.head_dim
        self.n_ctx = s.n_ctx
        self.adjacent_pairs = s.rotary_adjacent_pairs
        kv_dim = s.n_kv_heads * s.head_dim
        self.q_proj = nn.Linear(s.n_embd, s.n_embd, bias=s.attn_bias)
        self.k_proj = nn.Linear(s.n_embd, kv_dim, bias=s.attn_bias)
        self.v_proj = nn.Linear(s.n_embd, kv_dim, bias=s.attn_bias)
        self.o_proj = nn.Linear(s.n_embd, s.n_embd, bias=s.attn_bias)
        sin, cos = self._rotary_tables(s.head_dim, s.n_ctx, s.rotary_base)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.register_buffer("rotary_cos", cos, persistent=False)

    def _rotary_tables(self, rotary_dim: int, n_ctx: int, base: float) -> tuple[Tensor, Tensor]:
        """sin, cos of ``pos / base^(i / (rotary_dim/2))``, shape ``(n_ctx, rotary_dim)``, each
        frequency laid out where its coordinate pair sits."""
        pos = torch.arange(n_ctx, dtype=torch.float32)
        dim = torch.arange(rotary_dim // 2, dtype=torch.float32)
        freq = base ** (dim / (rotary_dim / 2))
        freq = freq.repeat_interleave(2) if self.adjacent_pairs else freq.repeat(2)
        angles = pos[:, None] / freq[None, :]
        return torch.sin(angles), torch.cos(angles)

    def _rotate_pairs(self, x: Tensor) -> Tensor:
        """The 90° turn of every coordinate pair: ``(a, b) -> (-b, a)``."""
        turned = x.clone()
        if self.adjacent_pairs:
            turned[..., ::2] = -x[..., 1::2]
            turned[..., 1::2] = x[..., ::2]
        else:
            n = x.shape[-1] // 2
            turned[..., :n] = -x[..., n:]
            turned[..., n:] = x[..., :n]
        return turned

    def forward(self, x: Tensor) -> Tensor:
        batch, n_pos, _ = x.shape
        q = self.q_proj(x).view(batch, n_pos, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, n_pos, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, n_pos, self.n_kv_heads, self.head_dim).transpose(1, 2)

        positions = self.positions(n_pos, x.device).clamp(max=self.n_ctx - 1)
        cos = self.rotary_cos[positions].to(q.dtype)  # (pos, head_dim) or (batch, pos, …)
        sin = self.rotary_sin[positions].to(q.dtype)
        if positions.ndim == 2:  # per-sample positions (document ids): broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        q = q * cos + self._rotate_pairs(q) * sin
        k = k * cos + self._rotate_pairs(k) * sin

        repeat = self.n_head // self.n_kv_heads
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)

        return self.o_proj(self.attend(x, q, k, v))


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, s: LlamaSettings) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.n_embd, s.n_intermediate, bias=s.mlp_bias)
        self.up_proj = nn.Linear(s.n_embd, s.n_intermediate, bias=s.mlp_bias)
        self.down_proj = nn.Linear(s.n_intermediate, s.n_embd, bias=s.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, s: LlamaSettings, layer: int, mlp: nn.Module) -> None:
        super().__init__()
        self.rms_1 = RMSNorm(s.n_embd, s.rms_norm_eps)
        self.attn = LlamaAttention(s, layer)
        self.rms_2 = RMSNorm(s.n_embd, s.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.rms_1(x))
        return x + self.mlp(self.rms_2(x))


class LlamaFamily(TargetModel):
    """Token embedding (tied to ``lm_head``), blocks, final RMSNorm; subclasses pick the MLP."""

    described: ClassVar[tuple[str, ...]] = (
        "n_layer",
        "n_embd",
        "n_head",
        "n_kv_heads",
        "vocab_size",
    )

    def __init__(self, settings: LlamaSettings) -> None:
        super().__init__()
        self.adopt(settings)
        self.wte = nn.Embedding(settings.vocab_size, settings.n_embd)
        self.h = nn.ModuleList(
            LlamaBlock(settings, i, self.make_mlp(settings)) for i in range(settings.n_layer)
        )
        self.ln_f = RMSNorm(settings.n_embd, settings.rms_norm_eps)
        self.lm_head = nn.Linear(settings.n_embd, settings.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.init_weights()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "") -> Self:
        return cls(LlamaSettings.from_config(cls.name, config, source))

    def make_mlp(self, settings: LlamaSettings) -> nn.Module:
        raise NotImplementedError

    def forward(self, tokens: Tensor) -> Tensor:
        """``(batch, pos)`` token ids -> ``(batch, pos, vocab)`` next-token logits."""
        self.check_tokens(tokens)
        x = self.wte(tokens)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def attention_specs(self) -> list[AttentionSpec]:
        s = self.settings
        rotary = RotaryConfig(
            rotary_dim=s.head_dim,
            base=s.rotary_base,
            adjacent_pairs=s.rotary_adjacent_pairs,
            n_ctx=s.n_ctx,
        )
        return self._specs(s.n_head, s.n_kv_heads, s.head_dim, rotary)


class LlamaSimple(LlamaFamily):
    """spd's LlamaSimple: the Llama family with a SwiGLU MLP (``gate_proj``, ``up_proj``,
    ``down_proj``)."""

    name: ClassVar[str] = "LlamaSimple"
    residual_suffixes: ClassVar[tuple[str, ...]] = ("attn.o_proj",)

    def make_mlp(self, settings: LlamaSettings) -> nn.Module:
        return SwiGLUMLP(settings)
