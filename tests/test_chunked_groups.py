"""A (layer, sample) group walked in query chunks equals the group computed in one chunk.

The validator decomposes rows ``i0:i1`` against keys ``:i1`` under ``--chunk-mib``
(qkcheck.chunks); every per-item number (closure error, ratio, head, key, r, bounds,
excess) and the run-level statistics (|r| sketch, logit moments) must not depend on where
the chunks fall. Random layers cover biases, grouped-query attention, rotary positions,
QK-norm and documents (restarted positions, same-document masks) through a minimal run
(:class:`_LayerRun`); the demo run covers a real target forward.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qkcheck.chunks import LIVE_BLOCKS, MAX_ROWS, group_chunks, query_chunks
from qkcheck.decompose import HeadLayout, LayerWeights, decompose_layer
from qkcheck.documents import document_positions
from qkcheck.models.base import AttentionSpec, Capture, QKNorm
from qkcheck.rotary import RotaryConfig
from qkcheck.settings import Settings
from qkcheck.validate import _PER_QUERY, GroupResult, Validator

PER_ROW = _PER_QUERY  # every per-query field of a GroupResult
#: the budgets compared with one chunk: one row at a time, and uneven chunks of many rows
SMALL_MIB = (0.0, 0.02)
ONE_CHUNK_MIB = 1e6


class _LayerRun:
    """One random attention layer behind the interface the Validator reads: components,
    target weights, and a "forward pass" whose logits are the layer's exact logits
    (``q Wᵀ`` against ``k Wᵀ``, rotated, QK-normed) plus noise, so residuals and bounds
    vary. Token ids name the sample (row ``tokens[:, 0]`` of ``x``)."""

    name = "random-layer"

    def __init__(self, seed: int, *, bias: bool, gqa: bool, rotary: bool, qk_norm: bool, T: int):
        g = torch.Generator().manual_seed(seed)
        d, hd, H = 16, 4, 4
        KV = 2 if gqa else H
        C = 12

        def randn(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        self.V_Q, self.U_Q = randn(d, C) / 4, randn(C, H * hd) / 3
        self.V_K, self.U_K = randn(d, C) / 4, randn(C, KV * hd) / 3
        self.W_Q = (self.V_Q @ self.U_Q).T + 0.05 * randn(H * hd, d)
        self.W_K = (self.V_K @ self.U_K).T + 0.05 * randn(KV * hd, d)
        self.b_Q = randn(H * hd) / 5 if bias else None
        self.b_K = randn(KV * hd) / 5 if bias else None
        norm = QKNorm(1 + randn(hd) / 3, 1 + randn(hd) / 3, 1e-6) if qk_norm else None
        rot = RotaryConfig(rotary_dim=hd) if rotary else None
        self.spec = AttentionSpec(0, "q", "k", H, KV, hd, 1 / math.sqrt(hd), rot, qk_norm=norm)
        self.x = randn(3, T, d)
        self.noise = 0.02 * randn(3, H, T, T)
        self.document_ids: torch.Tensor | None = None

    layers = property(lambda self: [self.spec])
    module_paths = property(lambda self: ["q", "k"])

    def components(self, path: str):
        return (self.V_Q, self.U_Q) if path == "q" else (self.V_K, self.U_K)

    def target_weight(self, path: str):
        return (self.W_Q, self.b_Q) if path == "q" else (self.W_K, self.b_K)

    def to(self, device):
        return self

    def capture(
        self, tokens: torch.Tensor, modules=None, document_ids=None, layers=None
    ) -> Capture:
        rows = tokens[:, 0]
        x = self.x[rows]
        sp = self.spec
        eps = None if sp.qk_norm is None else sp.qk_norm.eps
        layout = HeadLayout(sp.n_head, sp.n_kv_heads, sp.head_dim, sp.scale, sp.rotary, eps)
        q = self.spec.qk_norm
        gammas = (None, None) if q is None else (q.gamma_q, q.gamma_k)
        sides = (self.V_Q, self.U_Q, self.V_K, self.U_K, self.W_Q, self.W_K, self.b_Q, self.b_K)
        w = LayerWeights.from_target(*sides, *gammas)
        logits = []
        for n, r in enumerate(rows.tolist()):
            pos = None if document_ids is None else document_positions(document_ids[n : n + 1])[0]
            exact = decompose_layer(x[n : n + 1], w, layout, positions=pos).closure
            logits.append(exact + self.noise[r : r + 1])
        return Capture(attn_inputs={0: x}, logits={0: torch.cat(logits)})


def _group(run, mib: float, document_ids=None, **settings) -> GroupResult:
    T = run.x.shape[1]
    tokens = torch.arange(3)[:, None].expand(3, T)
    s = Settings(run_id="x", chunk_mib=mib, batch_size=1, dtype="float64", **settings)
    v = Validator(run, tokens, [0, 1, 2], s, document_ids=document_ids)
    return v.group(0, 2)


def _assert_same(a: GroupResult, b: GroupResult) -> None:
    for name in PER_ROW:
        x, y = getattr(a, name), getattr(b, name)
        if name in ("head", "key"):
            assert torch.equal(x, y), name
        elif name == "closure_error":  # the noise's share, or rounding far below tolerance
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-3 * a.closure_tol, msg=name)
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13, msg=name)
    assert a.closure_tol == b.closure_tol
    assert a.abs_r.buckets == b.abs_r.buckets
    assert (a.abs_r.count, a.abs_r.zeros) == (b.abs_r.count, b.abs_r.zeros)
    assert a.abs_r.max == pytest.approx(b.abs_r.max, rel=1e-12)
    assert a.target_count == b.target_count
    assert a.target_sum == pytest.approx(b.target_sum, rel=1e-12, abs=1e-12)
    assert a.target_sumsq == pytest.approx(b.target_sumsq, rel=1e-12)


def _ids(T: int) -> torch.Tensor:
    """Three packed documents per sample, the last sample ending in padding."""
    ids = torch.zeros(3, T, dtype=torch.long)
    ids[:, T // 3 :] = 1
    ids[:, 2 * T // 3 :] = 2
    ids[2, -3:] = -1
    return ids


CASES = {
    "plain": dict(bias=False, gqa=False, rotary=False, qk_norm=False),
    "bias": dict(bias=True, gqa=False, rotary=False, qk_norm=False),
    "gqa-rotary": dict(bias=False, gqa=True, rotary=True, qk_norm=False),
    "qk-norm": dict(bias=True, gqa=True, rotary=True, qk_norm=True),
}


@pytest.mark.parametrize("bound", ["weight", "data", "budget"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_chunked_groups_equal_one_chunk_on_random_layers(case, bound, documents):
    T = 29
    run = _LayerRun(7, T=T, **CASES[case])
    ids = _ids(T) if documents else None
    whole = _group(run, ONE_CHUNK_MIB, ids, bound=bound)
    assert len(group_chunks(T, 4, 8, ONE_CHUNK_MIB)) == 1
    assert float(whole.ratio.max()) > 0.01  # not vacuous: residuals against bounds
    for mib in SMALL_MIB:
        assert len(group_chunks(T, 4, 8, mib)) > 2
        _assert_same(_group(run, mib, ids, bound=bound), whole)


def test_chunked_groups_equal_one_chunk_on_the_demo_run():
    """The demo run's target forward, float32 as the suite runs it, every query row. A
    block of rows is a smaller matrix product than the square, which BLAS may round
    differently (about 1 ulp): entries agree to float32 rounding, heads and keys exactly."""
    from qkcheck import load_run

    run = load_run("demo")
    tokens = run.samples[:2]
    T = tokens.shape[1]
    groups = {}
    for mib in (ONE_CHUNK_MIB, 0.05, 0.0):
        v = Validator(run, tokens, [0, 1], Settings(run_id="demo", chunk_mib=mib))
        groups[mib] = [v.group(layer, s) for layer in v.layers for s in (0, 1)]
    assert len(group_chunks(T, 4, 4, 0.05)) > 2
    for mib in (0.05, 0.0):
        for a, b in zip(groups[mib], groups[ONE_CHUNK_MIB], strict=True):
            for name in ("head", "key"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
            for name in ("ratio", "r", "bound", "data_bound", "weight_bound", "excess"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)
            assert float((a.closure_error - b.closure_error).abs().max()) <= 0.05 * a.closure_tol
            assert a.abs_r.count == b.abs_r.count and a.target_count == b.target_count
            # a float32 |r| may round across a bucket edge: a few values move, not the quantiles
            keys = {*a.abs_r.buckets, *b.abs_r.buckets}
            moved = sum(abs(a.abs_r.buckets.get(k, 0) - b.abs_r.buckets.get(k, 0)) for k in keys)
            assert moved <= 2e-3 * b.abs_r.count
            for q in (0.5, 0.99):
                assert a.abs_r.quantile(q) == pytest.approx(b.abs_r.quantile(q), rel=1e-6)


def test_query_row_is_the_groups_row():
    """The figure's row (one-row chunk) gives the group's per-item numbers at that row."""
    run = _LayerRun(3, T=21, **CASES["qk-norm"])
    tokens = torch.arange(3)[:, None].expand(3, 21)
    v = Validator(run, tokens, [0, 1, 2], Settings(run_id="x", dtype="float64", bound="budget"))
    g = v.group(0, 1)
    for i in (0, 7, 20):
        S, target, B = v.query_row(0, 1, i)
        assert S.shape == target.shape == B.shape == (4, i + 1)
        h, j = int(g.head[i]), int(g.key[i])
        torch.testing.assert_close(target[h, j] - S[h, j], g.r[i], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(B[h, j], g.bound[i], rtol=1e-12, atol=1e-13)
        ratio = ((target - S).abs() / B).max()
        torch.testing.assert_close(ratio, g.ratio[i].to(ratio.dtype), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n_pos", [1, 7, 64, 2048])
@pytest.mark.parametrize("cap", [1, 5, 300, 10**6])
def test_query_chunks_cover_every_row_once_within_the_budget(n_pos, cap):
    chunks = query_chunks(n_pos, 3, 3 * cap)
    assert chunks[0][0] == 0 and chunks[-1][1] == n_pos
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    for i0, i1 in chunks:
        assert i1 > i0
        assert (i1 - i0) * i1 <= cap or i1 - i0 == 1  # within budget, or a single row
        assert i1 - i0 <= MAX_ROWS
        if i1 < n_pos:  # as many rows as fit, up to MAX_ROWS: one more would not
            assert (i1 + 1 - i0) * (i1 + 1) > cap or i1 - i0 == MAX_ROWS
    if cap == 10**6 and n_pos == 2048:  # a roomy budget: MAX_ROWS rows while they fit
        assert all(i1 - i0 == MAX_ROWS for i0, i1 in chunks)


def test_group_chunks_bound_the_live_blocks():
    """At the benchmark's shape (32 heads, 2048 positions, float32) under 256 MiB."""
    chunks = group_chunks(2048, 32, 4, 256)
    worst = max((i1 - i0) * i1 for i0, i1 in chunks) * 32 * 4 * LIVE_BLOCKS
    assert worst <= 256 * 2**20
    assert len(chunks) > 8
