"""The Run object on the genuine spd run: target logits and CI match spd's own, and bad runs
fail at load with one clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from qkcheck.errors import (
    ConfigError,
    QKCheckError,
    RunNotFoundError,
    SamplesError,
    UnsupportedError,
)
from qkcheck.runs import load_run, resolve
from tests.conftest import (
    GENUINE,
    GENUINE_OUT,
    GENUINE_PRETRAIN_DIR,
    GENUINE_RUN_DIR,
    GENUINE_RUN_ID,
)

CAUSAL = torch.tril(torch.ones(64, 64, dtype=torch.bool))


@pytest.fixture(scope="module")
def reference_logits() -> dict[int, torch.Tensor]:
    return torch.load(GENUINE / "reference" / "reference_logits.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_ci() -> dict[str, dict]:
    return torch.load(GENUINE / "reference" / "reference_ci_sm.pt", weights_only=True)


def _edit_config(run_dir: Path, **changes: object) -> None:
    path = run_dir / "final_config.yaml"
    raw = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_the_genuine_run_describes_itself(genuine_run):
    assert (genuine_run.name, genuine_run.step) == (GENUINE_RUN_ID, 400)
    assert genuine_run.files.checkpoint == GENUINE_RUN_DIR / "model_400.pth"
    assert genuine_run.files.pretrain_dir == GENUINE_PRETRAIN_DIR
    assert genuine_run.files.tokenizer == GENUINE_PRETRAIN_DIR / "tokenizer.json"
    assert genuine_run.config.ci_config.fn_type == "shared_mlp"
    assert genuine_run.model_config["n_key_value_heads"] == 2
    assert len(genuine_run.module_paths) == 12
    assert [
        (s.layer, s.q_path, s.k_path, s.n_head, s.n_kv_heads, s.head_dim)
        for s in genuine_run.layers
    ] == [
        (0, "h.0.attn.q_proj", "h.0.attn.k_proj", 4, 2, 16),
        (1, "h.1.attn.q_proj", "h.1.attn.k_proj", 4, 2, 16),
    ]
    assert genuine_run.samples is None


def test_target_logits_equal_spds_own_attention(genuine_run, genuine_tokens, reference_logits):
    logits = genuine_run.target_attention_logits(genuine_tokens)
    assert sorted(logits) == [0, 1]
    for layer, ref in reference_logits.items():
        assert logits[layer].shape == (8, 4, 64, 64)
        torch.testing.assert_close(logits[layer][..., CAUSAL], ref[..., CAUSAL], rtol=0, atol=1e-5)


def test_causal_importances_equal_spds_lower_leaky_ci(genuine_run, genuine_tokens, reference_ci):
    capture = genuine_run.capture(genuine_tokens)
    for layer, x in reference_ci["attn_inputs"].items():
        torch.testing.assert_close(capture.attn_inputs[layer], x, rtol=0, atol=1e-5)
    ci = genuine_run.causal_importances(genuine_tokens)
    assert set(ci) == set(genuine_run.module_paths)
    for path, ref in reference_ci["ci_lower_leaky"].items():
        assert ci[path].shape == ref.shape
        torch.testing.assert_close(ci[path], ref, rtol=0, atol=1e-5)
        V, _ = genuine_run.components(path)
        acts = capture.module_inputs[path] @ V
        torch.testing.assert_close(acts, reference_ci["component_acts"][path], rtol=0, atol=1e-4)


@pytest.mark.parametrize("path", ["h.0.attn.q_proj", "h.1.attn.k_proj"])
def test_target_weight_and_components_give_the_weight_delta(genuine_run, path):
    W, bias = genuine_run.target_weight(path)
    V, U = genuine_run.components(path)
    assert bias is None
    assert W.shape == (U.shape[1], V.shape[0])
    ratio = float((W - (V @ U).T).norm() / W.norm())
    assert 0.05 < ratio < 0.12  # the README's ‖Δ‖/‖W‖ for q/k


def test_an_undecomposed_module_is_named(genuine_run):
    with pytest.raises(
        QKCheckError,
        match=r"module 'h.0.rms_1' is not decomposed; decomposed modules: h.0.attn.q_proj",
    ):
        genuine_run.components("h.0.rms_1")


def test_token_labels_come_from_the_tokenizer_vocab(genuine_run, genuine_tokens):
    assert genuine_run.token_labels(genuine_tokens[0, :3]) == ["t299", "t6", "t477"]
    assert genuine_run.token_labels([0, 1, 9999]) == ["[UNK]", "[EOS]", "9999"]


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (
            torch.zeros(2, 65, dtype=torch.long),
            "samples have 65 tokens, longer than the model's context n_ctx=64",
        ),
        (
            torch.full((1, 4), 512),
            r"token id 512 at sample 0, position 0 is out of vocabulary: ids must lie in \[0, "
            r"512\)",
        ),
    ],
    ids=["too-long", "out-of-vocab"],
)
def test_bad_tokens_are_refused_before_the_forward_pass(genuine_run, tokens, message):
    with pytest.raises(SamplesError, match=f"^tokens: {message}"):
        genuine_run.capture(tokens)


# --- every way to name the run ---------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        GENUINE_RUN_ID,
        f"wandb:goodfire/spd/runs/{GENUINE_RUN_ID}",
        f"https://wandb.ai/goodfire/spd/runs/{GENUINE_RUN_ID}",
        str(GENUINE_RUN_DIR / "model_400.pth"),
        f"{GENUINE_RUN_DIR}@400",
    ],
)
def test_load_run_accepts_every_reference_form(monkeypatch, source):
    monkeypatch.setenv("SPD_OUT_DIR", str(GENUINE_OUT))
    run = load_run(source)
    assert (run.name, run.step, run.files.pretrain_dir) == (
        GENUINE_RUN_ID,
        400,
        GENUINE_PRETRAIN_DIR,
    )


def test_the_top_level_package_exports_load_run():
    import qkcheck

    assert qkcheck.load_run is load_run
    assert qkcheck.RunNotFoundError is RunNotFoundError


def test_the_demo_run_loads_with_its_shipped_samples(monkeypatch, spd_out_copy, genuine_tokens):
    torch.save(genuine_tokens[:2].clone(), spd_out_copy / "spd" / GENUINE_RUN_ID / "samples.pt")
    monkeypatch.setattr(resolve, "DEMO_ROOT", spd_out_copy)
    run = load_run("demo")
    assert run.files.pretrain_dir == spd_out_copy / "pretrain_cache" / "spd-t-5eed0000"
    assert run.samples is not None
    assert torch.equal(run.samples, genuine_tokens[:2])


# --- the target architecture -----------------------------------------------------------------


@pytest.fixture
def lone_run(tmp_path: Path) -> Path:
    """The run directory alone, with no pretrain run anywhere qkcheck looks."""
    run_dir = tmp_path / "lone" / GENUINE_RUN_ID
    shutil.copytree(GENUINE_RUN_DIR, run_dir)
    return run_dir


def test_an_unfound_pretrain_run_says_how_to_override_it(lone_run):
    with pytest.raises(
        RunNotFoundError,
        match=r"(?s)cannot find the target model's pretrain run "
        r"'wandb:goodfire/spd/runs/t-5eed0000'.*pretrain=PATH",
    ):
        load_run(lone_run)


@pytest.mark.parametrize(
    "pretrain",
    [GENUINE_PRETRAIN_DIR, GENUINE_PRETRAIN_DIR / "model_step_2499.pt"],
    ids=["dir", "checkpoint"],
)
def test_the_pretrain_run_can_be_given_explicitly(lone_run, pretrain):
    run = load_run(lone_run, pretrain=pretrain)
    assert run.files.model_config == GENUINE_PRETRAIN_DIR / "model_config.yaml"
    assert len(run.layers) == 2


def test_the_architecture_is_read_from_a_pretrain_final_config_without_model_config(
    lone_run, tmp_path
):
    pre = tmp_path / "pre"
    shutil.copytree(GENUINE_PRETRAIN_DIR, pre)
    (pre / "model_config.yaml").unlink()
    run = load_run(lone_run, pretrain=pre)
    assert run.files.model_config == pre / "final_config.yaml"
    assert run.model_config["n_head"] == 4


def test_a_config_naming_no_pretrained_model_is_refused(lone_run):
    _edit_config(lone_run, pretrained_model_name=None, pretrained_model_path=None)
    with pytest.raises(
        ConfigError,
        match=r"final_config.yaml: neither field 'pretrained_model_name' nor "
        r"'pretrained_model_path' is set",
    ):
        load_run(lone_run)


def test_an_unknown_model_class_is_refused_at_load(lone_run):
    _edit_config(lone_run, pretrained_model_class="spd.pretrain.models.mamba.Mamba")
    with pytest.raises(
        UnsupportedError,
        match=r"final_config.yaml: field 'pretrained_model_class': target model class "
        r"'spd.pretrain.models.mamba.Mamba' is not supported; supported: GPT2Simple",
    ):
        load_run(lone_run, pretrain=GENUINE_PRETRAIN_DIR)


def test_an_unknown_ci_type_fails_only_when_ci_is_asked_for(lone_run, genuine_tokens):
    _edit_config(
        lone_run, ci_config={"mode": "layerwise", "fn_type": "fancy_mlp", "hidden_dims": [64]}
    )
    run = load_run(lone_run, pretrain=GENUINE_PRETRAIN_DIR)
    assert sorted(run.target_attention_logits(genuine_tokens[:1])) == [0, 1]  # weighted mode works
    with pytest.raises(
        UnsupportedError,
        match=r"final_config.yaml: field 'ci_config': CI function type 'fancy_mlp' "
        r"\(mode 'layerwise'\) is not supported",
    ):
        run.causal_importances(genuine_tokens[:1])


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        ({"sigmoid_type": "tanh_ish"}, "sigmoid_type", r"sigmoid_type 'tanh_ish' is not supported"),
        (
            {"ci_config": {"mode": "layerwise", "fn_type": "global_shared_mlp"}},
            "ci_config",
            r"CI function type 'global_shared_mlp' \(mode 'layerwise'\)",
        ),
    ],
)
def test_an_unsupported_ci_setting_names_its_field_as_data(
    lone_run, genuine_tokens, edit, field, message
):
    _edit_config(lone_run, **edit)
    run = load_run(lone_run, pretrain=GENUINE_PRETRAIN_DIR)
    with pytest.raises(
        UnsupportedError, match=rf"final_config.yaml: field '{field}': {message}"
    ) as e:
        run.causal_importances(genuine_tokens[:1])
    assert e.value.field == field


def test_a_checkpoint_without_target_weights_takes_them_from_the_pretrain_run(
    lone_run, genuine_run, genuine_tokens
):
    state = torch.load(lone_run / "model_400.pth", weights_only=True)
    torch.save(
        {k: v for k, v in state.items() if not k.startswith("target_model.")},
        lone_run / "model_400.pth",
    )
    run = load_run(lone_run, pretrain=GENUINE_PRETRAIN_DIR)
    expected = genuine_run.target_attention_logits(genuine_tokens[:2])
    for layer, logits in run.target_attention_logits(genuine_tokens[:2]).items():
        torch.testing.assert_close(logits, expected[layer], rtol=0, atol=0)
