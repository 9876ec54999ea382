"""Write runs in spd's on-disk layout: the one writer behind ``tools/build_demo.py`` (the
embedded demo run) and ``bench/make_reference_run.py`` (the synthetic reference-scale run).

An SPD run folder holds ``final_config.yaml`` (spd's ``Config``), ``model_<step>.pth`` (one
state dict: ``target_model.*``, ``_components.<path-with-dashes>.{V,U}``,
``ci_fn._ci_fns.<path-with-dashes>.layers.<i>.{W,b}``), ``samples.pt`` (int64 token ids)
and optionally ``metrics.jsonl``; its target's pretrain folder holds ``model_config.yaml``,
``final_config.yaml``, ``model_step_<N>.pt`` and optionally a tokenizer's JSON files.

Every writer here returns ``{relative path: bytes}``; :func:`write_files` writes such a map
atomically (qkcheck's ``write_atomic``) and removes stale files from the folders it wrote.
Bytes are deterministic: the same tensors and configs give the same files.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from qkcheck.util import write_atomic

MODEL_CLASS = "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP"


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def yaml_bytes(obj: Any) -> bytes:
    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).encode()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def dashed(path: str) -> str:
    """spd's ModuleDict key of a module path: ``h.0.attn.q_proj`` → ``h-0-attn-q_proj``."""
    return path.replace(".", "-")


def llama_simple_mlp_config(
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_kv_heads: int,
    n_ctx: int,
    vocab_size: int,
    n_intermediate: int,
) -> dict[str, Any]:
    """``model_config.yaml`` of spd's LlamaSimpleMLP (keys sorted, as spd dumps them)."""
    fields = {
        "attn_bias": False,
        "block_size": n_ctx,
        "flash_attention": False,
        "mlp_bias": False,
        "model_type": "LlamaSimpleMLP",
        "n_ctx": n_ctx,
        "n_embd": n_embd,
        "n_head": n_head,
        "n_intermediate": n_intermediate,
        "n_key_value_heads": n_kv_heads,
        "n_layer": n_layer,
        "rms_norm_eps": 1.0e-6,
        "rotary_adjacent_pairs": False,
        "rotary_base": 10000,
        "rotary_dim": n_embd // n_head,
        "use_grouped_query_attention": True,
        "vocab_size": vocab_size,
    }
    return dict(sorted(fields.items()))


def spd_state(
    target: Mapping[str, Tensor],
    components: Mapping[str, tuple[Tensor, Tensor]],
    ci_layers: Mapping[str, Sequence[tuple[Tensor, Tensor]]],
) -> dict[str, Tensor]:
    """One SPD checkpoint's state dict, with spd's keys: the target's tensors under
    ``target_model.``, per module path ``(V, U)`` and the CI function's affine layers
    ``[(W, b), …]`` (``W`` stored ``(in, out)``, at the even ``layers.<i>`` indices)."""
    state = {f"target_model.{k}": v for k, v in target.items()}
    for path, (V, U) in components.items():
        state[f"_components.{dashed(path)}.V"] = V
        state[f"_components.{dashed(path)}.U"] = U
    for path, layers in ci_layers.items():
        for i, (W, b) in enumerate(layers):
            state[f"ci_fn._ci_fns.{dashed(path)}.layers.{2 * i}.W"] = W
            state[f"ci_fn._ci_fns.{dashed(path)}.layers.{2 * i}.b"] = b
    return state


def spd_run_files(
    config: Mapping[str, Any],
    state: Mapping[str, Tensor],
    step: int,
    samples: Tensor,
    metrics: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, bytes]:
    """An SPD run folder's files: config, ``model_<step>.pth``, metrics, samples."""
    files = {
        "final_config.yaml": yaml_bytes(dict(config)),
        f"model_{step}.pth": torch_bytes({k: v.detach().clone() for k, v in state.items()}),
    }
    if metrics is not None:
        files["metrics.jsonl"] = "".join(json.dumps(m) + "\n" for m in metrics).encode()
    files["samples.pt"] = torch_bytes(samples.to(torch.int64).clone())
    return files


def pretrain_run_files(
    model_config: Mapping[str, Any],
    train_config: Mapping[str, Any],
    state: Mapping[str, Tensor],
    step: int,
    tokenizer: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, bytes]:
    """A pretrain folder's files: model and training configs, ``model_step_<step>.pt`` and
    the tokenizer's JSON files (name → content), if any."""
    files = {
        "model_config.yaml": yaml_bytes(dict(model_config)),
        "final_config.yaml": yaml_bytes(dict(train_config)),
        f"model_step_{step}.pt": torch_bytes({k: v.detach().clone() for k, v in state.items()}),
    }
    for name, content in (tokenizer or {}).items():
        files[name] = json_bytes(content)
    return files


def under(folder: str, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """``files`` with ``folder/`` put in front of every path."""
    return {f"{folder}/{name}": data for name, data in files.items()}


def write_files(out: Path, files: Mapping[str, bytes]) -> None:
    """Write every file atomically, then remove files in the same folders that were not
    written now (a stale ``model_<step>.pth`` would otherwise shadow the new one)."""
    for rel, data in files.items():
        write_atomic(out / rel, data)
    for folder in {(out / rel).parent for rel in files}:
        written = {(out / rel).name for rel in files if (out / rel).parent == folder}
        for stale in folder.iterdir():
            if stale.is_file() and stale.name not in written:
                stale.unlink()
