"""The demo builder's pieces: a seeded corpus, a tokenizer HF can read, spd's file layout and
state-dict keys, deterministic bytes, and the budgets it refuses to write without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tools import build_demo as demo_build
from tools.build_demo import (
    PRETRAIN_RUN_ID,
    SPD_RUN_ID,
    BuildConfig,
    make_corpus,
    quality_problems,
    token_names,
    tokenizer_files,
)

TINY = BuildConfig.tiny()
SPD_DIR = Path("spd") / SPD_RUN_ID
PRETRAIN_DIR = Path("pretrain_cache") / f"spd-{PRETRAIN_RUN_ID}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny build, shared read-only by the tests of this module."""
    out = tmp_path_factory.mktemp("demo")
    report = demo_build.build(TINY, out, check=False, log=lambda _msg: None)
    return out, report


# --- corpus and tokenizer -----------------------------------------------------------------------


def test_the_corpus_is_the_same_for_the_same_seed_and_differs_for_another() -> None:
    a = make_corpus(32, 65, 256, seed=0)
    assert a.dtype == torch.int64 and a.shape == (32, 65)
    assert torch.equal(a, make_corpus(32, 65, 256, seed=0))
    assert not torch.equal(a, make_corpus(32, 65, 256, seed=1))


def test_the_corpus_holds_only_word_tokens_and_mostly_repeats() -> None:
    tokens = make_corpus(200, 64, 256, seed=0)
    assert int(tokens.min()) >= 2 and int(tokens.max()) < 256  # no [UNK] (0) or [EOS] (1)
    # a sequence that repeats a segment has far fewer distinct tokens than positions
    repeating = sum(len(set(row.tolist())) < 40 for row in tokens)
    assert 0.8 * len(tokens) < repeating < len(tokens)


def test_token_names_follow_the_fixture_convention() -> None:
    assert token_names(6) == ["[UNK]", "[EOS]", "t2", "t3", "t4", "t5"]


def test_the_tokenizer_json_round_trips_through_hf_tokenizers(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    files = tokenizer_files(64)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(files["tokenizer.json"]))
    tok = tokenizers.Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() == 64
    ids = [2, 17, 63, 5]
    text = tok.decode(ids)
    assert text == "t2 t17 t63 t5"
    assert tok.encode(text).ids == ids
    assert tok.encode("t2 nonsense").ids == [2, 0]  # unknown words map to [UNK]


def test_the_tokenizer_files_have_the_fields_of_spds_fixture() -> None:
    fixture = Path(__file__).parent / "data/spd-genuine-small/spd_out/pretrain_cache/spd-t-5eed0000"
    ours = tokenizer_files(512)
    for name, content in ours.items():
        theirs = json.loads((fixture / name).read_text())
        assert content == theirs, name


# --- the written run ----------------------------------------------------------------------------


