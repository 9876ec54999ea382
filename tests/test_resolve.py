"""Run references → files: every reference form, offline caches, steps, demo, W&B fallback."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest

from qkcheck.errors import CheckpointError, ConfigError, RunNotFoundError
from qkcheck.runs import resolve
from qkcheck.runs.resolve import WandbRef, parse_wandb_ref, resolve_pretrain, resolve_run
from tests.conftest import GENUINE_OUT, GENUINE_PRETRAIN_DIR, GENUINE_RUN_DIR, GENUINE_RUN_ID


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("s-5eed0002", ("goodfire", "spd", "s-5eed0002")),
        ("55ea3f9b", ("goodfire", "spd", "55ea3f9b")),
        ("wandb:goodfire/spd/runs/s-5eed0002", ("goodfire", "spd", "s-5eed0002")),
        ("wandb:ent/proj/s-5eed0002", ("ent", "proj", "s-5eed0002")),
        ("ent/proj/runs/abcd1234", ("ent", "proj", "abcd1234")),
        ("ent/proj/abcd1234", ("ent", "proj", "abcd1234")),
        ("https://wandb.ai/ent/proj/runs/s-5eed0002", ("ent", "proj", "s-5eed0002")),
        ("https://wandb.ai/ent/proj/runs/s-5eed0002/overview?nw=x", ("ent", "proj", "s-5eed0002")),
    ],
)
def test_every_wandb_reference_form_spd_accepts_parses(reference, expected):
    assert parse_wandb_ref(reference) == WandbRef(*expected)


@pytest.mark.parametrize(
    "reference",
    ["demo", "s-5eed000", "ent/proj", "a/b/c/d/e", "https://example.com/a/b/runs/abcd1234", ""],
)
def test_non_references_parse_to_none(reference):
    assert parse_wandb_ref(reference) is None


@pytest.mark.parametrize(
    "reference",
    [
        GENUINE_RUN_ID,
        f"wandb:goodfire/spd/runs/{GENUINE_RUN_ID}",
        f"goodfire/spd/runs/{GENUINE_RUN_ID}",
        f"https://wandb.ai/goodfire/spd/runs/{GENUINE_RUN_ID}",
    ],
)
def test_wandb_references_resolve_offline_from_spd_out_dir(monkeypatch, reference):
    monkeypatch.setenv("SPD_OUT_DIR", str(GENUINE_OUT))
    files = resolve_run(reference)
    assert files.run_dir == GENUINE_OUT / "spd" / GENUINE_RUN_ID
    assert files.checkpoint.name == "model_400.pth"
    assert (files.step, files.name, files.root) == (400, GENUINE_RUN_ID, GENUINE_OUT)


def test_a_run_directory_or_checkpoint_file_resolves_directly():
    by_dir = resolve_run(GENUINE_RUN_DIR)
    by_file = resolve_run(str(GENUINE_RUN_DIR / "model_400.pth"))
    assert by_dir == by_file
    assert by_dir.config == GENUINE_RUN_DIR / "final_config.yaml"


def test_spd_runs_cache_and_qkcheck_cache_are_searched(monkeypatch, tmp_path):
    spd_cache = tmp_path / "spd_out" / "runs" / f"spd-{GENUINE_RUN_ID}"
    shutil.copytree(GENUINE_RUN_DIR, spd_cache)
    monkeypatch.setenv("SPD_OUT_DIR", str(tmp_path / "spd_out"))
    assert resolve_run(GENUINE_RUN_ID).run_dir == spd_cache

    own_cache = tmp_path / "qk" / "runs" / f"spd-{GENUINE_RUN_ID}"
    shutil.copytree(GENUINE_RUN_DIR, own_cache)
    monkeypatch.setenv("SPD_OUT_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("QKCHECK_CACHE", str(tmp_path / "qk"))
    files = resolve_run(f"wandb:goodfire/spd/runs/{GENUINE_RUN_ID}")
    assert (files.run_dir, files.name) == (own_cache, GENUINE_RUN_ID)


@pytest.fixture
def two_steps(tmp_path: Path) -> Path:
    run_dir = tmp_path / "spd" / GENUINE_RUN_ID
    shutil.copytree(GENUINE_RUN_DIR, run_dir)
    shutil.copy(run_dir / "model_400.pth", run_dir / "model_100.pth")
    shutil.copy(run_dir / "model_400.pth", run_dir / "model_2000.pth")
    return run_dir


def test_a_directory_takes_the_largest_step_not_the_last_in_text_order(two_steps):
    assert resolve_run(two_steps).step == 2000


@pytest.mark.parametrize(
    ("suffix", "step"), [("@100", None), ("", 100), ("@100", 100)], ids=["at", "arg", "both"]
)
def test_a_step_is_picked_with_at_or_the_step_argument(two_steps, suffix, step):
    files = resolve_run(f"{two_steps}{suffix}", step=step)
    assert (files.step, files.checkpoint.name) == (100, "model_100.pth")


def test_a_step_suffix_works_on_wandb_references(monkeypatch, two_steps):
    monkeypatch.setenv("SPD_OUT_DIR", str(two_steps.parent.parent))
    assert resolve_run(f"{GENUINE_RUN_ID}@100").step == 100


def test_conflicting_steps_are_refused(two_steps):
    with pytest.raises(RunNotFoundError, match="asks for step 100 but step=400 was passed"):
        resolve_run(f"{two_steps}@100", step=400)


def test_a_missing_step_lists_the_steps_present(two_steps):
    with pytest.raises(
        CheckpointError, match=r"no checkpoint for step 7; steps present: \[100, 400, 2000\]"
    ):
        resolve_run(two_steps, step=7)


def test_a_checkpoint_file_and_another_step_are_refused():
    with pytest.raises(RunNotFoundError, match="checkpoint of step 400, but step 100 was asked"):
        resolve_run(GENUINE_RUN_DIR / "model_400.pth", step=100)


def test_a_directory_without_checkpoint_names_what_it_holds(tmp_path):
    (tmp_path / "final_config.yaml").write_text("{}")
    (tmp_path / "lm.pth").write_bytes(b"")
    with pytest.raises(
        CheckpointError,
        match=r"no checkpoint model_<step>.pth; the directory holds \['final_config.yaml', 'lm.p",
    ):
        resolve_run(tmp_path)


def test_a_directory_without_config_is_a_config_error(tmp_path):
    shutil.copy(GENUINE_RUN_DIR / "model_400.pth", tmp_path)
    with pytest.raises(ConfigError, match=r"no final_config.yaml .* holds \['model_400.pth'\]"):
        resolve_run(tmp_path)


def test_an_unknown_run_id_lists_every_place_tried_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("SPD_OUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("QKCHECK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RunNotFoundError) as info:
        resolve_run("s-00000000")
    message = str(info.value)
    assert message.startswith("cannot find SPD run goodfire/spd/runs/s-00000000. Tried:")
    for place in (
        tmp_path / "out" / "runs" / "spd-s-00000000",
        tmp_path / "out" / "spd" / "s-00000000",
        tmp_path / "cache" / "runs" / "spd-s-00000000",
        tmp_path / "cache" / "spd" / "s-00000000",
    ):
        assert f"  - {place} (no such directory)" in message
    assert "  - W&B download (skipped: WANDB_MODE=offline)" in message
    assert "Fix: set SPD_OUT_DIR" in message


def test_without_wandb_installed_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(
        RunNotFoundError,
        match=r"W&B download \(wandb is not installed: pip install 'qkcheck\[wandb\]'\)",
    ):
        resolve_run("s-00000000")


def test_a_source_that_is_neither_path_nor_reference_says_which_forms_work():
    with pytest.raises(
        RunNotFoundError,
        match=r"'no/such/run.pth' is neither an existing file or directory .* nor a W&B reference",
    ) as info:
        resolve_run("no/such/run.pth")
    assert 'Give one of: "demo", a run directory, a model_<step>.pth file' in str(info.value)


# --- the demo run ----------------------------------------------------------------------------


def test_demo_resolves_inside_the_package(monkeypatch, spd_out_copy):
    monkeypatch.setattr(resolve, "DEMO_ROOT", spd_out_copy)
    files = resolve_run("demo")
    assert (files.run_dir, files.name, files.root) == (
        spd_out_copy / "spd" / GENUINE_RUN_ID,
        GENUINE_RUN_ID,
        spd_out_copy,
    )
    # its pretrain run is found beside it, whatever SPD_OUT_DIR says
    assert resolve_pretrain("wandb:goodfire/spd/runs/t-5eed0000", near=files.root).dir == (
        spd_out_copy / "pretrain_cache" / "spd-t-5eed0000"
    )


def test_a_missing_demo_says_it_is_not_built(monkeypatch, tmp_path):
    monkeypatch.setattr(resolve, "DEMO_ROOT", tmp_path / "run")
    with pytest.raises(
        RunNotFoundError,
        match=r"the demo run is not built: expected one run directory under .*/spd \(found none\)",
    ):
        resolve_run("demo")


# --- pretrain runs ---------------------------------------------------------------------------


def test_a_pretrain_wandb_reference_is_found_in_spd_out_pretrain_cache(monkeypatch):
    monkeypatch.setenv("SPD_OUT_DIR", str(GENUINE_OUT))
    pre = resolve_pretrain("wandb:goodfire/spd/runs/t-5eed0000")
    assert pre.dir == GENUINE_PRETRAIN_DIR
    assert pre.checkpoint == GENUINE_PRETRAIN_DIR / "model_step_2499.pt"
    assert pre.tokenizer == GENUINE_PRETRAIN_DIR / "tokenizer.json"
    assert pre.model_config == GENUINE_PRETRAIN_DIR / "model_config.yaml"


def test_a_local_pretrain_checkpoint_finds_its_configs_two_levels_up(tmp_path):
    out = tmp_path / "target_models" / "2025-01-01"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("model_config.yaml", "final_config.yaml", "tokenizer.json"):
        shutil.copy(GENUINE_PRETRAIN_DIR / name, out)
    for step in (500, 2499):
        shutil.copy(
            GENUINE_PRETRAIN_DIR / "model_step_2499.pt",
            out / "checkpoints" / f"model_step_{step}.pt",
        )
    by_file = resolve_pretrain(out / "checkpoints" / "model_step_500.pt")
    assert (by_file.dir, by_file.checkpoint.name) == (out, "model_step_500.pt")
    by_dir = resolve_pretrain(out)
    assert by_dir.checkpoint == out / "checkpoints" / "model_step_2499.pt"


def test_an_unfound_pretrain_run_lists_places_and_the_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SPD_OUT_DIR", str(tmp_path))
    with pytest.raises(RunNotFoundError) as info:
        resolve_pretrain("wandb:goodfire/spd/runs/t-00000000")
    message = str(info.value)
    assert f"  - {tmp_path / 'pretrain_cache' / 'spd-t-00000000'} (no such directory)" in message
    assert "load_run(..., pretrain=PATH)" in message


# --- the W&B download path, with a stand-in for the wandb client -----------------------------


class _FakeFile:
    def __init__(self, path: Path) -> None:
        self.name, self._path = path.name, path

    def download(self, root: str, replace: bool = False) -> None:
        shutil.copy(self._path, Path(root) / self.name)


def _fake_wandb(runs: dict[str, Path], calls: list[str]) -> types.ModuleType:
    class Api:
        def __init__(self, timeout: int | None = None) -> None:
            pass

        def run(self, path: str):
            calls.append(path)
            if path not in runs:
                raise ValueError(f"Could not find run {path}")
            folder = runs[path]
            return types.SimpleNamespace(
                files=lambda: [_FakeFile(p) for p in sorted(folder.iterdir())]
            )

    return types.SimpleNamespace(Api=Api)  # type: ignore[return-value]


def test_a_run_absent_offline_is_downloaded_into_qkcheck_cache(monkeypatch, tmp_path):
    calls: list[str] = []
    fake = _fake_wandb(
        {
            f"goodfire/spd/{GENUINE_RUN_ID}": GENUINE_RUN_DIR,
            "goodfire/spd/t-5eed0000": GENUINE_PRETRAIN_DIR,
        },
        calls,
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("QKCHECK_CACHE", str(tmp_path / "cache"))
    files = resolve_run(GENUINE_RUN_ID)
    assert files.run_dir == tmp_path / "cache" / "runs" / f"spd-{GENUINE_RUN_ID}"
    assert sorted(p.name for p in files.run_dir.iterdir()) == ["final_config.yaml", "model_400.pth"]
    pre = resolve_pretrain("wandb:goodfire/spd/runs/t-5eed0000")
    assert pre.dir == tmp_path / "cache" / "pretrain_cache" / "spd-t-5eed0000"
    assert pre.checkpoint is not None and pre.tokenizer is not None
    # a second lookup is served from the cache
    assert resolve_run(GENUINE_RUN_ID).run_dir == files.run_dir
    assert calls == [f"goodfire/spd/{GENUINE_RUN_ID}", "goodfire/spd/t-5eed0000"]

    with pytest.raises(
        RunNotFoundError,
        match=r"W&B download \(W&B lookup of goodfire/spd/runs/s-00000000 failed: ValueError: ",
    ):
        resolve_run("s-00000000")


def test_spds_wandb_download_folder_is_searched_under_spd_repo_root_and_cwd(monkeypatch, tmp_path):
    """spd's fetch_wandb_run_dir keeps a run in <repo>/wandb/<id>/files/, or in the one
    <repo>/wandb/*<id>/files/ a local W&B run left."""
    repo, cwd = tmp_path / "spd", tmp_path / "work"
    in_repo = repo / "wandb" / GENUINE_RUN_ID / "files"
    shutil.copytree(GENUINE_RUN_DIR, in_repo)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SPD_REPO_ROOT", str(repo))
    files = resolve_run(f"goodfire/spd/runs/{GENUINE_RUN_ID}@400")
    assert (files.run_dir, files.name, files.step) == (in_repo, GENUINE_RUN_ID, 400)

    monkeypatch.delenv("SPD_REPO_ROOT")
    local = cwd / "wandb" / f"run-20260227_101500-{GENUINE_RUN_ID}" / "files"
    shutil.copytree(GENUINE_RUN_DIR, local)
    assert resolve_run(GENUINE_RUN_ID).run_dir == local

    # spd's output folder comes first
    monkeypatch.setenv("SPD_OUT_DIR", str(GENUINE_OUT))
    assert resolve_run(GENUINE_RUN_ID).run_dir == GENUINE_RUN_DIR


def test_the_wandb_download_folders_tried_are_listed(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPD_REPO_ROOT", str(tmp_path / "spd"))
    (tmp_path / "wandb" / "s-00000000").mkdir(parents=True)  # no files/ inside
    with pytest.raises(RunNotFoundError) as info:
        resolve_run("s-00000000")
    message = str(info.value)
    assert f"  - {tmp_path / 'spd' / 'wandb' / 's-00000000' / 'files'} (no such directory)" in (
        message
    )
    assert f"  - {tmp_path / 'wandb' / 's-00000000' / 'files'} (no such directory)" in message
    assert "or SPD_REPO_ROOT to the spd checkout whose wandb/ holds it" in message
