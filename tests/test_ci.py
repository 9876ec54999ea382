"""CI functions: the genuine run's shared_mlp CI matches spd's own values; every layout and
sigmoid matches a plain reference written here; unsupported types fail only when asked for CI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from qkcheck.ci import build_ci_functions, component_acts, lower_ci, upper_ci
from qkcheck.errors import CheckpointError, QKCheckError, UnsupportedError
from qkcheck.models import build_target_model

GENUINE = Path(__file__).parent / "data" / "spd-genuine-small"
SPD_RUN = GENUINE / "spd_out" / "spd" / "s-5eed0002"

# --- the genuine run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def genuine() -> dict:
    """Read-only: the SPD checkpoint split into target state, components and CI state."""
    state = torch.load(SPD_RUN / "model_400.pth", map_location="cpu", weights_only=True)
    components: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith("_components."):
            _, module, part = key.split(".")
            components.setdefault(module.replace("-", "."), {})[part] = value
    config = yaml.safe_load((SPD_RUN / "final_config.yaml").read_text())
    model_config = yaml.safe_load(
        (GENUINE / "spd_out/pretrain_cache/spd-t-5eed0000/model_config.yaml").read_text()
    )
    target = {
        k.removeprefix("target_model."): v
        for k, v in state.items()
        if k.startswith("target_model.")
    }
    model = build_target_model(config["pretrained_model_class"], model_config, target)
    tokens = torch.load(GENUINE / "reference" / "tokens.pt", weights_only=True)
    return {
        "config": config,
        "ci_state": {
            k.removeprefix("ci_fn."): v for k, v in state.items() if k.startswith("ci_fn.")
        },
        "components": {p: (c["V"], c["U"]) for p, c in components.items()},
        "capture": model.capture(tokens),
        "reference": torch.load(GENUINE / "reference" / "reference_ci_sm.pt", weights_only=True),
    }


def test_component_activations_match_spds(genuine):
    for path, expected in genuine["reference"]["component_acts"].items():
        V, _ = genuine["components"][path]
        got = component_acts(genuine["capture"].module_inputs[path], V)
        assert (got - expected).abs().max() <= 1e-5, path


def test_lower_leaky_ci_of_the_query_and_key_projections_matches_spds(genuine):
    config = genuine["config"]
    assert (config["ci_config"]["fn_type"], config["sigmoid_type"]) == ("shared_mlp", "leaky_hard")
    ci = build_ci_functions(
        config["ci_config"],
        config["sigmoid_type"],
        genuine["ci_state"],
        genuine["components"],
        "model_400.pth",
    )
    assert ci.problem is None
    expected = genuine["reference"]["ci_lower_leaky"]
    got = ci.lower(genuine["capture"].module_inputs, list(expected))
    assert (
        sorted(got)
        == sorted(expected)
        == sorted(f"h.{i}.attn.{m}_proj" for i in (0, 1) for m in "qk")
    )
    for path in expected:
        assert got[path].shape == expected[path].shape
        assert (got[path] - expected[path]).abs().max() <= 1e-5, path


# --- every layout and sigmoid against a plain reference ----------------------------------------

D_IN = 6
HIDDEN = [4, 3]
#: module path -> number of components; the global CI reads modules in sorted path order
N_COMP = {"h.0.attn.q_proj": 5, "h.0.attn.k_proj": 3}
GLOBAL_ORDER = ["h.0.attn.k_proj", "h.0.attn.q_proj"]
FN_TYPES = ["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"]
SIGMOIDS = ["normal", "hard", "leaky_hard", "upper_leaky_hard", "lower_leaky_hard", "swish_hard"]


def plain_gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def plain_swish(x: Tensor, beta: float) -> Tensor:
    return x / (1 + torch.exp(-beta * x))


def plain_swish_hard(x: Tensor) -> Tensor:
    y = x - 0.5
    return (
        0.5
        + (plain_swish(-(y - 0.5), 10.0) * -1 - plain_swish(y, 10.0))
        + (plain_swish(y + 0.5, 10.0) + plain_swish(-y, 10.0))
    )


PLAIN_SIGMOIDS = {
    "normal": lambda x: 1 / (1 + torch.exp(-x)),
    "hard": lambda x: torch.minimum(torch.maximum(x, torch.zeros_like(x)), torch.ones_like(x)),
    "leaky_hard": lambda x: torch.where(x > 0, torch.minimum(x, torch.ones_like(x)), 0.01 * x),
    "upper_leaky_hard": lambda x: torch.where(
        x > 1, 1 + 0.01 * (x - 1), torch.minimum(torch.relu(x), torch.ones_like(x))
    ),
    "lower_leaky_hard": lambda x: torch.minimum(torch.relu(x), torch.ones_like(x)),
    "swish_hard": plain_swish_hard,
}
#: which sigmoid spd's ComponentModel applies for the lower / upper CI of each sigmoid_type
LOWER_OF = {s: ("lower_leaky_hard" if s == "leaky_hard" else s) for s in SIGMOIDS}
UPPER_OF = {s: ("upper_leaky_hard" if s == "leaky_hard" else s) for s in SIGMOIDS}


def plain_mlp(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> Tensor:
    for i, (W, b) in enumerate(zip(weights, biases, strict=True)):
        x = x @ W + b
        if i < len(weights) - 1:
            x = plain_gelu(x)
    return x


def make_run(fn_type: str, seed: int = 0):
    """Random components, CI state in spd's key layout, and module inputs."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    components = {p: (randn(D_IN, c), randn(c, 8)) for p, c in N_COMP.items()}
    state: dict[str, Tensor] = {}
    if fn_type == "global_shared_mlp":
        dims = [D_IN * len(N_COMP), *HIDDEN, sum(N_COMP.values())]
        for n in range(len(dims) - 1):
            state[f"_global_ci_fn.layers.{2 * n}.W"] = randn(dims[n], dims[n + 1])
            state[f"_global_ci_fn.layers.{2 * n}.b"] = randn(dims[n + 1])
    for path, c in N_COMP.items():
        lead = () if fn_type == "shared_mlp" else (c,)
        first = {"mlp": 1, "vector_mlp": D_IN, "shared_mlp": D_IN}.get(fn_type)
        if first is None:
            break
        dims = [first, *HIDDEN, c if fn_type == "shared_mlp" else 1]
        for n in range(len(dims) - 1):
            key = f"_ci_fns.{path.replace('.', '-')}.layers.{2 * n}"
            state[key + ".W"] = randn(*lead, dims[n], dims[n + 1])
            state[key + ".b"] = randn(*lead, dims[n + 1])
    inputs = {p: randn(2, 7, D_IN) for p in N_COMP}
    mode = "global" if fn_type.startswith("global") else "layerwise"
    return {"mode": mode, "fn_type": fn_type, "hidden_dims": HIDDEN}, state, components, inputs