def test_a_build_writes_spds_layout(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(
        [
            str(SPD_DIR / "final_config.yaml"),
            str(SPD_DIR / f"model_{TINY.spd_steps}.pth"),
            str(SPD_DIR / "metrics.jsonl"),
            str(SPD_DIR / "samples.pt"),
            str(PRETRAIN_DIR / "model_config.yaml"),
            str(PRETRAIN_DIR / "final_config.yaml"),
            str(PRETRAIN_DIR / f"model_step_{TINY.pretrain_steps - 1}.pt"),
            str(PRETRAIN_DIR / "tokenizer.json"),
            str(PRETRAIN_DIR / "tokenizer_config.json"),
            str(PRETRAIN_DIR / "special_tokens_map.json"),
        ]
    )


def test_the_spd_config_names_the_pretrain_run_and_decomposes_qkvo(
    tiny_run: tuple[Path, dict],
) -> None:
    out, _ = tiny_run
    config = yaml.safe_load((out / SPD_DIR / "final_config.yaml").read_text())
    assert config["pretrained_model_name"] == f"wandb:goodfire/spd/runs/{PRETRAIN_RUN_ID}"
    assert config["pretrained_model_class"] == demo_build.MODEL_CLASS
    assert config["ci_config"] == {
        "mode": "layerwise",
        "fn_type": "shared_mlp",
        "hidden_dims": list(TINY.ci_hidden_dims),
    }
    assert config["sigmoid_type"] == "leaky_hard"
    assert [m["module_pattern"] for m in config["module_info"]] == [
        "h.*.attn.q_proj",
        "h.*.attn.k_proj",
        "h.*.attn.v_proj",
        "h.*.attn.o_proj",
    ]
    fixture = yaml.safe_load(
        (
            Path(__file__).parent
            / "data/spd-genuine-small/spd_out/spd/s-5eed0002/final_config.yaml"
        ).read_text()
    )
    assert list(config) == list(fixture)


def test_the_checkpoint_has_spds_keys_and_shapes(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    state = torch.load(out / SPD_DIR / f"model_{TINY.spd_steps}.pth", weights_only=True)
    target = torch.load(
        out / PRETRAIN_DIR / f"model_step_{TINY.pretrain_steps - 1}.pt", weights_only=True
    )
    assert {f"target_model.{k}" for k in target} == {
        k for k in state if k.startswith("target_model.")
    }
    for path, C in TINY.module_paths().items():
        dash = path.replace(".", "-")
        W = state[f"target_model.{path}.weight"]
        d_out, d_in = W.shape
        assert state[f"_components.{dash}.V"].shape == (d_in, C)
        assert state[f"_components.{dash}.U"].shape == (C, d_out)
        ci = f"ci_fn._ci_fns.{dash}.layers"
        assert state[f"{ci}.0.W"].shape == (d_in, TINY.ci_hidden_dims[0])  # stored (in, out)
        assert state[f"{ci}.2.W"].shape == (TINY.ci_hidden_dims[0], C)
        assert state[f"{ci}.2.b"].shape == (C,)
    assert all(v.dtype == torch.float32 for v in state.values())
    n_modules = len(TINY.module_paths())
    assert len(state) == len(target) + n_modules * (2 + 4)


def test_the_samples_are_held_out_int64_token_ids(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    samples = torch.load(out / SPD_DIR / "samples.pt", weights_only=True)
    assert samples.dtype == torch.int64
    assert samples.shape == (TINY.n_samples, TINY.n_ctx)
    test_split = make_corpus(TINY.n_test_seqs, TINY.n_ctx, TINY.vocab_size, TINY.corpus_seed + 1)
    assert torch.equal(samples, test_split[: TINY.n_samples])


def test_the_saved_target_loads_into_qkchecks_model_and_reproduces_itself(
    tiny_run: tuple[Path, dict],
) -> None:
    from qkcheck.models import build_target_model

    out, report = tiny_run
    model_config = yaml.safe_load((out / PRETRAIN_DIR / "model_config.yaml").read_text())
    state = torch.load(
        out / PRETRAIN_DIR / f"model_step_{TINY.pretrain_steps - 1}.pt", weights_only=True
    )
    model = build_target_model(demo_build.MODEL_CLASS, model_config, state)
    # the builder's own held-out loss, recomputed from the saved weights by qkcheck's model:
    # any weight saved under the wrong name, transposed or from another step changes it
    test = make_corpus(TINY.n_test_seqs, TINY.n_ctx, TINY.vocab_size, TINY.corpus_seed + 1)
    held_out = test[TINY.n_samples : TINY.n_samples + TINY.n_eval_seqs]
    with torch.no_grad():
        logits = model(held_out[:, :-1])
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), held_out[:, 1:].reshape(-1)
    )
    assert float(loss) == pytest.approx(report["held_out_loss"], abs=1e-4)


def test_metrics_are_json_lines_with_steps(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    lines = [json.loads(s) for s in (out / SPD_DIR / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("step" in line for line in lines)
    assert lines[-1]["step"] == TINY.spd_steps


def test_two_builds_write_identical_bytes(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny_run
    demo_build.build(TINY, tmp_path, check=False, log=lambda _msg: None)
    for path in out.rglob("*"):
        if path.is_file():
            other = tmp_path / path.relative_to(out)
            assert other.read_bytes() == path.read_bytes(), path.relative_to(out)


def test_a_rebuild_removes_a_stale_checkpoint(tmp_path: Path) -> None:
    stale = tmp_path / SPD_DIR / "model_99999.pth"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    demo_build.build(TINY, tmp_path, check=False, log=lambda _msg: None)
    assert not stale.exists()
    assert (tmp_path / SPD_DIR / f"model_{TINY.spd_steps}.pth").is_file()


# --- the budgets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "active", "broken"),
    [
        pytest.param(0.10, 0.05, [], id="within-budget"),
        pytest.param(0.01, 0.05, ["‖Δ‖/‖W‖ = 0.010 outside"], id="delta-too-small"),
        pytest.param(0.30, 0.05, ["‖Δ‖/‖W‖ = 0.300 outside"], id="delta-too-large"),
        pytest.param(0.10, 0.50, ["fraction of lower CI > 0.01 is 0.500"], id="ci-too-dense"),
    ],
)
def test_quality_problems_name_the_module_and_the_number(
    delta: float, active: float, broken: list[str]
) -> None:
    report = {
        "delta_fraction": {"h.0.attn.q_proj": delta, "h.0.attn.v_proj": 0.9},
        "ci_active_fraction": {"h.0.attn.q_proj": active, "h.0.attn.o_proj": 0.9},
    }
    problems = quality_problems(report)
    assert len(problems) == len(broken)
    for problem, expected in zip(problems, broken, strict=True):
        assert problem.startswith("h.0.attn.q_proj") and expected in problem


def test_a_build_that_misses_its_budgets_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"misses its budgets, nothing written:\n  h\.0\.attn"):
        demo_build.build(TINY, tmp_path, check=True, log=lambda _msg: None)
    assert not any(tmp_path.iterdir())


def test_qkchecks_loader_reads_the_build_as_the_builder_wrote_it(
    tiny_run: tuple[Path, dict],
) -> None:
    """An independent check of the key layout: qkcheck's loader (load_run, qkcheck.ci) and
    the builder's own modules agree on target logits and on every module's lower CI."""
    from qkcheck import load_run
    from qkcheck.models import build_target_model

    out, _ = tiny_run
    run = load_run(out / SPD_DIR)
    samples = run.samples
    assert samples is not None and samples.shape == (TINY.n_samples, TINY.n_ctx)
    assert sorted(run.module_paths) == sorted(TINY.module_paths())

    state = torch.load(out / SPD_DIR / f"model_{TINY.spd_steps}.pth", weights_only=True)
    model_config = yaml.safe_load((out / PRETRAIN_DIR / "model_config.yaml").read_text())
    target = build_target_model(demo_build.MODEL_CLASS, model_config, None)
    decomp = demo_build.Decomposition(target, TINY.module_paths(), TINY.ci_hidden_dims)
    decomp.load_state_dict(state)
    _, inputs = decomp.clean_forward(samples)
    with torch.no_grad():
        ours = {p: v.clamp(0.0, 1.0) for p, v in decomp.pre_sigmoid(inputs).items()}
    theirs = run.causal_importances(samples)
    for path, ci in ours.items():
        torch.testing.assert_close(theirs[path], ci, msg=lambda m, p=path: f"{p}: {m}")
    expected = target.capture(samples).logits
    for layer, logits in run.target_attention_logits(samples).items():
        torch.testing.assert_close(logits, expected[layer])


# --- the shipped demo run -------------------------------------------------------------------------


def test_the_shipped_demo_is_small_and_is_what_the_default_config_builds() -> None:
    root = demo_build.DEFAULT_OUT
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 5 * 2**20
    cfg = BuildConfig()
    expected = demo_build.run_file_names(cfg)
    assert sorted(str(p.relative_to(root)) for p in files) == sorted(expected)
    config = yaml.safe_load((root / SPD_DIR / "final_config.yaml").read_text())
    assert config == demo_build.spd_config(cfg)
    samples = torch.load(root / SPD_DIR / "samples.pt", weights_only=True)
    assert samples.dtype == torch.int64 and samples.shape == (cfg.n_samples, cfg.n_ctx)
    assert cfg.n_samples >= 16


def test_the_shipped_demo_matches_its_manifest() -> None:
    """Every shipped file has the sha256 the manifest records (a changed file without a new
    manifest fails here), and the manifest covers exactly the run's files."""
    recorded = json.loads(demo_build.MANIFEST.read_text())
    assert recorded == demo_build.manifest(demo_build.DEFAULT_OUT, BuildConfig())


def test_the_untrained_files_of_the_shipped_demo_rebuild_byte_for_byte() -> None:
    """Configs, tokenizer and samples depend on no float arithmetic: the builder writes them
    byte for byte on any machine (the trained files are checked by `compare`)."""
    files = demo_build.untrained_files(BuildConfig())
    assert sorted(files) == sorted(json.loads(demo_build.MANIFEST.read_text())["untrained"])
    for name, data in files.items():
        assert (demo_build.DEFAULT_OUT / name).read_bytes() == data, name


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_compare_accepts_a_rebuild_within_tolerance_and_names_what_is_not(
    tiny_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = tiny_run
    recorded = demo_build.manifest(out, TINY)
    same = demo_build.compare(out, out, recorded)
    assert same.ok and same.differing == 0 and same.identical > 0

    target = PRETRAIN_DIR / f"model_step_{TINY.pretrain_steps - 1}.pt"
    key = "h.0.attn.q_proj.weight"

    def rebuilt_with(offset: float, name: str) -> demo_build.Comparison:
        other = _copy(out, tmp_path / f"{name}")
        state = torch.load(other / target, weights_only=True)
        state[key] = state[key] + offset
        torch.save(state, other / target)
        return demo_build.compare(other, out, recorded)

    close = rebuilt_with(demo_build.TRAINED_ATOL / 2, "close")
    assert close.ok and close.differing == 1
    assert close.max_abs_diff == pytest.approx(demo_build.TRAINED_ATOL / 2, rel=1e-3)
    far = rebuilt_with(1.0, "far")
    assert not far.ok and len(far.failures) == 1 and key in far.failures[0]

    edited = _copy(out, tmp_path / "edited")
    config = edited / SPD_DIR / "final_config.yaml"
    config.write_text(config.read_text() + "# edited\n")
    result = demo_build.compare(edited, out, recorded)
    assert result.failures == [
        f"{SPD_DIR / 'final_config.yaml'}: not byte-identical (an untrained file must be)"
    ]


def test_compare_checks_component_weights_not_their_factors(
    tiny_run: tuple[Path, dict], tmp_path: Path
) -> None:
    """``V`` and ``U`` may move apart while ``(V U)ᵀ`` stays: rescaling them passes; a
    changed product fails and names the module."""
    out, _ = tiny_run
    recorded = demo_build.manifest(out, TINY)
    ckpt = SPD_DIR / f"model_{TINY.spd_steps}.pth"
    prefix = "_components.h-0-attn-k_proj"
    for name, scale_u, ok in (("rescaled", 0.5, True), ("changed", 3.0, False)):
        other = _copy(out, tmp_path / name)
        state = torch.load(other / ckpt, weights_only=True)
        state[f"{prefix}.V"] = state[f"{prefix}.V"] * 2.0
        state[f"{prefix}.U"] = state[f"{prefix}.U"] * scale_u
        torch.save(state, other / ckpt)
        result = demo_build.compare(other, out, recorded)
        assert result.ok is ok and result.differing == 2, name
        if not ok:
            assert any(f"{prefix} (V U)" in f for f in result.failures)
