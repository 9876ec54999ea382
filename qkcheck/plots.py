"""Figures for one item (docs/design.md §8), headless (Agg), free of torch and of global
state but a per-process cache of rasterised strings (qkcheck.plot_render):
:class:`ItemPlotData` holds plain numpy arrays, so figures can be drawn in worker processes
(:func:`draw_job`; qkcheck.figures.write_figures).

* :func:`validation_figure` — the verdict. Per head: target and component sum over key
  positions on one axis; below it, aligned on the same keys, the residual
  ``r = target − component sum`` (the Δ terms) with the asserted ±B band; |r|/B in each
  head's title, the worst (head, key) starred, PASS/FAIL and the closure error in the title;
  with ``show_attention`` a row per head with the softmax of the target and of the sum.
* :func:`combined_figure` — pairs. A head-mean panel and one panel per head; each draws
  its own top-N (q-component, k-component) pairs (colours and markers unique within the
  figure, a legend per panel with only its pairs), their sum ("top-N sum"), what every other
  pair adds ("rest"), the sum over all components, Δ and bias as pseudo-components, and the
  target logit.
* :func:`components_figure` — single components: per head, each query component summed
  over all key components and each key component summed over all query components, ranked
  by peak |value|, with "rest", Δ and bias; lines of a panel add up to the target.

Every panel of a figure shares its y-limits with the others of its kind. Keys are labelled
``token ·pos`` (every key up to :data:`LABEL_ALL_KEYS` keys, else each panel's peaks and the
query), tokens escaped (:func:`display_token`). Files are written atomically.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.lines import Line2D

from qkcheck.plot_render import (
    Canvas,
    Key,
    Label,
    Labels,
    PanelAxes,
    PanelLegend,
    ValueAxis,
    png_bytes,
)
from qkcheck.util import atomic_path, safe_name

#: up to this many keys every key is labelled; beyond, each panel's peaks and the query
LABEL_ALL_KEYS = 64
#: keys labelled per panel beyond LABEL_ALL_KEYS
PEAK_LABELS = 10
#: at most this many coloured entries in one panel's legend (the rest are summarised)
LEGEND_CAP = 10
DPI = 90

Pair = tuple[int, int]


@dataclass
class Verdict:
    """The item's verdict and what the validation figure draws, ``(head, key_pos)`` arrays:
    ``component_sum`` (components and bias, as the validator sums them), ``target``, and
    the asserted bound ``bound``; the worst entry is (``head``, ``key``)."""

    passed: bool
    closure_ok: bool
    bound_ok: bool
    closure_error: float
    closure_tol: float
    ratio: float
    head: int
    key: int
    r: float
    bound_kind: str
    bound_label: str
    component_sum: np.ndarray
    target: np.ndarray
    bound: np.ndarray

    @property
    def residual(self) -> np.ndarray:
        """``r = target − component sum`` (the Δ terms), the validator's sign."""
        return self.target - self.component_sum


@dataclass
class ItemPlotData:
    """Everything the figures of one item need, as plain arrays (picklable, no torch).

    Curves are ``(head, key_pos)`` over key positions ``0..query_pos``.
    ``pair_curves[(c, d)]``: one pair's contribution; ``head_top[h]`` the pairs of head h's
    top-N, ``mean_top`` those of the head mean. ``total``: the sum over every component
    pair; ``target`` the model's logits (None in binary mode); ``bias``/``delta``: the bias
    terms and the Δ terms (``target − total − bias``), None where undefined, so that
    ``total + bias + delta = target``. ``q_curves[c]``: query component c summed over every
    key component (``k_curves`` the reverse), ranked per head in ``head_q_top``/``head_k_top``
    and for the head mean in ``mean_q_top``/``mean_k_top``. ``q_label``/``k_label``: the
    modules' paths, for labels like ``h.1.attn.q_proj:47``.
    """

    run: str
    layer: int
    sample: int
    query_pos: int
    mode: str
    tokens: Sequence[str]
    pair_curves: dict[Pair, np.ndarray]
    head_top: list[list[Pair]]
    mean_top: list[Pair]
    total: np.ndarray
    target: np.ndarray | None
    bias: np.ndarray | None = None
    delta: np.ndarray | None = None
    q_curves: dict[int, np.ndarray] = field(default_factory=dict)
    k_curves: dict[int, np.ndarray] = field(default_factory=dict)
    head_q_top: list[list[int]] = field(default_factory=list)
    head_k_top: list[list[int]] = field(default_factory=list)
    mean_q_top: list[int] = field(default_factory=list)
    mean_k_top: list[int] = field(default_factory=list)
    q_label: str = "q"
    k_label: str = "k"
    verdict: Verdict | None = None
    #: the validation figure adds a row per head: softmax of the target and of the sum
    show_attention: bool = False

    @property
    def n_head(self) -> int:
        return self.total.shape[0]

    @property
    def n_keys(self) -> int:
        return self.total.shape[1]

    def stem(self) -> str:
        return f"{safe_name(self.run)}_L{self.layer}_S{self.sample}_Q{self.query_pos}"

    def file_names(self) -> list[str]:
        """``<stem>_<mode>_{combined,components[,validation]}.png``: validation in weighted
        mode only (binary mode has no ground truth to compare)."""
        kinds = ["combined", "components"] + (["validation"] if self.verdict else [])
        return [f"{self.stem()}_{self.mode}_{k}.png" for k in kinds]


