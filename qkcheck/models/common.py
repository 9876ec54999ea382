"""What the target models share: lenient config reading, checked weight loading, capture.

Every target model subclasses :class:`TargetModel`; every attention module subclasses
:class:`CapturingAttention` and calls :meth:`CapturingAttention.record` with its input and its
pre-mask scores, so :meth:`TargetModel.capture` gets the model's own logits (docs/design.md §7).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qkcheck.documents import document_mask, document_positions
from qkcheck.errors import CheckpointError, ConfigError, SamplesError, UnsupportedError
from qkcheck.models.base import AttentionSpec, Capture
from qkcheck.rotary import RotaryConfig

_MISSING = object()
#: at most this many problems are spelled out in one CheckpointError
_MAX_LISTED = 8


class ConfigReader:
    """Reads a model config mapping leniently: unknown fields are ignored, needed ones checked.

    Defaults are spd's own (``spd/pretrain/models/*.py`` config classes); fields that set a
    weight's shape have no default, so a config lacking one fails here rather than later.
    """

    def __init__(self, model_name: str, config: Mapping[str, Any], source: str = "") -> None:
        where = f" ({source})" if source else ""
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"{model_name} model config{where} must be a mapping of fields, "
                f"got {type(config).__name__}"
            )
        self._config = config
        self._what = f"{model_name} model config{where}"

    def _get(self, field: str, default: Any) -> Any:
        if field in self._config and self._config[field] is not None:
            return self._config[field]
        if default is _MISSING:
            raise ConfigError(f"{self._what} lacks the required field '{field}'")
        return default

    def int(self, field: str, default: Any = _MISSING, minimum: int = 1) -> int:
        value = self._get(field, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._what}: field '{field}' must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self._what}: field '{field}' must be >= {minimum}, got {value}")
        return value

    def float(self, field: str, default: Any = _MISSING) -> float:
        value = self._get(field, default)
        try:
            # YAML reads "1e-6" (no dot) as a string; accept anything float() accepts
            result = float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"{self._what}: field '{field}' must be a number, got {value!r}"
            ) from e
        if not math.isfinite(result):
            raise ConfigError(f"{self._what}: field '{field}' must be finite, got {value!r}")
        return result

    def bool(self, field: str, default: Any = _MISSING) -> bool:
        value = self._get(field, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._what}: field '{field}' must be true or false, got {value!r}")
        return value

    def check(self, ok: bool, rule: str) -> None:
        """Raise ConfigError stating ``rule`` unless ``ok``."""
        if not ok:
            raise ConfigError(f"{self._what}: {rule}")

    def unsupported(self, field: str, value: Any, why: str) -> UnsupportedError:
        return UnsupportedError(f"{self._what}: {field}={value!r} is not supported ({why})")


def new_gelu(x: Tensor) -> Tensor:
    """GPT-2's tanh approximation of GELU, written as spd's ``NewGELU`` writes it."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


class CapturingAttention(nn.Module):
    """An attention module that can hand its input and pre-mask scores to a :class:`Capture`."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.sink: Capture | None = None
        #: ``(batch, pos)`` document ids of the running capture (qkcheck.documents), or None
        self.document_ids: Tensor | None = None

    def positions(self, n_pos: int, device: torch.device) -> Tensor:
        """Rotary positions: ``(pos,)`` ``0..pos-1``, or ``(batch, pos)`` restarting at each
        document start when the capture has document ids."""
        if self.document_ids is None:
            return torch.arange(n_pos, device=device)
        return document_positions(self.document_ids.to(device))

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention as spd's non-flash path computes it: ``q``/``k``/``v``
        ``(batch, head, pos, d_head)`` (keys already repeated per query head), scores
        ``q kᵀ / sqrt(d_head)`` recorded before the mask together with the input ``x``.
        With document ids the mask is causal AND same document (a padding query attends to
        itself only, so its output stays finite; its logits are never checked).
        Returns ``(batch, pos, head·d_head)``."""
        batch, _, n_pos, _ = q.shape
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        self.record(x, scores)
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).tril()
        if self.document_ids is not None:
            eye = torch.eye(n_pos, dtype=torch.bool, device=x.device)
            causal = (document_mask(self.document_ids.to(x.device)) | eye)[:, None]
        pattern = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        return (pattern @ v).transpose(1, 2).contiguous().view(batch, n_pos, -1)

    def record(self, attn_input: Tensor, scores: Tensor) -> None:
        """Store ``attn_input`` ``(batch, pos, d_model)`` and ``scores`` ``(batch, head, query_pos,
        key_pos)`` (before the causal mask) when a capture is running."""
        if self.sink is not None and self.sink.records(self.layer):
            self.sink.attn_inputs[self.layer] = attn_input.detach()
            self.sink.logits[self.layer] = scores.detach()


