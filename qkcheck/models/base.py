"""What every target model exposes to qkcheck.

A target model is a plain reimplementation of one of SPD's pretrain architectures. Its
forward pass captures, per layer, the attention input (what ``q_proj``/``k_proj`` receive,
after the block's pre-attention norm) and the pre-softmax attention logits computed inside
its own attention module — the independent ground truth of docs/design.md §7.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from qkcheck.rotary import RotaryConfig


@dataclass(frozen=True)
class AttentionSpec:
    """Static description of one attention layer, enough to decompose its logits."""

    layer: int
    q_path: str  # module path of the query projection, e.g. "h.0.attn.q_proj"
    k_path: str
    n_head: int
    n_kv_heads: int
    head_dim: int
    scale: float  # logit = scale * <R_i q_i, R_j k_j>
    rotary: RotaryConfig | None  # None: no rotary embedding (GPT-2 style)
    #: output columns of q and k in a fused projection (GPT-2's ``c_attn``: one module, one
    #: set of components, ``q = U[:, q_cols]``, ``k = U[:, k_cols]``); None: the whole output
    q_cols: tuple[int, int] | None = None
    k_cols: tuple[int, int] | None = None
    #: per-head RMSNorm of q and k before RoPE (Qwen3), or None
    qk_norm: QKNorm | None = None

    @property
    def q_name(self) -> str:
        """The query side's name in reports: the module path, with ``[q]`` for a fused one."""
        return self.q_path if self.q_cols is None else f"{self.q_path}[q]"

    @property
    def k_name(self) -> str:
        return self.k_path if self.k_cols is None else f"{self.k_path}[k]"


@dataclass(frozen=True, eq=False)
class QKNorm:
    """Qwen3's QK-norm: ``q_h ← γ_Q ⊙ q_h / sqrt(mean(q_h²) + eps)`` per head (k alike),
    applied to the projections before the rotary embedding. ``gamma_q``/``gamma_k``:
    ``(head_dim,)``, shared by every head."""

    gamma_q: Tensor
    gamma_k: Tensor
    eps: float


@dataclass
class Capture:
    """Everything one forward pass over a batch of token ids records.

    ``attn_inputs[layer]``: ``(batch, pos, d_model)``;
    ``logits[layer]``: ``(batch, head, query_pos, key_pos)`` pre-softmax scores, entries
    above the diagonal unspecified (the causal mask is applied after capture);
    ``module_inputs[path]``: ``(batch, pos, d_in)`` input of every Linear, by module path;
    ``resid_pre[layer]``: ``(batch, pos, d_model)`` the block's input residual stream, before
    the pre-attention norm (``attn_inputs`` is after it).

    ``layers``: the layers whose attention input and logits are recorded (None: every
    layer). The logits are the capture's bulk, ``batch × heads × pos²`` per layer: 512 MiB
    per layer at Llama-3-8B's 32 heads and 2048 positions in float32.
    """

    attn_inputs: dict[int, Tensor] = field(default_factory=dict)
    logits: dict[int, Tensor] = field(default_factory=dict)
    module_inputs: dict[str, Tensor] = field(default_factory=dict)
    resid_pre: dict[int, Tensor] = field(default_factory=dict)
    layers: frozenset[int] | None = None

    def records(self, layer: int) -> bool:
        """Whether ``layer``'s attention input and logits are recorded."""
        return self.layers is None or layer in self.layers
