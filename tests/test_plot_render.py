"""The bulk artists of qkcheck.plot_render against what matplotlib draws for the same
request: label placement (ink), y ticks, legends; and other backends still work."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qkcheck.plot_render import (
    Canvas,
    Key,
    Label,
    Labels,
    PanelLegend,
    ValueAxis,
    tick_labels,
)

CASES = [  # (text, angle, ha, va, weight)
    ("3768 ·0", 90, "center", "top", None),
    ("␣or ·2", 90, "center", "top", "bold"),
    ("\\$5 ag ·3", 90, "center", "top", None),
    ("h.1.attn.q_proj:47", 0, "left", "center", None),
    ("−2.5", 0, "right", "center", None),
    ("logit", 90, "right", "center", None),
    ("gyp", 0, "left", "baseline", None),
]


def _ink(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return 765.0 - np.asarray(fig.canvas.buffer_rgba())[..., :3].sum(axis=-1)


def _box(dark: np.ndarray) -> tuple[float, float, float, float, float]:
    """Ink centroid (row, col), first/last inked row and the ink's mass."""
    rows, cols = np.indices(dark.shape)
    m = dark.sum()
    inked = np.nonzero(dark.sum(axis=1) > 0)[0]
    return (rows * dark).sum() / m, (cols * dark).sum() / m, inked[0], inked[-1], m


@pytest.mark.parametrize("text,angle,ha,va,weight", CASES)
def test_labels_land_where_matplotlib_puts_the_same_text(text, angle, ha, va, weight):
    """One string at (0.5, 0.5) of a small figure, aligned ha/va: the Labels artist's ink
    matches a matplotlib Text's to within a pixel (centroid and extent)."""

    def draw(ours: bool) -> np.ndarray:
        fig = Figure(figsize=(2, 2), dpi=90)
        Canvas(fig)
        if ours:
            art = Labels(
                [Label(0.5, 0.5, text, weight=weight)],
                fig.transFigure,
                size=7,
                angle=angle,
                ha=ha,
                va=va,
            )
            fig.add_artist(art)
        else:
            fig.text(0.5, 0.5, text, rotation=angle, ha=ha, va=va, fontsize=7, fontweight=weight)
        return _ink(fig)

    want, got = _box(draw(False)), _box(draw(True))
    assert abs(want[0] - got[0]) < 1.0 and abs(want[1] - got[1]) < 1.0, (want, got)
    assert abs(want[2] - got[2]) <= 1 and abs(want[3] - got[3]) <= 1, (want, got)
    assert abs(want[4] - got[4]) < 0.1 * want[4]


def test_tick_labels_need_as_few_decimals_as_the_spacing_and_a_true_minus():
    assert tick_labels([-5, 0, 5, 10]) == ["−5", "0", "5", "10"]
    assert tick_labels([-0.5, -0.25, 0, 0.25]) == ["−0.50", "−0.25", "0.00", "0.25"]
    assert tick_labels([0.0, 0.1, 0.2]) == ["0.0", "0.1", "0.2"]
    assert tick_labels([0, 20000, 40000]) == ["0", "2e+04", "4e+04"]
    assert tick_labels([]) == []


def test_value_axis_ticks_are_matplotlibs_at_the_panels_final_limits():
    fig = Figure(figsize=(3, 2), dpi=90)
    Canvas(fig)
    ax = fig.add_subplot()
    ax.xaxis.set_visible(False)
    art = ValueAxis(ax, "logit")
    ax.add_artist(art)
    ax.set_ylim(-7.3, 12.1)  # set after the artist: it reads the limits when drawn
    values, labels = art.ticks()
    want = MaxNLocator(4).tick_values(-7.3, 12.1)
    assert list(values) == [v for v in want if -7.3 <= v <= 12.1]
    assert labels == tick_labels(values)
    assert 3 <= len(values) <= 5
    dark = _ink(fig)
    left = dark[:, : int(ax.bbox.x0) - 2]  # everything left of the frame: ticks, labels, title
    assert left.sum() > 0
    ax.yaxis.set_visible(False)
    art.set_visible(False)
    assert _ink(fig)[:, : int(ax.bbox.x0) - 2].sum() == 0  # and it was all the artist's


