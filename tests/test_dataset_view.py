"""The dataset-level masses (qkcheck.dataset_view) against a brute-force sum over the dense
pair tensor of qkcheck.pairs, query position by query position.

The brute force builds, per sample and query ``i``, the full ``(head, C_q, C_k, j ≤ i)``
tensor with :func:`~qkcheck.pairs.dense_contributions` and sums ``|P|`` (pairs),
``|Σ_d P|`` (query components) and ``|Σ_c P|`` (key components). Biases enter it as one
more component of activation 1: an extra input coordinate fixed at 1 that only the bias
component reads.
"""

from __future__ import annotations

import json

import pytest
import torch

from qkcheck.dataset_view import DatasetViewError, LayerMasses, layer_view, write_dataset_view
from qkcheck.decompose import HeadLayout, LayerWeights, causal_mask
from qkcheck.pairs import dense_contributions, weighted_factors
from qkcheck.rotary import RotaryConfig
from qkcheck.settings import Selection, Settings
from qkcheck.validate import Validator


def _augment(x, V, U, b):
    if b is None:
        return x, V, U
    x1 = torch.cat((x, torch.ones(x.shape[0], 1, dtype=x.dtype)), dim=1)
    V1 = torch.zeros(V.shape[0] + 1, V.shape[1] + 1, dtype=V.dtype)
    V1[:-1, :-1], V1[-1, -1] = V, 1.0
    return x1, V1, torch.cat((U, b[None]), dim=0)


def brute_force(xs, allowed_rows, w: LayerWeights, layout: HeadLayout):
    """Pair and component masses from the dense pair tensor, one query at a time."""
    pair = cq = ck = 0
    for x, allowed in zip(xs, allowed_rows, strict=True):
        xq, VQ, UQ = _augment(x, w.V_Q, w.U_Q, w.b_Q)
        xk, VK, UK = _augment(x, w.V_K, w.U_K, w.b_K)
        for i in range(x.shape[0]):
            keys = allowed[i].nonzero()[:, 0]
            if keys.numel() == 0:
                continue
            f = weighted_factors(xq[i], xk[keys], VQ, UQ, VK, UK, layout, i, key_positions=keys)
            P = dense_contributions(f)  # (H, Cq, Ck, J)
            pair = pair + P.abs().sum(-1)
            cq = cq + P.sum(2).abs().sum(-1)
            ck = ck + P.sum(1).abs().sum(-1)
    return pair, cq, ck


def _random_layer(bias: bool, rotary: RotaryConfig | None):
    g = torch.Generator().manual_seed(0)
    d, Cq, Ck, H, KV, dh = 10, 5, 4, 4, 2, 6

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    w = LayerWeights(
        V_Q=r(d, Cq), U_Q=r(Cq, H * dh), V_K=r(d, Ck), U_K=r(Ck, KV * dh),
        delta_Q=r(H * dh, d), delta_K=r(KV * dh, d),
        b_Q=r(H * dh) if bias else None, b_K=r(KV * dh) if bias else None,
    )  # fmt: skip
    return w, HeadLayout(H, KV, dh, scale=-0.37, rotary=rotary), r


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rotary", [None, RotaryConfig(4), RotaryConfig(6, adjacent_pairs=True)])
def test_masses_equal_the_dense_pair_tensor_summed(bias, rotary):
    w, layout, r = _random_layer(bias, rotary)
    T = 7
    xs = [r(T, 10), r(T, 10)]
    allowed = causal_mask(T)
    rows = [allowed, allowed.clone()]
    rows[1][:2] = False  # query rows not selected on the second sample
    acc = LayerMasses(w, layout, budget_bytes=2000)  # small: several chunks
    for x, a in zip(xs, rows, strict=True):
        acc.add(x, a)
    pair, cq, ck = brute_force(xs, rows, w, layout)
    n_q, n_k = 5 + bias, 4 + bias
    assert acc.pair_mass().shape == (4, n_q, n_k)
    torch.testing.assert_close(acc.pair_mass(), pair, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(acc.comp_q, cq, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(acc.comp_k, ck, rtol=1e-10, atol=1e-10)
    assert acc.n_entries == int(rows[0].sum() + rows[1].sum())


def test_documents_count_same_document_keys_only():
    w, layout, r = _random_layer(True, RotaryConfig(4))
    from qkcheck.documents import document_mask, document_positions

    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1]])
    x = r(8, 10)
    pos, allowed = document_positions(ids)[0], document_mask(ids)[0]
    acc = LayerMasses(w, layout)
    acc.add(x, allowed, pos)
    # brute force with the document's own positions: shift each document to start at 0
    pair = 0
    for doc in (0, 1):
        idx = (ids[0] == doc).nonzero()[:, 0]
        p, _, _ = brute_force([x[idx]], [causal_mask(len(idx))], w, layout)
        pair = pair + p
    torch.testing.assert_close(acc.pair_mass(), pair, rtol=1e-10, atol=1e-10)


def test_the_rotary_clamp_is_refused_not_approximated():
    w, layout, r = _random_layer(False, RotaryConfig(4, n_ctx=4))
    with pytest.raises(DatasetViewError, match="n_ctx"):
        LayerMasses(w, layout).add(r(6, 10), causal_mask(6))


def test_a_run_masses_equal_brute_force_and_the_json_ranks_them(
    genuine_run, genuine_tokens, tmp_path
):
    samples = [0, 5]
    settings = Settings(run_id="x", dtype="float64", query_pos=Selection(indices=tuple(range(40))))
    v = Validator(genuine_run, genuine_tokens[samples], samples, settings)
    layer = 1
    view = layer_view(v, layer, budget_bytes=4 * 2**20)
    w, layout = v.weights(layer), v.layout(layer)
    xs, rows = [], []
    for s in samples:
        cap, row = v.capture(s)
        xs.append(cap.attn_inputs[layer][row].double())
        a = causal_mask(64).clone()
        a[40:] = False
        rows.append(a)
    pair, cq, ck = brute_force(xs, rows, w, layout)
    torch.testing.assert_close(view.pair_mass, pair, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(view.comp_q, cq, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(view.comp_k, ck, rtol=1e-9, atol=1e-9)

    paths = write_dataset_view(v, tmp_path, top_k=5)
    assert sorted(p.name for p in paths) == sorted(
        f"pairs_L{n}.{e}" for n in v.layers for e in ("json", "png")
    )
    data = json.loads((tmp_path / f"pairs_L{layer}.json").read_text())
    assert data["entries"] == 2 * sum(i + 1 for i in range(40))
    for h, head in enumerate(data["heads"]):
        m = pair[h]
        top = m.flatten().topk(5)
        assert [(p["q"], p["k"]) for p in head["pairs"]] == [
            (int(i) // m.shape[1], int(i) % m.shape[1]) for i in top.indices
        ]
        assert head["pairs"][0]["share"] == pytest.approx(float(top.values[0] / m.sum()))
        assert head["pairs"][0]["q_label"] == f"h.{layer}.attn.q_proj:{head['pairs'][0]['q']}"
        assert head["query_components"][0]["component"] == int(cq[h].argmax())
        assert head["key_components"][0]["mass"] == pytest.approx(float(ck[h].max()))
