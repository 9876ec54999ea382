"""param-decomp runs: resolution, orbax reading, stack→site mapping, targets, errors, and the
validation suite end to end (fixture: tests/data/param-decomp-small, laid out as
PARAM_DECOMP_OUT_DIR)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ts = pytest.importorskip("tensorstore")

from qkcheck import CheckpointError, ConfigError, RunNotFoundError, SamplesError, load_run  # noqa: E402
from qkcheck.coverage import layer_coverage  # noqa: E402
from qkcheck.errors import UnsupportedError  # noqa: E402
from qkcheck.runs.param_decomp.orbax import CheckpointItem  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "param-decomp-small"
RUN_ID = "p-5eed0a01"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def out_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PARAM_DECOMP_OUT_DIR", str(FIXTURE))
    monkeypatch.setenv("QKCHECK_CACHE", str(tmp_path / "cache"))
    return FIXTURE


@pytest.fixture
def copy(tmp_path, monkeypatch):
    """A writable copy of the fixture as PARAM_DECOMP_OUT_DIR."""
    dest = tmp_path / "out"
    shutil.copytree(FIXTURE, dest)
    monkeypatch.setenv("PARAM_DECOMP_OUT_DIR", str(dest))
    monkeypatch.setenv("QKCHECK_CACHE", str(tmp_path / "cache"))
    return dest


# --- resolution ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        RUN_ID,
        f"wandb:goodfire/param-decomp/runs/{RUN_ID}",
        f"goodfire/param-decomp/runs/{RUN_ID}",
        f"goodfire/other-project/runs/{RUN_ID}",
        f"https://wandb.ai/goodfire/param-decomp/runs/{RUN_ID}",
        f"https://wandb.ai/goodfire/param-decomp/runs/{RUN_ID}/overview?nw=1",
        str(FIXTURE / "runs" / RUN_ID),
    ],
)
def test_every_reference_form_finds_the_run_at_its_latest_step(out_dir, ref):
    run = load_run(ref)
    assert (run.name, run.step, run.steps) == (RUN_ID, 80, (40, 80))
    assert run.files.checkpoint == FIXTURE / "runs" / RUN_ID / "ckpts" / "80" / "decomposition"


@pytest.mark.parametrize("ref", [f"{RUN_ID}@40", str(FIXTURE / "runs" / RUN_ID) + "@40"])
def test_at_step_picks_that_checkpoint_and_its_components(out_dir, ref):
    at40 = load_run(ref)
    assert at40.step == 40
    assert at40.files.checkpoint.parent.name == "40"  # (the fixture's two steps hold equal arrays)
    assert load_run(RUN_ID, step=40).step == 40


def test_a_missing_step_lists_the_steps_present(out_dir):
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 50; steps present: 40, 80"):
        load_run(f"{RUN_ID}@50")


def test_an_unknown_id_names_every_place_tried(out_dir, tmp_path):
    with pytest.raises(
        RunNotFoundError,
        match=(
            r"p-00000000: tried .*param-decomp-small/runs/p-00000000 \(no "
            r"such directory\); .*cache/runs/p-00000000"
        ),
    ):
        load_run("p-00000000")


def test_spd_forms_still_resolve_as_spd():
    assert load_run("demo").name == "s-qkdemo01"


# --- reading ---------------------------------------------------------------------------------


def _item(step=80):
    return CheckpointItem(FIXTURE / "runs" / RUN_ID / "ckpts" / str(step) / "decomposition")


def test_components_are_the_stack_slice_of_their_layer_read_plainly(out_dir):
    run = load_run(RUN_ID)
    item = _item()
    for layer in (0, 1):
        for kind in ("q_proj", "k_proj"):
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "ocdbt", "base": f"file://{item.dir.resolve()}/"},
            }
            V = ts.open({**spec, "path": f"components.stacks.{kind}.0"}).result().read().result()
            U = ts.open({**spec, "path": f"components.stacks.{kind}.1"}).result().read().result()
            got_V, got_U = run.components(f"h.{layer}.attn.{kind}")
            np.testing.assert_array_equal(got_V.numpy(), V[layer])
            np.testing.assert_array_equal(got_U.numpy(), U[layer])
    # Δ small against the target weight: the components belong to these weights
    V, U = run.components("h.1.attn.k_proj")
    W, bias = run.target_weight("h.1.attn.k_proj")
    assert bias is None and W.shape == (16, 32)
    assert float((W - (V @ U).T).norm() / W.norm()) < 0.2


def test_target_weights_are_the_pretrain_safetensors(out_dir):
    from safetensors.torch import load_file

    run = load_run(RUN_ID)
    state = load_file(FIXTURE / "pretrain_cache" / "spd-t-5eed0a00" / "model_step_1999.safetensors")
    assert torch.equal(run.target_weight("h.0.attn.q_proj")[0], state["h.0.attn.q_proj.weight"])
    assert run.model.lm_head.weight is run.model.wte.weight


def test_only_the_needed_slice_is_read(out_dir):
    """Reading one layer's q/k touches only the q/k arrays (bytes counted by tensorstore)."""
    run = load_run(RUN_ID)

    def bytes_read():
        m = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
        return sum(v.get("value", 0) for x in m for v in x.get("values", []))

    before = bytes_read()
    run.components("h.0.attn.q_proj")
    run.components("h.0.attn.k_proj")
    used = bytes_read() - before
    # q/k stacks hold 2 * (2*32*36 + 2*36*32 + 2*32*20 + 2*20*16) * 4 bytes = 53 kB; every
    # stack of the item is 2.6x that. One layer must not read the others' arrays.
    everything = sum(int(np.prod(s)) * 4 for s in _item().shapes.values())
    assert 0 < used < everything / 2