# --- colours, tokens, axes ---------------------------------------------------------------------

#: reserved for the summary lines, never a pair's colour
TARGET_COLOR = "#d62728"
SUM_COLOR = "black"
DELTA_COLOR = "#8c0a4b"
BIAS_COLOR = "#8c564b"
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p")


@functools.cache
def palette(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinct colours, none grey, black, red or brown (the summary lines' colours):
    tab10's chromatic colours first, then hues spaced by the golden angle at alternating
    lightness and saturation."""
    base = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#e377c2", "#bcbd22", "#17becf"]
    out = [_rgb(c) for c in base]
    k = 0
    while len(out) < n:
        hue = (0.11 + k * 0.618034) % 1.0
        k += 1
        if hue < 0.06 or hue > 0.95:  # red: the target's
            continue
        light, sat = ((0.42, 0.85), (0.62, 0.75), (0.32, 0.6))[k % 3]
        out.append(colorsys.hls_to_rgb(hue, light, sat))
    return out[:n]


def _rgb(hex_color: str) -> tuple[float, float, float]:
    h = hex_color.lstrip("#")
    return tuple(int(h[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


@functools.cache
def _font_codepoints() -> frozenset[int]:
    """Code points the figures' font (matplotlib's default sans) has glyphs for."""
    font = FT2Font(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans")))
    return frozenset(font.get_charmap())


#: made visible: a newline would break the title, spaces would vanish
_VISIBLE = {"\n": "↵", "\r": "↵", "\t": "⇥", " ": "␣"}


def display_token(text: str) -> str:
    """A token as figure text: ``$`` escaped (never mathtext), newlines, tabs and spaces
    shown as ↵ ⇥ ␣, and characters the font has no glyph for (CJK, emoji…) written as
    their code point ``U+6F22`` — so a label is never silently blank nor a warning."""
    have = _font_codepoints()
    out = []
    for ch in text:
        ch = _VISIBLE.get(ch, ch)
        if ch == "$":
            out.append("\\$")
        elif ord(ch) in have:
            out.append(ch)
        else:
            out.append(f"U+{ord(ch):04X}")
    return "".join(out)


def _title_text(data: ItemPlotData, width: int = 110) -> str:
    """The sample's text up to the query, the query token marked, trimmed from the left."""
    shown = [display_token(t) for t in data.tokens[: data.query_pos + 1]]
    words = [*shown[: data.query_pos], f"[{shown[data.query_pos]}]"]
    text = " ".join(words)
    if len(text) > width:
        text = "…" + text[-width:]
    return text


def _cut(text: str) -> str:
    return text if len(text) <= TOKEN_CHARS else text[: TOKEN_CHARS - 1] + "…"


def _peak_keys(curves: Sequence[np.ndarray], n: int) -> list[int]:
    """The ``n`` keys where the largest of ``curves`` (1-d) peak in |value|, at least
    1/60 of the keys apart so that their labels do not overlap."""
    score = np.max(np.abs(np.stack(curves)), axis=0)
    gap = max(1, len(score) // 60)
    out: list[int] = []
    for j in np.argsort(-score, kind="stable"):
        if all(abs(int(j) - k) >= gap for k in out):
            out.append(int(j))
            if len(out) == n:
                break
    return sorted(out)


def _key_axis(
    ax, data: ItemPlotData, labels: bool, peaks: Sequence[int] = (), never: bool = False
) -> None:
    """Key positions as x: every key labelled ``token ·pos`` up to LABEL_ALL_KEYS keys
    (``labels``: this panel shows them), else the panel's ``peaks`` and the query; the query
    key marked by a dotted line and a bold red label.

    The labels are one :class:`~qkcheck.plot_render.Labels` artist (gid ``"key"``) under
    the axis, and the axis has no ticks (a matplotlib tick costs ~10× a label)."""
    J, q = data.n_keys, data.n_keys - 1
    if J <= LABEL_ALL_KEYS:
        keys = list(range(J))
    else:
        labels = not never  # each panel its own peaks
        keys = sorted({0, *peaks, q})
    ax.xaxis.set_visible(False)
    if labels:
        entries = [
            Label(
                t,
                -0.02,
                f"{_cut(display_token(data.tokens[t]))} ·{t}",
                color=TARGET_COLOR if t == q else "black",
                weight="bold" if t == q else None,
            )
            for t in keys
        ]
        size = 6 if len(keys) <= 40 else 5
        art = Labels(entries, ax.get_xaxis_transform(), size=size, angle=90, ha="center",
                     va="top", gid="key")  # fmt: skip
        art.set_clip_on(False)
        ax.add_artist(art)
    ax.set_xlim(-0.5, J - 0.5)
    ax.axvline(q, color=TARGET_COLOR, ls=":", lw=0.8, alpha=0.6, zorder=0)
    ax.axhline(0, color="0.8", lw=0.6, zorder=0)


def _y_axis(ax, label: str) -> None:
    """The value axis (:class:`~qkcheck.plot_render.ValueAxis`): its label and at most five
    labelled ticks, in place of matplotlib's y axis."""
    ax.yaxis.set_visible(False)
    art = ValueAxis(ax, label)
    art.set_clip_on(False)
    ax.add_artist(art)


def _line(ax, x, y, **style) -> Line2D:
    """A line added to ``ax`` without ``Axes.plot``'s argument parsing and data-limit
    bookkeeping (every panel's limits are set explicitly); clipped to the panel."""
    ln = Line2D(x, y, **style)
    ax.add_artist(ln)
    return ln


def _markevery(J: int) -> int:
    return max(1, math.ceil(J / 32))


def _lines(ax, x, curves, colors, markers, widths, J, gids) -> None:
    """Many curves as one LineCollection plus one marker artist per curve (markers at
    most every ~32 keys; a single-key curve stays visible)."""
    segs = [np.column_stack([x, c]) for c in curves]
    lc = LineCollection(segs, colors=colors, linewidths=widths, zorder=2)
    ax.add_collection(lc)
    step = _markevery(J)
    for c, col, m, gid in zip(curves, colors, markers, gids, strict=True):
        _line(ax, x[::step], c[::step], ls="none", marker=m, ms=3, color=col, zorder=3, gid=gid)


#: the summary lines' styles (line and legend key)
STYLES = {
    "target": dict(color=TARGET_COLOR, ls="--", lw=1.5, marker="x"),
    "sum": dict(color=SUM_COLOR, ls="-", lw=1.6, marker="."),
    "top": dict(color=SUM_COLOR, ls="--", lw=1.0, marker=None),
    "rest": dict(color=SUM_COLOR, ls=":", lw=1.1, marker=None),
    "delta": dict(color=DELTA_COLOR, ls="-.", lw=1.0, marker=None),
    "bias": dict(color=BIAS_COLOR, ls=(0, (5, 1, 1, 1, 1, 1)), lw=1.0, marker=None),
}


def _style_line(ax, x, y, kind: str, J: int):
    style = dict(STYLES[kind])
    if J > LABEL_ALL_KEYS:
        style["marker"] = None  # hundreds of keys: markers would hide the lines
    return _line(ax, x, y, markevery=_markevery(J), ms=4, zorder=4, gid=kind, **style)


STYLE_LABELS = {
    "target": "target logit",
    "sum": "all components (Σ pairs)",
    "top": "top-N sum",
    "rest": "rest (all other pairs)",
    "delta": "Δ (weight delta terms)",
    "bias": "bias terms",
}


def _style_keys(kinds: Sequence[str], labels: dict[str, str] | None = None) -> list[Key]:
    labels = {**STYLE_LABELS, **(labels or {})}
    return [Key(labels[k], ms=4, **STYLES[k]) for k in kinds]


def _panel_legend(ax, keys: Sequence[Key], ncols: int = 1) -> None:
    """A panel's legend in its upper left corner, at most LEGEND_CAP entries (the rest
    counted in a last entry)."""
    shown = list(keys[:LEGEND_CAP])
    if len(keys) > LEGEND_CAP:
        shown.append(Key(f"… {len(keys) - LEGEND_CAP} more", ls="none"))
    ax.add_artist(PanelLegend(shown, anchor=(0, 1), transform=ax.transAxes, ncols=ncols))


def legend_labels(ax) -> list[str]:
    """The labels of a panel's legend (empty without one)."""
    return [t for a in ax.artists if isinstance(a, PanelLegend) for t in a.texts()]


def key_labels(ax) -> list[str]:
    """The key labels under a panel."""
    return [
        t for a in ax.artists if isinstance(a, Labels) and a.get_gid() == "key" for t in a.texts()
    ]


def _share_y(axes: Sequence, values: Sequence[np.ndarray], pad: float = 0.08) -> None:
    lo = min(float(np.min(v)) for v in values)
    hi = max(float(np.max(v)) for v in values)
    span = max(hi - lo, 1e-9)
    lo, hi = lo - pad * span, hi + pad * span
    for ax in axes:
        ax.set_ylim(lo, hi)


#: inches: rotated ``token ·pos`` labels (tokens cut to TOKEN_CHARS), a panel title, the
#: figure's title lines and bottom legend
LABEL_IN, PANEL_TITLE_IN, TITLE_LINE_IN, LEGEND_IN = 0.95, 0.32, 0.2, 0.4
TOKEN_CHARS = 14


def _figure(
    width: float,
    n_rows: int,
    n_cols: int,
    row_in: float,
    every_row_labelled: bool,
    title_lines: int = 3,
    sub: tuple[int, list[float], float] | None = None,
    n_cells: int | None = None,
) -> tuple[Figure, list]:
    """A figure with a fixed layout computed here (no constrained layout: it draws every
    text twice). Rows of ``row_in`` inches; between rows room for a panel title and, where
    ``every_row_labelled``, the key labels. ``sub`` = (n, height ratios, gap in inches)
    splits each cell into n stacked axes. Only the first ``n_cells`` cells (row-major; all
    by default) get axes, the others are None (an axes costs ~8 ms to make). Returns the
    figure and a (row, col[, sub]) grid."""
    top = TITLE_LINE_IN * title_lines + 0.15 + PANEL_TITLE_IN
    bottom = LEGEND_IN + LABEL_IN
    gap = PANEL_TITLE_IN + (LABEL_IN if every_row_labelled else 0.12)
    height = top + bottom + n_rows * row_in + (n_rows - 1) * gap
    fig = Figure(figsize=(width, height))
    Canvas(fig)
    left, right, wgap = 0.6, 0.15, 0.55
    col_w = (width - left - right - (n_cols - 1) * wgap) / n_cols
    gs = fig.add_gridspec(
        n_rows, n_cols, left=left / width, right=1 - right / width, bottom=bottom / height,
        top=1 - top / height, hspace=gap / row_in, wspace=wgap / col_w,
    )  # fmt: skip
    grid = []
    for r in range(n_rows):
        row = []
        for c in range(n_cols):
            if n_cells is not None and r * n_cols + c >= n_cells:
                row.append(None)
            elif sub is None:
                row.append(fig.add_subplot(gs[r, c], axes_class=PanelAxes))
            else:
                n, ratios, sgap = sub
                inner = gs[r, c].subgridspec(n, 1, height_ratios=ratios, hspace=sgap * n / row_in)
                row.append([fig.add_subplot(inner[k], axes_class=PanelAxes) for k in range(n)])
        grid.append(row)
    return fig, grid


def _fig_legend(fig: Figure, keys: Sequence[Key], ncols: int) -> None:
    """The figure's legend of line kinds, centred at the bottom."""
    fig.add_artist(PanelLegend(keys, anchor=(0.5, 0.0), transform=fig.transFigure,
                               loc="lower center", size=7, ncols=ncols, handle_len=2.0,
                               frame_alpha=None, gid="figure_legend"))  # fmt: skip


def _units(data: ItemPlotData) -> str:
    return "logit" if data.mode == "weighted" else "gated weight-only term"


def _item_title(data: ItemPlotData, what: str) -> str:
    mode = "weighted" if data.mode == "weighted" else "binary (CI-gated, not logits)"
    return (
        f"{data.run} · layer {data.layer} · sample {data.sample} · query {data.query_pos} · "
        f"{mode} · {what}"
    )


def _short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


# --- combined: pairs ---------------------------------------------------------------------------


def combined_figure(data: ItemPlotData) -> Figure:
    """The combined figure (see module docstring). Caller saves (:func:`save_figure`)."""
    H, J = data.n_head, data.n_keys
    n_panels = H + 1
    ncols = min(4, max(1, math.ceil(math.sqrt(1.3 * n_panels))))
    nrows = math.ceil(n_panels / ncols)
    width = max(12.0, min(26.0, 3.6 * ncols + J * 0.035 * ncols))
    fig, grid = _figure(
        width, nrows, ncols, 2.6, every_row_labelled=J > LABEL_ALL_KEYS, n_cells=n_panels
    )
    axes = [ax for row in grid for ax in row][:n_panels]
    all_pairs = list(dict.fromkeys([*data.mean_top, *(p for top in data.head_top for p in top)]))
    colors = dict(zip(all_pairs, palette(len(all_pairs)), strict=True))
    marker = {p: MARKERS[k % len(MARKERS)] for k, p in enumerate(all_pairs)}
    x = np.arange(J)
    weighted = data.target is not None
    qs, ks = _short(data.q_label), _short(data.k_label)

    def pair_label(p: Pair) -> str:
        return f"{qs}:{p[0]}·{ks}:{p[1]}"

    def mean_or(h, a):
        return None if a is None else (a.mean(axis=0) if h is None else a[h])

    drawn = []
    for n, ax in enumerate(axes):
        h = None if n == 0 else n - 1
        pairs = data.mean_top if h is None else data.head_top[h]
        curves = [mean_or(h, data.pair_curves[p]) for p in pairs]
        total = mean_or(h, data.total)
        top_sum = np.sum(curves, axis=0) if curves else np.zeros(J)
        _lines(
            ax,
            x,
            curves,
            [colors[p] for p in pairs],
            [marker[p] for p in pairs],
            1.2,
            J,
            [f"pair:{p[0]},{p[1]}" for p in pairs],
        )
        styles = {"sum": total, "top": top_sum, "rest": total - top_sum}
        if weighted:
            styles["target"] = mean_or(h, data.target)
            if data.delta is not None:
                styles["delta"] = mean_or(h, data.delta)
            if data.bias is not None and np.any(data.bias):
                styles["bias"] = mean_or(h, data.bias)
        for kind, y in styles.items():
            _style_line(ax, x, y, kind, J)
        drawn.append([*curves, *styles.values()])
        keys = [Key(pair_label(p), colors[p], marker=marker[p]) for p in pairs]
        expl = float(np.abs(top_sum).max()) / max(float(np.abs(total).max()), 1e-12)
        title = "mean over heads" if h is None else f"head {h}"
        ax.set_title(
            f"{title}: peak |top-{len(pairs)} sum| = {expl:.0%} of peak |all pairs|",
            fontsize=8,
            y=1.0,  # a fixed place: automatic placement measures every tick label
        )
        _panel_legend(ax, keys, ncols=2 if min(len(keys), LEGEND_CAP) > 5 else 1)
        _y_axis(ax, _units(data))
        peaks = _peak_keys([styles.get("target", total), top_sum], PEAK_LABELS)
        _key_axis(ax, data, labels=n >= n_panels - ncols, peaks=peaks)
    _share_y(axes, [v for d in drawn for v in d])
    kinds = ["sum", "top", "rest"] + (["target", "delta"] if weighted else [])
    if weighted and data.bias is not None and np.any(data.bias):
        kinds.append("bias")
    _fig_legend(fig, _style_keys(kinds, {"top": f"top-{len(data.mean_top)} sum"}), len(kinds))
    fig.suptitle(
        f"{_item_title(data, 'pairs (q-component·k-component)')}\n"
        f"q = {data.q_label}, k = {data.k_label}; lines of a panel: its own top pairs; "
        f"y-limits shared\n{_title_text(data)}",
        fontsize=9,
    )
    return fig


# --- components: single components -------------------------------------------------------------


def components_figure(data: ItemPlotData) -> Figure:
    """Per head (and the head mean), two panels: each query component summed over all key
    components, and each key component summed over all query components, top ones coloured
    and ranked by peak |value|; "rest" the other components, Δ and bias pseudo-components,
    the target. In each panel the drawn lines add up to the target (weighted mode)."""
    H, J = data.n_head, data.n_keys
    head_cols = 1 if H == 1 else 2
    n_rows = math.ceil((H + 1) / head_cols)
    width = max(12.0, min(26.0, (3.4 + J * 0.03) * 2 * head_cols))
    fig, rows = _figure(
        width, n_rows, 2 * head_cols, 2.3, every_row_labelled=J > LABEL_ALL_KEYS,
        n_cells=2 * (H + 1),
    )  # fmt: skip
    grid = np.empty((n_rows, 2 * head_cols), dtype=object)
    for r, row in enumerate(rows):
        for c, ax in enumerate(row):
            grid[r, c] = ax
    x = np.arange(J)
    weighted = data.target is not None
    sides = (("q", data.q_curves, data.q_label), ("k", data.k_curves, data.k_label))
    ids = {
        s: list(dict.fromkeys([*top_mean, *(c for t in tops for c in t)]))
        for s, top_mean, tops in (
            ("q", data.mean_q_top, data.head_q_top),
            ("k", data.mean_k_top, data.head_k_top),
        )
    }
    n_colors = len(ids["q"]) + len(ids["k"])
    cols = palette(n_colors)
    color = {("q", c): cols[i] for i, c in enumerate(ids["q"])}
    color |= {("k", c): cols[len(ids["q"]) + i] for i, c in enumerate(ids["k"])}
    marker = {key: MARKERS[i % len(MARKERS)] for i, key in enumerate(color)}
    used, drawn = [], []
    for n in range(H + 1):
        h = None if n == 0 else n - 1
        row, col0 = divmod(n, head_cols)
        for s_i, (side, curves_of, label) in enumerate(sides):
            ax = grid[row, 2 * col0 + s_i]
            used.append(ax)
            if side == "q":
                top = data.mean_q_top if h is None else data.head_q_top[h]
            else:
                top = data.mean_k_top if h is None else data.head_k_top[h]

            def pick(a, h=h):
                return a.mean(axis=0) if h is None else a[h]

            curves = [pick(curves_of[c]) for c in top]
            total = pick(data.total)
            top_sum = np.sum(curves, axis=0) if curves else np.zeros(J)
            _lines(
                ax,
                x,
                curves,
                [color[(side, c)] for c in top],
                [marker[(side, c)] for c in top],
                1.2,
                J,
                [f"component:{side}:{c}" for c in top],
            )
            styles = {"rest": total - top_sum}
            if weighted:
                if data.bias is not None and np.any(data.bias):
                    styles["bias"] = pick(data.bias)
                if data.delta is not None:
                    styles["delta"] = pick(data.delta)
                styles["target"] = pick(data.target)
            else:
                styles["sum"] = total
            for kind, y in styles.items():
                _style_line(ax, x, y, kind, J)
            drawn.append([*curves, *styles.values()])
            _panel_legend(
                ax, [Key(f"{label}:{c}", color[(side, c)], marker=marker[(side, c)]) for c in top]
            )
            who = "mean over heads" if h is None else f"head {h}"
            ax.set_title(
                f"{who}: {_short(label)} components",
                fontsize=8,
                y=1.0,
            )
            _y_axis(ax, _units(data))
            peaks = _peak_keys([styles.get("target", total), *curves[:3]], PEAK_LABELS)
            _key_axis(ax, data, labels=n + head_cols >= H + 1, peaks=peaks)
    _share_y(used, [v for d in drawn for v in d])
    kinds = ["rest"] + (["delta", "target"] if weighted else ["sum"])
    if weighted and data.bias is not None and np.any(data.bias):
        kinds.insert(1, "bias")
    _fig_legend(fig, _style_keys(kinds, {"rest": "rest (all other components)"}), len(kinds))
    adds = "coloured + rest + bias + Δ = target" if weighted else "coloured + rest = sum"
    fig.suptitle(
        f"{_item_title(data, 'single components')}\nranked by peak |value| over keys; "
        f"in each panel {adds}; each {_short(data.q_label)} component Σ over all "
        f"{_short(data.k_label)} components and the reverse; y-limits shared\n{_title_text(data)}",
        fontsize=9,
    )
    return fig


# --- validation: the verdict -------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (keys ``0..i``), computed stably."""
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _attention_row(ax, data: ItemPlotData, T: np.ndarray, S: np.ndarray, peaks, labels: bool):
    """One head's attention pattern over keys ``j ≤ i``: the softmax of the target logits
    (gid ``"attention_target"``) and of the component sum (``"attention_sum"``), with the
    largest difference between them (gid ``"attention_gap"``)."""
    J = len(T)
    x = np.arange(J)
    a, b = softmax(T), softmax(S)
    _line(ax, x, a, color=TARGET_COLOR, lw=1.2, zorder=3, gid="attention_target")
    _line(ax, x, b, color=SUM_COLOR, lw=1.0, ls="--", zorder=4, gid="attention_sum")
    ax.text(0.99, 0.95, f"max |Δ attention| = {np.abs(a - b).max():.2g}", transform=ax.transAxes,
            ha="right", va="top", fontsize=6, gid="attention_gap")  # fmt: skip
    ax.set_ylim(0, 1.1 * max(float(a.max()), float(b.max()), 1e-12))
    _y_axis(ax, "attention")
    _key_axis(ax, data, labels=labels, peaks=sorted({*peaks, int(np.argmax(a))}))


def validation_figure(data: ItemPlotData) -> Figure:
    """The verdict (see module docstring); needs ``data.verdict`` (weighted mode)."""
    v = data.verdict
    if v is None:
        raise ValueError("the validation figure needs the item's verdict (weighted mode)")
    S, T, B = v.component_sum, v.target, v.bound
    r = v.residual
    H, J = S.shape
    ncols = min(3, H)
    nrows = math.ceil(H / ncols)
    width = max(11.0, min(26.0, (4.2 + J * 0.03) * ncols))
    att = data.show_attention
    sub = (3, [2, 1, 1], 0.1) if att else (2, [2, 1], 0.1)
    row_in = 4.5 if att else 3.4
    fig, grid = _figure(
        width, nrows, ncols, row_in, every_row_labelled=J > LABEL_ALL_KEYS, sub=sub, n_cells=H
    )
    x = np.arange(J)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(B > 0, np.abs(r) / B, np.where(np.abs(r) > 0, np.inf, 0.0))
    top_axes, low_axes = [], []
    kind = v.bound_kind
    for h in range(H):
        row, col = divmod(h, ncols)
        ax, axr, *axa = grid[row][col]
        top_axes.append(ax)
        low_axes.append(axr)
        _style_line(ax, x, T[h], "target", J)
        _line(ax, x, S[h], color=SUM_COLOR, lw=1.2, marker=".", ms=3, markevery=_markevery(J),
              label="component sum", gid="component_sum")  # fmt: skip
        worst_h = int(np.argmax(ratio[h]))
        ax.set_title(
            f"head {h}: max |r|/B_{kind} = {ratio[h].max():.3g} (key {worst_h}), "
            f"max |r| = {np.abs(r[h]).max():.3g}",
            fontsize=8,
            color=TARGET_COLOR if ratio[h].max() > 1 else "black",
            y=1.0,
        )
        _y_axis(ax, "logit")
        _key_axis(ax, data, labels=False, never=True)  # the residual row below has them
        # the residual row: ±B band, r as stems, entries beyond the band in red
        axr.fill_between(
            x, -B[h], B[h], step="mid", color="#2ca02c", alpha=0.18, lw=0, label=f"±B_{kind}"
        )
        over = ratio[h] > 1
        seg = np.stack([np.column_stack([x, np.zeros(J)]), np.column_stack([x, r[h]])], axis=1)
        cols = np.where(over[:, None], (*_rgb(TARGET_COLOR), 1.0), (0.12, 0.47, 0.71, 1.0))
        axr.add_collection(LineCollection(seg, colors=cols, linewidths=1.2))
        _line(axr, x, r[h], ls="none", marker="o", ms=2.2, color="#1f77b4", gid="residual")
        _y_axis(axr, "r")
        peaks = _peak_keys([ratio[h].clip(max=1e9), T[h]], PEAK_LABELS)
        if axa:  # the attention row under it carries the key labels
            _key_axis(axr, data, labels=False, never=True)
            _attention_row(axa[0], data, T[h], S[h], peaks, labels=h + ncols >= H)
        else:
            _key_axis(axr, data, labels=h + ncols >= H, peaks=peaks)
    # the worst (head, key) of the item
    wa, wr = top_axes[v.head], low_axes[v.head]
    _line(wr, [v.key], [r[v.head, v.key]], marker="*", ms=11, color=TARGET_COLOR, ls="none",
          zorder=5, gid="worst")  # fmt: skip
    wr.annotate(
        f"worst |r|/B = {v.ratio:.3g}",
        (v.key, r[v.head, v.key]),
        xytext=(-6 if v.key > J / 2 else 6, 6),
        textcoords="offset points",
        ha="right" if v.key > J / 2 else "left",
        fontsize=7,
        color=TARGET_COLOR,
    )
    wa.axvline(v.key, color=TARGET_COLOR, lw=0.8, ls="-", alpha=0.5)
    _share_y(top_axes, [T, S])
    lim = 1.12 * max(float(np.abs(r).max()), float(B.max()), 1e-12)
    for axr in low_axes:
        axr.set_ylim(-lim, lim)
    _fig_legend(
        fig,
        [
            *_style_keys(["target"]),
            Key("component sum (incl. bias)", SUM_COLOR, marker=".", ms=4),
            Key(f"±B_{kind}: {v.bound_label}", "#2ca02c", lw=6, alpha=0.4),
            Key("r within the band", "#1f77b4", marker="o"),
            Key("r beyond the band", TARGET_COLOR),
            Key("worst entry", TARGET_COLOR, ls="none", marker="*", ms=9),
            *(
                [
                    Key("softmax(target)", TARGET_COLOR),
                    Key("softmax(sum)", SUM_COLOR, ls="--", lw=1.0),
                ]
                if att
                else []
            ),
        ],
        8 if att else 6,
    )
    if v.passed:
        verdict = "PASS"
    else:
        why = [w for w, ok in (("bound", v.bound_ok), ("closure", v.closure_ok)) if not ok]
        verdict = f"FAIL ({' and '.join(why)})"
    fig.suptitle(
        f"{verdict} · {_item_title(data, 'component sum vs target')}\n"
        f"worst |r|/B_{kind} = {v.ratio:.3g} at head {v.head}, key {v.key} "
        f"(r = {v.r:.3g}) · closure error {v.closure_error:.2g} (tol {v.closure_tol:.2g}) · "
        f"r = target − component sum (= the Δ terms) · y-limits shared per row kind\n"
        f"{_title_text(data)}",
        fontsize=9,
        color="#1a7f1a" if v.passed else TARGET_COLOR,
    )
    return fig


# --- files -------------------------------------------------------------------------------------


def save_figure(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """Write ``fig`` to ``path`` atomically (temp file + rename) and release it; a PNG
    through :func:`~qkcheck.plot_render.png_bytes` (unfiltered rows, zlib level 1: ~2.5×
    faster than Pillow's encoder here), other formats through matplotlib.

    Glyphs are rendered unhinted (a quarter of the text's cost, the figures' largest)."""
    import matplotlib

    try:
        with atomic_path(path) as tmp, matplotlib.rc_context({"text.hinting": "no_hinting"}):
            fmt = path.suffix.lstrip(".") or "png"
            if fmt == "png" and isinstance(fig.canvas, Canvas):
                fig.set_dpi(dpi)
                fig.canvas.draw()
                Path(tmp).write_bytes(png_bytes(np.asarray(fig.canvas.buffer_rgba()), dpi))
            else:
                fig.savefig(tmp, dpi=dpi, format=fmt)
    finally:
        _release(fig)
    return path


def _release(fig: Figure) -> None:
    """Drop a drawn figure's axes and texts (``Figure.clear`` rebuilds every axis first,
    ~50 ms a figure)."""
    for ax in list(fig.axes):
        fig.delaxes(ax)
    fig.texts.clear()
    fig.legends.clear()


FIGURES = {
    "combined": combined_figure,
    "components": components_figure,
    "validation": validation_figure,
}


def draw_item(data: ItemPlotData, out_dir: Path | str) -> list[str]:
    """Draw and write all of an item's figures (:meth:`ItemPlotData.file_names`)."""
    return [draw_job(job) for job in figure_jobs(data, out_dir)]


def figure_jobs(data: ItemPlotData, out_dir: Path | str) -> list[tuple[ItemPlotData, str, str]]:
    """(data, kind, path) per figure of an item, for :func:`draw_job`."""
    return [
        (data, name.rsplit("_", 1)[-1].removesuffix(".png"), str(Path(out_dir) / name))
        for name in data.file_names()
    ]


def draw_job(args: tuple[ItemPlotData, str, str]) -> str:
    """Draw and write one figure; module-level, so worker processes can run it."""
    data, kind, path = args
    return str(save_figure(FIGURES[kind](data), Path(path)))
