"""Global CI functions (global_shared_transformer, global_reverse_residual).

Against spd's own CI values for the two genuine runs of ``tests/data/spd-genuine-hf`` and
against a plain reference written here from spd's state-dict keys (heads in a loop, RoPE as
explicit pair rotations, RMS norm by its formula). The plain reference has switches for the
mistakes a reimplementation can make; each mistake moves the CI far from spd's values, so the
comparison with spd's values has the power to catch it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from qkcheck.ci import build_ci_functions
from qkcheck.errors import CheckpointError, ConfigError, QKCheckError, UnsupportedError

pytest_plugins = ["pytester"]

HF = Path(__file__).parent / "data" / "spd-genuine-hf"
RUNS = {"s-5eed0104": "global_shared_transformer", "s-5eed0105": "global_reverse_residual"}
P = "_global_ci_fn."
TOL = 1e-5  # spd's ComponentModel runs the same float32 ops in another order


# --- the plain reference -----------------------------------------------------------------------


def plain_rms(x: Tensor, weight: Tensor | None = None) -> Tensor:
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
    return y if weight is None else y * weight


def plain_gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def plain_mlp(state: dict, prefix: str) -> Callable[[Tensor], Tensor]:
    """spd's nn.Sequential of Linear (W (in, out), b) with GELU between: keys prefix0, prefix2…"""
    n = 0
    while f"{prefix}{2 * n}.W" in state:
        n += 1

    def apply(x: Tensor) -> Tensor:
        for i in range(n):
            x = x @ state[f"{prefix}{2 * i}.W"] + state[f"{prefix}{2 * i}.b"]
            if i < n - 1:
                x = plain_gelu(x)
        return x

    return apply


def plain_linear(state: dict, prefix: str):
    return lambda x: x @ state[f"{prefix}W"] + state[f"{prefix}b"]


def plain_attention(
    state: dict, prefix: str, n_heads: int, base: float, causal: bool = False
) -> Callable[[Tensor], Tensor]:
    """Multi-head attention, one head at a time; RoPE rotates each pair (i, i + d_head/2) of
    position t by the angle t / base^(2i / d_head)."""
    Wq, Wk, Wv, Wo = (state[f"{prefix}{n}_proj.weight"] for n in ("q", "k", "v", "out"))

    def rope(x: Tensor) -> Tensor:  # (batch, T, d_head)
        T, d_head = x.shape[-2:]
        half = d_head // 2
        angle = torch.arange(T, dtype=torch.float32)[:, None] / base ** (
            torch.arange(half, dtype=torch.float32)[None, :] * 2 / d_head
        )
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)

    def apply(x: Tensor) -> Tensor:
        T, d = x.shape[-2:]
        d_head = d // n_heads
        outs = []
        for h in range(n_heads):
            rows = slice(h * d_head, (h + 1) * d_head)
            q, k = rope(x @ Wq[rows].T), rope(x @ Wk[rows].T)
            scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)
            if causal:
                scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
            outs.append(torch.softmax(scores, -1) @ (x @ Wv[rows].T))
        return torch.cat(outs, -1) @ Wo.T

    return apply


def plain_shared_transformer(
    state, ci_config, inputs, module_order, *, sort=True, input_norm=True, causal=False
):
    cfg = ci_config["simple_transformer_ci_cfg"]
    attn_cfg = cfg["attn_config"]
    order = sorted(module_order) if sort else list(module_order)
    x = torch.cat([plain_rms(inputs[p]) if input_norm else inputs[p] for p in order], -1)
    h = plain_linear(state, f"{P}_input_projector.")(x)
    for i in range(cfg["n_blocks"]):
        block = f"{P}_blocks.{i}."
        attn = plain_attention(
            state, f"{block}attn.", attn_cfg["n_heads"], attn_cfg["rope_base"], causal
        )
        h = h + attn(plain_rms(h))
        h = h + plain_mlp(state, f"{block}mlp.")(plain_rms(h))
    out = plain_linear(state, f"{P}_output_head.")(h)
    sizes = [state["__C__"][p] for p in order]
    return dict(zip(order, torch.split(out, sizes, -1), strict=True))


