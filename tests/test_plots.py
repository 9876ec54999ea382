"""Figures: any head count, atomic files, and data that matches a brute-force computation."""

from __future__ import annotations

import numpy as np
import pytest

from qkcheck.figures import item_plot_data, write_item_figures
from qkcheck.pairs import dense_contributions, weighted_factors
from qkcheck.plots import ItemPlotData, combined_figure, save_figure, validation_figure
from qkcheck.settings import Settings
from qkcheck.validate import Validator


def synthetic(n_head: int, n_keys: int = 12, mode: str = "weighted") -> ItemPlotData:
    rng = np.random.default_rng(0)
    pairs = [(c, d) for c in range(3) for d in range(2)]
    curves = {p: rng.normal(size=(n_head, n_keys)) for p in pairs}
    total = sum(curves.values())
    return ItemPlotData(
        run="r",
        layer=1,
        sample=2,
        query_pos=n_keys - 1,
        mode=mode,
        tokens=[f"tok{i}" for i in range(n_keys)],
        pair_curves=curves,
        head_top=[pairs[h % 3 : h % 3 + 3] for h in range(n_head)],
        mean_top=pairs[:4],
        head_faint=[pairs[-2:]] * n_head,
        mean_faint=pairs[-2:],
        total=total,
        target=None if mode == "binary" else total + 0.1,
    )


@pytest.mark.parametrize("n_head", [1, 3, 6, 12])
def test_the_combined_figure_has_a_mean_a_legend_and_one_panel_per_head(n_head, tmp_path):
    fig = combined_figure(synthetic(n_head))
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["mean over heads", *(f"head {h}" for h in range(n_head))]
    path = save_figure(fig, tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]
    assert fig.axes == []  # released after saving


def test_binary_figures_draw_no_target_line(tmp_path):
    fig = combined_figure(synthetic(2, mode="binary"))
    styles = {line.get_linestyle() for ax in fig.axes for line in ax.get_lines()}
    assert "--" not in styles
    assert "binary" in fig._suptitle.get_text()


def test_the_validation_figure_titles_each_head_with_its_max_residual():
    data = synthetic(2)
    S = np.zeros((2, 12))
    T = np.zeros((2, 12))
    T[1, 5] = 0.75
    fig = validation_figure(data, S, T)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["head 0: max |r| = 0", "head 1: max |r| = 0.75"]


@pytest.fixture(scope="module")
def validator(genuine_run, genuine_tokens):
    return Validator(genuine_run, genuine_tokens, list(range(8)), Settings(run_id="x", top_n=5))


def test_plot_data_equals_a_brute_force_ranking_of_every_pair(validator):
    layer, sample, i = 1, 3, 40
    data = item_plot_data(validator, layer, sample, i)
    cap, row = validator.capture(sample)
    x = cap.attn_inputs[layer][row]
    w, lay = validator.weights(layer), validator.layout(layer)
    dense = dense_contributions(
        weighted_factors(x[i], x[: i + 1], w.V_Q, w.U_Q, w.V_K, w.U_K, lay, i)
    )
    for h in range(dense.shape[0]):
        peaks = dense[h].abs().amax(dim=-1).flatten()
        want = [divmod(int(k), dense.shape[2]) for k in peaks.argsort(descending=True)[:5]]
        assert data.head_top[h] == want
    for (c, d), curve in data.pair_curves.items():
        np.testing.assert_allclose(curve, dense[:, c, d].double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data.total, dense.sum(dim=(1, 2)).double().numpy(), atol=1e-4)
    np.testing.assert_allclose(data.target, cap.logits[layer][row, :, i, : i + 1].double().numpy())


def test_item_figures_are_written_under_names_carrying_run_layer_sample_and_query(
    validator, tmp_path
):
    paths = write_item_figures(validator, 0, 2, 63, tmp_path)
    assert [p.name for p in paths] == [
        "s-5eed0002_L0_S2_Q63_combined.png",
        "s-5eed0002_L0_S2_Q63_validation.png",
    ]


def test_binary_mode_figures_use_the_runs_ci(genuine_run, genuine_tokens, tmp_path):
    v = Validator(genuine_run, genuine_tokens, [0], Settings(run_id="x", mode="binary"))
    data = item_plot_data(v, 0, 0, 20)
    assert data.target is None
    ci = genuine_run.causal_importances(genuine_tokens[:1], paths=["h.0.attn.q_proj"])
    live = set((ci["h.0.attn.q_proj"][0, 20] > 0.1).nonzero().flatten().tolist())
    drawn = {c for c, _ in data.mean_top if np.abs(data.pair_curves[(c, _)]).max() > 0}
    assert live and drawn, "binary mode drew no live pair: the comparison would be vacuous"
    assert drawn <= live
    for (c, _d), curve in data.pair_curves.items():  # a component gated off adds nothing
        assert c in live or np.abs(curve).max() == 0, c


def test_non_latin_and_special_tokens_render_visibly_without_warnings(tmp_path):
    """A CJK token, ``$`` and a newline: no missing-glyph warning (warnings are errors here),
    no mathtext, no broken title; the glyph-less characters are labelled by code point."""
    data = synthetic(2)
    data.tokens = ["漢", "$5", " or", "$6\n", *data.tokens[4:]]
    for fig in (combined_figure(data), validation_figure(data, data.total, data.target)):
        labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() if t.get_text()]
        assert "U+6F22 ·0" in labels
        assert "\\$5 ·1" in labels and "␣or ·2" in labels and "\\$6↵ ·3" in labels
        title = fig._suptitle.get_text()
        assert "U+6F22 \\$5 ␣or \\$6↵ tok4" in title  # one line, nothing lost
        assert title.splitlines()[-1].endswith("[tok11]")
        save_figure(fig, tmp_path / "t.png")  # drawing raises on a missing glyph
