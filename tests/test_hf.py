"""Hugging Face targets: transformers' own forward as ground truth, and the decomposition
extended to fused QKV (GPT-2), QK-norm (Qwen3), llama3 RoPE, biases and documents.

References, each independent of the code under test: spd's own runs with logits and CI
captured from the target's attention code (``tests/data/spd-genuine-hf``); transformers'
eager attention with ``output_attentions``; each document run through the model alone.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkcheck.errors import CheckpointError, RunNotFoundError, UnsupportedError
from qkcheck.models import hf_hub
from qkcheck.models.hf import HFTarget
from qkcheck.rotary import RotaryConfig
from qkcheck.runs import load_run
from qkcheck.settings import Settings
from qkcheck.validate import Validator
from tests.hf_runs import CLASSES, GENUINE_HF, KINDS, tiny_hf_model, write_run, write_snapshot

ROOT = Path(__file__).parents[1]
GENUINE_HF_RUNS = {"s-5eed0101": "gpt2-tiny", "s-5eed0102": "llama-tiny"}


@pytest.fixture
def genuine_hf(monkeypatch):
    monkeypatch.setenv("SPD_OUT_DIR", str(GENUINE_HF / "spd_out"))
    monkeypatch.setenv("HF_HUB_CACHE", str(GENUINE_HF / "hf_hub"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs of each class (float32 and bf16 target weights); their hub cache."""
    root = tmp_path_factory.mktemp("hf")
    runs = {}
    for kind in KINDS:
        runs[kind] = write_run(kind, root / "out", root / "hub")
        runs[f"{kind}-bf16"] = write_run(
            kind, root / "out", root / "hub", run_id=f"s-{kind}bf16", weights_dtype=torch.bfloat16
        )
    runs["hub"] = root / "hub"
    return runs


def _load(tiny, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny["hub"]))
    return load_run(tiny[name])


def _validator(run, n_samples=3, **kw) -> Validator:
    tokens = run.samples[:n_samples]
    return Validator(run, tokens, list(range(len(tokens))), Settings(run_id="x", **kw))


def _all_items(v: Validator):
    return [v.item(*item) for item in v.items()]


# --- ground truth ----------------------------------------------------------------------


@pytest.mark.parametrize("run_id", sorted(GENUINE_HF_RUNS))
def test_captured_logits_and_ci_equal_spds_own_references(genuine_hf, run_id):
    run = load_run(run_id)
    ref = GENUINE_HF / "reference" / run_id
    tokens = torch.load(ref / "tokens.pt")
    cap = run.capture(tokens, modules=run.module_paths)
    tri = torch.ones(64, 64, dtype=torch.bool).tril()
    for layer, want in torch.load(ref / "reference_logits.pt").items():
        # spd captured through sdpa-loaded inputs: float32 rounding of ~1.5e-6 (README)
        diff = (cap.logits[layer] - want)[..., tri].abs().max()
        assert diff < 1e-5, (layer, float(diff))
    ci = run.causal_importances(tokens, capture=cap)
    for path, want in torch.load(ref / "reference_ci.pt").items():
        assert torch.allclose(ci[path], want, atol=1e-5), path