# --- the site mapping, on layouts written with tensorstore -----------------------------------


def _write_item(item_dir: Path, arrays: dict[str, np.ndarray], zarr3=False, listed=None):
    """An orbax-like item: arrays in an OCDBT store, _METADATA listing ``listed`` (default
    the arrays)."""
    item_dir.mkdir(parents=True)
    base = {"driver": "ocdbt", "base": f"file://{item_dir}/"}
    for key, a in arrays.items():
        if zarr3:
            meta = {"shape": list(a.shape), "data_type": "float32"}
        else:
            meta = {"shape": list(a.shape), "dtype": "<f4", "chunks": list(a.shape)}
        t = ts.open(
            {
                "driver": "zarr3" if zarr3 else "zarr",
                "kvstore": base,
                "path": key,
                "metadata": meta,
                "create": True,
            }
        ).result()
        t.write(a).result()
    listed = listed if listed is not None else {k: a.shape for k, a in arrays.items()}
    tree = {
        str(tuple(k.split("."))): {
            "key_metadata": [{"key": p, "key_type": 2} for p in k.split(".")],
            "value_metadata": {"value_type": "jax.Array", "write_shape": list(shape)},
        }
        for k, shape in listed.items()
    }
    (item_dir / "_METADATA").write_text(json.dumps({"tree_metadata": tree, "use_zarr3": zarr3}))
    (item_dir.parent / "commit_success.txt").write_text("ok")


def _variant(copy: Path, stacks: dict[str, np.ndarray], config_edit, zarr3=False, listed=None):
    """Replace the copy's step-80 checkpoint by one holding ``stacks``; edit its config."""
    run_dir = copy / "runs" / RUN_ID
    shutil.rmtree(run_dir / "ckpts")
    _write_item(run_dir / "ckpts" / "80" / "decomposition", stacks, zarr3, listed)
    path = run_dir / "launch_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    config_edit(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_dir


def _stacks(kinds=("q_proj", "k_proj"), step=80):
    item = _item(step)
    return {
        f"components.stacks.{k}.{i}": item.read(f"components.stacks.{k}.{i}")
        for k in kinds
        for i in (0, 1)
    }


