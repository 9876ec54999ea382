"""Figures for one item (docs/design.md §8), headless (Agg) and free of global state.

* :func:`combined_figure` — head-mean panel, legend panel, one panel per head. The top-N
  pairs are coloured lines (a pair keeps its colour in every panel and is drawn in a head's
  panel only where it is among that head's own top-N), the next strongest pairs faint grey,
  the sum over all components black, and in weighted mode the target logit red dashed.
  The x-axis is key positions labelled with their tokens.
* :func:`validation_figure` — per head: component sum vs target over key positions, the
  residual as bars on a second axis, max |r| in the title.

Both are written atomically (temporary file, then rename) and always closed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from torch import Tensor

from qkcheck.util import atomic_path, safe_name

MAX_TICK_LABELS = 48


@dataclass
class ItemPlotData:
    """Everything a figure of one item needs, as plain arrays.

    Curves are over key positions ``0..query_pos``. ``pair_curves[(c, d)]`` is
    ``(head, key_pos)``; ``head_top[h]`` the pairs of head h's top-N, ``mean_top`` those of
    the head mean; ``head_faint``/``mean_faint`` the next strongest pairs (drawn faint);
    ``total`` ``(head, key_pos)`` the sum over all components; ``target`` the same for the
    model's logits (None in binary mode).
    """

    run: str
    layer: int
    sample: int
    query_pos: int
    mode: str
    tokens: Sequence[str]
    pair_curves: dict[tuple[int, int], np.ndarray]
    head_top: list[list[tuple[int, int]]]
    mean_top: list[tuple[int, int]]
    head_faint: list[list[tuple[int, int]]]
    mean_faint: list[tuple[int, int]]
    total: np.ndarray
    target: np.ndarray | None

    @property
    def n_head(self) -> int:
        return self.total.shape[0]

    def stem(self) -> str:
        return f"{safe_name(self.run)}_L{self.layer}_S{self.sample}_Q{self.query_pos}"


def _colors(n: int) -> list:
    from matplotlib import colormaps

    names = ("tab20", "tab20b", "tab20c")
    palette = [colormaps[m](i) for m in names for i in range(20)]
    # tab20 pairs light/dark shades; take the dark ones first for contrast
    palette = palette[0::2] + palette[1::2]
    return [palette[i % len(palette)] for i in range(n)]


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


def _key_axis(ax, tokens: Sequence[str], n_keys: int, show_labels: bool) -> None:
    step = max(1, math.ceil(n_keys / MAX_TICK_LABELS))
    ticks = list(range(0, n_keys, step))
    ax.set_xticks(ticks)
    if show_labels:
        labels = [f"{display_token(tokens[t])} ·{t}" for t in ticks]
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    else:
        ax.set_xticklabels([])
    ax.set_xlim(-0.5, n_keys - 0.5)
    ax.axhline(0, color="0.8", lw=0.6, zorder=0)


def _pair_label(pair: tuple[int, int]) -> str:
    return f"q{pair[0]}·k{pair[1]}"


def combined_figure(data: ItemPlotData) -> Figure:
    """The combined figure (see module docstring). Caller saves and closes it."""
    H = data.n_head
    n_panels = H + 2
    ncols = min(4, math.ceil(math.sqrt(1.5 * n_panels)))
    nrows = math.ceil(n_panels / ncols)
    J = data.total.shape[1]
    width = max(14.0, min(28.0, 3.2 * ncols + J * 0.04 * ncols))
    fig = Figure(figsize=(width, 3.4 * nrows + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    all_pairs = list(dict.fromkeys([*data.mean_top, *(p for top in data.head_top for p in top)]))
    color = dict(zip(all_pairs, _colors(len(all_pairs)), strict=True))
    x = np.arange(J)
    units = "logit" if data.mode == "weighted" else "gated weight-only term"

    def panel(ax, title, curves, faint, total, target, pairs) -> None:
        for p in faint:
            ax.plot(x, curves(p), color="0.75", lw=0.6, alpha=0.7)
        for p in pairs:
            ax.plot(x, curves(p), color=color[p], lw=1.3)
        ax.plot(x, total, color="black", lw=1.6)
        if target is not None:
            ax.plot(x, target, color="red", ls="--", lw=1.4)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(units, fontsize=8)
        ax.tick_params(labelsize=7)

    target = data.target
    panel(
        axes[0],
        "mean over heads",
        lambda p: data.pair_curves[p].mean(axis=0),
        data.mean_faint,
        data.total.mean(axis=0),
        None if target is None else target.mean(axis=0),
        data.mean_top,
    )
    _key_axis(axes[0], data.tokens, J, show_labels=True)
    for h in range(H):
        ax = axes[h + 2]
        panel(
            ax,
            f"head {h}",
            lambda p, h=h: data.pair_curves[p][h],
            data.head_faint[h],
            data.total[h],
            None if target is None else target[h],
            data.head_top[h],
        )
        _key_axis(ax, data.tokens, J, show_labels=h + 2 >= len(axes) - ncols)
    legend_ax = axes[1]
    legend_ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color[p], lw=2, label=_pair_label(p)) for p in all_pairs]
    handles += [
        Line2D([], [], color="black", lw=2, label="sum over all components"),
        Line2D([], [], color="0.75", lw=1, label=f"next {len(data.mean_faint)} pairs"),
    ]
    if target is not None:
        handles.append(Line2D([], [], color="red", ls="--", lw=2, label="target logit"))
    legend_ax.legend(
        handles=handles,
        loc="center",
        ncols=max(1, math.ceil(len(handles) / 16)),
        fontsize=7,
        frameon=False,
        title=f"top-{len(data.mean_top)} pairs (q-comp·k-comp)",
        title_fontsize=8,
    )
    for ax in axes[n_panels:]:
        ax.axis("off")
    mode = "weighted" if data.mode == "weighted" else "binary (CI-gated, not logits)"
    fig.suptitle(
        f"{data.run} · layer {data.layer} · sample {data.sample} · query {data.query_pos} · "
        f"{mode}\n{_title_text(data)}",
        fontsize=10,
    )
    return fig


def validation_figure(data: ItemPlotData, component_sum: np.ndarray, target: np.ndarray) -> Figure:
    """Per head: component sum (incl. bias) vs target over keys; residual bars on a second
    axis; max |r| in each title. ``component_sum``/``target``: ``(head, key_pos)``."""
    H = component_sum.shape[0]
    J = component_sum.shape[1]
    ncols = min(3, H)
    nrows = math.ceil(H / ncols)
    fig = Figure(figsize=(max(12.0, 5.0 * ncols), 3.2 * nrows + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    x = np.arange(J)
    resid = target - component_sum
    for h in range(H):
        ax = axes[h]
        twin = ax.twinx()
        # one filled step artist for all keys: bar() makes a patch per key (~1 s at 512 keys)
        edges = np.arange(J + 1) - 0.5
        twin.stairs(resid[h], edges, baseline=0, fill=True, color="tab:orange", alpha=0.45)
        lim = max(float(np.abs(resid[h]).max()), 1e-12) * 1.1
        twin.set_ylim(-lim, lim)
        twin.set_ylabel("residual r", fontsize=8, color="tab:orange")
        twin.tick_params(labelsize=7)
        ax.plot(x, target[h], color="red", ls="--", lw=1.4, label="target")
        ax.plot(x, component_sum[h], color="black", lw=1.2, label="component sum")
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.set_title(f"head {h}: max |r| = {np.abs(resid[h]).max():.3g}", fontsize=9)
        ax.set_ylabel("logit", fontsize=8)
        ax.tick_params(labelsize=7)
        _key_axis(ax, data.tokens, J, show_labels=h >= H - ncols)
        if h == 0:
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes[H:]:
        ax.axis("off")
    fig.suptitle(
        f"{data.run} · layer {data.layer} · sample {data.sample} · query {data.query_pos} · "
        f"component sum vs target\n{_title_text(data)}",
        fontsize=10,
    )
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` atomically (temp file + rename) and release it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        fig.clear()
    return path


def as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()
