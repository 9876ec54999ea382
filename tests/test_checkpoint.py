"""Checkpoints: weights-only reads, key migrations, and every broken file named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qkcheck.errors import CheckpointError
from qkcheck.runs.checkpoint import migrate_keys, read_checkpoint, split_checkpoint, weight_modules
from qkcheck.runs.config import ModulePattern, expand_module_info, read_spd_config
from tests.conftest import GENUINE_RUN_DIR

CHECKPOINT = GENUINE_RUN_DIR / "model_400.pth"


@pytest.fixture(scope="module")
def genuine_state() -> dict[str, torch.Tensor]:
    """The genuine checkpoint's state dict (read-only: build edited copies with dict(...))."""
    return read_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def genuine_modules(genuine_state):
    config = read_spd_config(GENUINE_RUN_DIR / "final_config.yaml")
    target = {
        k.removeprefix("target_model."): v
        for k, v in genuine_state.items()
        if k.startswith("target_model.")
    }
    return expand_module_info(config.module_info, weight_modules(target), config.path)


def _saved(tmp_path: Path, state: object, name: str = "model_1.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_the_genuine_checkpoint_splits_into_target_components_and_ci(
    genuine_state, genuine_modules
):
    split = split_checkpoint(genuine_state, genuine_modules, "layerwise", CHECKPOINT)
    assert list(split.components)[:2] == ["h.0.attn.q_proj", "h.1.attn.q_proj"]
    assert len(split.components) == 12
    q = split.components["h.0.attn.q_proj"]
    assert (tuple(q.V.shape), tuple(q.U.shape), q.bias) == ((64, 48), (48, 64), None)
    assert tuple(split.target["h.0.attn.k_proj.weight"].shape) == (32, 64)
    assert "_ci_fns.h-0-attn-q_proj.layers.0.W" in split.ci_state


def test_old_key_names_are_migrated_as_spd_does(genuine_state):
    def old_name(key: str) -> str:
        if key.startswith("_components."):
            module, name = key.removeprefix("_components.").rsplit(".", 1)
            return f"patched_model.{module.replace('-', '.')}.components.{name}"
        if key.startswith("target_model.") and key.endswith(".weight"):
            key = key.removesuffix(".weight") + ".original.weight"
        key = key.replace("target_model.", "patched_model.")
        return key.replace("ci_fn._ci_fns.", "_gates.")

    old = {old_name(k): v for k, v in genuine_state.items()}
    assert "_gates.h-0-attn-q_proj.layers.0.W" in old
    assert "patched_model.h.0.attn.q_proj.components.V" in old
    assert migrate_keys(old) == genuine_state


def test_a_top_level_ci_fns_key_moves_under_ci_fn():
    assert list(migrate_keys({"_ci_fns.a.layers.0.W": torch.zeros(1)})) == [
        "ci_fn._ci_fns.a.layers.0.W"
    ]


# --- unreadable files ------------------------------------------------------------------------


def test_a_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"model_9.pth: no such checkpoint file"):
        read_checkpoint(tmp_path / "model_9.pth")


def test_a_truncated_checkpoint_is_named_truncated(tmp_path):
    path = tmp_path / "model_400.pth"
    path.write_bytes(CHECKPOINT.read_bytes()[:50_000])
    with pytest.raises(
        CheckpointError,
        match=r"model_400.pth: unreadable checkpoint: truncated or corrupted zip archive "
        r"\(50000 bytes",
    ):
        read_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"step: 400\n", r"not a torch.save zip archive \(starts with b'step: 40'\)"),
        (b"", r"the file is empty \(0 bytes\)"),
    ],
    ids=["text", "empty"],
)
def test_a_file_that_is_no_torch_archive_is_named(tmp_path, content, message):
    path = tmp_path / "model_400.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"model_400.pth: unreadable checkpoint: {message}"):
        read_checkpoint(path)


