"""Hugging Face targets, run by transformers' own modeling code (the ground truth).

A :class:`HFTarget` holds a ``transformers`` model built from the snapshot's ``config.json``
with the run's target weights. Its forward pass is transformers' own; the pre-softmax scores
come from an attention function qkcheck registers in transformers' ``AttentionInterface``
(``"qkcheck_eager"``): it records ``query · repeat_kv(key)ᵀ · scaling`` — the tensors the
model hands to attention, after its own projections, QK-norm and rotary embedding — and
then calls the modeling module's own ``eager_attention_forward``, so the model's output is
exactly its eager output. None of qkcheck's rotary or norm code runs on this path.

Supported classes (:data:`ARCHITECTURES`): ``LlamaForCausalLM``, ``Qwen3ForCausalLM``,
``GPT2LMHeadModel``. What each declares for the decomposition: module paths of q and k, a
fused projection's column slices (GPT-2's ``c_attn``: q, k, v side by side), whether weights
are stored ``(d_in, d_out)`` (GPT-2's ``Conv1D``), RoPE (from ``config.json`` via
:mod:`qkcheck.models.hf_rope`) and QK-norm gains.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from qkcheck.documents import document_mask, document_positions
from qkcheck.errors import CheckpointError, ConfigError, UnsupportedError
from qkcheck.models.base import AttentionSpec, Capture, QKNorm
from qkcheck.models.common import TargetModel, _shape
from qkcheck.models.hf_rope import hf_rotary

ATTENTION_NAME = "qkcheck_eager"


@dataclass(frozen=True)
class HFArch:
    """How qkcheck reads one transformers class."""

    class_name: str
    model_type: str
    blocks: str  # the ModuleList of decoder blocks, e.g. "model.layers"
    q: str  # q projection inside a block, e.g. "self_attn.q_proj"
    k: str
    fused: bool = False  # q, k (and v) are column slices of one module
    conv1d: bool = False  # weights stored (d_in, d_out), y = x W + b
    rotary: bool = True
    qk_norm: str | None = None  # attention submodule holding q_norm / k_norm
    n_ctx_field: str = "max_position_embeddings"


ARCHITECTURES: Mapping[str, HFArch] = {
    a.class_name: a
    for a in (
        HFArch("LlamaForCausalLM", "llama", "model.layers", "self_attn.q_proj", "self_attn.k_proj"),
        HFArch(
            "Qwen3ForCausalLM",
            "qwen3",
            "model.layers",
            "self_attn.q_proj",
            "self_attn.k_proj",
            qk_norm="self_attn",
        ),
        HFArch(
            "GPT2LMHeadModel",
            "gpt2",
            "transformer.h",
            "attn.c_attn",
            "attn.c_attn",
            fused=True,
            conv1d=True,
            rotary=False,
            n_ctx_field="n_positions",
        ),
    )
}


def is_hf_class(class_name: str | None) -> bool:
    """Whether spd's ``pretrained_model_class`` names a transformers class."""
    return bool(class_name) and str(class_name).startswith("transformers.")


def hf_arch(class_name: str, source: str = "") -> HFArch:
    bare = str(class_name).rsplit(".", 1)[-1]
    if bare not in ARCHITECTURES:
        where = f"{source}: " if source else ""
        raise UnsupportedError(
            f"{where}transformers class {class_name!r} is not supported; supported: "
            f"{', '.join('transformers.' + n for n in ARCHITECTURES)}",
            field="pretrained_model_class",
        )
    return ARCHITECTURES[bare]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UnsupportedError(
            "Hugging Face targets need the transformers package: pip install 'qkcheck[hf]'"
        ) from None
    return transformers