def plain_pre_sigmoid(fn_type: str, state, components, inputs) -> dict[str, Tensor]:
    def layers(prefix: str, pick=lambda t: t):
        n = len(HIDDEN) + 1
        return (
            [pick(state[f"{prefix}layers.{2 * i}.W"]) for i in range(n)],
            [pick(state[f"{prefix}layers.{2 * i}.b"]) for i in range(n)],
        )

    if fn_type == "global_shared_mlp":
        out = plain_mlp(torch.cat([inputs[p] for p in GLOBAL_ORDER], -1), *layers("_global_ci_fn."))
        k_comp = N_COMP["h.0.attn.k_proj"]
        return {"h.0.attn.k_proj": out[..., :k_comp], "h.0.attn.q_proj": out[..., k_comp:]}
    result = {}
    for path, (V, _) in components.items():
        prefix = f"_ci_fns.{path.replace('.', '-')}."
        x = inputs[path]
        if fn_type == "shared_mlp":
            result[path] = plain_mlp(x, *layers(prefix))
            continue
        columns = []
        for c in range(V.shape[1]):
            column_input = (x @ V[:, c])[..., None] if fn_type == "mlp" else x
            columns.append(plain_mlp(column_input, *layers(prefix, lambda t, c=c: t[c]))[..., 0])
        result[path] = torch.stack(columns, dim=-1)
    return result


