"""Document positions: restarted rotary positions, causal AND same-document masks, padding.

References: plain loops for the position/mask rules, and the target model run on each
document alone (a packed sample must give each document the logits it has by itself)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkcheck import SamplesError, load_run
from qkcheck.decompose import closure_tolerance, decompose_layer
from qkcheck.documents import (
    document_mask,
    document_positions,
    ids_from_separator,
    read_document_ids,
)
from qkcheck.models import build_target_model, common, gpt2_simple
from qkcheck.settings import Settings
from qkcheck.validate import Validator

IDS = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [3, 3, 5, 5, 5, 5, 3]])


def test_positions_and_mask_follow_the_rules_written_as_loops():
    B, T = IDS.shape
    pos = document_positions(IDS)
    mask = document_mask(IDS)
    for b in range(B):
        start = 0
        for t in range(T):
            if t > 0 and IDS[b, t] != IDS[b, t - 1]:
                start = t
            assert pos[b, t] == t - start
            for j in range(T):
                same_run = all(IDS[b, u] == IDS[b, t] for u in range(min(j, t), max(j, t) + 1))
                want = j <= t and same_run and IDS[b, t] != -1
                assert bool(mask[b, t, j]) == want, (b, t, j)


def test_a_separator_starts_a_document():
    tokens = torch.tensor([[5, 1, 2, 1, 7]])
    assert ids_from_separator(tokens, 1).tolist() == [[0, 1, 1, 2, 2]]


def test_document_ids_file_must_match_the_samples(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.zeros((2, 3), dtype=np.int32))
    assert read_document_ids(path, (2, 3)).dtype == torch.int64
    with pytest.raises(
        SamplesError,
        match=r"ids.npy: document ids have shape \(2, 3\), but the samples are \(2, 4\)",
    ):
        read_document_ids(path, (2, 4))


@pytest.fixture(scope="module")
def demo():
    run = load_run("demo")
    return run, run.samples[:2, :40]


def _packed_ids(T: int, cut: int) -> torch.Tensor:
    ids = torch.zeros(2, T, dtype=torch.long)
    ids[:, cut:] = 1
    ids[1, -5:] = -1  # padding at the end of the second sample
    return ids


def _gpt2():
    torch.manual_seed(0)
    config = {"vocab_size": 37, "n_layer": 2, "n_embd": 24, "n_head": 4, "block_size": 48}
    return build_target_model("GPT2Simple", config, None)


def _assert_each_document_as_alone(model, tokens, cut):
    """Reference: the model on each document by itself (positions from 0, no other keys)."""
    ids = _packed_ids(tokens.shape[1], cut)
    packed = model.capture(tokens, document_ids=ids)
    for lo, hi in ((0, cut), (cut, tokens.shape[1])):
        alone = model.capture(tokens[:1, lo:hi])
        low = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
        for layer, logits in alone.logits.items():
            got = packed.logits[layer][:1, :, lo:hi, lo:hi]
            torch.testing.assert_close(got[..., low], logits[..., low], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model_kind", ["llama_simple_mlp", "gpt2_simple"])
def test_packed_documents_get_the_logits_each_has_alone(demo, model_kind):
    run, tokens = demo
    model = run.model if model_kind == "llama_simple_mlp" else _gpt2()
    _assert_each_document_as_alone(
        model, tokens % 37 if model_kind == "gpt2_simple" else tokens, 13
    )


def test_a_mask_ignoring_documents_is_caught(demo, monkeypatch):
    run, tokens = demo
    monkeypatch.setattr(
        common,
        "document_mask",
        lambda ids: torch.ones(ids.shape[0], ids.shape[1], ids.shape[1], dtype=torch.bool).tril(),
    )
    with pytest.raises(AssertionError):
        _assert_each_document_as_alone(run.model, tokens, 13)


def test_absolute_positions_not_restarted_are_caught(demo, monkeypatch):
    """GPT2Simple's learned positions: not restarting them changes every later logit."""
    _, tokens = demo
    monkeypatch.setattr(
        gpt2_simple,
        "document_positions",
        lambda ids: torch.arange(ids.shape[1]).expand_as(ids),
    )
    with pytest.raises(AssertionError):
        _assert_each_document_as_alone(_gpt2(), tokens % 37, 13)


def test_rotary_logits_depend_on_offsets_only_so_closure_holds_either_way(demo):
    """With RoPE, a query/key pair's logit depends on i − j only: positions shifted by a
    document's start give the same logits, so closure cannot (and need not) tell them apart;
    the decomposition still uses the restarted positions."""
    run, tokens = demo
    ids = _packed_ids(tokens.shape[1], 13)
    cap = run.capture(tokens, document_ids=ids)
    v = Validator(run, tokens, [0, 1], Settings(run_id="demo"), document_ids=ids)
    w, layout = v.weights(1), v.layout(1)
    x, target = cap.attn_inputs[1][:1], cap.logits[1][:1]
    T = x.shape[1]
    tol = closure_tolerance(torch.float32, x.shape[-1], w.V_Q.shape[1], layout.head_dim, T)
    mask = document_mask(ids[:1])[0]
    restarted = document_positions(ids[:1])[0]
    right = decompose_layer(x, w, layout, target=target, positions=restarted)
    shifted = decompose_layer(x, w, layout, target=target)
    assert float(right.closure_error[0][:, mask].max()) <= tol
    assert float(shifted.closure_error[0][:, mask].max()) <= tol


def test_validator_checks_same_document_keys_and_skips_padding(demo):
    run, tokens = demo
    ids = _packed_ids(tokens.shape[1], 13)
    settings = Settings(run_id="demo")
    v = Validator(run, tokens, [0, 1], settings, document_ids=ids)
    items = v.items()
    assert len(items) == 2 * 2 * 40 - 2 * 5  # 5 padding queries of sample 1, per layer
    assert (0, 1, 36) not in items and (0, 1, 34) in items
    assert all(v.item(*it).passed for it in items)
    # counted entries: same-document causal pairs only
    g = v.group(0, 0)
    assert g.target_count == 4 * (13 * 14 // 2 + 27 * 28 // 2)
    # the same samples without document ids fail closure where the documents meet
    plain = Validator(run, tokens, [0, 1], settings)
    ids_doc = Validator(run, tokens, [0, 1], settings, document_ids=ids)
    assert not torch.equal(plain.query_row(1, 0, 39)[1], ids_doc.query_row(1, 0, 39)[1])
