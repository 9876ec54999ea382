"""Lenient config reading: needed fields validated, unknown ignored, old formats migrated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qkcheck.errors import ConfigError
from qkcheck.runs.config import (
    CIConfig,
    ModulePattern,
    expand_module_info,
    parse_model_config,
    parse_spd_config,
    read_spd_config,
    read_yaml,
)
from tests.conftest import GENUINE_PRETRAIN_DIR, GENUINE_RUN_DIR

CONFIG = GENUINE_RUN_DIR / "final_config.yaml"
WHERE = Path("final_config.yaml")


@pytest.fixture(scope="module")
def genuine_raw() -> dict:
    """The genuine run's config as a dict (read-only: copy before editing)."""
    return yaml.safe_load(CONFIG.read_text())


def test_the_genuine_config_gives_the_fields_qkcheck_needs():
    config = read_spd_config(CONFIG)
    assert config.pretrained_model_class == "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP"
    assert config.pretrained_reference == "wandb:goodfire/spd/runs/t-5eed0000"
    assert config.module_info[:2] == (
        ModulePattern(module_pattern="h.*.attn.q_proj", C=48),
        ModulePattern(module_pattern="h.*.attn.k_proj", C=32),
    )
    assert config.ci_config == CIConfig(mode="layerwise", fn_type="shared_mlp", hidden_dims=(64,))
    assert config.ci_config.as_dict() == {
        "mode": "layerwise",
        "fn_type": "shared_mlp",
        "hidden_dims": [64],
    }
    assert config.sigmoid_type == "leaky_hard"
    assert config.task_config is not None
    assert (config.task_config.column_name, config.task_config.max_seq_len) == ("input_ids", 64)
    assert config.task_config.is_tokenized


def test_unknown_fields_are_ignored(genuine_raw):
    config = parse_spd_config({**genuine_raw, "a_field_from_the_future": {"x": 1}}, WHERE)
    assert config.sigmoid_type == "leaky_hard"


def test_old_configs_are_migrated_as_spd_migrates_them(genuine_raw):
    old = {k: v for k, v in genuine_raw.items() if k not in ("module_info", "ci_config")}
    old |= {
        "C": 40,
        "target_module_patterns": ["h.*.attn.q_proj", "h.*.attn.k_proj"],
        "ci_fn_type": "vector_mlp",
        "ci_fn_hidden_dims": [16],
        "pretrained_model_class": "simple_stories_train.models.llama_simple_mlp.LlamaSimpleMLP",
        "pretrained_model_name_hf": "wandb:goodfire/spd/runs/t-5eed0000",
    }
    del old["pretrained_model_name"]
    config = parse_spd_config(old, WHERE)
    assert config.module_info == (
        ModulePattern(module_pattern="h.*.attn.q_proj", C=40),
        ModulePattern(module_pattern="h.*.attn.k_proj", C=40),
    )
    assert config.ci_config == CIConfig(mode="layerwise", fn_type="vector_mlp", hidden_dims=(16,))
    assert config.pretrained_model_class == "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP"
    assert config.pretrained_model_name == "wandb:goodfire/spd/runs/t-5eed0000"


@pytest.mark.parametrize(
    ("old", "expected"),
    [
        (
            {"use_global_ci": True},
            CIConfig(mode="global", fn_type="global_shared_mlp", hidden_dims=(8,)),
        ),
        ({"ci_fn_type": "mlp"}, CIConfig(mode="layerwise", fn_type="mlp", hidden_dims=(8,))),
        (
            {"ci_fn_type": "global_shared_mlp", "ci_fn_hidden_dims": [4]},
            CIConfig(mode="global", fn_type="global_shared_mlp", hidden_dims=(4,)),
        ),
    ],
)
def test_old_ci_fields_map_to_ci_config(genuine_raw, old, expected):
    raw = {k: v for k, v in genuine_raw.items() if k != "ci_config"} | old
    assert parse_spd_config(raw, WHERE).ci_config == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"pretrained_model_class": None},
            "field 'pretrained_model_class' must be a string, got None",
        ),
        ({"module_info": []}, "field 'module_info' must be a non-empty list"),
        (
            {"module_info": [{"module_pattern": "h.*.attn.q_proj", "C": -3}]},
            r"field 'module_info\[0\].C' must be a positive integer, got -3",
        ),
        (
            {"module_info": [{"C": 3}]},
            r"required field 'module_info\[0\].module_pattern' is missing",
        ),
        ({"ci_config": "shared_mlp"}, "field 'ci_config' must be a mapping, got 'shared_mlp'"),
        (
            {"ci_config": {"mode": "layerwise", "hidden_dims": [64]}},
            "required field 'ci_config.fn_type' is missing",
        ),
        (
            {"ci_config": {"fn_type": "mlp", "hidden_dims": "64"}},
            "field 'ci_config.hidden_dims' must be a list, got '64'",
        ),
        (
            {"task_config": {"max_seq_len": "long"}},
            "field 'task_config.max_seq_len' must be an integer, got 'long'",
        ),
        ({"C": 4}, "field 'target_module_patterns' is required with the old 'C'"),
        (
            {"ci_config": {"fn_type": "mlp", "hidden_dims": [64, -1]}},
            r"field 'ci_config.hidden_dims\[1\]' must be a non-negative integer, got -1",
        ),
        ({"sigmoid_type": 3}, "field 'sigmoid_type' must be a string, got 3"),
    ],
    ids=[
        "class",
        "empty-modules",
        "negative-C",
        "no-pattern",
        "ci-not-mapping",
        "no-fn-type",
        "dims",
        "task",
        "old-C",
        "negative-dim",
        "sigmoid",
    ],
)
def test_a_bad_field_names_file_field_and_value(genuine_raw, change, message):
    with pytest.raises(ConfigError, match=rf"^final_config.yaml: {message}"):
        parse_spd_config({**genuine_raw, **change}, WHERE)


