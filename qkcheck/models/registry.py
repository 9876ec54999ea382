"""Which spd architectures qkcheck can run, and building one from a config and state dict."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import Tensor

from qkcheck.errors import ConfigError, UnsupportedError
from qkcheck.models.common import TargetModel
from qkcheck.models.gpt2_simple import GPT2Simple
from qkcheck.models.llama_simple import LlamaSimple
from qkcheck.models.llama_simple_mlp import LlamaSimpleMLP

#: bare spd class name -> qkcheck's reimplementation (read-only)
SUPPORTED_MODELS: Mapping[str, type[TargetModel]] = MappingProxyType(
    {cls.name: cls for cls in (GPT2Simple, LlamaSimple, LlamaSimpleMLP)}
)


def resolve_model_class(
    class_name: str | None, model_config: Mapping[str, Any]
) -> type[TargetModel]:
    """The model class named by ``class_name`` (bare, e.g. ``"LlamaSimpleMLP"``, or spd's
    dotted path) or, when that is empty, by ``model_config["model_type"]``."""
    model_type = model_config.get("model_type") if isinstance(model_config, Mapping) else None
    requested = class_name or model_type
    if not requested:
        raise ConfigError(
            "no target model class given: pretrained_model_class is empty and the model "
            "config has no 'model_type'"
        )
    bare = str(requested).rsplit(".", 1)[-1]
    if bare not in SUPPORTED_MODELS:
        raise UnsupportedError(
            f"target model class '{requested}' is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_MODELS))}"
        )
    if model_type and str(model_type) != bare:
        raise ConfigError(
            f"target model class '{requested}' disagrees with the model config's "
            f"model_type '{model_type}'"
        )
    return SUPPORTED_MODELS[bare]


def build_target_model(
    class_name: str | None,
    model_config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor] | None,
    source: str = "",
    *,
    config_source: str = "",
) -> TargetModel:
    """Build a target model and load ``state_dict`` into it, checked.

    ``state_dict`` keys are the pretrain checkpoint's (no ``"target_model."`` prefix); None
    leaves spd's random initialisation, drawn from torch's global generator. ``source`` names
    the checkpoint file and ``config_source`` the config file in error messages. Raises
    :class:`~qkcheck.errors.UnsupportedError` for a class qkcheck lacks,
    :class:`~qkcheck.errors.ConfigError` for a config lacking a needed field, and
    :class:`~qkcheck.errors.CheckpointError` for missing, unexpected, misshapen or
    non-finite tensors. The model comes back in eval mode.
    """
    cls = resolve_model_class(class_name, model_config)
    model = cls.from_config(model_config, source=config_source)
    if state_dict is not None:
        model.load_checked_state_dict(state_dict, source)
    return model.eval()
