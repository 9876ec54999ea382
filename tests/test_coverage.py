"""Partial decompositions: only the layers with q and k decomposed are validated; the
others are named with the reason, in the header, the terminal summary and summary.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qkcheck import load_run
from qkcheck.coverage import layer_coverage
from qkcheck.errors import UnsupportedError
from qkcheck.models.base import AttentionSpec
from qkcheck.settings import OptionError, Settings, parse_layers
from qkcheck.validate import Validator
from tests.hf_runs import GENUINE_HF

ROOT = Path(__file__).parents[1]
SPD = GENUINE_HF / "spd_out"
TOKENS = GENUINE_HF / "reference" / "s-5eed0106" / "tokens.pt"


def _spec(layer, q, k) -> AttentionSpec:
    return AttentionSpec(layer, q, k, n_head=2, n_kv_heads=1, head_dim=4, scale=0.5, rotary=None)


def test_coverage_names_the_missing_side():
    specs = [
        _spec(0, "a.q", "a.k"),
        _spec(1, "b.q", "b.k"),
        _spec(2, "c.q", "c.k"),
        _spec(3, "d.qkv", "d.qkv"),
        _spec(4, "e.qkv", "e.qkv"),
        _spec(5, "f.q", "f.k"),
    ]
    cov = layer_coverage(specs, {"a.q", "a.k", "b.q", "c.k", "d.qkv", "f.k", "f.q"})
    assert cov.decomposed == [0, 3, 5]
    assert set(cov.skipped) == {1, 2, 4}
    assert cov.skipped[1].startswith("only b.q is decomposed (b.k is not)")
    assert cov.skipped[2].startswith("only c.k is decomposed (c.q is not)")
    assert cov.skipped[4] == "e.qkv is not decomposed"
    cov = layer_coverage(specs[:1], set())
    assert cov.skipped[0] == "neither a.q nor a.k is decomposed"


@pytest.fixture
def spd_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPD_OUT_DIR", str(SPD))
    monkeypatch.setenv("QKCHECK_CACHE", str(tmp_path / "cache"))


def _validator(run, layers: str | None = None) -> Validator:
    tokens = torch.load(TOKENS, weights_only=True)[:2]
    return Validator(run, tokens, [0, 1], Settings(run_id="x", layers=parse_layers(layers)))


def test_the_genuine_partial_run_validates_its_decomposed_layer(spd_env):
    run = load_run("s-5eed0106")
    v = _validator(run)
    assert v.layers == [1]
    assert v.skipped_layers == {0: "neither h.0.attn.q_proj nor h.0.attn.k_proj is decomposed"}
    for layer, sample, q in v.items()[::37]:
        r = v.item(layer, sample, q)
        assert r.passed and r.closure_error < 1e-5
    with pytest.raises(OptionError, match=r"layers \[0\] \(layer 0: neither h\.0"):
        _validator(run, "0")


def _one_sided_copy(tmp_path: Path, drop: str) -> Path:
    """s-5eed0104 (both layers decomposed) with ``drop``'s components removed from the
    checkpoint and the config."""
    src = SPD / "spd" / "s-5eed0104"
    dest = tmp_path / "s-5eed0104-partial"
    shutil.copytree(src, dest)
    ckpt = next(dest.glob("model_*.pth"))
    state = torch.load(ckpt, weights_only=True)
    dash = drop.replace(".", "-")
    kept = {k: v for k, v in state.items() if f"_components.{dash}." not in k}
    assert len(kept) < len(state)
    torch.save(kept, ckpt)
    config = yaml.safe_load((dest / "final_config.yaml").read_text())
    config["module_info"] = [
        {"module_pattern": "h.*.attn.q_proj", "C": 40},
        {"module_pattern": "h.1.attn.k_proj", "C": 24},
    ]
    (dest / "final_config.yaml").write_text(yaml.safe_dump(config))
    return dest


def test_a_one_sided_layer_is_skipped_with_its_reason(spd_env, tmp_path):
    run = load_run(_one_sided_copy(tmp_path, "h.0.attn.k_proj"))
    assert "h.0.attn.q_proj" in run.module_paths
    v = _validator(run)
    assert v.layers == [1]
    assert v.skipped_layers[0].startswith("only h.0.attn.q_proj is decomposed (h.0.attn.k_proj")


def test_a_run_with_no_layer_to_validate_is_one_error(spd_env, tmp_path):
    run = load_run(_one_sided_copy(tmp_path, "h.0.attn.k_proj"))
    run._components.pop("h.1.attn.k_proj")
    with pytest.raises(UnsupportedError, match="no attention layer to validate"):
        _validator(run)


def test_the_suite_passes_on_the_partial_run_and_says_what_it_skipped(tmp_path):
    env = {**os.environ, "SPD_OUT_DIR": str(SPD), "QKCHECK_CACHE": str(tmp_path / "c")}
    cmd = [sys.executable, "-m", "pytest", "validation/", "-p", "no:cacheprovider", "-q"]
    cmd += ["--run-id", "s-5eed0106", "--samples-file", str(TOKENS), "--samples", "2"]
    cmd += ["--artifacts-dir", str(tmp_path / "a"), "--plots", "none"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "layer 0 not validated: neither h.0.attn.q_proj nor h.0.attn.k_proj" in done.stdout
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert list(summary["layers"]) == ["1"] and summary["totals"]["items"] == 2 * 64
    assert summary["skipped_layers"] == {
        "0": "neither h.0.attn.q_proj nor h.0.attn.k_proj is decomposed"
    }