def _only_layer_1(cfg):
    cfg["decomposition"]["sites"]["layers"] = {"kind": "list", "indices": [1]}
    cfg["decomposition"]["sites"]["cs"] = {"q_proj": 36, "k_proj": 20}


@pytest.mark.parametrize("zarr3", [False, True])
def test_list_layers_with_a_padding_slice_map_rank_to_layer(copy, zarr3):
    full = _stacks()
    # layer 1 alone: slice 0 holds layer 1's components, slice 1 is padding (zeros)
    stacks = {k: np.stack([a[1], np.zeros_like(a[1])]) for k, a in full.items()}
    _variant(copy, stacks, _only_layer_1, zarr3=zarr3)
    run = load_run(RUN_ID)
    assert run.module_paths == ["h.1.attn.q_proj", "h.1.attn.k_proj"]
    assert layer_coverage(run.layers, set(run.module_paths)).decomposed == [1]
    np.testing.assert_array_equal(
        run.components("h.1.attn.q_proj")[0].numpy(), full["components.stacks.q_proj.0"][1]
    )
    with pytest.raises(Exception, match=r"module 'h.0.attn.q_proj' is not decomposed"):
        run.components("h.0.attn.q_proj")


def test_a_stack_shorter_than_the_sites_is_an_error(copy):
    stacks = {k: a[:1] for k, a in _stacks().items()}
    _variant(
        copy, stacks, lambda c: c["decomposition"]["sites"].update(cs={"q_proj": 36, "k_proj": 20})
    )
    with pytest.raises(
        CheckpointError,
        match=(
            r"array 'components.stacks.q_proj.0' has 1 stack slices but "
            r"the launch config decomposes 2 q_proj sites"
        ),
    ):
        load_run(RUN_ID)


def test_c_disagreeing_with_the_launch_config_names_file_and_array(copy):
    _variant(
        copy,
        _stacks(),
        lambda c: c["decomposition"]["sites"].update(cs={"q_proj": 30, "k_proj": 20}),
    )
    with pytest.raises(
        CheckpointError,
        match=(
            r"decomposition: array 'components.stacks.q_proj.0' has shape "
            r"\(2, 32, 36\), but the launch config's "
            r"decomposition.sites.cs.q_proj is 30"
        ),
    ):
        load_run(RUN_ID)


# --- corrupt and partial checkpoints ----------------------------------------------------------


def test_no_commit_success_is_a_partial_checkpoint(copy):
    (copy / "runs" / RUN_ID / "ckpts" / "80" / "commit_success.txt").unlink()
    with pytest.raises(
        CheckpointError,
        match=(
            r"ckpts/80: no commit_success.txt: the checkpoint was not "
            r"completely written"
        ),
    ):
        load_run(RUN_ID)
    assert load_run(f"{RUN_ID}@40").step == 40


def test_missing_metadata_names_the_file(copy):
    (copy / "runs" / RUN_ID / "ckpts" / "80" / "decomposition" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match=r"decomposition/_METADATA: missing"):
        load_run(RUN_ID)


def test_an_array_listed_but_absent_names_the_array(copy):
    stacks = _stacks()
    listed = {k: a.shape for k, a in stacks.items()}
    del stacks["components.stacks.k_proj.1"]
    _variant(
        copy,
        stacks,
        lambda c: c["decomposition"]["sites"].update(cs={"q_proj": 36, "k_proj": 20}),
        listed=listed,
    )
    run = load_run(RUN_ID)
    with pytest.raises(
        CheckpointError,
        match=(
            r"array 'components.stacks.k_proj.1' is listed in _METADATA "
            r"but cannot be opened"
        ),
    ):
        run.components("h.0.attn.k_proj")


def test_an_array_missing_from_metadata_names_the_array(copy):
    stacks = _stacks()
    del stacks["components.stacks.k_proj.0"]
    _variant(
        copy, stacks, lambda c: c["decomposition"]["sites"].update(cs={"q_proj": 36, "k_proj": 20})
    )
    with pytest.raises(
        CheckpointError, match=(r"no array 'components.stacks.k_proj.0' in the checkpoint")
    ):
        load_run(RUN_ID)


