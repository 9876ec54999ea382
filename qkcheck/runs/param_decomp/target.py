"""The target model of a param-decomp run, with its weights cast as the run cast them.

``target.spec.kind: pretrained`` names a pretrain run (``run_path: entity/project/runs/ID``)
whose files sit in ``<root>/pretrain_cache/<project>-<ID>/``: ``model_config.yaml`` (the
architecture) and ``model_step_<N>.safetensors`` (or the torch-era ``model_step_<N>.pt``;
the largest N is used). ``lm_head`` is tied to ``wte``. The roots searched: the one the run
sits in, ``$PARAM_DECOMP_OUT_DIR``, qkcheck's cache.

``target.spec.kind: hf`` (a ``transformers`` class, ``model_name`` in the HF hub cache) goes
through :func:`build_hf_target`.

``target.weights_dtype`` is honoured by rounding every weight to it (the values the run's
target holds); the model then computes in float32 — exact on those values — as
param-decomp computes attention scores in float32. The closure tolerance therefore stays
float32's: a bf16 forward would loosen it to ~1e-2 of each logit's terms and make the check
vacuous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkcheck.errors import CheckpointError, ConfigError, RunNotFoundError, UnsupportedError
from qkcheck.models import build_target_model
from qkcheck.models.common import TargetModel
from qkcheck.runs.checkpoint import read_checkpoint
from qkcheck.runs.config import parse_model_config, read_yaml
from qkcheck.runs.param_decomp.launch_config import LaunchConfig
from qkcheck.runs.param_decomp.resolve import output_roots
from qkcheck.runs.resolve import parse_wandb_ref

MODEL_CONFIG = "model_config.yaml"
_WEIGHTS_RE = re.compile(r"^model_step_(\d+)\.(safetensors|pt)$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PretrainCache:
    dir: Path
    model_config: Path
    weights: Path


def find_pretrain_cache(config: LaunchConfig, run_root: Path | None) -> PretrainCache:
    """The pretrain cache folder of a ``kind: pretrained`` target, and its latest weights."""
    spec = config.target.spec
    ref = parse_wandb_ref(spec.run_path)
    if ref is None:
        raise RunNotFoundError(
            f"{config.path}: field 'target.spec.run_path': {spec.run_path!r} is not a W&B run "
            "path entity/project/runs/ID"
        )
    roots = list(dict.fromkeys([*([run_root] if run_root else []), *output_roots()]))
    tried = []
    for root in roots:
        folder = root / "pretrain_cache" / ref.cache_name
        if not (folder / MODEL_CONFIG).is_file():
            tried.append(f"{folder} ({'no ' + MODEL_CONFIG if folder.is_dir() else 'missing'})")
            continue
        found = {}
        for p in folder.iterdir():
            if m := _WEIGHTS_RE.match(p.name):
                # a .safetensors file wins over a .pt of the same step
                key = (int(m.group(1)), m.group(2) == "safetensors")
                found[key] = p
        if not found:
            raise CheckpointError(
                f"{folder}: no model_step_<N>.safetensors or model_step_<N>.pt weights"
            )
        return PretrainCache(folder, folder / MODEL_CONFIG, found[max(found)])
    raise RunNotFoundError(
        f"cannot find the target's pretrain run {spec.run_path} ({config.path}: "
        f"target.spec.run_path): tried {'; '.join(tried)}. Fix: put pretrain_cache/ beside "
        "runs/ in PARAM_DECOMP_OUT_DIR"
    )


def read_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` (safetensors) or ``.pt`` (torch, weights only)."""
    if path.suffix == ".pt":
        return read_checkpoint(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path}: reading safetensors needs the safetensors package: "
            "pip install 'qkcheck[param-decomp]'"
        ) from None
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError on bad files
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e


def load_pretrained_target(
    config: LaunchConfig, cache: PretrainCache
) -> tuple[TargetModel, dict[str, Any]]:
    """The LlamaSimpleMLP (or other qkcheck model) target, weights cast to weights_dtype."""
    class_name = config.target.spec.model_class
    model_config = parse_model_config(read_yaml(cache.model_config), cache.model_config, class_name)
    dtype = DTYPES[config.target.weights_dtype]
    state = {k: v.to(dtype) for k, v in read_weights(cache.weights).items()}
    try:
        model = build_target_model(
            class_name,
            model_config,
            state,
            source=str(cache.weights),
            config_source=str(cache.model_config),
        )
    except UnsupportedError as e:
        raise UnsupportedError(f"{config.path}: field 'target.spec.model_class': {e}") from e
    return model, model_config


def build_hf_target(config: LaunchConfig) -> tuple[TargetModel, dict[str, Any]]:
    """The transformers target of ``target.spec.kind: hf``: class ``target.spec.model_class``
    (e.g. ``transformers.Qwen3ForCausalLM``, see :mod:`qkcheck.models.hf`) built from the
    snapshot of ``target.spec.model_name`` (a local folder or the HF hub cache, see
    :func:`~qkcheck.models.hf_hub.find_snapshot`), its safetensors rounded to
    ``weights_dtype``. Returns the model and its ``config.json``."""
    from qkcheck.models.hf import (
        HFTarget,
        hf_arch,
        is_hf_class,
        read_hf_config,
        read_snapshot_weights,
    )
    from qkcheck.models.hf_hub import find_snapshot

    spec = config.target.spec
    if not is_hf_class(spec.model_class):
        raise UnsupportedError(
            f"{config.path}: field 'target.spec.model_class': {spec.model_class!r} is not a "
            "transformers class (expected e.g. transformers.LlamaForCausalLM)"
        )
    hf_arch(spec.model_class, f"{config.path}: field 'target.spec.model_class'")  # before lookup
    if config.decomposition.sites.kind != "glu_transformer":
        raise ConfigError(
            f"{config.path}: field 'decomposition.sites.kind': HF targets are decomposed as "
            f"'glu_transformer' sites, not {config.decomposition.sites.kind!r}",
            field="decomposition.sites.kind",
        )
    snapshot = find_snapshot(spec.model_name, near=config.path.parent)
    dtype = DTYPES[config.target.weights_dtype]
    state = {k: v.to(dtype) for k, v in read_snapshot_weights(snapshot).items()}
    model = HFTarget.build(spec.model_class, snapshot, state, source=str(snapshot))
    return model, read_hf_config(snapshot)
