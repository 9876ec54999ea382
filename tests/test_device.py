"""``--device``: the target forward runs where the decomposition does, for both run formats.

No GPU here: the device path is exercised with ``cpu`` named explicitly, through the same
code a ``cuda`` device takes (the Validator moves the run's model with ``run.to``; the
model's ``capture`` moves its tokens and document ids to the model's device; weights read
from a model come back on the CPU). On a GPU, ``--device cuda`` runs it there (untested
here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qkcheck import load_run
from qkcheck.settings import Settings
from qkcheck.validate import Validator

PARAM_DECOMP = Path(__file__).parent / "data" / "param-decomp-small"


def _spd():
    run = load_run("demo")
    return run, run.samples[:2]


def _param_decomp(monkeypatch):
    pytest.importorskip("tensorstore")
    monkeypatch.setenv("PARAM_DECOMP_OUT_DIR", str(PARAM_DECOMP))
    run = load_run("p-5eed0a01")
    tokens = torch.from_numpy(np.load(PARAM_DECOMP / "tokens.npy"))[:2].long()
    return run, tokens


@pytest.mark.parametrize("fmt", ["spd", "param-decomp"])
def test_the_validator_runs_the_target_on_the_settings_device(fmt, monkeypatch):
    run, tokens = _spd() if fmt == "spd" else _param_decomp(monkeypatch)
    moved: list[str] = []
    to = run.to

    def spy(device):
        moved.append(device)
        return to(device)

    monkeypatch.setattr(run, "to", spy)
    v = Validator(run, tokens, [0, 1], Settings(run_id="x", device="cpu"))
    assert moved == ["cpu"]
    assert run.model.device == torch.device("cpu")
    cap, _ = v.capture(0)
    layer = v.layers[0]
    assert cap.logits[layer].device == run.model.device == cap.attn_inputs[layer].device
    assert all(v.item(layer, 0, q).passed for q in v.query_positions)
    W, _ = run.target_weight(v.specs[layer].q_path)
    assert W.device.type == "cpu"


def test_capture_moves_tokens_and_document_ids_to_the_models_device(monkeypatch):
    """Tokens and ids handed over elsewhere arrive where the parameters are."""
    run, tokens = _spd()
    model = run.model
    seen = {}
    forward = model.forward

    def record(toks, *args, **kw):
        seen["tokens"] = toks.device
        return forward(toks, *args, **kw)

    monkeypatch.setattr(model, "forward", record)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cpu")))
    ids = torch.zeros_like(tokens)
    out_tokens, out_ids = model.on_device(tokens, ids)
    assert out_tokens.device == out_ids.device == torch.device("cpu")
    run.capture(tokens, document_ids=ids)
    assert seen["tokens"] == torch.device("cpu")
    assert run.to("cpu") is run
