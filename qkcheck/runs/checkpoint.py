"""SPD checkpoints: read safely, migrate old key names, split and check against the config.

A checkpoint is a plain ``torch.save`` of spd's ``ComponentModel.state_dict()``, read here
with ``torch.load(weights_only=True)`` only: no pickled code is ever executed. Its keys:

* ``target_model.<param>`` — the target model's weights, exactly those decomposed;
* ``_components.<module path, '.'→'-'>.V`` (``d_in × C``), ``.U`` (``C × d_out``) and
  ``.bias`` (the target Linear's bias, when it has one), so the component weight of a
  Linear is ``(V @ U).T`` (``d_out × d_in``, like ``W``);
* ``ci_fn._ci_fns.<path with dashes>.*`` (layerwise CI) or ``ci_fn._global_ci_fn.*`` (global).
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qkcheck.errors import CheckpointError
from qkcheck.runs.config import ModulePattern

TARGET_PREFIX = "target_model."
COMPONENTS_PREFIX = "_components."
CI_PREFIX = "ci_fn."
LAYERWISE_CI_PREFIX = "ci_fn._ci_fns."
GLOBAL_CI_PREFIX = "ci_fn._global_ci_fn."


@dataclass(frozen=True)
class Components:
    """One decomposed module: ``V`` (``d_in × comp``), ``U`` (``comp × d_out``), bias or None."""

    V: Tensor
    U: Tensor
    bias: Tensor | None = None


@dataclass(frozen=True)
class SplitCheckpoint:
    """A checked state dict, split by owner."""

    target: dict[str, Tensor]  # target-model parameters, prefix removed
    components: dict[str, Components]  # by module path (with dots)
    ci_state: dict[str, Tensor]  # CI-function parameters, "ci_fn." removed


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """A state dict from ``path``: weights-only load, old key names migrated, all finite."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # torch warns about pickle protocols it did not write; the type check below is ours.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any pickle that would import or call code.
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        if what is None:  # no code referenced: bytes torch cannot read, not a refusal
            raise CheckpointError(
                f"{path}: unreadable checkpoint: {_why_unreadable(path)}"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load: the file is a pickle that needs code execution "
            f"(it references {what.group(1)}); "
            "qkcheck reads checkpoints with torch.load(weights_only=True) only. Expected a plain "
            "state dict of tensors as spd writes with torch.save(model.state_dict())"
        ) from None  # torch's own message advises weights_only=False: never repeat that
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... on a broken file
        raise CheckpointError(f"{path}: unreadable checkpoint: {_why_unreadable(path)}") from e
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a dict of tensors), got {type(data).__name__}"
        )
    state = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{path}: key {key!r} holds {type(value).__name__}, expected a Tensor "
                "(a state dict holds only tensors)"
            )
        state[key] = value
    check_finite(state, path)
    return migrate_keys(state)