def test_a_truncated_chunk_is_a_clear_error(copy):
    data = copy / "runs" / RUN_ID / "ckpts" / "80" / "decomposition" / "ocdbt.process_0" / "d"
    for f in data.iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"(cannot read its data|cannot be opened)"):
        load_run(RUN_ID).components("h.0.attn.q_proj")


def test_a_bad_launch_config_field_is_named(copy):
    path = copy / "runs" / RUN_ID / "launch_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["decomposition"]["sites"]["kind"] = "conv"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ConfigError, match=(r"launch_config.yaml: field 'decomposition.sites.kind'")
    ):
        load_run(RUN_ID)


def _hf_variant(copy, tmp_path, monkeypatch, kind, weights_dtype="float32", C=40):
    """The copy's run made to decompose a tiny HF ``kind`` target's q/k (glu_transformer
    sites) from a snapshot in a fresh HF hub cache; components: the SVD of each weight, plus
    noise, so Δ is small but not zero."""
    from tests.hf_runs import tiny_hf_model, write_snapshot

    hub = tmp_path / "hub"
    name, _ = write_snapshot(kind, hub)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    state = tiny_hf_model(kind).state_dict()
    g = torch.Generator().manual_seed(5)
    stacks = {}
    for side in ("q", "k"):
        Vs, Us = [], []
        for layer in (0, 1):
            W = state[f"model.layers.{layer}.self_attn.{side}_proj.weight"].double()
            u, sv, vh = torch.linalg.svd(W, full_matrices=False)
            r = sv.numel()
            V = torch.cat(
                [
                    vh.T * sv.sqrt(),
                    0.1 * torch.randn(W.shape[1], C - r, generator=g, dtype=W.dtype),
                ],
                1,
            )
            U = torch.cat([(u * sv.sqrt()).T, torch.zeros(C - r, W.shape[0], dtype=W.dtype)], 0)
            Vs.append(V.float().numpy())
            Us.append((U + 0.01 * torch.randn(U.shape, generator=g, dtype=W.dtype)).float().numpy())
        stacks[f"components.stacks.{side}.0"] = np.stack(Vs)
        stacks[f"components.stacks.{side}.1"] = np.stack(Us)
    classes = {"llama": "transformers.LlamaForCausalLM", "qwen3": "transformers.Qwen3ForCausalLM"}

    def edit(cfg):
        cfg["decomposition"]["sites"] = {
            "kind": "glu_transformer",
            "layers": {"kind": "all"},
            "cs": {"q": C, "k": C},
        }
        cfg["target"]["spec"] = {"kind": "hf", "model_class": classes[kind], "model_name": name}
        cfg["target"]["weights_dtype"] = weights_dtype

    _variant(copy, stacks, edit)
    return stacks


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_hf_targets_run_through_transformers_with_their_sites(copy, tmp_path, monkeypatch, kind):
    stacks = _hf_variant(copy, tmp_path, monkeypatch, kind, weights_dtype="bfloat16")
    run = load_run(RUN_ID)
    paths = [f"model.layers.{i}.self_attn.{s}_proj" for s in ("q", "k") for i in (0, 1)]
    assert run.module_paths == paths
    assert layer_coverage(run.layers, set(run.module_paths)).decomposed == [0, 1]
    V, U = run.components("model.layers.1.self_attn.k_proj")
    np.testing.assert_array_equal(V.numpy(), stacks["components.stacks.k.0"][1])
    np.testing.assert_array_equal(U.numpy(), stacks["components.stacks.k.1"][1])
    W = run.target_weight("model.layers.1.self_attn.k_proj")[0]
    snapshot_W = tiny_hf_model_weight(kind, "model.layers.1.self_attn.k_proj.weight")
    assert torch.equal(W, snapshot_W.bfloat16().float()) and not torch.equal(W, snapshot_W)
    assert (run.layers[0].qk_norm is not None) == (kind == "qwen3")
    res = _suite(copy, "--artifacts-dir", str(tmp_path / "art"), "--plots", "none")
    assert res.returncode == 0, res.stdout[-3000:]
    summary = json.loads((tmp_path / "art" / "summary.json").read_text())
    assert summary["totals"] == {"items": 12, "passed": 12, "failed": 0}
    assert max(row["max_closure_error"] for row in summary["layers"].values()) < 1e-5