class _CreatesFile:
    """A pickle payload that would create ``marker`` if unpickling ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_needs_code_execution_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = _saved(tmp_path, {"weight": torch.zeros(2), "payload": _CreatesFile(marker)})
    with pytest.raises(
        CheckpointError,
        match=r"model_1.pth: refused to load: the file is a pickle that needs code execution "
        r"\(it references [\w.]*open\); qkcheck reads checkpoints with "
        r"torch.load\(weights_only=True\) only",
    ):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ([torch.zeros(2)], "expected a state dict \\(a dict of tensors\\), got list"),
        ({"a": torch.zeros(2), "step": 3}, "key 'step' holds int, expected a Tensor"),
    ],
    ids=["list", "int-value"],
)
def test_a_file_that_is_no_state_dict_is_refused(tmp_path, state, message):
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(_saved(tmp_path, state))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_with_their_count(tmp_path, genuine_state, bad):
    state = dict(genuine_state)
    V = state["_components.h-1-attn-k_proj.V"].clone()
    V[3, 5] = bad
    state["_components.h-1-attn-k_proj.V"] = V
    n_nan, n_inf = (1, 0) if bad != bad else (0, 1)
    with pytest.raises(
        CheckpointError,
        match=rf"model_1.pth: key '_components.h-1-attn-k_proj.V' \(64, 32\) holds {n_nan} NaN "
        rf"and {n_inf} Inf of 2048 values; expected finite weights",
    ):
        read_checkpoint(_saved(tmp_path, state))


# --- keys and shapes against the config ------------------------------------------------------


def _split(state, modules, mode="layerwise"):
    return split_checkpoint(state, modules, mode, Path("model_1.pth"))


def test_a_missing_component_key_is_named_with_its_pattern(genuine_state, genuine_modules):
    state = {k: v for k, v in genuine_state.items() if k != "_components.h-1-attn-q_proj.U"}
    with pytest.raises(
        CheckpointError,
        match=r"model_1.pth: missing key '_components.h-1-attn-q_proj.U' for module "
        r"'h.1.attn.q_proj' \(module_info pattern 'h.\*.attn.q_proj', C=48\)",
    ):
        _split(state, genuine_modules)


def test_components_for_a_module_the_config_does_not_decompose_are_refused(
    genuine_state, genuine_modules
):
    state = dict(genuine_state)
    state["_components.h-7-attn-q_proj.V"] = torch.zeros(64, 48)
    with pytest.raises(
        CheckpointError,
        match=r"unexpected key '_components.h-7-attn-q_proj.V': module_info in the config "
        r"decomposes no module 'h.7.attn.q_proj'",
    ):
        _split(state, genuine_modules)


def test_a_key_outside_the_spd_namespaces_is_refused(genuine_state, genuine_modules):
    state = dict(genuine_state) | {"optimizer.step": torch.zeros(1)}
    with pytest.raises(
        CheckpointError, match=r"unexpected key 'optimizer.step'; an SPD checkpoint holds only"
    ):
        _split(state, genuine_modules)


def test_a_checkpoint_without_target_weights_is_refused(genuine_state, genuine_modules):
    state = {k: v for k, v in genuine_state.items() if not k.startswith("target_model.")}
    with pytest.raises(
        CheckpointError, match=r"missing keys 'target_model.\*' \(the target model's weights\)"
    ):
        _split(state, genuine_modules)


def test_a_C_that_disagrees_with_the_tensors_is_a_shape_mismatch(genuine_state, genuine_modules):
    modules = dict(genuine_modules) | {
        "h.0.attn.q_proj": ModulePattern(module_pattern="h.*.attn.q_proj", C=40)
    }
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for module 'h.0.attn.q_proj': module_info pattern "
        r"'h.\*.attn.q_proj' "
        r"gives C=40, so expected _components.h-0-attn-q_proj.V \(d_in, 40\) and "
        r"_components.h-0-attn-q_proj.U \(40, d_out\), got V \(64, 48\) and U \(48, 64\)",
    ):
        _split(genuine_state, modules)


def test_components_that_do_not_fit_the_target_weight_are_a_shape_mismatch(
    genuine_state, genuine_modules
):
    state = dict(genuine_state) | {"target_model.h.0.attn.q_proj.weight": torch.zeros(32, 64)}
    with pytest.raises(
        CheckpointError,
        match=r"target weight 'target_model.h.0.attn.q_proj.weight' is \(32, 64\), but its "
        r"components V \(64, 48\) and U \(48, 64\) need \(64, 64\)",
    ):
        _split(state, genuine_modules)


def test_a_missing_layerwise_ci_function_is_named(genuine_state, genuine_modules):
    state = {
        k: v for k, v in genuine_state.items() if not k.startswith("ci_fn._ci_fns.h-1-attn-k_proj.")
    }
    with pytest.raises(
        CheckpointError,
        match=r"missing keys 'ci_fn._ci_fns.h-1-attn-k_proj.\*': the layerwise CI function of "
        r"module 'h.1.attn.k_proj'",
    ):
        _split(state, genuine_modules)


def test_ci_weights_of_the_other_mode_are_refused(genuine_state, genuine_modules):
    with pytest.raises(
        CheckpointError,
        match=r"missing keys 'ci_fn._global_ci_fn.\*': the config's ci_config.mode is 'global' "
        r"\(checkpoint has layerwise CI weights for 12 modules\)",
    ):
        _split(genuine_state, genuine_modules, mode="global")
    state = dict(genuine_state) | {"ci_fn._global_ci_fn.layers.0.W": torch.zeros(1)}
    with pytest.raises(
        CheckpointError,
        match=r"unexpected keys 'ci_fn._global_ci_fn.\*': the config's ci_config.mode is "
        r"'layerwise'",
    ):
        _split(state, genuine_modules)
