"""Figures: any head count, atomic files, and data that matches a brute-force computation."""

from __future__ import annotations

import numpy as np
import pytest

from qkcheck.figures import item_plot_data, write_item_figures
from qkcheck.pairs import dense_contributions, weighted_factors
from qkcheck.plots import (
    ItemPlotData,
    Verdict,
    combined_figure,
    components_figure,
    key_labels,
    legend_labels,
    palette,
    save_figure,
    validation_figure,
)
from qkcheck.settings import Settings
from qkcheck.validate import Validator


def synthetic(n_head: int, n_keys: int = 12, mode: str = "weighted") -> ItemPlotData:
    rng = np.random.default_rng(0)
    pairs = [(c, d) for c in range(3) for d in range(2)]
    curves = {p: rng.normal(size=(n_head, n_keys)) for p in pairs}
    total = sum(curves.values())
    q_curves = {c: sum(curves[(c, d)] for d in range(2)) for c in range(3)}
    k_curves = {d: sum(curves[(c, d)] for c in range(3)) for d in range(2)}
    weighted = mode == "weighted"
    bias = np.full((n_head, n_keys), 0.05)
    target = total + bias + 0.1
    data = ItemPlotData(
        run="r",
        layer=1,
        sample=2,
        query_pos=n_keys - 1,
        mode=mode,
        tokens=[f"tok{i}" for i in range(n_keys)],
        pair_curves=curves,
        head_top=[pairs[h % 3 : h % 3 + 3] for h in range(n_head)],
        mean_top=pairs[:4],
        total=total,
        target=target if weighted else None,
        bias=bias if weighted else None,
        delta=target - total - bias if weighted else None,
        q_curves=q_curves,
        k_curves=k_curves,
        head_q_top=[[0, 1]] * n_head,
        head_k_top=[[1]] * n_head,
        mean_q_top=[2, 0],
        mean_k_top=[0],
        q_label="h.1.attn.q_proj",
        k_label="h.1.attn.k_proj",
    )
    if weighted:
        data.verdict = verdict(total + bias, target, np.full((n_head, n_keys), 0.2))
    return data


def verdict(S: np.ndarray, T: np.ndarray, B: np.ndarray) -> Verdict:
    ratio = np.abs(T - S) / B
    h, j = np.unravel_index(np.argmax(ratio), ratio.shape)
    return Verdict(
        passed=bool(ratio.max() <= 1),
        closure_ok=True,
        bound_ok=bool(ratio.max() <= 1),
        closure_error=1e-7,
        closure_tol=1e-4,
        ratio=float(ratio.max()),
        head=int(h),
        key=int(j),
        r=float((T - S)[h, j]),
        bound_kind="weight",
        bound_label="B_weight",
        component_sum=S,
        target=T,
        bound=B,
    )


@pytest.mark.parametrize("n_head", [1, 3, 6, 12])
def test_the_combined_figure_has_a_mean_and_one_panel_per_head(n_head, tmp_path):
    fig = combined_figure(synthetic(n_head))
    titled = [ax.get_title().split(":")[0] for ax in fig.axes if ax.get_title()]
    assert titled == ["mean over heads", *(f"head {h}" for h in range(n_head))]
    path = save_figure(fig, tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]
    assert fig.axes == []  # released after saving


def test_binary_figures_draw_no_target_line(tmp_path):
    fig = combined_figure(synthetic(2, mode="binary"))
    gids = {line.get_gid() for ax in fig.axes for line in ax.get_lines()}
    assert {"sum", "top", "rest"} <= gids and not gids & {"target", "delta", "bias"}
    assert "binary" in fig._suptitle.get_text()


def test_the_validation_figure_titles_each_head_with_its_ratio_to_the_bound():
    data = synthetic(2)
    S = np.zeros((2, 12))
    T = np.zeros((2, 12))
    T[1, 5] = 0.75
    data.verdict = verdict(S, T, np.full((2, 12), 0.5))
    fig = validation_figure(data)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [
        "head 0: max |r|/B_weight = 0 (key 0), max |r| = 0",
        "head 1: max |r|/B_weight = 1.5 (key 5), max |r| = 0.75",
    ]
    title = fig._suptitle.get_text()
    assert title.startswith("FAIL (bound)") and "r = target − component sum" in title
    worst = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "worst"]
    assert len(worst) == 1 and list(worst[0].get_xdata()) == [5]
    assert list(worst[0].get_ydata()) == [0.75]


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
        "s-5eed0002_L0_S2_Q63_weighted_combined.png",
        "s-5eed0002_L0_S2_Q63_weighted_components.png",
        "s-5eed0002_L0_S2_Q63_weighted_validation.png",
    ]