@pytest.mark.parametrize("fn_type", FN_TYPES)
def test_ci_function_outputs_match_a_plain_reference(fn_type):
    ci_config, state, components, inputs = make_run(fn_type)
    ci = build_ci_functions(ci_config, "leaky_hard", state, components, "run.pth")
    assert ci.problem is None
    got = ci.pre_sigmoid(inputs)
    expected = plain_pre_sigmoid(fn_type, state, components, inputs)
    assert sorted(got) == sorted(N_COMP)
    for path, c in N_COMP.items():
        assert got[path].shape == (2, 7, c)
        torch.testing.assert_close(got[path], expected[path], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigmoid_type", SIGMOIDS)
@pytest.mark.parametrize("fn_type", FN_TYPES)
def test_lower_and_upper_ci_apply_spds_sigmoid_choice(fn_type, sigmoid_type):
    ci_config, state, components, inputs = make_run(fn_type, seed=1)
    ci = build_ci_functions(ci_config, sigmoid_type, state, components)
    pre = plain_pre_sigmoid(fn_type, state, components, inputs)
    assert any(float(v.min()) < 0 and float(v.max()) > 1 for v in pre.values())  # every branch hit
    lower = ci.lower(inputs, ["h.0.attn.q_proj"])
    upper = ci.upper(inputs)
    assert list(lower) == ["h.0.attn.q_proj"]
    for path in N_COMP:
        if path in lower:
            expected = PLAIN_SIGMOIDS[LOWER_OF[sigmoid_type]](pre[path])
            torch.testing.assert_close(lower[path], expected, rtol=1e-5, atol=1e-5)
        expected = PLAIN_SIGMOIDS[UPPER_OF[sigmoid_type]](pre[path])
        torch.testing.assert_close(upper[path], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigmoid_type", SIGMOIDS)
def test_each_sigmoid_matches_its_definition_across_all_branches(sigmoid_type):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    torch.testing.assert_close(lower_ci(x, sigmoid_type), PLAIN_SIGMOIDS[LOWER_OF[sigmoid_type]](x))
    torch.testing.assert_close(upper_ci(x, sigmoid_type), PLAIN_SIGMOIDS[UPPER_OF[sigmoid_type]](x))


def test_the_lower_ci_of_leaky_hard_is_the_clamp_to_0_1():
    x = torch.tensor([-2.0, -0.1, 0.0, 0.3, 1.0, 1.7])
    assert lower_ci(x, "leaky_hard").tolist() == pytest.approx([0, 0, 0, 0.3, 1, 1])
    assert upper_ci(x, "leaky_hard").tolist() == pytest.approx([0, 0, 0, 0.3, 1, 1.007])


def test_component_activations_are_x_times_v_or_v_rows_for_token_ids():
    gen = torch.Generator().manual_seed(3)
    x, V = torch.randn(2, 4, 6, generator=gen), torch.randn(6, 5, generator=gen)
    torch.testing.assert_close(component_acts(x, V), torch.einsum("bpi,ic->bpc", x, V))
    ids = torch.tensor([[2, 0, 5]])
    assert torch.equal(component_acts(ids, V), V[ids])


def test_ci_keys_may_keep_their_ci_fn_prefix():
    ci_config, state, components, inputs = make_run("shared_mlp")
    prefixed = {f"ci_fn.{k}": v for k, v in state.items()}
    a = build_ci_functions(ci_config, "hard", state, components).lower(inputs)
    b = build_ci_functions(ci_config, "hard", prefixed, components).lower(inputs)
    assert all(torch.equal(a[p], b[p]) for p in N_COMP)


# --- failures surface only when CI is asked for ------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fn_type"),
    [
        ("global", "global_lstm"),
        ("layerwise", "global_reverse_residual"),  # a global type needs mode 'global'
        ("global", "shared_mlp"),
        ("layerwise", "conv"),
    ],
)
def test_an_unsupported_ci_type_fails_only_when_ci_is_computed(mode, fn_type):
    _, state, components, inputs = make_run("shared_mlp")
    ci = build_ci_functions({"mode": mode, "fn_type": fn_type}, "leaky_hard", state, components)
    message = (
        rf"CI function type '{fn_type}' \(mode '{mode}'\) is not supported; supported: "
        r"layerwise mlp, vector_mlp, shared_mlp, global global_shared_mlp, "
        r"global_shared_transformer, global_reverse_residual$"
    )
    assert ci.problem is not None
    with pytest.raises(UnsupportedError, match=message):
        ci.lower(inputs)


def test_an_unsupported_sigmoid_fails_only_when_ci_is_computed():
    ci_config, state, components, inputs = make_run("mlp")
    ci = build_ci_functions(ci_config, "tanh", state, components)
    with pytest.raises(
        UnsupportedError,
        match=r"sigmoid_type 'tanh' is not supported; supported: normal, hard, leaky_hard, "
        r"upper_leaky_hard, lower_leaky_hard, swish_hard$",
    ):
        ci.upper(inputs)


def test_a_misshapen_ci_weight_names_file_module_key_and_shapes_and_spares_other_modules():
    ci_config, state, components, inputs = make_run("vector_mlp")
    state["_ci_fns.h-0-attn-k_proj.layers.2.W"] = torch.zeros(3, 4, 2)
    ci = build_ci_functions(ci_config, "leaky_hard", state, components, "model_400.pth")
    with pytest.raises(
        CheckpointError,
        match=r"^model_400\.pth \(h\.0\.attn\.k_proj\): "
        r"CI key '_ci_fns\.h-0-attn-k_proj\.layers\.2\.W' has shape \(3, 4, 2\), "
        r"expected \(3, 4, 3\)$",
    ):
        ci.lower(inputs, ["h.0.attn.k_proj"])
    assert ci.lower(inputs, ["h.0.attn.q_proj"])["h.0.attn.q_proj"].shape == (2, 7, 5)


def test_missing_ci_weights_are_reported():
    ci_config, state, components, inputs = make_run("shared_mlp")
    state = {k: v for k, v in state.items() if "q_proj" not in k}
    ci = build_ci_functions(ci_config, "hard", state, components, "run.pth")
    with pytest.raises(
        CheckpointError,
        match=r"run\.pth \(h\.0\.attn\.q_proj\): "
        r"no CI function weights under '_ci_fns\.h-0-attn-q_proj\.layers\.'",
    ):
        ci.lower(inputs)


def test_global_ci_needs_every_modules_input():
    ci_config, state, components, inputs = make_run("global_shared_mlp")
    ci = build_ci_functions(ci_config, "hard", state, components)
    with pytest.raises(
        QKCheckError,
        match=r"global CI reads every decomposed module's input; missing 'h\.0\.attn\.k_proj'",
    ):
        ci.lower({"h.0.attn.q_proj": inputs["h.0.attn.q_proj"]}, ["h.0.attn.q_proj"])


# --- binary mode end to end, per CI type --------------------------------------------------


def _with_ci(run_dir: Path, fn_type: str) -> None:
    """Replace the genuine run's shared_mlp CI by random weights of ``fn_type`` (in spd's
    checkpoint key layout) for every decomposed module."""
    ckpt = run_dir / "model_400.pth"
    state = {
        k: v for k, v in torch.load(ckpt, weights_only=True).items() if not k.startswith("ci_fn.")
    }
    comps = {
        k.removeprefix("_components.").removesuffix(".V").replace("-", "."): v
        for k, v in state.items()
        if k.startswith("_components.") and k.endswith(".V")
    }
    gen = torch.Generator().manual_seed(0)
    hidden = 8
    if fn_type == "global_shared_mlp":
        dims = [
            sum(V.shape[0] for V in comps.values()),
            hidden,
            sum(V.shape[1] for V in comps.values()),
        ]
        for n in range(2):
            state[f"ci_fn._global_ci_fn.layers.{2 * n}.W"] = (
                torch.randn(dims[n], dims[n + 1], generator=gen) * 0.2
            )
            state[f"ci_fn._global_ci_fn.layers.{2 * n}.b"] = torch.randn(dims[n + 1], generator=gen)
    else:
        for path, V in comps.items():
            d_in, C = V.shape
            dims = [1 if fn_type == "mlp" else d_in, hidden, 1]
            for n in range(2):
                key = f"_ci_fns.{path.replace('.', '-')}.layers.{2 * n}"
                state[key + ".W"] = torch.randn(C, dims[n], dims[n + 1], generator=gen) * 0.3
                state[key + ".b"] = torch.randn(C, dims[n + 1], generator=gen)
    torch.save(state, ckpt)
    config_path = run_dir / "final_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["ci_config"] = {
        "mode": "global" if fn_type.startswith("global") else "layerwise",
        "fn_type": fn_type,
        "hidden_dims": [hidden],
    }
    config_path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("fn_type", ["mlp", "vector_mlp", "global_shared_mlp"])