def plain_reverse_residual(
    state, ci_config, inputs, module_order, *, reader_after_transition=True, causal=False
):
    d = ci_config["d_resid_ci_fn"]
    attn_cfg = ci_config.get("transition_attn_config")
    groups = ci_config["block_groups"]
    first = next(iter(inputs.values()))
    r = torch.zeros(*first.shape[:-1], d)
    out = {}
    for n, group in enumerate(groups):
        b = group["name"].replace(".", "-")
        paths = [m for pat in group["patterns"] for m in module_order if fnmatch.fnmatch(m, pat)]
        r = r + plain_linear(state, f"{P}_inp_projectors.{b}.")(
            torch.cat([inputs[p] for p in paths], -1)
        )

        def read(r: Tensor, b: str = b) -> Tensor:
            return plain_mlp(state, f"{P}_readers.{b}.")(
                plain_rms(r, state[f"{P}_reader_norms.{b}.weight"])
            )

        ci = None if reader_after_transition else read(r)
        if n < len(groups) - 1:
            if attn_cfg is not None:
                attn = plain_attention(
                    state,
                    f"{P}_attn_transitions.{b}.",
                    attn_cfg["n_heads"],
                    attn_cfg["rope_base"],
                    causal,
                )
                r = r + attn(plain_rms(r, state[f"{P}_attn_norms.{b}.weight"]))
            t = f"{P}_transitions.{b}."
            mlp = plain_mlp(state, t) if f"{t}0.W" in state else plain_linear(state, t)
            r = r + mlp(plain_rms(r, state[f"{P}_transition_norms.{b}.weight"]))
        if ci is None:
            ci = read(r)
        sizes = [state["__C__"][p] for p in paths]
        out.update(zip(paths, torch.split(ci, sizes, -1), strict=True))
    return out


def plain_global(fn_type, state, ci_config, inputs, module_order, **mistakes):
    fn = plain_shared_transformer if fn_type == RUNS["s-5eed0104"] else plain_reverse_residual
    return fn(state, ci_config, inputs, module_order, **mistakes)


# --- the genuine runs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def genuine():
    """Per run: the loaded run, its tokens, spd's CI, the module inputs and the raw CI state."""
    from qkcheck.runs import load_run

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPD_OUT_DIR", str(HF / "spd_out"))
        for run_id in RUNS:
            run = load_run(run_id)
            tokens = torch.load(HF / "reference" / run_id / "tokens.pt", weights_only=True)
            raw = torch.load(run.files.checkpoint, map_location="cpu", weights_only=True)
            state = {k.removeprefix("ci_fn."): v for k, v in raw.items() if "ci_fn." in k}
            state["__C__"] = {p: run.components(p)[0].shape[1] for p in run.module_paths}
            out[run_id] = {
                "run": run,
                "tokens": tokens,
                "reference": torch.load(
                    HF / "reference" / run_id / "reference_ci.pt", weights_only=True
                ),
                "inputs": run.capture(tokens, run.module_paths).module_inputs,
                "state": state,
                "ci_config": yaml.safe_load(run.files.config.read_text())["ci_config"],
            }
    return out


def lower(pre: dict[str, Tensor]) -> dict[str, Tensor]:
    return {p: v.clamp(0, 1) for p, v in pre.items()}  # leaky_hard's lower CI


@pytest.mark.parametrize("run_id", RUNS)
def test_lower_ci_equals_spds_own_per_module(genuine, run_id):
    g = genuine[run_id]
    run = g["run"]
    assert run.config.ci_config.fn_type == RUNS[run_id]
    assert run.ci_functions.problem is None
    ci = run.causal_importances(g["tokens"])
    assert sorted(ci) == sorted(g["reference"]) == sorted(run.module_paths)
    for path, ref in g["reference"].items():
        assert ci[path].shape == ref.shape == (8, 64, 40 if "q_proj" in path else 24)
        torch.testing.assert_close(ci[path], ref, rtol=0, atol=TOL, msg=path)


@pytest.mark.parametrize("run_id", RUNS)
def test_the_plain_reference_reproduces_spds_ci(genuine, run_id):
    g = genuine[run_id]
    got = lower(
        plain_global(RUNS[run_id], g["state"], g["ci_config"], g["inputs"], g["run"].module_paths)
    )
    for path, ref in g["reference"].items():
        torch.testing.assert_close(got[path], ref, rtol=0, atol=TOL, msg=path)