def tiny_hf_model_weight(kind: str, key: str) -> torch.Tensor:
    from tests.hf_runs import tiny_hf_model

    return tiny_hf_model(kind).state_dict()[key]


def test_hf_target_with_components_of_the_wrong_layer_fails_the_gate(copy, tmp_path, monkeypatch):
    stacks = _hf_variant(copy, tmp_path, monkeypatch, "llama")
    swapped = {k: a[::-1].copy() for k, a in stacks.items()}
    _variant(copy, swapped, lambda cfg: None)
    res = _suite(copy, "--artifacts-dir", str(tmp_path / "art"), "--plots", "none")
    assert res.returncode == 1, res.stdout[-3000:]
    assert "test_weight_delta_is_within_budget[model.layers.0.self_attn.q_proj]" in res.stdout


def test_hf_target_errors_name_the_field(copy, tmp_path, monkeypatch):
    _hf_variant(copy, tmp_path, monkeypatch, "llama")
    path = copy / "runs" / RUN_ID / "launch_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["decomposition"]["sites"]["kind"] = "simple_mlp"
    cfg["decomposition"]["sites"]["cs"] = {"q_proj": 40, "k_proj": 40}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"field 'decomposition.sites.kind': HF targets are"):
        load_run(RUN_ID)
    cfg["decomposition"]["sites"] = {"kind": "glu_transformer", "layers": {"kind": "all"}}
    cfg["decomposition"]["sites"]["cs"] = {"q": 40, "k": 40}
    cfg["target"]["spec"]["model_name"] = "tiny/absent"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RunNotFoundError, match=r"HF_HUB_CACHE"):
        load_run(RUN_ID)
    cfg["target"]["spec"]["model_class"] = "transformers.MistralForCausalLM"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        UnsupportedError,
        match=r"field 'target.spec.model_class': transformers class 'transformers.Mistral.*"
        r"supported: transformers.LlamaForCausalLM",
    ):
        load_run(RUN_ID)


def test_binary_mode_is_refused(out_dir):
    run = load_run(RUN_ID)
    with pytest.raises(
        UnsupportedError, match=(r"chunkwise_transformer.*not readable from its checkpoints")
    ):
        run.causal_importances(torch.zeros(1, 4, dtype=torch.long))


# --- samples -----------------------------------------------------------------------------------


