"""spd's GPT2Simple (``spd.pretrain.models.gpt2_simple``): GPT-2 with separate projections.

LayerNorm (eps 1e-5, biased variance), learned position embeddings ``wpe``, ``q_proj``/
``k_proj``/``v_proj``/``o_proj`` all with biases, no rotary embedding and no grouped-query
heads. Per head ``logits = (q @ kᵀ) · (1 / sqrt(head_dim))`` with ``q = x W_Qᵀ + b_Q``,
recorded before the causal mask. Module names are spd's, so its state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from qkcheck.documents import document_positions
from qkcheck.models.base import AttentionSpec
from qkcheck.models.common import CapturingAttention, ConfigReader, TargetModel, new_gelu


@dataclass(frozen=True)
class GPT2Settings:
    """The fields of spd's GPT2SimpleConfig that shape the computation."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 1024

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "") -> Self:
        read = ConfigReader(GPT2Simple.name, config, source)
        n_embd = read.int("n_embd")
        n_head = read.int("n_head")
        read.check(n_embd % n_head == 0, f"n_embd {n_embd} is not divisible by n_head {n_head}")
        return cls(
            vocab_size=read.int("vocab_size"),
            n_layer=read.int("n_layer"),
            n_head=n_head,
            n_embd=n_embd,
            block_size=read.int("block_size", 1024),
        )


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) · weight + bias`` with the biased variance."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        std = (x.var(dim=-1, keepdim=True, unbiased=False) + self.eps).sqrt()
        return (x - mean) / std * self.weight + self.bias


class GPT2Attention(CapturingAttention):
    """Causal multi-head self-attention with biased projections."""

    def __init__(self, s: GPT2Settings, layer: int) -> None:
        super().__init__(layer)
        self.n_head = s.n_head
        self.q_proj = nn.Linear(s.n_embd, s.n_embd)
        self.k_proj = nn.Linear(s.n_embd, s.n_embd)
        self.v_proj = nn.Linear(s.n_embd, s.n_embd)
        self.o_proj = nn.Linear(s.n_embd, s.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        batch, n_pos, d_model = x.shape
        head_dim = d_model // self.n_head
        q = self.q_proj(x).view(batch, n_pos, self.n_head, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, n_pos, self.n_head, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, n_pos, self.n_head, head_dim).transpose(1, 2)
        return self.o_proj(self.attend(x, q, k, v))


class GeluMLP(nn.Module):
    """``down_proj(NewGELU(c_fc(x)))``, hidden width ``4 · n_embd``, with biases."""

    def __init__(self, s: GPT2Settings) -> None:
        super().__init__()
        self.c_fc = nn.Linear(s.n_embd, 4 * s.n_embd)
        self.down_proj = nn.Linear(4 * s.n_embd, s.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(new_gelu(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, s: GPT2Settings, layer: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(s.n_embd)
        self.attn = GPT2Attention(s, layer)
        self.ln_2 = LayerNorm(s.n_embd)
        self.mlp = GeluMLP(s)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Simple(TargetModel):
    """spd's GPT2Simple: token + learned position embeddings, LayerNorm blocks, tied
    ``lm_head``."""

    name: ClassVar[str] = "GPT2Simple"
    described: ClassVar[tuple[str, ...]] = (
        "n_layer",
        "n_embd",
        "n_head",
        "vocab_size",
        "block_size",
    )
    residual_suffixes: ClassVar[tuple[str, ...]] = ("attn.o_proj", "mlp.down_proj")

    def __init__(self, settings: GPT2Settings) -> None:
        super().__init__()
        self.adopt(settings)
        self.wte = nn.Embedding(settings.vocab_size, settings.n_embd)
        self.wpe = nn.Embedding(settings.block_size, settings.n_embd)
        self.h = nn.ModuleList(GPT2Block(settings, i) for i in range(settings.n_layer))
        self.ln_f = LayerNorm(settings.n_embd)
        self.lm_head = nn.Linear(settings.n_embd, settings.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.init_weights()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "") -> Self:
        return cls(GPT2Settings.from_config(config, source))

    def forward(self, tokens: Tensor) -> Tensor:
        """``(batch, pos)`` token ids -> ``(batch, pos, vocab)`` next-token logits."""
        self.check_tokens(tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        if self.document_ids is not None:  # positions restart per document
            positions = document_positions(self.document_ids.to(tokens.device))
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def attention_specs(self) -> list[AttentionSpec]:
        s = self.settings
        return self._specs(s.n_head, s.n_head, s.head_dim, rotary=None)