def test_binary_mode_draws_figures_with_each_ci_type(fn_type, spd_out_copy, tmp_path):
    """(shared_mlp: the genuine run itself and the HF runs; the global transformers:
    tests/test_ci_global.py.) The CI gates some pairs and not others."""
    import subprocess
    import sys

    from tests.conftest import GENUINE, GENUINE_RUN_ID

    _with_ci(spd_out_copy / "spd" / GENUINE_RUN_ID, fn_type)
    from qkcheck import load_run

    run = load_run(spd_out_copy / "spd" / GENUINE_RUN_ID)
    tokens = torch.load(GENUINE / "reference" / "tokens.pt", weights_only=True)[:1]
    ci = run.causal_importances(tokens, paths=["h.1.attn.q_proj", "h.1.attn.k_proj"])
    for v in ci.values():
        assert 0 < float((v > 0.1).float().mean()) < 1
    art = tmp_path / "art"
    cmd = [sys.executable, "-m", "pytest", "validation/", "-p", "no:cacheprovider", "-q"]
    cmd += ["--run-id", str(spd_out_copy / "spd" / GENUINE_RUN_ID), "--mode", "binary"]
    cmd += ["--samples-file", str(GENUINE / "reference" / "tokens.pt"), "-k", "L1-S0-Q20"]
    cmd += ["--plots", "all", "--max-plots", "1", "--artifacts-dir", str(art)]
    root = Path(__file__).parents[1]
    done = subprocess.run(cmd, cwd=root, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "figure failed" not in done.stdout
    pngs = list(art.glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)