@pytest.mark.parametrize("kind", KINDS)
def test_captured_scores_reproduce_transformers_eager_attention(kind, tmp_path):
    _, snapshot = write_snapshot(kind, tmp_path)
    ours = HFTarget.build(CLASSES[kind], snapshot)
    theirs = tiny_hf_model(kind)  # eager attention, transformers' own
    tokens = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    cap = ours.capture(tokens)
    with torch.no_grad():
        out = theirs(input_ids=tokens, output_attentions=True, use_cache=False)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    for layer, attn in enumerate(out.attentions):
        pattern = cap.logits[layer].masked_fill(~causal, float("-inf")).softmax(-1)
        assert torch.allclose(pattern, attn, atol=1e-6), layer
    assert torch.allclose(ours(tokens), out.logits, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_capture_of_some_layers_records_only_theirs_and_the_same_values(kind, tmp_path):
    """``layers``: only those layers' attention inputs and logits (the capture's bulk); the
    forward pass and the rest of the capture are unchanged."""
    _, snapshot = write_snapshot(kind, tmp_path)
    model = HFTarget.build(CLASSES[kind], snapshot)
    tokens = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    full, part = model.capture(tokens), model.capture(tokens, layers=[1])
    assert len(full.logits) > 1 and set(part.logits) == set(part.attn_inputs) == {1}
    assert torch.equal(part.logits[1], full.logits[1])
    assert torch.equal(part.attn_inputs[1], full.attn_inputs[1])
    assert part.resid_pre.keys() == full.resid_pre.keys()


def test_square_conv1d_weights_are_read_in_the_orientation_the_model_declares(genuine_hf):
    """GPT-2's c_proj is (32, 32): its shape cannot tell Conv1D's (d_in, d_out) apart."""
    run = load_run("s-5eed0101")
    path = "transformer.h.0.attn.c_proj"
    W, _ = run.target_weight(path)
    stored = run.model.get_submodule(path).weight
    assert W.shape == stored.shape == (32, 32)
    assert torch.equal(W, stored.T.detach()) and not torch.equal(W, stored.detach())


# --- the decomposition on each class ------------------------------------------------------


@pytest.mark.parametrize("name", [*KINDS, *(f"{k}-bf16" for k in KINDS)])
def test_every_item_closes_and_stays_within_the_bound(tiny, name, monkeypatch):
    v = _validator(_load(tiny, name, monkeypatch))
    results = _all_items(v)
    assert len(results) == 2 * 3 * 40
    assert all(r.closure_ok for r in results), max(r.closure_error for r in results)
    assert all(r.bound_ok for r in results), max(r.ratio for r in results)
    assert max(r.closure_error for r in results) < 1e-5
    # the residual is real (Δ ≠ 0), so the bound is tested, not vacuous
    assert max(abs(r.r) for r in results) > 1e-4


def test_a_bf16_target_is_run_on_its_rounded_weights(tiny, monkeypatch):
    run = _load(tiny, "qwen3-bf16", monkeypatch)
    q = run.model.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert q.dtype == torch.float32 and torch.equal(q, q.to(torch.bfloat16).float())


def _mutated(v: Validator, changes) -> Validator:
    v.specs = {i: dataclasses.replace(sp, **changes(sp)) for i, sp in v.specs.items()}
    v._weights.clear()
    return v


@pytest.mark.parametrize(
    "name, fault",
    [
        ("qwen3", lambda sp: {"qk_norm": None}),  # QK-norm omitted
        ("gpt2", lambda sp: {"q_cols": sp.k_cols, "k_cols": sp.q_cols}),  # slices swapped
        (  # llama3 scaling ignored: the default frequencies of the same theta
            "llama",
            lambda sp: {"rotary": RotaryConfig(sp.rotary.rotary_dim, base=sp.rotary.base)},
        ),
    ],
    ids=["qk-norm-omitted", "fused-slices-swapped", "llama3-scaling-ignored"],
)
def test_a_wrongly_modelled_architecture_breaks_closure(tiny, name, fault, monkeypatch):
    v = _mutated(_validator(_load(tiny, name, monkeypatch), n_samples=1), changes=fault)
    failed = [r for r in _all_items(v) if not r.closure_ok]
    assert len(failed) > 0.5 * len(v.items())


def test_qk_norm_gains_are_in_the_bound(tiny, monkeypatch):
    """Dropping γ from the bound's norms (γ drawn in [0.25, 1.75]) changes B_weight."""
    v = _validator(_load(tiny, "qwen3", monkeypatch), n_samples=1)
    with_gamma = v.group(0, 0).weight_bound.clone()
    w = v.weights(0)
    v._weights[0] = dataclasses.replace(w, gamma_Q=torch.ones_like(w.gamma_Q))
    v._groups.clear()
    assert not torch.allclose(v.group(0, 0).weight_bound, with_gamma, rtol=1e-3)


# --- documents ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_documents_restart_positions_and_attend_within(kind, tmp_path):
    """The second of two packed documents gets the logits it gets alone."""
    _, snapshot = write_snapshot(kind, tmp_path)
    model = HFTarget.build(CLASSES[kind], snapshot)
    tokens = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[0] * 10 + [1] * 14])
    packed = model.capture(tokens, document_ids=ids)
    alone = model.capture(tokens[:, 10:])
    for layer in range(2):
        got = packed.logits[layer][:, :, 10:, 10:]
        assert torch.allclose(got, alone.logits[layer], atol=1e-5), layer