def test_panel_legend_draws_a_handle_and_a_label_per_key_in_columns():
    """Ink on each key's row, left (handle) and right (label); two columns side by side;
    a key with no line and no marker draws no handle."""
    keys = [
        Key("q_proj:1·k_proj:2", "#1f77b4", marker="o"),
        Key("dashed", "black", ls="--", lw=1.0),
        Key("bias terms", "#8c564b", ls=(0, (5, 1, 1, 1, 1, 1))),
        Key("… 3 more", ls="none"),
    ]

    def draw(ks, ncols=1):
        fig = Figure(figsize=(3, 2), dpi=90)
        Canvas(fig)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.add_artist(PanelLegend(ks, anchor=(0, 1), transform=ax.transAxes, ncols=ncols))
        return _ink(fig)

    one = draw(keys)
    rows = np.nonzero(one.sum(axis=1) > 0)[0]
    assert rows.size > 0
    two = draw(keys, ncols=2)
    # two columns: half as many text rows, twice as wide
    h1 = np.ptp(np.nonzero(one.sum(axis=1) > 0)[0])
    h2 = np.ptp(np.nonzero(two.sum(axis=1) > 0)[0])
    w1 = np.ptp(np.nonzero(one.sum(axis=0) > 0)[0])
    w2 = np.ptp(np.nonzero(two.sum(axis=0) > 0)[0])
    assert h2 < 0.7 * h1 and w2 > 1.5 * w1
    solid, dashed = draw([Key("x", "black")]), draw([Key("x", "black", ls="--")])
    assert dashed.sum() < solid.sum() - 200  # the handle's gaps
    no_handle = draw([Key("… 3 more", ls="none")])
    with_handle = draw([Key("… 3 more", "black")])
    assert with_handle.sum() > no_handle.sum()


def test_figures_with_these_artists_also_save_to_vector_formats():
    fig = Figure(figsize=(3, 2), dpi=90)
    Canvas(fig)
    ax = fig.add_subplot()
    ax.add_artist(ValueAxis(ax, "logit"))
    ax.add_artist(Labels([Label(0, -0.02, "a ·0")], ax.get_xaxis_transform(), size=6, angle=90))
    ax.add_artist(PanelLegend([Key("x", marker="*")], anchor=(0, 1), transform=ax.transAxes))
    for fmt in ("svg", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt)
        assert buf.tell() > 1000


def test_png_bytes_round_trip_through_pillow_with_the_resolution():
    from PIL import Image

    from qkcheck.plot_render import png_bytes

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(37, 53, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    img = Image.open(io.BytesIO(png_bytes(rgba, 90)))
    img.load()
    assert img.mode == "RGB" and img.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(img), rgba[..., :3])
    assert img.info["dpi"] == pytest.approx((90, 90), abs=0.01)


def test_a_saved_figure_is_the_canvas_it_drew(tmp_path):
    from PIL import Image

    from qkcheck.plots import DPI, save_figure

    fig = Figure(figsize=(3, 2))
    Canvas(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [1, 3, 2], color="#d62728")
    fig.set_dpi(DPI)
    with matplotlib.rc_context({"text.hinting": "no_hinting"}):  # as save_figure draws
        fig.canvas.draw()
    want = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    save_figure(fig, tmp_path / "f.png")
    got = np.asarray(Image.open(tmp_path / "f.png"))
    np.testing.assert_array_equal(got, want)
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temp file left


def test_panels_make_no_tick_objects_and_draw_no_matplotlib_axis():
    """A drawn item figure: every panel is a PanelAxes whose x and y axes are hidden and
    never made a tick (the figures draw their own key labels and value axes)."""
    from qkcheck.plot_render import PanelAxes
    from qkcheck.plots import combined_figure, components_figure, validation_figure
    from tests.test_plots import synthetic

    data = synthetic(3)
    for make in (combined_figure, components_figure, validation_figure):
        fig = make(data)
        fig.canvas.draw()
        assert fig.axes and all(isinstance(ax, PanelAxes) for ax in fig.axes)
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                assert not axis.get_visible()
                assert "majorTicks" not in vars(axis) and "minorTicks" not in vars(axis)
            assert any(isinstance(a, ValueAxis) for a in ax.artists)


@pytest.mark.parametrize("kind", ["combined", "components", "validation"])
def test_panel_axes_draw_the_same_pixels_as_matplotlibs_own_axes(kind, monkeypatch):
    """Skipping the ticks changes nothing drawn: the same figure with plain matplotlib
    Axes (which make their ticks, and place their spines doing so) is pixel-identical."""
    from matplotlib.axes import Axes

    from qkcheck import plots
    from tests.test_plots import synthetic

    data = synthetic(2, n_keys=80)  # beyond LABEL_ALL_KEYS: peak labels

    def pixels() -> np.ndarray:
        fig = plots.FIGURES[kind](data)
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba()).copy()

    ours = pixels()
    monkeypatch.setattr(plots, "PanelAxes", Axes)
    theirs = pixels()
    np.testing.assert_array_equal(ours, theirs)