MISTAKES = [
    ("s-5eed0104", {"sort": False}),  # inputs in module_info order, not sorted path order
    ("s-5eed0104", {"input_norm": False}),  # inputs not RMS-normed
    ("s-5eed0104", {"causal": True}),  # causal instead of bidirectional attention
    ("s-5eed0105", {"reader_after_transition": False}),  # reader before the transition
    ("s-5eed0105", {"causal": True}),
]


@pytest.mark.parametrize(("run_id", "mistake"), MISTAKES, ids=[str(m) for m in MISTAKES])
def test_each_mistake_moves_the_ci_far_from_spds(genuine, run_id, mistake):
    """Detection power: the comparison above fails for each of these mistakes."""
    g = genuine[run_id]
    got = lower(
        plain_global(
            RUNS[run_id], g["state"], g["ci_config"], g["inputs"], g["run"].module_paths, **mistake
        )
    )
    worst = max(float((got[p] - ref).abs().max()) for p, ref in g["reference"].items())
    assert worst > 100 * TOL


def test_the_shared_transformers_ci_at_a_position_sees_later_tokens(genuine):
    """Bidirectional: changing only the last token changes CI at earlier positions."""
    g = genuine["s-5eed0104"]
    run = g["run"]
    tokens = g["tokens"][:1].clone()
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % run.vocab_size
    a = run.causal_importances(tokens)["h.1.attn.q_proj"]
    b = run.causal_importances(changed)["h.1.attn.q_proj"]
    assert float((a[0, :-1] - b[0, :-1]).abs().max()) > 1e-3


# --- branches the genuine runs do not take: plain reference on random weights ------------------

D_IN, D_MODEL = 6, 8
#: module_info order; an embedding (wte, input = its component activations) among them
MODULES = {"h.1.attn.q_proj": 5, "h.0.attn.k_proj": 3, "wte": 4, "h.0.attn.q_proj": 2}
VOCAB = 11


def random_state(keys_shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=gen) / math.sqrt(s[0]) for k, s in keys_shapes.items()}


def random_modules(seed: int):
    gen = torch.Generator().manual_seed(seed)
    components, inputs, acts = {}, {}, {}
    for path, c in MODULES.items():
        d_in = VOCAB if path == "wte" else D_IN
        V = torch.randn(d_in, c, generator=gen)
        components[path] = (V, torch.randn(c, D_IN, generator=gen))
        if path == "wte":
            inputs[path] = torch.randint(0, VOCAB, (2, 7), generator=gen)
            acts[path] = V[inputs[path]]
        else:
            inputs[path] = torch.randn(2, 7, D_IN, generator=gen)
            acts[path] = inputs[path]
    return components, inputs, acts


def width(path: str) -> int:
    return MODULES[path] if path == "wte" else D_IN