def test_documents_not_restarted_are_caught(tmp_path, monkeypatch):
    """Positions not restarted in the target forward: GPT-2's learned positions then give
    the second document other logits than it gets alone. (With RoPE a logit depends on
    ``i − j`` only, so within one document an offset cannot change it.)"""
    import qkcheck.models.hf as H

    monkeypatch.setattr(H, "document_positions", lambda d: torch.arange(d.shape[1])[None])
    _, snapshot = write_snapshot("gpt2", tmp_path)
    model = HFTarget.build(CLASSES["gpt2"], snapshot)
    tokens = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(5))
    packed = model.capture(tokens, document_ids=torch.tensor([[0] * 10 + [1] * 14]))
    alone = model.capture(tokens[:, 10:])
    assert not torch.allclose(packed.logits[0][:, :, 10:, 10:], alone.logits[0], atol=1e-3)


# --- finding the target, and bad inputs ----------------------------------------------------


def test_the_hub_cache_is_found_through_each_variable(tmp_path, monkeypatch):
    name, snapshot = write_snapshot("llama", tmp_path / "a" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "a"))
    assert hf_hub.find_snapshot(name) == snapshot
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "a" / "hub").rename(tmp_path / "home" / ".cache" / "huggingface" / "hub")
    found = hf_hub.find_snapshot(name)
    assert found.parts[-4:] == snapshot.parts[-4:] and (found / "config.json").is_file()
    assert hf_hub.find_snapshot(str(found)) == found  # a local folder


def test_refs_main_picks_the_snapshot(tmp_path, monkeypatch):
    name, snapshot = write_snapshot("llama", tmp_path)
    other = snapshot.parent / ("f" * 40)
    other.mkdir()
    (other / "config.json").write_text("{}")
    os.utime(other, (2e9, 2e9))  # newer, but refs/main names the first
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert hf_hub.find_snapshot(name) == snapshot