def test_samples_file_and_the_runs_parquet_data_set(copy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = load_run(RUN_ID)
    tokens = run.load_samples(str(FIXTURE / "tokens.npy")).tokens
    assert torch.equal(tokens, torch.from_numpy(np.load(FIXTURE / "tokens.npy")).long())
    with pytest.raises(
        SamplesError,
        match=(
            r"data set 'synthetic_tok_32_val' is not present locally: "
            r"tried .*datasets/synthetic_tok_32_val \(missing\)"
        ),
    ):
        run.load_samples("dataset")
    folder = copy / "datasets" / "synthetic_tok_32_val"
    folder.mkdir(parents=True)
    rows = [[int(t) for t in r] for r in np.load(FIXTURE / "tokens.npy")] + [[1, 2]]
    pq.write_table(pa.table({"text_len": [0] * 7, "input_ids": rows}), folder / "part-0.parquet")
    got = run.load_samples("dataset", n=3, seq_len=32).tokens
    assert torch.equal(got, tokens[:3])


# --- the validation suite end to end ----------------------------------------------------------


def _suite(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PARAM_DECOMP_OUT_DIR": str(out), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "validation/",
            "--run-id",
            RUN_ID,
            "--samples-file",
            str(FIXTURE / "tokens.npy"),
            "-q",
            "-p",
            "no:randomly",
            "--samples",
            "2",
            "--query-pos",
            "0,9,31",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_suite_passes_on_the_fixture(tmp_path):
    res = _suite(FIXTURE, "--artifacts-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:]
    assert "12 passed" in res.stdout


def test_swapped_layers_fail_the_quality_gate(copy, tmp_path):
    stacks = {k: a[::-1].copy() for k, a in _stacks().items()}
    _variant(
        copy, stacks, lambda c: c["decomposition"]["sites"].update(cs={"q_proj": 36, "k_proj": 20})
    )
    res = _suite(copy, "--artifacts-dir", str(tmp_path))
    assert res.returncode == 1, res.stdout[-3000:]
    assert "test_weight_delta_is_within_budget[h.0.attn.q_proj]" in res.stdout
    assert "exceeds the budget" in res.stdout


def test_a_mapping_off_by_one_fails_the_quality_gate(copy, tmp_path):
    # the config says only layer 1 is decomposed, but slice 0 holds layer 0's components
    _variant(copy, _stacks(), _only_layer_1)
    res = _suite(copy, "--artifacts-dir", str(tmp_path))
    assert res.returncode == 1, res.stdout[-3000:]
    assert "test_weight_delta_is_within_budget[h.1.attn.q_proj]" in res.stdout


def test_a_partial_bf16_variant_passes(copy, tmp_path):
    full = _stacks()
    stacks = {k: np.stack([a[1], np.zeros_like(a[1])]) for k, a in full.items()}

    def edit(cfg):
        _only_layer_1(cfg)
        cfg["target"]["weights_dtype"] = "bfloat16"

    _variant(copy, stacks, edit)
    run = load_run(RUN_ID)
    W = run.target_weight("h.1.attn.q_proj")[0]
    # the weights are the bf16-rounded values, held and computed in float32 (as param-decomp
    # computes its scores), and they differ from the float32 originals
    assert W.dtype == torch.float32 and torch.equal(W, W.bfloat16().float())
    original = load_run(str(FIXTURE / "runs" / RUN_ID)).target_weight("h.1.attn.q_proj")[0]
    assert not torch.equal(W, original)
    res = _suite(copy, "--artifacts-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:]
    # closure is checked at float32 precision, not a vacuous bf16 tolerance
    layer = json.loads((tmp_path / "summary.json").read_text())["layers"]["1"]
    assert layer["max_closure_error"] < 1e-5
    assert "L0-" not in res.stdout.split("qkcheck summary")[-1].split("total")[0].replace(
        "layer", ""
    )


def test_binary_mode_is_a_usage_error(tmp_path):
    res = _suite(FIXTURE, "--mode", "binary", "--artifacts-dir", str(tmp_path))
    assert res.returncode == 4
    assert "--mode binary: run p-5eed0a01: param-decomp's CI functions" in res.stderr
    assert "Traceback" not in res.stderr


def test_the_suite_with_document_ids_skips_padding_queries(tmp_path):
    ids = np.zeros((6, 32), dtype=np.int64)
    ids[:, 10:] = 1
    ids[1, 28:] = -1  # sample 1 ends in padding: its query 31 has no key
    path = tmp_path / "doc_ids.npy"
    np.save(path, ids)
    res = _suite(FIXTURE, "--doc-ids", str(path), "--artifacts-dir", str(tmp_path / "a"))
    assert res.returncode == 0, res.stdout[-3000:]
    assert "10 passed" in res.stdout  # 2 layers × (3 + 2) items, no L*-S1-Q31
    bad = tmp_path / "bad.npy"
    np.save(bad, ids[:, :5])
    res = _suite(FIXTURE, "--doc-ids", str(bad), "--artifacts-dir", str(tmp_path / "b"))
    assert res.returncode == 4
    assert "bad.npy: document ids have shape (6, 5), but the samples are (6, 32)" in res.stderr