def attn_shapes(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{n}_proj.weight": (d, d) for n in ("q", "k", "v", "out")}


def transformer_case(mlp_hidden_dim, n_blocks=2, n_heads=2):
    hidden = [4 * D_MODEL] if mlp_hidden_dim is None else mlp_hidden_dim
    total_in = sum(width(p) for p in MODULES)
    shapes = {f"{P}_input_projector.W": (total_in, D_MODEL), f"{P}_input_projector.b": (D_MODEL,)}
    for i in range(n_blocks):
        shapes.update(attn_shapes(f"{P}_blocks.{i}.attn.", D_MODEL))
        dims = [D_MODEL, *hidden, D_MODEL]
        for n in range(len(dims) - 1):
            shapes[f"{P}_blocks.{i}.mlp.{2 * n}.W"] = (dims[n], dims[n + 1])
            shapes[f"{P}_blocks.{i}.mlp.{2 * n}.b"] = (dims[n + 1],)
    shapes[f"{P}_output_head.W"] = (D_MODEL, sum(MODULES.values()))
    shapes[f"{P}_output_head.b"] = (sum(MODULES.values()),)
    ci_config = {
        "mode": "global",
        "fn_type": "global_shared_transformer",
        "simple_transformer_ci_cfg": {
            "d_model": D_MODEL,
            "n_blocks": n_blocks,
            "mlp_hidden_dim": mlp_hidden_dim,
            "attn_config": {"n_heads": n_heads, "max_len": 16, "rope_base": 100.0},
        },
    }
    return ci_config, shapes


GROUPS = [
    {"name": "top", "patterns": ["h.1.*"]},
    {"name": "layer.0", "patterns": ["h.0.attn.q_proj", "h.0.attn.k_proj"]},  # pattern order
    {"name": "embed", "patterns": ["wte"]},
]


def reverse_case(transition_hidden_dim, attention: bool, reader_hidden=(5,)):
    ci_config = {
        "mode": "global",
        "fn_type": "global_reverse_residual",
        "d_resid_ci_fn": D_MODEL,
        "reader_hidden_dims": list(reader_hidden),
        "block_groups": GROUPS,
        "transition_hidden_dim": transition_hidden_dim,
        "transition_attn_config": {"n_heads": 2, "max_len": 16, "rope_base": 50.0}
        if attention
        else None,
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for n, group in enumerate(GROUPS):
        b = group["name"].replace(".", "-")
        paths = [m for pat in group["patterns"] for m in MODULES if fnmatch.fnmatch(m, pat)]
        shapes[f"{P}_inp_projectors.{b}.W"] = (sum(width(p) for p in paths), D_MODEL)
        shapes[f"{P}_inp_projectors.{b}.b"] = (D_MODEL,)
        dims = [D_MODEL, *reader_hidden, sum(MODULES[p] for p in paths)]
        for i in range(len(dims) - 1):
            shapes[f"{P}_readers.{b}.{2 * i}.W"] = (dims[i], dims[i + 1])
            shapes[f"{P}_readers.{b}.{2 * i}.b"] = (dims[i + 1],)
        shapes[f"{P}_reader_norms.{b}.weight"] = (D_MODEL,)
        if n == len(GROUPS) - 1:
            continue
        shapes[f"{P}_transition_norms.{b}.weight"] = (D_MODEL,)
        if transition_hidden_dim is None:
            shapes[f"{P}_transitions.{b}.W"] = (D_MODEL, D_MODEL)
            shapes[f"{P}_transitions.{b}.b"] = (D_MODEL,)
        else:
            for i, (a, z) in enumerate(
                [(D_MODEL, transition_hidden_dim), (transition_hidden_dim, D_MODEL)]
            ):
                shapes[f"{P}_transitions.{b}.{2 * i}.W"] = (a, z)
                shapes[f"{P}_transitions.{b}.{2 * i}.b"] = (z,)
        if attention:
            shapes.update(attn_shapes(f"{P}_attn_transitions.{b}.", D_MODEL))
            shapes[f"{P}_attn_norms.{b}.weight"] = (D_MODEL,)
    return ci_config, shapes


CASES = {
    "transformer, default MLP width": lambda: transformer_case(None),
    "transformer, two hidden layers, one block": lambda: transformer_case([5, 7], n_blocks=1),
    "transformer, no hidden layer, 4 heads": lambda: transformer_case([], n_heads=4),
    "reverse, MLP transitions": lambda: reverse_case(9, attention=False),
    "reverse, linear transitions, attention": lambda: reverse_case(None, attention=True),
    "reverse, reader without hidden layer": lambda: reverse_case(None, False, reader_hidden=()),
}


@pytest.mark.parametrize("case", CASES)
def test_global_ci_matches_the_plain_reference(case):
    ci_config, shapes = CASES[case]()
    state = random_state(shapes, seed=len(case))
    components, inputs, acts = random_modules(seed=1)
    ci = build_ci_functions(ci_config, "normal", state, components, "run.pth")
    assert ci.problem is None
    got = ci.pre_sigmoid(inputs)
    expected = plain_global(
        ci_config["fn_type"], {**state, "__C__": MODULES}, ci_config, acts, list(MODULES)
    )
    assert sorted(got) == sorted(MODULES)
    for path, c in MODULES.items():
        assert got[path].shape == (2, 7, c)
        torch.testing.assert_close(got[path], expected[path], rtol=1e-5, atol=1e-5)
    upper = ci.upper(inputs, ["wte"])["wte"]
    torch.testing.assert_close(upper, torch.sigmoid(expected["wte"]), rtol=1e-5, atol=1e-5)


# --- bad configs and checkpoints: one line each, only when CI is asked for --------------------


def problem_of(ci_config, state, seed=0) -> str:
    components, inputs, _ = random_modules(seed)
    ci = build_ci_functions(
        ci_config, "leaky_hard", state, components, "model_300.pth", config_source="cfg.yaml"
    )
    assert ci.problem is not None
    with pytest.raises(QKCheckError) as info:
        ci.lower(inputs)
    assert str(info.value) == ci.problem and "\n" not in ci.problem
    return ci.problem


def test_a_missing_or_bad_transformer_setting_names_the_config_field():
    ci_config, shapes = transformer_case(None)
    state = random_state(shapes, 0)
    del ci_config["simple_transformer_ci_cfg"]
    assert problem_of(ci_config, state) == (
        "cfg.yaml: required field 'ci_config.simple_transformer_ci_cfg' is missing"
    )
    ci_config, _ = transformer_case(None, n_heads=3)
    assert problem_of(ci_config, state) == (
        "cfg.yaml: field 'ci_config.simple_transformer_ci_cfg.attn_config.n_heads' must be a "
        "divisor of ci_config.simple_transformer_ci_cfg.d_model = 8 leaving an even head width "
        "(RoPE), got 3"
    )


def test_more_blocks_in_the_config_than_in_the_checkpoint_names_the_missing_key():
    ci_config, shapes = transformer_case(None, n_blocks=2)
    ci_config["simple_transformer_ci_cfg"]["n_blocks"] = 3
    assert problem_of(ci_config, random_state(shapes, 0)) == (
        "model_300.pth (global_shared_transformer CI over 4 modules): missing CI key "
        "'_global_ci_fn._blocks.2.attn.q_proj.weight'"
    )


def test_weights_the_config_does_not_describe_are_reported():
    ci_config, shapes = reverse_case(None, attention=True)
    ci_config["transition_attn_config"] = None
    assert problem_of(ci_config, random_state(shapes, 0)) == (
        "model_300.pth (global_reverse_residual CI over 4 modules): unexpected CI key "
        "'_global_ci_fn._attn_norms.layer-0.weight' (and 9 more): the run's ci_config "
        "describes no such weight"
    )


def test_a_misshapen_reader_names_the_key_and_shapes():
    ci_config, shapes = reverse_case(9, attention=False)
    state = random_state(shapes, 0)
    state[f"{P}_readers.top.2.W"] = torch.zeros(5, 4)
    assert problem_of(ci_config, state) == (
        "model_300.pth (global_reverse_residual CI over 4 modules): CI key "
        "'_global_ci_fn._readers.top.2.W' has shape (5, 4), expected (5, 5)"
    )


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (
            [*GROUPS, {"name": "mlp", "patterns": ["h.*.mlp.*"]}],
            "field 'ci_config.block_groups[3].patterns[0]' ('h.*.mlp.*', block 'mlp') matches "
            "no decomposed module; decomposed: h.1.attn.q_proj, h.0.attn.k_proj, wte, "
            "h.0.attn.q_proj",
        ),
        (
            GROUPS[:2],
            "field 'ci_config.block_groups' puts no block over module(s) 'wte'; every "
            "decomposed module needs one",
        ),
        (
            [*GROUPS, {"name": "again", "patterns": ["h.0.*"]}],
            "field 'ci_config.block_groups': module 'h.0.attn.k_proj' is matched in block "
            "'layer.0' and again in block 'again'; each module belongs to one block",
        ),
        (None, "field 'ci_config.block_groups' must be a non-empty list of mappings, got None"),
    ],
)
def test_block_groups_must_cover_each_module_once(groups, message):
    ci_config, shapes = reverse_case(None, attention=False)
    ci_config["block_groups"] = groups
    assert problem_of(ci_config, random_state(shapes, 0)) == f"cfg.yaml: {message}"


