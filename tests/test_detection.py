"""The suite catches the faults it exists for (issue: detection power).

Each test runs ``validation/`` in a fresh pytest process (pytester) on the genuine spd run:

* analysis bugs are injected into the decomposition path only, through a conftest in the
  pytester directory, leaving the target model's own forward untouched — each must fail
  per-item checks;
* runs whose decomposition does not belong to the target are built as checkpoint copies —
  each must fail the run-level quality gate while every per-item check still passes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import GENUINE, GENUINE_RUN_ID

pytest_plugins = ["pytester"]

VALIDATION = Path(__file__).parents[1] / "validation"
TOKENS = GENUINE / "reference" / "tokens.pt"

INJECT = {
    "rotary-layout-swapped": """
import dataclasses, qkcheck.rotary as R
_orig = R.apply_rotary
def _swapped(x, cos, sin, config):
    return _orig(x, cos, sin, dataclasses.replace(config, adjacent_pairs=not config.adjacent_pairs))
R.apply_rotary = _swapped
""",
    "key-positions-shifted-by-one": """
import qkcheck.decompose as D
_orig = D.rotate
def _shifted(x, positions, config):
    if x.shape[1] == 2:  # the key side (2 key heads, 4 query heads in this run)
        positions = positions + 1
    return _orig(x, positions, config)
D.rotate = _shifted
""",
    "key-heads-grouped-wrongly": """
import qkcheck.decompose as D
def _tiled(q, k):  # query head h reads key head h % n_kv instead of h // group
    return q @ k.repeat(1, q.shape[1] // k.shape[1], 1, 1).transpose(-1, -2)
D._grouped_scores = _tiled
""",
    "logit-scale-missing": """
import dataclasses, qkcheck.validate as V
_orig = V.Validator.layout
V.Validator.layout = lambda self, layer: dataclasses.replace(_orig(self, layer), scale=1.0)
""",
    "logit-scale-applied-twice": """
import dataclasses, qkcheck.validate as V
_orig = V.Validator.layout
def _twice(self, layer):
    lay = _orig(self, layer)
    return dataclasses.replace(lay, scale=lay.scale ** 2)
V.Validator.layout = _twice
""",
    "attention-input-before-the-norm": """
import dataclasses, qkcheck.validate as V
_orig = V.Validator.capture
def _pre_norm(self, sample, layer=None):
    cap, row = _orig(self, sample, layer)
    return dataclasses.replace(cap, attn_inputs=cap.resid_pre), row
V.Validator.capture = _pre_norm
""",
}


def setup_suite(pytester: pytest.Pytester, spd_out: Path, inject: str = "") -> None:
    """Copy validation/ into the pytester directory, with an optional fault injection."""
    conftest = (VALIDATION / "conftest.py").read_text()
    pytester.makeconftest(conftest + "\n" + inject)
    for name in ("test_items.py", "test_quality.py"):
        shutil.copy(VALIDATION / name, pytester.path / name)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    pytester._monkeypatch.setenv("SPD_OUT_DIR", str(spd_out))


def run_suite(
    pytester: pytest.Pytester, *args: str, run: tuple[str, ...] | None = None
) -> tuple[dict, set[str]]:
    """Run the suite (on the genuine run unless ``run`` gives other run options); return
    the summary JSON and the names of failed tests."""
    art = pytester.path / "artifacts"
    run = run or ("--run-id", GENUINE_RUN_ID, "--samples-file", str(TOKENS))
    result = pytester.runpytest_subprocess(
        *run,
        "--artifacts-dir",
        str(art),
        "--plots",
        "none",
        "-rf",
        "-q",
        "-p",
        "no:randomly",
        *args,
    )
    failed = set(re.findall(r"^FAILED (\S+?)(?: - |$)", result.stdout.str(), re.M))
    summary = json.loads((art / "summary.json").read_text())
    return summary, failed


@pytest.fixture
def spd_out(tmp_path: Path) -> Path:
    out = tmp_path / "spd_out"
    shutil.copytree(GENUINE / "spd_out", out)
    return out


def test_the_genuine_run_passes_every_check(pytester, spd_out):
    setup_suite(pytester, spd_out)
    summary, failed = run_suite(pytester, "--samples", "3")
    assert failed == set()
    assert summary["totals"] == {"items": 2 * 3 * 64, "passed": 2 * 3 * 64, "failed": 0}


def test_the_demo_run_passes_every_check(pytester, spd_out):
    setup_suite(pytester, spd_out)
    summary, failed = run_suite(pytester, "--samples", "2", run=("--run-id", "demo"))
    assert failed == set()
    assert summary["run"] == "s-qkdemo01" and summary["totals"]["failed"] == 0


@pytest.mark.parametrize("fault", sorted(INJECT))
def test_an_analysis_bug_fails_per_item_checks(pytester, spd_out, fault):
    setup_suite(pytester, spd_out, INJECT[fault])
    summary, failed = run_suite(pytester, "--samples", "2")
    assert summary["totals"]["failed"] > 0, f"{fault} went unnoticed"
    assert any("test_items.py" in name for name in failed)


def _edit_checkpoint(spd_out: Path, edit) -> None:
    path = spd_out / "spd" / GENUINE_RUN_ID / "model_400.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _swap_k_proj(state: dict) -> None:
    a, b = "target_model.h.0.attn.k_proj.weight", "target_model.h.1.attn.k_proj.weight"
    state[a], state[b] = state[b].clone(), state[a].clone()


def _scale_one_component(state: dict) -> None:
    V, U = state["_components.h-0-attn-q_proj.V"], state["_components.h-0-attn-q_proj.U"]
    c = int((V.norm(dim=0) * U.norm(dim=1)).argmax())  # the largest component
    V[:, c] *= 10


def _target_of_another_model(state: dict) -> None:
    from qkcheck.models import build_target_model

    torch.manual_seed(7)
    config = dict(
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_intermediate=256,
        n_key_value_heads=2,
        vocab_size=512,
        n_ctx=64,
        block_size=64,
    )
    other = build_target_model("LlamaSimpleMLP", config, None)
    other.init_weights()
    for key, value in other.state_dict().items():
        if f"target_model.{key}" in state:
            state[f"target_model.{key}"] = value.detach().clone()


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_swap_k_proj, id="k_proj-weights-swapped-between-layers"),
        pytest.param(_scale_one_component, id="one-component-V-scaled-by-10"),
        pytest.param(_target_of_another_model, id="components-of-a-different-target-model"),
    ],
)
def test_a_decomposition_that_does_not_belong_to_its_target_fails_the_quality_gate(
    pytester, spd_out, edit
):
    _edit_checkpoint(spd_out, edit)
    setup_suite(pytester, spd_out)
    summary, failed = run_suite(pytester, "--query-pos", "last")
    assert summary["totals"]["failed"] == 0, "faithfulness must still hold: Δ absorbs the fault"
    assert any("test_quality.py" in name for name in failed), failed


def test_serial_and_two_workers_give_identical_results(pytester, spd_out):
    setup_suite(pytester, spd_out)
    serial, _ = run_suite(pytester, "--samples", "4")
    parallel, _ = run_suite(pytester, "--samples", "4", "-n", "2")
    for s in (serial, parallel):
        s.pop("settings")
        s.pop("figures")
    assert serial == parallel
