"""Target models: spd's genuine checkpoints reproduce spd's own logits; every class matches a
plain dense reference written here; bad configs and checkpoints fail with pinned messages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from qkcheck.errors import CheckpointError, ConfigError, SamplesError, UnsupportedError
from qkcheck.models import SUPPORTED_MODELS, build_target_model

GENUINE = Path(__file__).parent / "data" / "spd-genuine-small"
PRETRAIN = GENUINE / "spd_out" / "pretrain_cache" / "spd-t-5eed0000"
SPD_RUN = GENUINE / "spd_out" / "spd" / "s-5eed0002"
SPD_CLASS = "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP"


def assert_lower_triangle_close(actual: Tensor, expected: Tensor, atol: float, what: str) -> None:
    """Compare ``(batch, head, query_pos, key_pos)`` logits on key_pos <= query_pos."""
    __tracebackhide__ = True
    n_pos = expected.shape[-1]
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    diff = (actual.double() - expected.double()).abs().masked_fill(~causal, 0.0)
    worst = float(diff.max())
    if worst > atol:
        b, h, i, j = (int(x) for x in torch.unravel_index(diff.argmax(), diff.shape))
        pytest.fail(
            f"{what}: max |diff| {worst:.3g} > {atol:g} at sample {b}, head {h}, "
            f"query_pos {i}, key_pos {j}; {int((diff > atol).sum())} entries off"
        )


# --- the genuine spd run (read-only module fixtures) ------------------------------------------


@pytest.fixture(scope="module")
def genuine_config() -> dict:
    return yaml.safe_load((PRETRAIN / "model_config.yaml").read_text())


@pytest.fixture(scope="module")
def genuine_tokens() -> Tensor:
    return torch.load(GENUINE / "reference" / "tokens.pt", weights_only=True)


@pytest.fixture(scope="module")
def genuine_reference() -> dict[int, Tensor]:
    return torch.load(GENUINE / "reference" / "reference_logits.pt", weights_only=True)


@pytest.fixture(scope="module")
def pretrain_state() -> dict[str, Tensor]:
    return torch.load(PRETRAIN / "model_step_2499.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def spd_target_state() -> dict[str, Tensor]:
    state = torch.load(SPD_RUN / "model_400.pth", map_location="cpu", weights_only=True)
    prefix = "target_model."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("state_name", ["pretrain_state", "spd_target_state"])
def test_llama_simple_mlp_reproduces_spds_own_attention_logits(
    request, state_name, genuine_config, genuine_tokens, genuine_reference
):
    state = request.getfixturevalue(state_name)
    model = build_target_model(SPD_CLASS, genuine_config, state, source=state_name)
    captured = model.capture(genuine_tokens)
    assert sorted(captured.logits) == sorted(genuine_reference) == [0, 1]
    for layer, expected in genuine_reference.items():
        assert captured.logits[layer].shape == expected.shape == (8, 4, 64, 64)
        assert_lower_triangle_close(captured.logits[layer], expected, 1e-5, f"layer {layer}")


def test_attention_inputs_are_what_spds_q_proj_receives(
    genuine_config, pretrain_state, genuine_tokens
):
    model = build_target_model("LlamaSimpleMLP", genuine_config, pretrain_state)
    captured = model.capture(genuine_tokens)
    reference = torch.load(GENUINE / "reference" / "reference_ci_sm.pt", weights_only=True)
    for layer, expected in reference["attn_inputs"].items():
        assert (captured.attn_inputs[layer] - expected).abs().max() <= 1e-5
        assert torch.equal(
            captured.module_inputs[f"h.{layer}.attn.q_proj"], captured.attn_inputs[layer]
        )


def test_attention_specs_describe_the_genuine_model(genuine_config, pretrain_state):
    model = build_target_model(SPD_CLASS, genuine_config, pretrain_state)
    specs = model.attention_specs()
    assert [s.layer for s in specs] == [0, 1]
    spec = specs[1]
    assert (spec.q_path, spec.k_path) == ("h.1.attn.q_proj", "h.1.attn.k_proj")
    assert (spec.n_head, spec.n_kv_heads, spec.head_dim, spec.scale) == (4, 2, 16, 0.25)
    assert spec.rotary is not None
    assert (spec.rotary.rotary_dim, spec.rotary.adjacent_pairs, spec.rotary.n_ctx) == (
        16,
        False,
        64,
    )
    assert (model.n_ctx, model.vocab_size, model.n_layer) == (64, 512, 2)


def test_the_model_factory_reads_the_class_from_model_type(genuine_config, pretrain_state):
    model = build_target_model("", genuine_config, pretrain_state)
    assert type(model).__name__ == "LlamaSimpleMLP"


# --- every supported class against a plain reference -------------------------------------------

BASE = {"vocab_size": 37, "n_layer": 2, "n_embd": 24, "n_head": 4, "block_size": 16}
CASES = {
    "LlamaSimpleMLP-halves-gqa": ("LlamaSimpleMLP", {"n_key_value_heads": 2, "n_intermediate": 40}),
    "LlamaSimpleMLP-adjacent-mha": (
        "LlamaSimpleMLP",
        {"n_key_value_heads": 4, "n_intermediate": 40, "rotary_adjacent_pairs": True},
    ),
    "LlamaSimpleMLP-positions-clamped-at-n_ctx": (
        "LlamaSimpleMLP",
        {"n_key_value_heads": 2, "n_intermediate": 40, "n_ctx": 5, "rotary_base": 50},
    ),
    "LlamaSimple-halves-one-kv-head": (
        "LlamaSimple",
        {"n_key_value_heads": 1, "n_intermediate": 32},
    ),
    "LlamaSimple-adjacent-biases": (
        "LlamaSimple",
        {
            "n_key_value_heads": 2,
            "n_intermediate": 32,
            "rotary_adjacent_pairs": True,
            "attn_bias": True,
            "mlp_bias": True,
            "rotary_dim": 4,  # spd ignores it: rotary always covers the whole head
        },
    ),
    "GPT2Simple": ("GPT2Simple", {}),
}


def config_for(case: str) -> tuple[str, dict]:
    class_name, extra = CASES[case]
    return class_name, {"model_type": class_name, **BASE, "n_ctx": 16, **extra, "unknown": 1}


def random_state(class_name: str, config: dict, seed: int) -> dict[str, Tensor]:
    """Weights far from init (so every term matters), in the checkpoint's key layout."""
    torch.manual_seed(seed)
    template = build_target_model(class_name, config, None).state_dict()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in template.items():
        is_norm_weight = key.endswith(".weight") and value.ndim == 1
        noise = torch.randn(value.shape, generator=gen)
        state[key] = 1 + 0.2 * noise if is_norm_weight else 0.4 * noise
    state["lm_head.weight"] = state["wte.weight"]
    return state


