"""The building blocks of spd's CI networks, read from a checkpoint's CI state.

* :class:`Stack` — affine layers ``x @ W + b`` (``W`` is ``(in, out)``, not ``nn.Linear``'s
  ``(out, in)``) with exact-erf GELU between them; spd keeps them in an ``nn.Sequential``,
  so their keys sit at the even indices ``<prefix>0``, ``<prefix>2``, … A single spd
  ``Linear`` (keys ``<prefix>W``, ``<prefix>b``) is a one-layer stack.
* :func:`rms_norm` — ``x / sqrt(mean(x²) + ε) (⊙ γ)`` over the last axis, ``ε`` torch's
  default (the machine epsilon of the dtype), as ``F.rms_norm`` and ``nn.RMSNorm`` compute it.
* :class:`SelfAttention` — spd's bidirectional multi-head self-attention with rotate-half
  RoPE: for head ``h``, ``q = R_t (x W_Qᵀ)_h``, ``k = R_s (x W_Kᵀ)_h`` with positions
  ``t, s = 0..T−1`` and ``R_t`` the rotation by angles ``t · inv_freq`` (``inv_freq_i =
  1/base^(2i/d_head)``, applied to the pairs ``(x_i, x_{i + d_head/2})``); weights
  ``softmax_s(⟨q_t, k_s⟩ / √d_head)`` over **every** key ``s`` (no causal mask); output
  ``concat_h(Σ_s w_ts v_s) W_Oᵀ``. Projections are ``nn.Linear`` without bias.

:class:`StateReader` reads these from a state dict, checking every tensor's presence, type,
finiteness and shape, and remembers which keys it used so that leftovers can be reported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from qkcheck.errors import CheckpointError, QKCheckError


@dataclass(frozen=True)
class Stack:
    """Affine layers with exact GELU between them.

    ``parallel``: one network per component, weights ``(comp, in, out)``, input
    ``(... comp in)`` — or ``(... in)``, the same for every component, when ``shared_input``;
    output ``(... comp out)``. Otherwise one network, weights ``(in, out)``, ``(... in) -> (...
    out)``.
    """

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]
    parallel: bool = False
    shared_input: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = x.to(W.dtype)
            if not self.parallel:
                x = x @ W + b
            elif i == 0 and self.shared_input:
                x = torch.einsum("...i,cio->...co", x, W) + b
            else:
                x = torch.einsum("...ci,cio->...co", x, W) + b
            if i < last:
                x = F.gelu(x)
        return x


def rms_norm(x: Tensor, weight: Tensor | None = None) -> Tensor:
    """``x / sqrt(mean(x², -1) + ε)``, times ``weight`` when given; ``ε`` torch's default."""
    return F.rms_norm(x, (x.shape[-1],), weight)


def rotate_half(x: Tensor, inv_freq: Tensor) -> Tensor:
    """RoPE over positions ``0..T−1`` of ``x`` ``(... pos d_head)``, rotate-half pairing."""
    positions = torch.arange(x.shape[-2], dtype=inv_freq.dtype, device=x.device)
    angles = positions[:, None] * inv_freq[None, :]  # (pos, d_head/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class SelfAttention:
    """Bidirectional RoPE self-attention (see the module docstring); ``W_*`` ``(out, in)``."""

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    inv_freq: Tensor  # (d_head / 2,)
    n_heads: int
    max_len: int
    field: str  # the config field holding max_len, for the error message

    def __call__(self, x: Tensor) -> Tensor:
        """``(batch pos d) -> (batch pos d)``."""
        *lead, T, d = x.shape
        if T > self.max_len:
            raise QKCheckError(
                f"global CI attention takes at most {self.field} = {self.max_len} positions, "
                f"got samples of {T} tokens; use shorter samples"
            )
        d_head = d // self.n_heads

        def heads(W: Tensor) -> Tensor:  # (... pos d) -> (... head pos d_head)
            return (x @ W.T).reshape(*lead, T, self.n_heads, d_head).transpose(-3, -2)

        q = rotate_half(heads(self.W_Q), self.inv_freq)
        k = rotate_half(heads(self.W_K), self.inv_freq)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d_head), dim=-1)
        out = (weights @ heads(self.W_V)).transpose(-3, -2).reshape(*lead, T, d)
        return out @ self.W_O.T


_LAYER_KEY = re.compile(r"^(\d+)\.(W|b)$")