def _shape(t: Tensor | torch.Size) -> str:
    dims = tuple(t.shape if isinstance(t, Tensor) else t)
    return "(" + ", ".join(str(d) for d in dims) + (",)" if len(dims) == 1 else ")")


class TargetModel(nn.Module):
    """Base of the target models: ``forward(tokens) -> lm logits``, plus :meth:`capture`.

    Attributes every subclass sets: ``n_ctx`` (the longest token sequence the model accepts,
    spd's ``block_size``), ``vocab_size``, ``n_layer``.
    """

    name: ClassVar[str]
    #: groups of state-dict keys that name one shared tensor (tied embeddings)
    tied_keys: ClassVar[tuple[tuple[str, ...], ...]] = (("wte.weight", "lm_head.weight"),)
    #: linear modules whose weights start at std 0.02 / sqrt(2 n_layer) (spd's residual scaling)
    residual_suffixes: ClassVar[tuple[str, ...]] = ()

    n_ctx: int
    vocab_size: int
    n_layer: int
    #: ``(batch, pos)`` document ids while :meth:`capture` runs with them, else None
    document_ids: Tensor | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "") -> Self:
        """Build with random weights from an spd model config (``source`` names its file)."""
        raise NotImplementedError

    def adopt(self, settings: Any) -> None:
        """Keep an spd architecture's ``settings`` and the sizes every target exposes."""
        self.settings = settings
        self.n_ctx = settings.block_size
        self.vocab_size = settings.vocab_size
        self.n_layer = settings.n_layer

    #: ``settings`` fields :meth:`describe` names
    described: ClassVar[tuple[str, ...]] = ()

    def describe(self) -> str:
        """``Name(field=value, …)`` over :attr:`described` (the architecture's sizes)."""
        s = getattr(self, "settings", None)
        fields = ", ".join(f"{f}={getattr(s, f)}" for f in self.described)
        return f"{self.name}({fields})" if fields else self.name

    def attention_specs(self) -> list[AttentionSpec]:
        raise NotImplementedError

    def _specs(
        self, n_head: int, n_kv_heads: int, head_dim: int, rotary: RotaryConfig | None
    ) -> list[AttentionSpec]:
        """One spec per layer for blocks ``h.<i>.attn.{q,k}_proj``, scale ``1/sqrt(d_head)``."""
        return [
            AttentionSpec(
                layer=i,
                q_path=f"h.{i}.attn.q_proj",
                k_path=f"h.{i}.attn.k_proj",
                n_head=n_head,
                n_kv_heads=n_kv_heads,
                head_dim=head_dim,
                scale=1.0 / math.sqrt(head_dim),
                rotary=rotary,
            )
            for i in range(self.n_layer)
        ]

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (:meth:`capture` runs there)."""
        return next(self.parameters()).device

    def on_device(
        self, tokens: Tensor, document_ids: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """``tokens`` and ``document_ids`` checked (:meth:`check_tokens`, one id per token)
        and moved to the model's :attr:`device`."""
        self.check_tokens(tokens)
        if document_ids is not None and tuple(document_ids.shape) != tuple(tokens.shape):
            raise SamplesError(
                f"document ids have shape {_shape(document_ids)}, tokens {_shape(tokens)}; "
                "give one id per token"
            )
        dev = self.device
        return tokens.to(dev), None if document_ids is None else document_ids.to(dev)

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise SamplesError unless ``tokens`` is an integer ``(batch, pos)`` tensor it takes."""
        if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.ndim != 2:
            got = f"{tokens.dtype} {_shape(tokens)}" if isinstance(tokens, Tensor) else type(tokens)
            raise SamplesError(f"tokens must be an integer tensor (batch, pos), got {got}")
        if tokens.shape[1] > self.n_ctx:
            raise SamplesError(
                f"{tokens.shape[1]} tokens per sample exceed {self.name}'s context of {self.n_ctx}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise SamplesError(
                f"token ids must lie in [0, {self.vocab_size}) for {self.name}, "
                f"got range [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def capture(
        self,
        tokens: Tensor,
        modules: Collection[str] | None = None,
        document_ids: Tensor | None = None,
        layers: Collection[int] | None = None,
    ) -> Capture:
        """One no-grad forward pass recording attention inputs, pre-mask logits, each
        block's input residual stream (``resid_pre``, before its norm) and the input of every
        Linear (keyed by module path, e.g. ``"h.0.attn.q_proj"``) — or only of those in
        ``modules``. ``layers``: only these layers' attention inputs and logits (None: all).
        ``document_ids`` ``(batch, pos)`` (-1: padding): positions restart per
        document and attention stays within it (see :mod:`qkcheck.documents`). Runs on the
        model's :attr:`device` (tokens moved there); the captured tensors stay there."""
        tokens, document_ids = self.on_device(tokens, document_ids)
        self.document_ids = document_ids
        result = Capture(layers=None if layers is None else frozenset(layers))
        handles = []
        for path, module in self.named_modules():
            if isinstance(module, nn.Linear) and (modules is None or path in modules):
                handles.append(module.register_forward_pre_hook(_input_recorder(result, path)))
            elif _BLOCK.fullmatch(path):
                handles.append(module.register_forward_pre_hook(_resid_recorder(result, path)))
            elif isinstance(module, CapturingAttention):
                module.sink = result
                module.document_ids = document_ids
        try:
            with torch.no_grad():
                self(tokens)
        finally:
            for handle in handles:
                handle.remove()
            self.document_ids = None
            for module in self.modules():
                if isinstance(module, CapturingAttention):
                    module.sink = None
                    module.document_ids = None
        return result

    def init_weights(self) -> None:
        """spd's initialisation, drawn from torch's global generator (seed it to reproduce):
        Linear and Embedding weights N(0, 0.02), residual-writing projections N(0, 0.02 /
        sqrt(2 n_layer)), biases 0, norm weights 1 (their constructors already set those)."""
        residual_std = 0.02 / math.sqrt(2 * self.n_layer)
        with torch.no_grad():
            for path, module in self.named_modules():
                if isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                elif isinstance(module, nn.Linear) and path != "lm_head":  # lm_head is tied to wte
                    std = residual_std if path.endswith(self.residual_suffixes) else 0.02
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def load_checked_state_dict(self, state_dict: Mapping[str, Tensor], source: str = "") -> None:
        """Load weights after checking keys, shapes and values; any problem raises one
        CheckpointError naming ``source``, the keys, and expected vs actual shapes.

        Tied keys (``wte.weight`` / ``lm_head.weight``) may appear once or both; when both
        appear they must be equal.
        """
        where = source or "state dict"
        if not isinstance(state_dict, Mapping):
            raise CheckpointError(
                f"{where}: expected a mapping of parameter names to tensors, "
                f"got {type(state_dict).__name__}"
            )
        expected = {k: v.shape for k, v in self.state_dict().items()}
        given = dict(state_dict)
        problems: list[str] = []
        for group in self.tied_keys:
            present = [k for k in group if k in given]
            if not present:
                continue
            first = given[present[0]]
            for other in present[1:]:
                same = (
                    isinstance(first, Tensor)
                    and isinstance(given[other], Tensor)
                    and first.shape == given[other].shape
                    and torch.equal(first, given[other])
                )
                if not same:
                    problems.append(
                        f"tied keys '{present[0]}' and '{other}' hold different tensors"
                    )
            for key in group:
                given.setdefault(key, first)
        for key, shape in expected.items():
            if key not in given:
                problems.append(f"missing key '{key}' (expected shape {_shape(shape)})")
        for key, value in given.items():
            if key not in expected:
                shape = _shape(value) if isinstance(value, Tensor) else type(value).__name__
                problems.append(f"unexpected key '{key}' (shape {shape})")
            elif not isinstance(value, Tensor):
                problems.append(f"key '{key}' holds a {type(value).__name__}, not a tensor")
            elif value.shape != expected[key]:
                problems.append(
                    f"key '{key}' has shape {_shape(value)}, expected {_shape(expected[key])}"
                )
            elif not value.dtype.is_floating_point:
                problems.append(f"key '{key}' has dtype {value.dtype}, expected a float tensor")
            elif not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                problems.append(f"key '{key}' has {bad} non-finite values (NaN/Inf)")
        if any(k.startswith("target_model.") for k in given if k not in expected):
            problems.insert(0, "hint: strip the 'target_model.' prefix of SPD checkpoint keys")
        if problems:
            listed = problems[:_MAX_LISTED]
            if len(problems) > _MAX_LISTED:
                listed.append(f"and {len(problems) - _MAX_LISTED} more")
            raise CheckpointError(f"{where} does not fit {self.describe()}: " + "; ".join(listed))
        with torch.no_grad():
            self.load_state_dict({k: given[k] for k in expected}, strict=True)


def _input_recorder(capture: Capture, path: str):
    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        capture.module_inputs[path] = args[0].detach()

    return hook


#: transformer blocks, whose input is the residual stream before the pre-attention norm
_BLOCK = re.compile(r"h\.(\d+)")


def _resid_recorder(capture: Capture, path: str):
    layer = int(path.split(".")[1])

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        capture.resid_pre[layer] = args[0].detach()

    return hook