def test_samples_longer_than_the_attentions_max_len_are_refused():
    ci_config, shapes = transformer_case(None)
    ci_config["simple_transformer_ci_cfg"]["attn_config"]["max_len"] = 5
    components, inputs, _ = random_modules(0)
    ci = build_ci_functions(ci_config, "hard", random_state(shapes, 0), components)
    with pytest.raises(
        QKCheckError,
        match=r"^global CI attention takes at most "
        r"ci_config\.simple_transformer_ci_cfg\.attn_config\.max_len = 5 positions, got samples "
        r"of 7 tokens; use shorter samples$",
    ):
        ci.lower(inputs)


def edited_run(genuine, tmp_path, **ci_fields):
    """A copy of s-5eed0105 with ``ci_config`` fields replaced, loaded."""
    from qkcheck.runs import load_run

    dest = tmp_path / "s-5eed0105"
    shutil.copytree(genuine["s-5eed0105"]["run"].files.run_dir, dest)
    config = yaml.safe_load((dest / "final_config.yaml").read_text())
    config["ci_config"].update(ci_fields)
    (dest / "final_config.yaml").write_text(yaml.safe_dump(config))
    return load_run(dest, pretrain=HF / "spd_out" / "pretrain_cache" / "spd-t-5eed0100")


def test_an_unsupported_global_type_in_a_run_names_the_field_and_the_supported_list(
    genuine, tmp_path
):
    run = edited_run(genuine, tmp_path, fn_type="global_lstm")
    with pytest.raises(
        UnsupportedError,
        match=r"^.*final_config\.yaml: field 'ci_config': CI function type 'global_lstm' "
        r"\(mode 'global'\) is not supported; supported: layerwise mlp, vector_mlp, shared_mlp, "
        r"global global_shared_mlp, global_shared_transformer, global_reverse_residual$",
    ):
        run.causal_importances(genuine["s-5eed0105"]["tokens"][:1])