def test_figures_drawn_by_worker_processes_equal_those_drawn_here(validator, tmp_path):
    """write_figures hands items to workers forked from the fork server (qkcheck.workers);
    their PNGs are byte-identical to the same items drawn in this process, and a bad item
    is reported as its exception without losing the others."""
    from PIL import Image

    from qkcheck import workers
    from qkcheck.figures import write_figures

    ctx = workers.context()
    assert ctx.get_start_method() == "forkserver"  # Linux: never a spawned interpreter
    items = [(0, 1, 63), (1, 2, 40), (1, 99, 5)]  # sample 99 is not selected
    got = write_figures(validator, items, tmp_path / "pool", workers=2)
    assert isinstance(got[2], Exception)
    for it, paths in zip(items[:2], got[:2], strict=True):
        assert len(paths) == 3
        want = write_item_figures(validator, *it, tmp_path / "here")
        for a, b in zip(paths, want, strict=True):
            assert a.name == b.name
            np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_figures_are_drawn_here_when_no_worker_process_can_start(validator, tmp_path, monkeypatch):
    """A machine where worker processes cannot start (no semaphores, no fork server): the
    figures are still written, by this process, and equal the workers' (same PNGs)."""
    import concurrent.futures

    from qkcheck.figures import write_figures

    class NoWorkers:
        def __init__(self, *args, **kwargs):
            raise OSError("[Errno 38] Function not implemented (sem_open)")

    items = [(0, 1, 63), (1, 2, 40)]
    pooled = write_figures(validator, items, tmp_path / "pool", workers=2)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", NoWorkers)
    here = write_figures(validator, items, tmp_path / "here", workers=2)
    for a_paths, b_paths in zip(pooled, here, strict=True):
        assert len(b_paths) == 3
        for a, b in zip(a_paths, b_paths, strict=True):
            assert a.read_bytes() == b.read_bytes()


def test_an_item_is_due_a_figure_exactly_when_select_plot_items_could_choose_it():
    """The plugin starts the drawing workers at the first item due a figure."""
    from types import SimpleNamespace

    from qkcheck.pytest_plugin import _due_a_figure, select_plot_items

    items = [
        {"layer": 0, "sample": s, "query_pos": q, "passed": p, "ratio": r}
        for s, (q, p, r) in enumerate(
            [(0, False, 3.0), (5, False, 2.0), (5, True, 0.5), (1, True, float("nan"))]
        )
    ]
    for plots in ("none", "failed", "worst", "all"):
        for max_plots in (0, 10):
            settings = SimpleNamespace(plots=plots, max_plots=max_plots)
            chosen, _ = select_plot_items(items, plots, max_plots)
            due = [it for it in items if _due_a_figure(it, settings)]
            key = lambda it: it["sample"]  # noqa: E731
            assert sorted(map(key, due)) == sorted(map(key, chosen)), (plots, max_plots)


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
    for fig in (combined_figure(data), validation_figure(data), components_figure(data)):
        labels = [t for ax in fig.axes for t in key_labels(ax)]
        assert "U+6F22 ·0" in labels
        assert "\\$5 ·1" in labels and "␣or ·2" in labels and "\\$6↵ ·3" in labels
        title = fig._suptitle.get_text()
        assert "U+6F22 \\$5 ␣or \\$6↵ tok4" in title  # one line, nothing lost
        assert title.splitlines()[-1].endswith("[tok11]")
        save_figure(fig, tmp_path / "t.png")  # drawing raises on a missing glyph


def test_failing_and_passing_items_give_different_validation_figures(
    genuine_run, genuine_tokens, validator, tmp_path
):
    """The same item under the default bound (passes) and under a tiny --delta-budget
    (fails): the verdict, the band and the ratios in the figure follow the validator."""
    failing = Validator(
        genuine_run,
        genuine_tokens,
        list(range(8)),
        Settings(run_id="x", top_n=5, bound="budget", delta_budget=0.001),
    )
    item = (1, 3, 40)
    figs = {}
    for name, v in (("pass", validator), ("fail", failing)):
        res = v.item(*item)
        assert res.passed == (name == "pass")
        data = item_plot_data(v, *item)
        fig = validation_figure(data)
        title = fig._suptitle.get_text()
        assert title.startswith("PASS" if res.passed else "FAIL (bound)"), title
        assert f"worst |r|/B_{res.bound_kind} = {res.ratio:.3g} at head {res.head}" in title
        S, T, B = (t.double().numpy() for t in v.query_row(item[0], item[1], 40))
        r = T - S
        titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("head")]
        for h, t in enumerate(titles):
            assert t.startswith(
                f"head {h}: max |r|/B_{res.bound_kind} = {(abs(r[h]) / B[h]).max():.3g}"
            )
        worst = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "worst"]
        assert list(worst[0].get_xdata()) == [res.key]
        figs[name] = save_figure(fig, tmp_path / f"{name}.png").read_bytes()
    assert figs["pass"] != figs["fail"]