def plain_reference_logits(
    config: dict, state: dict[str, Tensor], tokens: Tensor
) -> dict[int, Tensor]:
    """A dense float64 forward pass written from the architecture's definition: RoPE as complex
    multiplication, grouped heads by explicit index. Returns pre-mask logits per layer."""
    w = {k: v.double() for k, v in state.items()}
    gpt2 = config["model_type"] == "GPT2Simple"
    d, n_head = config["n_embd"], config["n_head"]
    n_kv = n_head if gpt2 else config["n_key_value_heads"]
    hd = d // n_head
    n_pos = tokens.shape[1]

    def linear(x, name):
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    def norm(x, name):
        if gpt2:
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]
        return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * w[name + ".weight"]

    def rope(v):  # v: (batch, pos, heads, hd)
        if gpt2:
            return v
        half = hd // 2
        pos = torch.arange(n_pos).clamp(max=config["n_ctx"] - 1).double()
        theta = 1.0 / config.get("rotary_base", 10000) ** (torch.arange(half).double() / half)
        turn = torch.polar(torch.ones(n_pos, half, dtype=torch.float64), pos[:, None] * theta)
        if config.get("rotary_adjacent_pairs"):
            a, b = v[..., 0::2], v[..., 1::2]
        else:
            a, b = v[..., :half], v[..., half:]
        z = torch.complex(a, b) * turn[None, :, None, :]
        if config.get("rotary_adjacent_pairs"):
            return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
        return torch.cat((z.real, z.imag), dim=-1)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = w["wte.weight"][tokens]
    if gpt2:
        x = x + w["wpe.weight"][:n_pos]
    logits = {}
    for layer in range(config["n_layer"]):
        p = f"h.{layer}."
        a = norm(x, p + ("ln_1" if gpt2 else "rms_1"))
        q = rope(linear(a, p + "attn.q_proj").unflatten(-1, (n_head, hd)))
        k = rope(linear(a, p + "attn.k_proj").unflatten(-1, (n_kv, hd)))
        v = linear(a, p + "attn.v_proj").unflatten(-1, (n_kv, hd))
        group = torch.tensor([h * n_kv // n_head for h in range(n_head)])
        scores = torch.einsum("bihd,bjhd->bhij", q, k[:, :, group]) / math.sqrt(hd)
        logits[layer] = scores
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
        pattern = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
        mixed = torch.einsum("bhij,bjhd->bihd", pattern, v[:, :, group]).flatten(-2)
        x = x + linear(mixed, p + "attn.o_proj")
        m = norm(x, p + ("ln_2" if gpt2 else "rms_2"))
        if config["model_type"] == "LlamaSimple":
            hidden = torch.nn.functional.silu(linear(m, p + "mlp.gate_proj")) * linear(
                m, p + "mlp.up_proj"
            )
        else:
            hidden = gelu_tanh(linear(m, p + "mlp.c_fc"))
        x = x + linear(hidden, p + "mlp.down_proj")
    return logits


@pytest.fixture(scope="module")
def tokens() -> Tensor:
    return torch.randint(0, BASE["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("case", list(CASES))
def test_captured_logits_match_a_plain_dense_reference(case, tokens):
    class_name, config = config_for(case)
    state = random_state(class_name, config, seed=1)
    model = build_target_model(class_name, config, state, source=case)
    captured = model.capture(tokens)
    expected = plain_reference_logits(config, state, tokens)
    for layer in range(config["n_layer"]):
        assert float(expected[layer].abs().max()) > 1.0  # the check is not vacuous
        assert_lower_triangle_close(
            captured.logits[layer], expected[layer], 1e-4, f"{case} layer {layer}"
        )


@pytest.mark.parametrize("case", list(CASES))
def test_capture_records_the_input_of_every_linear_and_forward_is_differentiable(case, tokens):
    class_name, config = config_for(case)
    torch.manual_seed(0)
    model = build_target_model(class_name, config, None)
    captured = model.capture(tokens)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(captured.module_inputs) == linears
    for layer, spec in enumerate(model.attention_specs()):
        assert torch.equal(captured.module_inputs[spec.k_path], captured.attn_inputs[layer])
    only_queries = model.capture(tokens, modules={"h.1.attn.q_proj"})
    assert list(only_queries.module_inputs) == ["h.1.attn.q_proj"]
    out = model(tokens)
    assert out.shape == (3, 12, BASE["vocab_size"])
    out.logsumexp(-1).sum().backward()
    assert model.h[0].attn.q_proj.weight.grad is not None


def test_attention_specs_follow_the_config_and_ignore_rotary_dim():
    _, config = config_for("LlamaSimple-adjacent-biases")
    spec = build_target_model("LlamaSimple", config, None).attention_specs()[0]
    assert (spec.n_head, spec.n_kv_heads, spec.head_dim) == (4, 2, 6)
    assert spec.scale == pytest.approx(1 / math.sqrt(6))
    assert spec.rotary is not None
    assert (spec.rotary.rotary_dim, spec.rotary.adjacent_pairs, spec.rotary.n_ctx) == (6, True, 16)
    gpt2 = build_target_model("GPT2Simple", config_for("GPT2Simple")[1], None).attention_specs()[1]
    assert (gpt2.rotary, gpt2.n_kv_heads, gpt2.q_path) == (None, 4, "h.1.attn.q_proj")


def test_changing_the_rotary_layout_in_the_config_changes_the_logits(tokens):
    class_name, halves = config_for("LlamaSimpleMLP-halves-gqa")
    state = random_state(class_name, halves, seed=2)
    adjacent = {**halves, "rotary_adjacent_pairs": True}
    a = build_target_model(class_name, halves, state).capture(tokens).logits[0]
    b = build_target_model(class_name, adjacent, state).capture(tokens).logits[0]
    assert torch.equal(a[:, :, 0, 0], b[:, :, 0, 0])  # position 0 is not rotated
    assert float((a - b).tril().abs().max()) > 0.1


def test_gpt2_simple_uses_its_query_and_key_biases(tokens):
    class_name, config = config_for("GPT2Simple")
    state = random_state(class_name, config, seed=3)
    assert state["h.0.attn.q_proj.bias"].abs().max() > 0
    without = {
        **state,
        "h.0.attn.q_proj.bias": torch.zeros(24),
        "h.0.attn.k_proj.bias": torch.zeros(24),
    }
    a = build_target_model(class_name, config, state).capture(tokens).logits[0]
    b = build_target_model(class_name, config, without).capture(tokens).logits[0]
    assert float((a - b).tril().abs().max()) > 0.1


@pytest.mark.parametrize(
    "present", [("wte.weight",), ("lm_head.weight",), ("wte.weight", "lm_head.weight")]
)
def test_tied_embeddings_load_from_either_key_or_both(present, tokens):
    class_name, config = config_for("LlamaSimpleMLP-halves-gqa")
    state = random_state(class_name, config, seed=4)
    full = build_target_model(class_name, config, state)
    partial = {
        k: v for k, v in state.items() if k not in ("wte.weight", "lm_head.weight") or k in present
    }
    model = build_target_model(class_name, config, partial)
    assert torch.equal(model.lm_head.weight, full.lm_head.weight)
    assert torch.equal(model(tokens), full(tokens))


# --- error messages ----------------------------------------------------------------------------


def test_an_unknown_class_is_unsupported_and_the_supported_ones_are_listed():
    with pytest.raises(
        UnsupportedError,
        match=r"target model class 'spd\.pretrain\.models\.gpt2\.GPT2' is not supported; "
        r"supported: GPT2Simple, LlamaSimple, LlamaSimpleMLP$",
    ):
        build_target_model("spd.pretrain.models.gpt2.GPT2", {**BASE}, None)
    assert sorted(SUPPORTED_MODELS) == ["GPT2Simple", "LlamaSimple", "LlamaSimpleMLP"]


def test_a_class_that_disagrees_with_model_type_is_a_config_error():
    with pytest.raises(
        ConfigError,
        match=r"'LlamaSimple' disagrees with the model config's model_type 'GPT2Simple'",
    ):
        build_target_model("LlamaSimple", config_for("GPT2Simple")[1], None)


def test_a_missing_config_field_is_named():
    _, config = config_for("LlamaSimpleMLP-halves-gqa")
    del config["n_intermediate"]
    with pytest.raises(
        ConfigError,
        match=r"LlamaSimpleMLP model config \(model_config\.yaml\) "
        r"lacks the required field 'n_intermediate'",
    ):
        build_target_model("LlamaSimpleMLP", config, None, config_source="model_config.yaml")


def test_fused_c_attn_is_unsupported():
    _, config = config_for("LlamaSimpleMLP-halves-gqa")
    with pytest.raises(
        UnsupportedError, match=r"use_grouped_query_attention=False is not supported"
    ):
        build_target_model("LlamaSimpleMLP", {**config, "use_grouped_query_attention": False}, None)


def test_a_missing_key_names_the_file_the_key_and_its_shape(genuine_config, pretrain_state):
    state = {k: v for k, v in pretrain_state.items() if k != "h.1.mlp.c_fc.weight"}
    with pytest.raises(
        CheckpointError,
        match=r"^model_step_2499\.pt does not fit LlamaSimpleMLP\(n_layer=2, .*\): "
        r"missing key 'h\.1\.mlp\.c_fc\.weight' \(expected shape \(256, 64\)\)$",
    ):
        build_target_model(SPD_CLASS, genuine_config, state, source="model_step_2499.pt")


def test_a_shape_mismatch_names_expected_and_actual_shapes(genuine_config, pretrain_state):
    state = {**pretrain_state, "h.0.attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(
        CheckpointError,
        match=r"model_400\.pth does not fit .*: key 'h\.0\.attn\.k_proj\.weight' has shape "
        r"\(64, 64\), expected \(32, 64\)",
    ):
        build_target_model(SPD_CLASS, genuine_config, state, source="model_400.pth")


def test_a_nan_weight_is_refused(genuine_config, pretrain_state):
    bad = pretrain_state["h.0.attn.q_proj.weight"].clone()
    bad[3, 5] = float("nan")
    state = {**pretrain_state, "h.0.attn.q_proj.weight": bad}
    with pytest.raises(
        CheckpointError,
        match=r"key 'h\.0\.attn\.q_proj\.weight' has 1 non-finite values \(NaN/Inf\)",
    ):
        build_target_model(SPD_CLASS, genuine_config, state, source="ckpt.pt")


def test_unexpected_prefixed_keys_get_a_hint(genuine_config, pretrain_state):
    state = {f"target_model.{k}": v for k, v in pretrain_state.items()}
    with pytest.raises(CheckpointError, match=r"hint: strip the 'target_model\.' prefix"):
        build_target_model(SPD_CLASS, genuine_config, state, source="model_400.pth")


def test_tied_keys_that_differ_are_refused(genuine_config, pretrain_state):
    state = {**pretrain_state, "lm_head.weight": pretrain_state["wte.weight"] + 1}
    with pytest.raises(
        CheckpointError,
        match=r"tied keys 'wte\.weight' and 'lm_head\.weight' hold different tensors",
    ):
        build_target_model(SPD_CLASS, genuine_config, state, source="x.pt")


def test_samples_longer_than_the_context_or_out_of_vocabulary_are_refused():
    class_name, config = config_for("GPT2Simple")
    model = build_target_model(class_name, config, None)
    with pytest.raises(
        SamplesError, match=r"17 tokens per sample exceed GPT2Simple's context of 16"
    ):
        model.capture(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(
        SamplesError, match=r"token ids must lie in \[0, 37\) for GPT2Simple, got range \[0, 37\]"
    ):
        model.capture(torch.tensor([[0, 37]]))