def test_a_bad_global_ci_config_in_a_run_names_its_config_file(genuine, tmp_path):
    run = edited_run(genuine, tmp_path, d_resid_ci_fn="wide")
    dest = run.files.run_dir
    with pytest.raises(
        ConfigError,
        match=rf"^{dest / 'final_config.yaml'}: field 'ci_config.d_resid_ci_fn' must be a "
        r"positive integer, got 'wide'$",
    ):
        run.causal_importances(genuine["s-5eed0105"]["tokens"][:1])


def test_a_missing_global_weight_is_a_checkpoint_error():
    ci_config, shapes = transformer_case(None)
    state = random_state(shapes, 0)
    del state[f"{P}_output_head.b"]
    components, inputs, _ = random_modules(0)
    ci = build_ci_functions(ci_config, "hard", state, components, "m.pth")
    with pytest.raises(CheckpointError, match=r"missing CI key '_global_ci_fn\._output_head\.b'$"):
        ci.lower(inputs)


# --- binary mode end to end ------------------------------------------------------------------


def test_binary_mode_draws_figures_on_both_global_runs(pytester: pytest.Pytester):
    validation = Path(__file__).parents[1] / "validation"
    pytester.makeconftest((validation / "conftest.py").read_text())
    for name in ("test_items.py", "test_quality.py"):
        shutil.copy(validation / name, pytester.path / name)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p no:randomly\n")
    pytester._monkeypatch.setenv("SPD_OUT_DIR", str(HF / "spd_out"))
    for run_id in RUNS:
        art = pytester.path / f"art-{run_id}"
        result = pytester.runpytest_subprocess(
            "--run-id",
            run_id,
            "--samples-file",
            str(HF / "reference" / run_id / "tokens.pt"),
            "--mode",
            "binary",
            "--plots",
            "all",
            "--max-plots",
            "1",
            "-k",
            "L1-S0-Q20",
            "--artifacts-dir",
            str(art),
            "-rA",
        )
        result.assert_outcomes(passed=1)
        assert "figure failed" not in result.stdout.str()
        summary = json.loads((art / "summary.json").read_text())
        assert summary["settings"]["mode"] == "binary"
        names = sorted(Path(p).name for p in summary["figures"]["paths"])
        # binary: no validation figure (no ground truth)
        assert names == [f"{run_id}_L1_S0_Q20_binary_{k}.png" for k in ("combined", "components")]
        assert all((art / n).is_file() and (art / n).stat().st_size > 10_000 for n in names)