class StateReader:
    """Checked reads from CI state (keys without ``ci_fn.``); remembers the keys used."""

    def __init__(self, state: Mapping[str, Tensor], where: str) -> None:
        self.state = state
        self.where = where
        self.used: set[str] = set()

    def has(self, prefix: str) -> bool:
        """Whether any key starts with ``prefix``."""
        return any(k.startswith(prefix) for k in self.state)

    def tensor(self, key: str, shape: Sequence[int]) -> Tensor:
        """The float tensor at ``key``, which must be finite and of ``shape``."""
        if key not in self.state:
            raise CheckpointError(f"{self.where}: missing CI key '{key}'")
        value = self._checked(key)
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.where}: CI key '{key}' has shape {tuple(value.shape)}, "
                f"expected {tuple(shape)}"
            )
        self.used.add(key)
        return value

    def _checked(self, key: str) -> Tensor:
        value = self.state[key]
        if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
            raise CheckpointError(f"{self.where}: CI key '{key}' is not a float tensor")
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{self.where}: CI key '{key}' has non-finite values")
        return value

    def affine(self, prefix: str, d_in: int, d_out: int) -> Stack:
        """One spd ``Linear``: ``<prefix>W`` ``(d_in, d_out)`` and ``<prefix>b`` ``(d_out,)``."""
        W = self.tensor(f"{prefix}W", (d_in, d_out))
        return Stack((W,), (self.tensor(f"{prefix}b", (d_out,)),))

    def stack(
        self,
        prefix: str,
        *,
        d_in: int,
        d_out: int,
        hidden_dims: Sequence[int] | None,
        hidden_field: str = "hidden_dims",
        parallel: bool = False,
        shared_input: bool = False,
        n_parallel: int = 0,
    ) -> Stack:
        """``<prefix><i>.{W,b}`` at ``i = 0, 2, …``, shapes chaining ``d_in`` → ``d_out``.

        ``hidden_dims`` (the config's, under ``hidden_field``) fixes the hidden widths when
        given; otherwise they are read from the weights.
        """
        found: dict[int, dict[str, Tensor]] = {}
        for key in self.state:
            if key.startswith(prefix) and (m := _LAYER_KEY.match(key[len(prefix) :])):
                found.setdefault(int(m.group(1)), {})[m.group(2)] = self._checked(key)
        if not found:
            raise CheckpointError(f"{self.where}: no CI function weights under '{prefix}'")
        indices = sorted(found)
        if indices != list(range(0, 2 * len(indices), 2)):
            raise CheckpointError(
                f"{self.where}: CI layers under '{prefix}' sit at indices {indices}, "
                f"expected 0, 2, 4, … (GELU between them)"
            )
        if hidden_dims is not None and len(hidden_dims) != len(indices) - 1:
            raise CheckpointError(
                f"{self.where}: CI function under '{prefix}' has {len(indices) - 1} hidden "
                f"layers, the config's {hidden_field} {list(hidden_dims)} say {len(hidden_dims)}"
            )
        weights, biases = [], []
        width = d_in
        lead = (n_parallel,) if parallel else ()
        for n, i in enumerate(indices):
            key = f"{prefix}{i}"
            for part in ("W", "b"):
                if part not in found[i]:
                    raise CheckpointError(f"{self.where}: missing CI key '{key}.{part}'")
            is_last = n == len(indices) - 1
            if is_last:
                out = d_out
            elif hidden_dims is not None:
                out = hidden_dims[n]
            else:
                out = found[i]["W"].shape[-1]
            weights.append(self.tensor(f"{key}.W", (*lead, width, out)))
            biases.append(self.tensor(f"{key}.b", (*lead, out)))
            width = out
        return Stack(tuple(weights), tuple(biases), parallel, shared_input)

    def attention(
        self,
        prefix: str,
        d_model: int,
        n_heads: int,
        max_len: int,
        rope_base: float,
        field: str,
    ) -> SelfAttention:
        """spd's ``SelfAttention`` under ``prefix``: ``{q,k,v,out}_proj.weight`` ``(d, d)`` and
        the ``rope.inv_freq`` buffer (computed from ``rope_base`` when the state lacks it)."""
        d_head = d_model // n_heads
        W = {n: self.tensor(f"{prefix}{n}_proj.weight", (d_model, d_model)) for n in "qkv"}
        W_O = self.tensor(f"{prefix}out_proj.weight", (d_model, d_model))
        key = f"{prefix}rope.inv_freq"
        if key in self.state:
            inv_freq = self.tensor(key, (d_head // 2,))
        else:
            inv_freq = 1.0 / (rope_base ** (torch.arange(0, d_head, 2).float() / d_head))
        return SelfAttention(W["q"], W["k"], W["v"], W_O, inv_freq, n_heads, max_len, field)

    def norm_weight(self, key: str, d: int) -> Tensor:
        """An ``nn.RMSNorm``'s ``weight`` ``(d,)``."""
        return self.tensor(key, (d,))

    def check_all_used(self, prefix: str) -> None:
        """CheckpointError naming the first key under ``prefix`` that nothing read."""
        left = sorted(k for k in self.state if k.startswith(prefix) and k not in self.used)
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise CheckpointError(
                f"{self.where}: unexpected CI key '{left[0]}'{more}: the run's ci_config "
                "describes no such weight"
            )