def _panel_lines(ax) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {"coloured": []}
    for coll in ax.collections:
        if hasattr(coll, "get_segments"):
            out["coloured"] += [seg[:, 1] for seg in coll.get_segments()]
    for ln in ax.get_lines():
        if ln.get_gid() in ("rest", "bias", "delta", "target", "sum", "top"):
            out.setdefault(ln.get_gid(), []).append(np.asarray(ln.get_ydata()))
    return out


def test_the_components_figures_lines_add_up_to_the_target(validator):
    """Per-component sums over every component plus bias equal the validator's component
    sum (an independent computation, decompose.py's); in every panel of the components
    figure the coloured components + rest + bias + Δ equal the target line."""
    from qkcheck.figures import _factors, component_curves

    layer, sample, i = 1, 3, 40
    S, T, _ = (t.double().numpy() for t in validator.query_row(layer, sample, i))
    f, extra = _factors(validator, layer, sample, i)
    Q, K = component_curves(f)
    bias = 0 if extra["bias"] is None else extra["bias"].double().numpy()
    np.testing.assert_allclose(Q.sum(dim=1).double().numpy() + bias, S, atol=1e-4)
    np.testing.assert_allclose(K.sum(dim=1).double().numpy() + bias, S, atol=1e-4)
    data = item_plot_data(validator, layer, sample, i)
    fig = components_figure(data)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2 * (data.n_head + 1)
    for n, ax in enumerate(panels):
        lines = _panel_lines(ax)
        assert len(lines["coloured"]) == 5  # --top-n 5
        want = T.mean(axis=0) if n < 2 else T[(n - 2) // 2]
        np.testing.assert_allclose(lines["target"][0], want, atol=1e-9)
        got = sum(lines["coloured"]) + lines["rest"][0] + lines["delta"][0]
        got = got + (lines["bias"][0] if "bias" in lines else 0)
        np.testing.assert_allclose(got, want, atol=1e-4)
    labels = legend_labels(panels[2])
    assert labels[0].startswith("h.1.attn.q_proj:") and len(labels) == 5


def test_the_combined_figure_shows_what_its_top_pairs_leave_out(validator):
    data = item_plot_data(validator, 1, 3, 40)
    fig = combined_figure(data)
    for n, ax in enumerate(ax for ax in fig.axes if ax.get_title()):
        lines = _panel_lines(ax)
        top = data.mean_top if n == 0 else data.head_top[n - 1]
        assert len(lines["coloured"]) == len(top)
        np.testing.assert_allclose(lines["top"][0], sum(lines["coloured"]), atol=1e-9)
        np.testing.assert_allclose(lines["top"][0] + lines["rest"][0], lines["sum"][0], atol=1e-9)
        np.testing.assert_allclose(
            lines["sum"][0] + lines["delta"][0] + lines.get("bias", [0])[0],
            lines["target"][0],
            atol=1e-4,
        )
        legend = legend_labels(ax)
        assert legend == [f"q_proj:{c}·k_proj:{d}" for c, d in top]  # only its own pairs


def test_colours_are_unique_and_never_grey():
    import colorsys

    cols = palette(120)
    assert len(set(cols)) == 120
    for c in cols:
        _, light, sat = colorsys.rgb_to_hls(*c)
        assert sat > 0.3 and 0.2 < light < 0.8, c


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    from tests.hf_runs import KINDS, write_run

    root = tmp_path_factory.mktemp("hf")
    return {kind: write_run(kind, root / "out", root / "hub") for kind in KINDS}, root / "hub"


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
def test_hf_figures_add_up_to_the_decomposition_with_qk_norm_biases_and_fused_slices(
    hf_tiny, kind, monkeypatch
):
    """Pair sum + bias terms equal the validator's component sum (decompose.py) on Qwen3
    (QK-norm: σ and γ), GPT-2 (fused c_attn with biases) and Llama; binary-mode figures of a
    QK-norm layer are refused, not drawn wrong."""
    from qkcheck.errors import UnsupportedError
    from qkcheck.runs import load_run

    runs, hub = hf_tiny
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    run = load_run(runs[kind])
    v = Validator(run, run.samples[:1], [0], Settings(run_id="x", top_n=4))
    for layer in v.layers:
        i = 17
        data = item_plot_data(v, layer, 0, i)
        S = v.query_row(layer, 0, i)[0].double().numpy()
        np.testing.assert_allclose(data.total + data.bias, S, atol=1e-4, rtol=1e-4)
        assert np.abs(data.total).max() > 1e-2  # not vacuous
        if kind == "gpt2":
            assert np.abs(data.bias).max() > 1e-3  # its biases are drawn
    if kind == "qwen3":
        b = Validator(run, run.samples[:1], [0], Settings(run_id="x", mode="binary"))
        with pytest.raises(UnsupportedError, match="QK-norm"):
            item_plot_data(b, 0, 0, 17)


def test_text_drawn_from_the_string_cache_matches_matplotlibs_own_rendering():
    """Each string is rasterised once per process and blitted where it recurs: labels at 0°
    and 90° (bold, escaped, glyph-less) land where matplotlib's own renderer puts them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from qkcheck import plot_render

    texts = [
        ("3768 ·0", 0, None),
        ("h.1.attn.q_proj:47", 0, None),
        ("␣or ·2", 90, None),
        ("U+6F22 ·0", 90, "bold"),
        ("\\$5 ag", 90, None),
        ("head 3: max |r|/B", 0, "bold"),
    ]

    def ink(canvas) -> list[tuple[float, float, float]]:
        """Per text: the centroid (row, column) of its ink and the ink's mass."""
        fig = Figure(figsize=(8, 2), dpi=90)
        canvas(fig)
        for k, (t, angle, weight) in enumerate(texts):
            fig.text(0.02 + 0.16 * k, 0.3, t, rotation=angle, fontsize=7, fontweight=weight)
        fig.canvas.draw()
        dark = 765.0 - np.asarray(fig.canvas.buffer_rgba())[..., :3].sum(axis=-1)
        out = []
        for k in range(len(texts)):
            cell = dark[:, int(720 * (0.02 + 0.16 * k)) - 4 : int(720 * (0.18 + 0.16 * k)) - 4]
            rows, cols = np.indices(cell.shape)
            m = cell.sum()
            out.append(((rows * cell).sum() / m, (cols * cell).sum() / m, m))
        return out

    plot_render._TEXT_IMAGES.clear()
    want = ink(FigureCanvasAgg)
    got = ink(plot_render.Canvas)
    cached = len(plot_render._TEXT_IMAGES)
    assert cached == len(texts)
    assert ink(plot_render.Canvas) == got  # drawn again from the cache: the same pixels
    assert len(plot_render._TEXT_IMAGES) == cached
    for (t, _, _), w, g in zip(texts, want, got, strict=True):
        assert abs(w[0] - g[0]) < 0.75 and abs(w[1] - g[1]) < 0.75, (t, w, g)
        assert abs(w[2] - g[2]) < 0.1 * w[2], (t, w, g)


def _attention_lines(fig) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for ax in fig.axes:
        for ln in ax.get_lines():
            if ln.get_gid() in ("attention_target", "attention_sum"):
                out.setdefault(ln.get_gid(), []).append(np.asarray(ln.get_ydata()))
    return out


@pytest.mark.parametrize("n_head", [1, 4])
def test_show_attention_adds_a_row_per_head_with_the_softmax_of_target_and_sum(n_head):
    data = synthetic(n_head)
    assert _attention_lines(validation_figure(data)) == {}  # off by default
    data.show_attention = True
    fig = validation_figure(data)
    lines = _attention_lines(fig)
    T, S = data.verdict.target, data.verdict.component_sum
    assert len(lines["attention_target"]) == len(lines["attention_sum"]) == n_head
    for h in range(n_head):
        a = lines["attention_target"][h]
        np.testing.assert_allclose(a.sum(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(a, np.exp(T[h]) / np.exp(T[h]).sum(), rtol=1e-12)
        np.testing.assert_allclose(lines["attention_sum"][h], np.exp(S[h]) / np.exp(S[h]).sum())
    gaps = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "attention_gap"]
    assert len(gaps) == n_head and gaps[0].startswith("max |Δ attention| = ")
    labels = [t for ax in fig.axes for t in key_labels(ax)]
    assert "tok11 ·11" in labels  # the keys are labelled under the attention row


def test_show_attention_is_the_softmax_of_the_targets_own_logits(genuine_run, genuine_tokens):
    v = Validator(
        genuine_run, genuine_tokens, [0], Settings(run_id="x", top_n=3, show_attention=True)
    )
    layer, i = 1, 30
    data = item_plot_data(v, layer, 0, i)
    assert data.show_attention
    cap, row = v.capture(0)
    logits = cap.logits[layer][row, :, i, : i + 1].double().numpy()  # (head, key)
    got = _attention_lines(validation_figure(data))["attention_target"]
    for h, a in enumerate(got):
        np.testing.assert_allclose(a.sum(), 1.0, rtol=1e-9)
        want = np.exp(logits[h] - logits[h].max())
        np.testing.assert_allclose(a, want / want.sum(), rtol=1e-6, atol=1e-9)