def test_a_download_happens_only_when_allowed(tmp_path, monkeypatch):
    calls = []

    def fake(name):
        calls.append(name)
        return write_snapshot("gpt2", tmp_path / "dl")[1]

    monkeypatch.setattr(hf_hub, "_download", fake)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(RunNotFoundError, match="QKCHECK_HF_DOWNLOAD=1"):
        hf_hub.find_snapshot("tiny/gpt2")
    assert calls == []
    monkeypatch.setenv("QKCHECK_HF_DOWNLOAD", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert (hf_hub.find_snapshot("tiny/gpt2") / "config.json").is_file()
    assert calls == ["tiny/gpt2"]


def test_a_missing_snapshot_names_every_place_looked_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c1"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "c2"))
    with pytest.raises(RunNotFoundError) as e:
        hf_hub.find_snapshot("org/model")
    msg = str(e.value)
    for place in (tmp_path / "c1", tmp_path / "c2" / "hub", Path.home() / ".cache"):
        assert str(place) in msg
    assert "HF_HUB_CACHE" in msg and "local folder" in msg and "\n" not in msg


def test_an_unsupported_class_is_named_with_the_supported_ones(tiny, tmp_path, monkeypatch):
    import shutil

    run = shutil.copytree(tiny["llama"], tmp_path / "s-0000beef")
    cfg = run / "final_config.yaml"
    cfg.write_text(cfg.read_text().replace("LlamaForCausalLM", "MistralForCausalLM"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny["hub"]))
    with pytest.raises(UnsupportedError) as e:
        load_run(run)
    msg = str(e.value)
    assert "transformers.MistralForCausalLM" in msg and "pretrained_model_class" in msg
    assert all(f"transformers.{c}" in msg for c in ("LlamaForCausalLM", "Qwen3ForCausalLM"))


def test_a_config_disagreeing_with_the_checkpoint_is_one_error(tiny, tmp_path, monkeypatch):
    import json
    import shutil

    hub = shutil.copytree(tiny["hub"], tmp_path / "hub", symlinks=False)
    config = next((hub / "models--tiny--llama" / "snapshots").iterdir()) / "config.json"
    data = json.loads(config.read_text())
    data["intermediate_size"] = 48
    config.write_text(json.dumps(data))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    run = load_run(tiny["llama"])
    with pytest.raises(CheckpointError) as e:
        run.model  # noqa: B018
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "(64, 32)" in msg and "(48, 32)" in msg


def test_without_transformers_the_error_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    run = _load(tiny, "gpt2", monkeypatch)
    with pytest.raises(UnsupportedError, match=r"pip install 'qkcheck\[hf\]'"):
        run.model  # noqa: B018


def test_the_suite_passes_on_a_tiny_run_and_a_missing_target_is_one_line(tiny, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tiny["hub"])}
    cmd = [sys.executable, "-m", "pytest", "validation/", "-q", "-p", "no:cacheprovider"]
    cmd += ["--artifacts-dir", str(tmp_path / "a"), "--plots", "none"]
    ok = subprocess.run(
        [*cmd, "--run-id", str(tiny["qwen3"])], cwd=ROOT, env=env, text=True, capture_output=True
    )
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "240 passed" in ok.stdout
    env["HF_HUB_CACHE"] = str(tmp_path / "nothing")
    bad = subprocess.run(
        [*cmd, "--run-id", str(tiny["qwen3"])], cwd=ROOT, env=env, text=True, capture_output=True
    )
    assert bad.returncode != 0
    lines = [
        ln for ln in (bad.stdout + bad.stderr).splitlines() if "cannot find the HF target" in ln
    ]
    assert len(lines) == 1 and "Traceback" not in bad.stdout + bad.stderr


@pytest.mark.parametrize("run_id", ["s-5eed0101", "s-5eed0102", "s-5eed0106"])
def test_binary_mode_gates_pairs_with_spds_own_ci(genuine_hf, run_id):
    """Binary figures' totals on the fused GPT-2 run (one CI for q and k), the HF Llama run
    and the partial run equal the gated weight-only sum computed from spd's reference CI."""
    from qkcheck.figures import item_plot_data
    from qkcheck.pairs import binary_factors, component_sum

    run = load_run(run_id)
    ref = GENUINE_HF / "reference" / run_id
    tokens = torch.load(ref / "tokens.pt")[:1]
    want_ci = torch.load(ref / "reference_ci.pt")
    layer, q = run.layers[-1].layer, 40
    spec = run.layers[-1]
    ci_q, ci_k = want_ci[spec.q_path][0], want_ci[spec.k_path][0]
    tau = float(ci_q[q].quantile(0.7))  # a threshold some pairs pass and some do not
    v = Validator(run, tokens, [0], Settings(run_id="x", mode="binary", ci_threshold=tau))
    w = v.weights(layer)
    f = binary_factors(ci_q[q], ci_k[: q + 1], w.U_Q, w.U_K, v.layout(layer), q, tau)
    want = component_sum(f).numpy()
    got = item_plot_data(v, layer, 0, q).total
    assert abs(want).max() > 0.1  # some pairs survive the gate
    assert float(abs(got - want).max()) < 1e-4


def test_the_dataset_view_leaves_qk_norm_layers_out_with_the_reason(tiny, tmp_path, monkeypatch):
    from qkcheck.dataset_view import DatasetViewError, layer_view, write_dataset_view

    v = _validator(_load(tiny, "qwen3", monkeypatch), n_samples=1)
    with pytest.raises(DatasetViewError, match="QK-norm layer"):
        layer_view(v, v.layers[0])
    assert write_dataset_view(v, tmp_path, top_k=3) == []
    llama = _validator(_load(tiny, "llama", monkeypatch), n_samples=1)
    assert len(write_dataset_view(llama, tmp_path, top_k=3)) == 2 * len(llama.layers)
