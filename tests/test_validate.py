"""The engine's per-(layer, sample) reduction against brute force written plainly here.

For each query position the engine reports the worst ``|r| / B`` over heads and keys
``j ≤ i`` and where it is; a zero bound counts as ``inf`` where ``|r|`` exceeds the
rounding slack (else 0); the run-level statistics pool |r| and the target logits over all
heads, samples and causal (i, j). Each is recomputed here entry by entry.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from qkcheck.decompose import closure_tolerance, decompose_layer
from qkcheck.settings import Settings
from qkcheck.sketch import ALPHA
from qkcheck.validate import Validator

LAYER = 1
SAMPLES = [0, 3]


def _validator(run, tokens, **kw) -> Validator:
    return Validator(run, tokens[SAMPLES], SAMPLES, Settings(run_id="x", **kw))


def _dense(v: Validator, row: int):
    """Target logits, residual, both bounds and magnitude for one sample, (head, i, j)."""
    cap = v.run.capture(v.tokens[row : row + 1])
    x, target = cap.attn_inputs[LAYER], cap.logits[LAYER]
    dec = decompose_layer(x, v.weights(LAYER), v.layout(LAYER), target=target)
    return target[0], dec.residual[0], dec.data_bound[0], dec.weight_bound[0], dec.magnitude[0]


def _brute_worst(r, B, magnitude, tol):
    """Per query i: (ratio, head, key) of the worst |r|/B, first in (head, key) order."""
    H, T, _ = r.shape
    out = []
    for i in range(T):
        best = (-1.0, -1, -1)
        for h in range(H):
            for j in range(i + 1):
                a, b = abs(float(r[h, i, j])), float(B[h, i, j])
                ratio = a / b if b > 0 else (math.inf if a > tol * float(magnitude[h, i, j]) else 0)
                if ratio > best[0]:
                    best = (ratio, h, j)
        out.append(best)
    return out


@pytest.mark.parametrize("bound", ["weight", "data"])
def test_the_worst_head_and_key_per_query_match_brute_force(genuine_run, genuine_tokens, bound):
    v = _validator(genuine_run, genuine_tokens, bound=bound)
    g = v.group(LAYER, SAMPLES[1])
    _, r, b_data, b_weight, mag = _dense(v, 1)
    B = b_data if bound == "data" else b_weight
    want = _brute_worst(r, B, mag, g.closure_tol)
    for i, (ratio, h, j) in enumerate(want):
        assert float(g.ratio[i]) == pytest.approx(ratio, rel=1e-5), i
        assert (int(g.head[i]), int(g.key[i])) == (h, j), i
        assert float(g.r[i]) == pytest.approx(float(r[h, i, j]), rel=1e-5)
        assert float(g.bound[i]) == pytest.approx(float(B[h, i, j]), rel=1e-5)
        assert float(g.data_bound[i]) == pytest.approx(float(b_data[h, i, j]), rel=1e-5)
    assert max(w[0] for w in want) > 0.01  # a real residual, not a vacuous comparison


def test_a_zero_bound_counts_as_infinite_where_the_residual_exceeds_rounding(
    genuine_run, genuine_tokens
):
    v = _validator(genuine_run, genuine_tokens)
    w = v.weights(LAYER)
    # the deltas dropped from the decomposition: B_weight is 0 everywhere, while the target
    # logits still carry the real Δ, so r ≠ 0 on every query with a key of real size
    v._weights[LAYER] = replace(
        w, delta_Q=torch.zeros_like(w.delta_Q), delta_K=torch.zeros_like(w.delta_K)
    )
    g = v.group(LAYER, SAMPLES[0])
    _, r, _, b_weight, mag = _dense(v, 0)
    assert float(b_weight.abs().max()) == 0.0
    want = _brute_worst(r, b_weight, mag, g.closure_tol)
    assert [float(x) for x in g.ratio] == [x[0] for x in want]
    assert math.inf in [x[0] for x in want]
    item = g.item(5, "weight")
    assert not item.bound_ok and item.ratio == math.inf


def test_layer_statistics_pool_every_head_sample_and_causal_pair(genuine_run, genuine_tokens):
    v = _validator(genuine_run, genuine_tokens)
    stats = v.layer_quality(LAYER)
    abs_r, logits = [], []
    for row in range(len(SAMPLES)):
        target, r, *_ = _dense(v, row)
        H, T, _ = r.shape
        for h in range(H):
            for i in range(T):
                for j in range(i + 1):
                    abs_r.append(abs(float(r[h, i, j])))
                    logits.append(float(target[h, i, j]))
    # quantiles come from a sketch: within its relative error of the exact order statistic
    median = float(np.quantile(abs_r, 0.5, method="lower"))
    p99 = float(np.quantile(abs_r, 0.99, method="lower"))
    assert stats["median_abs_r"] == pytest.approx(median, rel=ALPHA)
    assert stats["p99_abs_r"] == pytest.approx(p99, rel=ALPHA)
    scale = stats["median_abs_r"] / float(np.std(logits))
    assert stats["r_frac_of_logit_scale"] == pytest.approx(scale, rel=1e-4)
    assert stats["abs_r_sketch"]["count"] == len(abs_r)
    groups = [v.group(LAYER, s) for s in SAMPLES]
    assert stats["worst_ratio"] == max(float(g.ratio.max()) for g in groups)


def test_the_closure_tolerance_follows_the_coarser_precision():
    f32 = closure_tolerance(torch.float32, 64, 48, 16, 64)
    assert closure_tolerance(torch.bfloat16, 64, 48, 16, 64) == pytest.approx(
        f32 * torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float32).eps
    )


def test_items_read_their_groups_numbers_and_only_the_current_group_keeps_lists(
    genuine_run, genuine_tokens
):
    """An item equals its group's per-query tensors at its row; the Python lists it is read
    from exist for one group at a time (a long run keeps every group's compact tensors,
    not 30× as much in lists)."""
    v = _validator(genuine_run, genuine_tokens)
    first = v.item(LAYER, SAMPLES[0], 7)
    g = v.group(LAYER, SAMPLES[0])
    assert (first.ratio, first.head, first.key) == (
        float(g.ratio[7]),
        int(g.head[7]),
        int(g.key[7]),
    )
    assert first.closure_error == float(g.closure_error[7]) and first.r == float(g.r[7])
    v.item(LAYER, SAMPLES[1], 7)
    assert v._listed[0] is v.group(LAYER, SAMPLES[1])  # the lists of one group only
    assert v.item(LAYER, SAMPLES[0], 7) == first  # rebuilt on demand, same numbers


def test_a_layer_shard_captures_only_its_layers_logits(genuine_run, genuine_tokens):
    """``--layers 1``: the forward capture holds layer 1's logits and input only, and its
    verdicts equal those of a session validating every layer."""
    from qkcheck.settings import parse_layers

    part = _validator(genuine_run, genuine_tokens, layers=parse_layers("1"))
    full = _validator(genuine_run, genuine_tokens)
    cap, _ = part.capture(0)
    assert set(cap.logits) == set(cap.attn_inputs) == {1}
    assert set(full.capture(0)[0].logits) == {0, 1}
    for q in (5, 40, 63):
        a, b = part.item(1, 0, q), full.item(1, 0, q)
        assert (a.ratio, a.head, a.key, a.passed) == (b.ratio, b.head, b.key, b.passed)


def test_captures_hold_every_layer_sample_major_and_one_layer_layer_major(
    genuine_run, genuine_tokens
):
    """One process walking samples over every layer: one forward pass per sample, each
    holding both layers. Layer-major (an xdist worker, the dataset view): each capture
    holds the layer at hand — both only where one layer ends and the next begins — at no
    more forward passes than a one-batch cache needs anyway; the verdicts are the same."""
    sample_major = _validator(genuine_run, genuine_tokens)
    held = []
    for layer, s, q in sample_major.items():
        cap, _ = sample_major.capture(s, layer)
        held.append(set(cap.logits))
        sample_major.item(layer, s, q)
    assert sample_major.n_forward == len(SAMPLES)
    assert all(h == {0, 1} for h in held)

    layer_major = _validator(genuine_run, genuine_tokens)
    layer_major.expect_layer_major()
    held = {}
    for layer in (0, 1):
        for s in SAMPLES:
            cap, _ = layer_major.capture(s, layer)
            held[(layer, s)] = set(cap.logits)
            for q in (3, 40):
                a, b = layer_major.item(layer, s, q), sample_major.item(layer, s, q)
                assert (a.ratio, a.head, a.key, a.passed) == (b.ratio, b.head, b.key, b.passed)
    assert held == {(0, 0): {0}, (0, 3): {0}, (1, 0): {0, 1}, (1, 3): {1}}
    assert layer_major.n_forward == 2 * len(SAMPLES)