def _why_unreadable(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(8)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"truncated or corrupted zip archive ({size} bytes, the zip directory is missing)"
    if not head.startswith(b"PK"):
        return (
            f"not a torch.save zip archive (starts with {head!r}); expected a file written "
            "by torch.save"
        )
    return f"corrupted torch.save archive ({size} bytes)"


def check_finite(state: Mapping[str, Tensor], path: Path) -> None:
    """CheckpointError naming the first key that holds NaN or Inf."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            n_nan = int(torch.isnan(value).sum())
            n_inf = int(torch.isinf(value).sum())
            raise CheckpointError(
                f"{path}: key {key!r} {tuple(value.shape)} holds {n_nan} NaN and {n_inf} Inf "
                f"of {value.numel()} values; expected finite weights"
            )


def migrate_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename keys of older checkpoints, as spd's ``handle_deprecated_state_dict_keys_`` does.

    ``_gates.`` → ``_ci_fns.``; ``patched_model.`` → ``target_model.``;
    ``*.original.weight`` → ``*.weight``; ``target_model.<path>.components.{U,V}`` →
    ``_components.<path-with-dashes>.{U,V}``; top-level ``_ci_fns.`` → ``ci_fn._ci_fns.``.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key.replace("_gates.", "_ci_fns.")
        if new.startswith("patched_model."):
            new = TARGET_PREFIX + new.removeprefix("patched_model.")
        if new.endswith(".original.weight"):
            new = new.removesuffix(".original.weight") + ".weight"
        if new.endswith((".components.U", ".components.V")):
            module = new.removeprefix(TARGET_PREFIX).rsplit(".components.", 1)[0]
            new = f"{COMPONENTS_PREFIX}{module.replace('.', '-')}.{new[-1]}"
        if new.startswith("_ci_fns."):
            new = CI_PREFIX + new
        out[new] = value
    return out


def weight_modules(target: Mapping[str, Tensor]) -> list[str]:
    """Module paths with a 2-D ``weight`` (Linear, Embedding), in state-dict order."""
    return [
        k.removesuffix(".weight")
        for k, v in target.items()
        if k.endswith(".weight") and v.ndim == 2
    ]


def split_checkpoint(
    state: Mapping[str, Tensor],
    modules: Mapping[str, ModulePattern],
    ci_mode: str,
    path: Path,
) -> SplitCheckpoint:
    """Split ``state`` and check it against the expanded ``module_info`` (``modules``).

    Every decomposed module needs ``V`` of shape ``(d_in, C)`` and ``U`` of shape
    ``(C, d_out)`` with ``C`` from its pattern, agreeing with the target weight; there may be
    no components for other modules, and CI-function weights must match ``ci_mode``.
    """
    target: dict[str, Tensor] = {}
    by_module: dict[str, dict[str, Tensor]] = {}
    ci_state: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(TARGET_PREFIX):
            target[key.removeprefix(TARGET_PREFIX)] = value
        elif key.startswith(COMPONENTS_PREFIX):
            module, _, name = key.removeprefix(COMPONENTS_PREFIX).rpartition(".")
            by_module.setdefault(module, {})[name] = value
        elif key.startswith(CI_PREFIX):
            ci_state[key.removeprefix(CI_PREFIX)] = value
        else:
            raise CheckpointError(
                f"{path}: unexpected key {key!r}; an SPD checkpoint holds only "
                f"'{TARGET_PREFIX}*', '{COMPONENTS_PREFIX}*' and '{CI_PREFIX}*' keys"
            )
    if not target:
        raise CheckpointError(
            f"{path}: missing keys '{TARGET_PREFIX}*' (the target model's weights)"
        )

    dashed = {p.replace(".", "-"): p for p in modules}
    extra = sorted(set(by_module) - set(dashed))
    if extra:
        raise CheckpointError(
            f"{path}: unexpected key '{COMPONENTS_PREFIX}{extra[0]}.V': module_info in the "
            f"config decomposes no module {extra[0].replace('-', '.')!r}"
            + (f" ({len(extra)} such modules: {extra})" if len(extra) > 1 else "")
        )
    components = {
        module: _check_components(module, info, by_module.get(dash, {}), target, path)
        for dash, (module, info) in zip(dashed, modules.items(), strict=True)
    }
    _check_ci_keys(ci_state, dashed, ci_mode, path)
    return SplitCheckpoint(target, components, ci_state)


def _check_components(
    module: str,
    info: ModulePattern,
    tensors: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    path: Path,
) -> Components:
    prefix = f"{COMPONENTS_PREFIX}{module.replace('.', '-')}"
    for name in ("V", "U"):
        if name not in tensors:
            raise CheckpointError(
                f"{path}: missing key '{prefix}.{name}' for module {module!r} "
                f"(module_info pattern {info.pattern!r}, C={info.C})"
            )
    V, U = tensors["V"], tensors["U"]
    if V.ndim != 2 or U.ndim != 2 or V.shape[1] != info.C or U.shape[0] != info.C:
        raise CheckpointError(
            f"{path}: shape mismatch for module {module!r}: module_info pattern "
            f"{info.pattern!r} gives C={info.C}, so expected {prefix}.V (d_in, {info.C}) and "
            f"{prefix}.U ({info.C}, d_out), got V {tuple(V.shape)} and U {tuple(U.shape)}"
        )
    d_in, d_out = V.shape[0], U.shape[1]
    if info.identity:
        if d_in != d_out:
            raise CheckpointError(
                f"{path}: identity module {module!r} needs d_in == d_out, got "
                f"V {tuple(V.shape)} and U {tuple(U.shape)}"
            )
    else:
        weight_key = f"{module}.weight"
        if weight_key not in target:
            raise CheckpointError(
                f"{path}: missing key '{TARGET_PREFIX}{weight_key}': the target weight of "
                f"decomposed module {module!r}"
            )
        shape = tuple(target[weight_key].shape)
        # Linear: W is (d_out, d_in); Embedding: W is (vocab = d_in, d_out).
        if shape not in ((d_out, d_in), (d_in, d_out)):
            raise CheckpointError(
                f"{path}: shape mismatch for module {module!r}: target weight "
                f"'{TARGET_PREFIX}{weight_key}' is {shape}, but its components V "
                f"{tuple(V.shape)} and U {tuple(U.shape)} need ({d_out}, {d_in})"
            )
    return Components(V, U, tensors.get("bias"))


def _check_ci_keys(
    ci_state: Mapping[str, Tensor], dashed: Mapping[str, str], ci_mode: str, path: Path
) -> None:
    layerwise = LAYERWISE_CI_PREFIX.removeprefix(CI_PREFIX)
    global_ = GLOBAL_CI_PREFIX.removeprefix(CI_PREFIX)
    has_global = any(k.startswith(global_) for k in ci_state)
    ci_modules = {
        k.removeprefix(layerwise).split(".", 1)[0] for k in ci_state if k.startswith(layerwise)
    }
    if ci_mode not in ("layerwise", "global"):
        return  # qkcheck.ci reports a mode it does not know when CI is asked for
    if ci_mode == "global":
        if not has_global:
            raise CheckpointError(
                f"{path}: missing keys '{GLOBAL_CI_PREFIX}*': the config's ci_config.mode is "
                f"'global' (checkpoint has layerwise CI weights for {len(ci_modules)} modules)"
            )
        return
    if has_global:
        raise CheckpointError(
            f"{path}: unexpected keys '{GLOBAL_CI_PREFIX}*': the config's ci_config.mode is "
            "'layerwise'"
        )
    for dash, module in dashed.items():
        if dash not in ci_modules:
            raise CheckpointError(
                f"{path}: missing keys '{LAYERWISE_CI_PREFIX}{dash}.*': the layerwise CI "
                f"function of module {module!r}"
            )
    extra = sorted(ci_modules - set(dashed))
    if extra:
        raise CheckpointError(
            f"{path}: unexpected keys '{LAYERWISE_CI_PREFIX}{extra[0]}.*': module_info in the "
            f"config decomposes no module {extra[0].replace('-', '.')!r}"
        )
    unknown = sorted(k for k in ci_state if not k.startswith(layerwise))
    if unknown:
        raise CheckpointError(f"{path}: unexpected key '{CI_PREFIX}{unknown[0]}'")
