"""Target weights stored in bf16/fp16: no false "closure broken".

The ground truth is the target model qkcheck builds: float32 parameters holding the stored
bf16/fp16 values exactly (the upcast is exact), computing in float32 — as spd computes
(spd keeps parameters in float32; ``autocast_bf16`` is a training-time autocast that never
changes the stored dtype). ``Δ = W − (V U)ᵀ`` is computed in float64 and kept at the
decomposition's precision: rounding it back to bf16 (the old behaviour) breaks closure on
150 of 256 demo items.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkcheck.decompose import (
    HeadLayout,
    LayerWeights,
    causal_mask,
    closure_tolerance,
    decompose_layer,
)
from qkcheck.runs import load_run
from qkcheck.runs.resolve import DEMO_ROOT
from qkcheck.settings import Settings
from qkcheck.validate import Validator

ROOT = Path(__file__).resolve().parent.parent
DEMO_ID = "s-qkdemo01"


def demo_copy(dest: Path, dtype: torch.dtype) -> Path:
    """The demo run copied to ``dest`` with every ``target_model.*`` tensor cast to ``dtype``
    (written with torch.save, the checkpoint's own format); returns the run directory."""
    shutil.copytree(DEMO_ROOT, dest)
    run_dir = dest / "spd" / DEMO_ID
    (checkpoint,) = run_dir.glob("model_*.pth")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cast = {k: v.to(dtype) if k.startswith("target_model.") else v for k, v in state.items()}
    torch.save(cast, checkpoint)
    return run_dir


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def low_run(request, tmp_path_factory):
    return demo_copy(tmp_path_factory.mktemp("low") / "run", request.param), request.param


def test_the_copy_really_holds_low_precision_target_weights(low_run):
    run_dir, dtype = low_run
    run = load_run(run_dir)
    W, _ = run.target_weight(run.layers[0].q_path)
    assert W.dtype == dtype


def test_delta_is_computed_in_float64_and_not_rounded_to_the_weight_dtype(low_run):
    run_dir, dtype = low_run
    run = load_run(run_dir)
    sp = run.layers[0]
    V, U = run.components(sp.q_path)
    W, _ = run.target_weight(sp.q_path)
    w = LayerWeights.from_target(V, U, V, U, W, W)
    expected = W.double() - (V.double() @ U.double()).T  # written plainly
    assert w.delta_Q.dtype == torch.float64
    assert torch.equal(w.delta_Q, expected)
    # what the old code kept: Δ rounded to bf16/fp16, far from the exact Δ
    assert not torch.allclose(expected.to(dtype).double(), expected, rtol=1e-4, atol=0)


def test_every_item_closes_on_low_precision_target_weights(low_run):
    run_dir, _ = low_run
    run = load_run(run_dir)
    tokens = run.samples[:2]
    v = Validator(run, tokens, [0, 1], Settings(run_id=str(run_dir)))
    results = [v.item(*item) for item in v.items()]
    assert len(results) == 2 * 2 * tokens.shape[1]
    failed = [r.id for r in results if not r.closure_ok]
    assert failed == []
    # the tolerance is float32's: the target model computes in float32
    sp = run.layers[0]
    d_model = v.weights(0).V_Q.shape[0]
    c_max = max(v.weights(0).V_Q.shape[1], v.weights(0).V_K.shape[1])
    T = tokens.shape[1]
    assert results[0].closure_tol == closure_tolerance(
        torch.float32, d_model, c_max, sp.head_dim, T
    )


def test_the_decomposition_closes_against_a_float32_forward_written_plainly(low_run):
    """The ground truth: q/k from the stored low-precision weights upcast to float32."""
    run_dir, _ = low_run
    run = load_run(run_dir)
    sp = run.layers[0]
    tokens = run.samples[:1]
    cap = run.capture(tokens)
    x = cap.attn_inputs[0]
    assert cap.logits[0].dtype == torch.float32
    V_Q, U_Q = run.components(sp.q_path)
    V_K, U_K = run.components(sp.k_path)
    W_Q, _ = run.target_weight(sp.q_path)
    W_K, _ = run.target_weight(sp.k_path)
    w = LayerWeights.from_target(V_Q, U_Q, V_K, U_K, W_Q, W_K).to(torch.float32)
    layout = HeadLayout(sp.n_head, sp.n_kv_heads, sp.head_dim, sp.scale, sp.rotary)
    dec = decompose_layer(x, w, layout, target=cap.logits[0])
    T = x.shape[1]
    mask = causal_mask(T)
    tol = closure_tolerance(torch.float32, x.shape[-1], V_Q.shape[1], sp.head_dim, T)
    assert float(dec.closure_error[..., mask].max()) <= tol


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pytest_validation_passes_on_a_low_precision_copy_of_the_demo(tmp_path, dtype):
    run_dir = demo_copy(tmp_path / "run", getattr(torch, dtype))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "validation/",
            "--run-id",
            str(run_dir),  # every sample: the gate compares with the demo's own baseline
            "--plots",
            "none",
            "--artifacts-dir",
            str(tmp_path / "art"),
            "-q",
            "-p",
            "no:randomly",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "total 2048 items: 2048 passed, 0 failed" in out