def test_the_field_travels_as_data(genuine_raw):
    with pytest.raises(ConfigError) as e:
        parse_spd_config({**genuine_raw, "task_config": {"max_seq_len": 0}}, WHERE)
    assert e.value.field == "task_config.max_seq_len"
    assert "must be a positive integer, got 0" in str(e.value)


def test_a_missing_needed_field_is_named(genuine_raw):
    raw = {k: v for k, v in genuine_raw.items() if k != "pretrained_model_class"}
    with pytest.raises(ConfigError, match="required field 'pretrained_model_class' is missing"):
        parse_spd_config(raw, WHERE)


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "final_config.yaml"
    path.write_text("seed: 0\nmodule_info:\n  - module_pattern: [unclosed\nC: 3\n")
    with pytest.raises(
        ConfigError, match=r"final_config.yaml: malformed YAML at line 4, column 2: "
    ):
        read_yaml(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("- a\n- b\n", "expected a YAML mapping of fields, got list"), ("", "got NoneType")],
)
def test_yaml_that_is_not_a_mapping_is_refused(tmp_path, text, message):
    path = tmp_path / "final_config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_yaml(path)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model_config.yaml: no such file"):
        read_yaml(tmp_path / "model_config.yaml")


def test_model_config_gains_model_type_from_the_class_name():
    raw = {
        k: v
        for k, v in read_yaml(GENUINE_PRETRAIN_DIR / "model_config.yaml").items()
        if k != "model_type"
    }
    config = parse_model_config(raw, WHERE, "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP")
    assert config["model_type"] == "LlamaSimpleMLP"
    assert config["n_head"] == 4


def test_model_config_nested_in_a_pretrain_final_config():
    raw = read_yaml(GENUINE_PRETRAIN_DIR / "final_config.yaml")
    nested = parse_model_config(raw, WHERE, "LlamaSimpleMLP", nested=True)
    assert nested == read_yaml(GENUINE_PRETRAIN_DIR / "model_config.yaml")
    with pytest.raises(ConfigError, match="field 'model' must hold the architecture"):
        parse_model_config({"seed": 0}, WHERE, "LlamaSimpleMLP", nested=True)


# --- module_info patterns --------------------------------------------------------------------

MODULES = [
    "wte",
    "h.0.attn.q_proj",
    "h.0.attn.k_proj",
    "h.1.attn.q_proj",
    "h.1.attn.k_proj",
    "lm_head",
]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("h.*.attn.q_proj", ["h.0.attn.q_proj", "h.1.attn.q_proj"]),
        ("h.*q_proj", ["h.0.attn.q_proj", "h.1.attn.q_proj"]),  # * spans dots
        ("h.1.*", ["h.1.attn.q_proj", "h.1.attn.k_proj"]),
        ("wte", ["wte"]),
    ],
)
def test_module_patterns_expand_with_fnmatch(pattern, expected):
    assert (
        list(expand_module_info([ModulePattern(module_pattern=pattern, C=4)], MODULES, WHERE))
        == expected
    )


def test_a_pattern_matching_nothing_lists_the_modules():
    with pytest.raises(
        ConfigError,
        match=r"module_info pattern 'h.\*.attn.c_attn' \(C=8\) matches no module of the "
        r"target model; its weight modules are: wte, h.0.attn.q_proj",
    ):
        expand_module_info([ModulePattern(module_pattern="h.*.attn.c_attn", C=8)], MODULES, WHERE)


def test_a_module_matched_by_two_patterns_is_refused():
    patterns = [
        ModulePattern(module_pattern="h.*.attn.*", C=8),
        ModulePattern(module_pattern="h.0.attn.q_proj", C=4),
    ]
    with pytest.raises(
        ConfigError,
        match=r"module 'h.0.attn.q_proj' matches two module_info patterns, 'h.\*.attn.\*' and "
        r"'h.0.attn.q_proj'",
    ):
        expand_module_info(patterns, MODULES, WHERE)


def test_identity_patterns_name_an_inserted_module():
    expanded = expand_module_info(
        [ModulePattern(module_pattern="h.0.attn.q_proj", C=4, identity=True)], MODULES, WHERE
    )
    assert list(expanded) == ["h.0.attn.q_proj.pre_identity"]
