"""spd's LlamaSimpleMLP (``spd.pretrain.models.llama_simple_mlp``): LlamaSimple's attention
(see :mod:`qkcheck.models.llama_simple`) with a GPT-2 style MLP,
``down_proj(NewGELU(c_fc(x)))``."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from qkcheck.models.common import new_gelu
from qkcheck.models.llama_simple import LlamaFamily, LlamaSettings


class GeluMLP(nn.Module):
    """``down_proj(NewGELU(c_fc(x)))`` (NewGELU: the tanh approximation)."""

    def __init__(self, s: LlamaSettings) -> None:
        super().__init__()
        self.c_fc = nn.Linear(s.n_embd, s.n_intermediate, bias=s.mlp_bias)
        self.down_proj = nn.Linear(s.n_intermediate, s.n_embd, bias=s.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(new_gelu(self.c_fc(x)))


class LlamaSimpleMLP(LlamaFamily):
    """spd's LlamaSimpleMLP: the Llama family with a NewGELU MLP (``c_fc``, ``down_proj``)."""

    name: ClassVar[str] = "LlamaSimpleMLP"
    residual_suffixes: ClassVar[tuple[str, ...]] = ("attn.o_proj", "mlp.down_proj")

    def make_mlp(self, settings: LlamaSettings) -> nn.Module:
        return GeluMLP(settings)