def read_hf_config(snapshot: Path) -> dict[str, Any]:
    path = snapshot / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable JSON config: {e}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_snapshot_weights(snapshot: Path) -> dict[str, Tensor]:
    """Every ``*.safetensors`` file of a snapshot, merged (sharded checkpoints included)."""
    files = sorted(snapshot.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{snapshot}: no *.safetensors weights in the HF snapshot")
    from qkcheck.runs.param_decomp.target import read_weights

    state: dict[str, Tensor] = {}
    for f in files:
        state.update(read_weights(f))
    return state


# --- the attention function ---------------------------------------------------------------


def _qkcheck_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Record the pre-softmax scores, then run the model's own eager attention."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    sink: Capture | None = getattr(module, "_qkcheck_sink", None)
    if sink is not None and sink.records(module.layer_idx):
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # = repeat_kv
        sink.logits[module.layer_idx] = (torch.matmul(query, k.transpose(2, 3)) * scaling).detach()
    mask = getattr(module, "_qkcheck_mask", None)
    if mask is not None:
        attention_mask = mask.to(query.dtype)
    return eager(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    transformers = _transformers()
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    transformers.AttentionInterface.register(ATTENTION_NAME, _qkcheck_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)


# --- the target ---------------------------------------------------------------------------


class HFTarget(TargetModel):
    """A transformers causal LM behind qkcheck's :class:`TargetModel` interface.

    The transformers model's top-level children are this module's children, so module
    paths and state-dict keys are transformers' own (``model.layers.0.self_attn.q_proj``).
    """

    name: ClassVar[str] = "HF"
    tied_keys: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __init__(self, arch: HFArch, hf_model: nn.Module, config: dict[str, Any], source: str):
        super().__init__()
        object.__setattr__(self, "_hf", hf_model)  # not a child: its children are ours
        for child_name, child in hf_model.named_children():
            self.add_module(child_name, child)
        self.arch = arch
        self.config = config
        self.source = source
        hf_config = hf_model.config
        self.n_layer = int(hf_config.num_hidden_layers)
        self.vocab_size = int(hf_config.vocab_size)
        self.n_ctx = int(getattr(hf_config, arch.n_ctx_field))
        self._rotary = hf_rotary(config, source) if arch.rotary else None

    def describe(self) -> str:
        return f"transformers.{self.arch.class_name} ({self.source})"

    @classmethod
    def build(
        cls,
        class_name: str,
        snapshot: Path,
        state_dict: Mapping[str, Tensor] | None = None,
        source: str = "",
    ) -> HFTarget:
        """The model of ``snapshot/config.json`` with ``state_dict`` (transformers' keys),
        else the snapshot's safetensors; float32, eval mode, qkcheck's attention function."""
        arch = hf_arch(class_name)
        config_path = snapshot / "config.json"
        config = read_hf_config(snapshot)
        if config.get("model_type") != arch.model_type:
            raise ConfigError(
                f"{config_path}: field 'model_type' is {config.get('model_type')!r}, but "
                f"{class_name} needs {arch.model_type!r}",
                field="model_type",
            )
        _check_supported(arch, config, config_path)
        transformers = _transformers()
        _register()
        hf_cls = getattr(transformers, arch.class_name)
        hf_config = hf_cls.config_class.from_pretrained(str(snapshot))
        hf_config._attn_implementation = ATTENTION_NAME
        torch_default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            hf_model = hf_cls(hf_config)
        finally:
            torch.set_default_dtype(torch_default)
        hf_model.float()
        weights_source = source
        if state_dict is None:
            state_dict = read_snapshot_weights(snapshot)
            weights_source = str(snapshot)
        target = cls(arch, hf_model, config, str(config_path))
        target._load(state_dict, weights_source or str(snapshot), hf_model)
        return target.eval()

    def _load(self, given: Mapping[str, Tensor], source: str, hf_model: nn.Module) -> None:
        expected = hf_model.state_dict()
        prefix = getattr(hf_model, "base_model_prefix", "") + "."
        state = dict(given)
        if prefix != "." and not any(k.startswith(prefix) for k in state):
            # the original GPT-2 files name keys without the base model prefix
            state = {(k if k.startswith("lm_head") else prefix + k): v for k, v in state.items()}
        # buffers older checkpoints still carry (GPT-2's causal mask)
        state = {
            k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
        }
        tied = bool(getattr(hf_model.config, "tie_word_embeddings", False))
        problems = []
        for key, value in expected.items():
            if key not in state:
                if tied and key == "lm_head.weight":
                    continue
                problems.append(f"missing key '{key}' (config.json gives shape {_shape(value)})")
            elif tuple(state[key].shape) != tuple(value.shape):
                problems.append(
                    f"key '{key}' has shape {_shape(state[key])}, config.json gives {_shape(value)}"
                )
            elif not state[key].dtype.is_floating_point:
                problems.append(f"key '{key}' has dtype {state[key].dtype}, expected floats")
            elif not bool(torch.isfinite(state[key]).all()):
                problems.append(f"key '{key}' has non-finite values (NaN/Inf)")
        problems += [f"unexpected key '{k}'" for k in state if k not in expected]
        if problems:
            listed = problems[:8] + ([f"and {len(problems) - 8} more"] if len(problems) > 8 else [])
            raise CheckpointError(f"{source} does not fit {self.describe()}: " + "; ".join(listed))
        with torch.no_grad():
            hf_model.load_state_dict(
                {k: v.to(torch.float32) for k, v in state.items()}, strict=False
            )
            if tied:
                hf_model.tie_weights()

    # --- what the decomposition needs ------------------------------------------------------

    def block_path(self, layer: int) -> str:
        return f"{self.arch.blocks}.{layer}"

    def attention_specs(self) -> list[AttentionSpec]:
        specs = []
        for i in range(self.n_layer):
            block = self.get_submodule(self.block_path(i))
            attn = self.get_submodule(f"{self.block_path(i)}.{self.arch.q.split('.')[0]}")
            n_head, n_kv, head_dim = _heads(self._hf.config)
            q_cols = k_cols = None
            if self.arch.fused:
                d = n_head * head_dim
                q_cols, k_cols = (0, d), (d, d + n_kv * head_dim)
            qk_norm = None
            if self.arch.qk_norm is not None:
                holder = block.get_submodule(self.arch.qk_norm)
                qk_norm = QKNorm(
                    holder.q_norm.weight.detach(),
                    holder.k_norm.weight.detach(),
                    float(holder.q_norm.variance_epsilon),
                )
            specs.append(
                AttentionSpec(
                    layer=i,
                    q_path=f"{self.block_path(i)}.{self.arch.q}",
                    k_path=f"{self.block_path(i)}.{self.arch.k}",
                    n_head=n_head,
                    n_kv_heads=n_kv,
                    head_dim=head_dim,
                    scale=float(attn.scaling),
                    rotary=self._rotary,
                    q_cols=q_cols,
                    k_cols=k_cols,
                    qk_norm=qk_norm,
                )
            )
        return specs

    def stores_transposed(self, path: str) -> bool:
        """Whether ``path``'s weight is stored ``(d_in, d_out)`` (Conv1D, embeddings)."""
        module = self.get_submodule(path)
        return isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D"

    def forward(self, tokens: Tensor, position_ids: Tensor | None = None) -> Tensor:
        return self._hf(input_ids=tokens, position_ids=position_ids, use_cache=False).logits

    def capture(
        self,
        tokens: Tensor,
        modules: Collection[str] | None = None,
        document_ids: Tensor | None = None,
        layers: Collection[int] | None = None,
    ) -> Capture:
        """One no-grad forward pass of the transformers model (see TargetModel.capture).
        With ``document_ids`` the positions restart per document (``position_ids``) and the
        mask is causal within a document (a padding query attends to itself only). Runs on the
        model's device (tokens moved there); the captured tensors stay there."""
        tokens, ids = self.on_device(tokens, document_ids)
        result = Capture(layers=None if layers is None else frozenset(layers))
        position_ids = mask = None
        if ids is not None:
            position_ids = document_positions(ids)
            n = tokens.shape[1]
            eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
            allowed = (document_mask(ids) | eye)[:, None]  # (batch, 1, i, j)
            mask = torch.zeros(allowed.shape, device=tokens.device).masked_fill(
                ~allowed, torch.finfo(torch.float32).min
            )
        handles = []
        q_paths = {sp.q_path: sp.layer for sp in self.attention_specs() if result.records(sp.layer)}
        blocks = {self.block_path(i): i for i in range(self.n_layer)}
        for path, module in self.named_modules():
            if path in q_paths:
                handles.append(
                    module.register_forward_pre_hook(_store(result.attn_inputs, q_paths[path]))
                )
            if _is_linear(module) and (modules is None or path in modules):
                handles.append(module.register_forward_pre_hook(_store(result.module_inputs, path)))
            if path in blocks:
                handles.append(
                    module.register_forward_pre_hook(
                        _store_kw(result.resid_pre, blocks[path]), with_kwargs=True
                    )
                )
            if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
                module._qkcheck_sink = result
                module._qkcheck_mask = mask
        try:
            with torch.no_grad():
                self(tokens, position_ids=position_ids)
        finally:
            for handle in handles:
                handle.remove()
            for module in self.modules():
                if hasattr(module, "_qkcheck_sink"):
                    module._qkcheck_sink = None
                    module._qkcheck_mask = None
        return result


def _heads(hf_config) -> tuple[int, int, int]:
    n_head = int(hf_config.num_attention_heads)
    n_kv = int(getattr(hf_config, "num_key_value_heads", None) or n_head)
    head_dim = getattr(hf_config, "head_dim", None) or int(hf_config.hidden_size) // n_head
    return n_head, n_kv, int(head_dim)


def _check_supported(arch: HFArch, config: Mapping[str, Any], path: Path) -> None:
    """Refuse, by field, what the decomposition does not model."""
    if config.get("use_sliding_window") or any(
        t == "sliding_attention" for t in (config.get("layer_types") or [])
    ):
        raise UnsupportedError(
            f"{path}: sliding-window attention layers are not supported (field "
            "'use_sliding_window' / 'layer_types')",
            field="use_sliding_window",
        )
    if arch.model_type == "gpt2" and config.get("add_cross_attention"):
        raise UnsupportedError(f"{path}: GPT-2 with cross-attention is not supported")
    if arch.rotary:
        hf_rotary(config, str(path))  # unsupported RoPE types fail here, at load time


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _store(into: dict, key):
    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        into[key] = args[0].detach()

    return hook


def _store_kw(into: dict, key):
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        into[key] = (args[0] if args else kwargs["hidden_states"]).detach()

    return hook
