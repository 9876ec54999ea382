"""Fast drawing for the item figures (qkcheck.plots): a canvas whose renderer keeps each
rasterised string, and three bulk artists that stand in for matplotlib's costliest parts.

Measured on the reference item (6 heads, 512 keys, three figures): matplotlib's legends,
ticks and per-label ``Text`` objects took ~45 % of the drawing time; text layout (glyph by
glyph in matplotlib ≥ 3.11) most of the rest. Here

* :class:`Labels` draws many single-line strings of one size (key labels, tick labels) as
  one artist: aligned from each string's cached metrics, blitted from the string cache;
* :class:`PanelAxes` is an axes whose own x and y axes are never drawn, and so never make
  the tick objects (and their clip paths) an axes makes when created: half its cost;
* :class:`ValueAxis` draws a panel's y axis — at most five ticks (matplotlib's
  ``MaxNLocator``), their labels and the axis label — without matplotlib's ``Tick``
  objects (each two lines, two texts and a grid line);
* :class:`PanelLegend` draws a legend — handles (line, dashes, marker) and labels in
  columns, on a translucent frame — without offset boxes, whose layout is recomputed for
  every entry several times per draw;
* :func:`png_bytes` encodes the drawn canvas without PNG's per-row filters (Pillow tries
  five filters a row: two thirds of its encoding time on these flat-coloured figures,
  whose unfiltered rows compress smaller anyway).

Every artist draws through the standard renderer API (``draw_text``, ``draw_path``,
``draw_markers``), so a figure also saves to other formats; with :class:`_Renderer` (Agg)
the strings come from the cache.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import font_manager
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg, get_hinting_flag
from matplotlib.colors import to_rgba
from matplotlib.font_manager import FontProperties
from matplotlib.markers import MarkerStyle
from matplotlib.path import Path as MplPath
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Affine2D, IdentityTransform

# --- text: each string rasterised once per process --------------------------------------------

#: rasterised strings and their metrics, per process (figures repeat most of their strings:
#: tick labels, key labels, the query's label, component labels across heads and figures)
_TEXT_IMAGES: dict[tuple, tuple[np.ndarray, float, float, float]] = {}
_TEXT_METRICS: dict[tuple, tuple[float, float, float]] = {}
#: matplotlib ≥ 3.11 renders text glyph by glyph (and passes draw_text the baseline)
_GLYPH_BY_GLYPH = hasattr(RendererAgg, "_draw_text_glyphs_and_boxes")
#: entries kept before a cache is emptied
TEXT_CACHE_SIZE = 20_000


class _Renderer(RendererAgg):
    """Agg with a cache of rasterised strings.

    matplotlib ≥ 3.11 lays out and renders every glyph of every text through Python (~0.1 ms
    a glyph, ~9,000 glyphs an item: the largest cost of the figures). Here a string is
    rasterised once — FreeType's whole-string bitmap, the way matplotlib drew text before —
    and blitted wherever it recurs, rotated in raster space; its metrics are kept too.
    Anything else (mathtext; a matplotlib that draws whole strings itself, before 3.11) is
    drawn by matplotlib."""

    def _text_key(self, s: str, prop) -> tuple:
        fonts = _OWN_FONTS.get(id(prop))
        if fonts is None:
            fonts = tuple(font_manager.fontManager._find_fonts_by_props(prop))
        return (fonts, prop.get_size_in_points(), self.dpi, s, get_hinting_flag())

    def draw_text(self, gc, x, y, s, prop, angle, ismath=False, mtext=None):
        if ismath or not _GLYPH_BY_GLYPH:
            return super().draw_text(gc, x, y, s, prop, angle, ismath, mtext)
        try:
            key = (*self._text_key(s, prop), gc.get_antialiased())
            hit = _TEXT_IMAGES.get(key)
            if hit is None:
                font = self._prepare_font(prop)
                font.set_text(s, 0, flags=get_hinting_flag())
                font.draw_glyphs_to_bitmap(antialiased=gc.get_antialiased())
                xo, yo = font.get_bitmap_offset()
                image = np.array(font.get_image(), dtype=np.uint8)
                hit = (image, xo / 64, yo / 64, font.get_descent() / 64)
                _put(_TEXT_IMAGES, key, hit)
            image, xo, yo, d = hit
            # (x, y): the baseline's start (matplotlib ≥ 3.11); the bitmap's lower left lies
            # a descent below it, turned with the text (fitted to within 0.3 px of the ink of
            # matplotlib's own rendering at 0° and 90°, see tests/test_plots.py)
            sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
            bx, by = round(x + xo + (d + 1) * sin), round(y + yo + d * cos - sin) + 1
            self._renderer.draw_text_image(image, bx, by, angle, gc)
        except (AttributeError, TypeError):  # not the matplotlib this was written for
            super().draw_text(gc, x, y, s, prop, angle, ismath, mtext)

    def get_text_width_height_descent(self, s, prop, ismath):
        try:
            key = None if ismath else self._text_key(s, prop)
        except AttributeError:  # another matplotlib
            key = None
        if key is None:
            return super().get_text_width_height_descent(s, prop, ismath)
        hit = _TEXT_METRICS.get(key)
        if hit is None:
            hit = super().get_text_width_height_descent(s, prop, ismath)
            _put(_TEXT_METRICS, key, hit)
        return hit


def _put(cache: dict, key: tuple, value) -> None:
    if len(cache) >= TEXT_CACHE_SIZE:
        cache.clear()
    cache[key] = value


class Canvas(FigureCanvasAgg):
    """FigureCanvasAgg drawing with :class:`_Renderer`."""

    def get_renderer(self):
        w, h = self.get_width_height(physical=True)
        key = w, h, self.figure.dpi
        if getattr(self, "_lastKey", None) != key:
            self.renderer = _Renderer(w, h, self.figure.dpi)
            self._lastKey = key
        return self.renderer


# --- panels ------------------------------------------------------------------------------------


def _ignored(*args, **kwargs) -> None:
    """Tick settings of an axis that is never drawn."""


class PanelAxes(Axes):
    """Axes whose x and y axes are hidden for good (the figures draw their own: key labels,
    :class:`ValueAxis`). Creating an axes makes a major and a minor tick per axis (to apply
    tick parameters, grid state and clip paths): five artists each, over half of the ~6 ms
    an axes takes. A hidden axis needs none of it, so here its clip path is set on the axis
    alone and its tick parameters and grid are ignored; no tick is ever made. (The spines,
    which matplotlib positions as a side effect of making the first tick, are positioned
    explicitly.)"""

    name = "qkcheck_panel"

    def clear(self):
        super().clear()
        # matplotlib places the spines when it first makes a tick (their default position,
        # set lazily); with no tick, set here
        for spine in self.spines.values():
            spine.set_position(("outward", 0.0))

    def _init_axis(self):
        super()._init_axis()
        for axis in (self.xaxis, self.yaxis):
            axis.set_visible(False)
            axis.set_clip_path = functools.partial(Artist.set_clip_path, axis)
            axis.set_tick_params = _ignored
            axis.grid = _ignored


# --- PNG ---------------------------------------------------------------------------------------


def png_bytes(rgba: np.ndarray, dpi: float, level: int = 1) -> bytes:
    """An opaque ``(height, width, 4)`` uint8 image as an RGB PNG: 8 bits a channel, filter
    type 0 (None) on every row, zlib ``level``, and the resolution (pHYs) of ``dpi``."""
    h, w, _ = rgba.shape
    rows = np.empty((h, 1 + 3 * w), dtype=np.uint8)
    rows[:, 0] = 0  # each row's filter type
    rows[:, 1:] = rgba[..., :3].reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ppm = round(dpi / 0.0254)  # pixels per metre
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
            chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1)),
            chunk(b"IDAT", zlib.compress(rows, level)),
            chunk(b"IEND", b""),
        ]
    )


# --- strings -----------------------------------------------------------------------------------


#: the font files of :func:`_font`'s properties, by id (they live as long as the process)
_OWN_FONTS: dict[int, tuple] = {}


@functools.cache
def _font(size: float, weight: str | None) -> FontProperties:
    prop = FontProperties(size=size, weight=weight or "normal")
    _OWN_FONTS[id(prop)] = tuple(font_manager.fontManager._find_fonts_by_props(prop))
    return prop


@functools.cache
def _font_box(prop: FontProperties, dpi: float) -> tuple[float, float] | None:
    """The font's (ascent, descent) in pixels from its OS/2 or hhea table, as matplotlib
    ≥ 3.11 sizes a line of text; None where the font has neither."""
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(font_manager.findfont(prop))
        units = font.get_sfnt_table("head")["unitsPerEm"]
        for table, up, down in (
            ("OS/2", "sTypoAscender", "sTypoDescender"),
            ("hhea", "ascent", "descent"),
        ):
            t = font.get_sfnt_table(table)
            if t is not None:
                scale = prop.get_size_in_points() * dpi / 72 / units
                return t[up] * scale, -t[down] * scale
    except (OSError, KeyError, TypeError, RuntimeError):
        pass
    return None


def _extent(renderer, s: str, prop) -> tuple[float, float, float]:
    """(width, ascent, descent) of one line in pixels, at least the font's ascent and
    descent (as matplotlib sizes a one-line text: the font's tables in matplotlib ≥ 3.11,
    the extent of "lp" before)."""
    w, h, d = renderer.get_text_width_height_descent(s, prop, False)
    box = _font_box(prop, renderer.dpi) if _GLYPH_BY_GLYPH else None
    if box is None:
        _, lh, ld = renderer.get_text_width_height_descent("lp", prop, False)
        box = lh - ld, ld
    return w, max(h - d, box[0]), max(d, box[1])


def _baseline(x, y, w, a, d, angle: float, ha: str, va: str) -> tuple[float, float]:
    """Where a line of text (width ``w``, ascent ``a``, descent ``d``) turned by ``angle``
    (0 or 90) starts its baseline so that its box is aligned ``ha``/``va`` at (x, y):
    matplotlib's default rotation mode (the turned box is aligned)."""
    if angle == 90:  # box: x in [bx - a, bx + d], y in [by, by + w]
        left, width, bottom, height = -a, a + d, 0.0, w
    else:  # box: x in [bx, bx + w], y in [by - d, by + a]
        left, width, bottom, height = 0.0, w, -d, a + d
    fx = {"left": 0.0, "center": 0.5, "right": 1.0}[ha]
    fy = {"bottom": 0.0, "center": 0.5, "top": 1.0}[va]
    return x - left - fx * width, y - bottom - fy * height


def _draw_string(renderer, gc, x: float, y: float, s: str, prop, angle: float) -> None:
    """One line with its baseline starting at display (x, y); the strings come escaped for
    matplotlib's Text (display_token: ``\\$``), drawn unescaped here."""
    if renderer.flipy():  # as Text.draw: text backends that count y from the top
        y = renderer.get_canvas_width_height()[1] - y
    renderer.draw_text(gc, x, y, s.replace("\\$", "$"), prop, angle)


@dataclass(frozen=True)
class Label:
    """One string of :class:`Labels` at (x, y) in the artist's transform."""

    x: float
    y: float
    text: str
    color: str = "black"
    weight: str | None = None


class Labels(Artist):
    """Single-line strings of one size and angle (0 or 90) as one artist, each aligned
    ``ha``/``va`` at its point (``va="baseline"`` at 0° only). ``texts()`` are the strings
    as given."""

    def __init__(
        self,
        labels: Sequence[Label],
        transform,
        *,
        size: float,
        angle: float = 0,
        ha: str = "left",
        va: str = "baseline",
        gid: str | None = None,
    ):
        super().__init__()
        self.labels = list(labels)
        self.size, self.angle, self.ha, self.va = size, angle, ha, va
        self.set_transform(transform)
        self.set_gid(gid)

    def texts(self) -> list[str]:
        return [lab.text for lab in self.labels]

    def draw(self, renderer):
        if not self.get_visible() or not self.labels:
            return
        xy = self.get_transform().transform([(lab.x, lab.y) for lab in self.labels])
        gc = renderer.new_gc()
        try:
            for lab, (x, y) in zip(self.labels, xy, strict=True):
                prop = _font(self.size, lab.weight)
                w, a, d = _extent(renderer, lab.text.replace("\\$", "$"), prop)
                va = "bottom" if self.va == "baseline" else self.va
                bx, by = _baseline(x, y, w, a, d, self.angle, self.ha, va)
                if self.va == "baseline":  # 0°: the baseline at y
                    by = y
                gc.set_foreground(lab.color)
                _draw_string(renderer, gc, bx, by, lab.text, prop, self.angle)
        finally:
            gc.restore()
        self.stale = False


# --- the value (y) axis --------------------------------------------------------------------------

MINUS = "\N{MINUS SIGN}"


def tick_labels(values: Sequence[float]) -> list[str]:
    """Labels of evenly spaced tick values: as few decimals as the spacing needs (``0.25``
    needs two), a true minus sign; 3 significant digits in ``g`` form beyond 10⁴ or below
    10⁻³."""
    vals = [float(v) for v in values]
    if not vals:
        return []
    step = abs(vals[1] - vals[0]) if len(vals) > 1 else abs(vals[0]) or 1.0
    big = max(abs(v) for v in vals)
    if big >= 1e4 or step < 1e-3:
        out = [f"{v:.3g}" for v in vals]
    else:
        dec = 0
        while dec < 6 and abs(step * 10**dec - round(step * 10**dec)) > 1e-6 * step * 10**dec:
            dec += 1
        out = [f"{0.0 if abs(v) < step * 1e-9 else v:.{dec}f}" for v in vals]
    return [s.replace("-", MINUS) for s in out]


class ValueAxis(Artist):
    """A panel's y axis drawn in one pass: up to five ticks at ``MaxNLocator(4)`` values of
    the limits the panel has when drawn, their labels, and the axis label left of them."""

    TICK_PT, PAD_PT, LABEL_PAD_PT = 2.5, 2.0, 3.0

    def __init__(self, ax, label: str, *, size: float = 6, label_size: float = 7):
        super().__init__()
        self.ax, self.label = ax, label
        self.size, self.label_size = size, label_size
        self.set_transform(IdentityTransform())

    def ticks(self) -> tuple[np.ndarray, list[str]]:
        """The tick values within the panel's y-limits and their labels."""
        lo, hi = sorted(self.ax.get_ylim())
        v = MaxNLocator(4).tick_values(lo, hi)
        span = hi - lo
        v = v[(v >= lo - 1e-9 * span) & (v <= hi + 1e-9 * span)]
        return v, tick_labels(v)

    def draw(self, renderer):
        if not self.get_visible():
            return
        values, labels = self.ticks()
        x0 = self.ax.bbox.x0
        ys = self.ax.transData.transform(np.column_stack([np.zeros(len(values)), values]))[:, 1]
        tick = renderer.points_to_pixels(self.TICK_PT)
        pad = renderer.points_to_pixels(self.PAD_PT)
        gc = renderer.new_gc()
        try:
            gc.set_foreground("black")
            gc.set_linewidth(0.8)
            if len(ys):
                verts = np.column_stack([np.tile([x0 - tick, x0], len(ys)), np.repeat(ys, 2)])
                codes = np.tile([MplPath.MOVETO, MplPath.LINETO], len(ys))
                renderer.draw_path(gc, MplPath(verts, codes), IdentityTransform())
            prop = _font(self.size, None)
            widest = 0.0
            for y, s in zip(ys, labels, strict=True):
                w, a, d = _extent(renderer, s, prop)
                widest = max(widest, w)
                bx, by = _baseline(x0 - tick - pad, y, w, a, d, 0, "right", "center")
                _draw_string(renderer, gc, bx, by, s, prop, 0)
            lprop = _font(self.label_size, None)
            w, a, d = _extent(renderer, self.label, lprop)
            x = x0 - tick - pad - widest - renderer.points_to_pixels(self.LABEL_PAD_PT)
            y = 0.5 * (self.ax.bbox.y0 + self.ax.bbox.y1)
            bx, by = _baseline(x, y, w, a, d, 90, "right", "center")
            _draw_string(renderer, gc, bx, by, self.label, lprop, 90)
        finally:
            gc.restore()
        self.stale = False


# --- legends -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One legend entry: its label and the handle drawn for it (``ls="none"`` and no marker:
    no handle, e.g. "… 3 more")."""

    label: str
    color: object = "black"
    ls: object = "-"
    lw: float = 1.2
    marker: str | None = None
    ms: float = 3.0
    alpha: float = 1.0


@functools.cache
def _marker(symbol: str) -> tuple[MplPath, Affine2D, bool]:
    m = MarkerStyle(symbol)
    return m.get_path(), m.get_transform(), m.is_filled()


def _dashes(ls, lw: float) -> tuple[float, Sequence[float] | None]:
    """``(offset, on-off sequence in points)`` for a matplotlib line style, scaled by the
    line width as matplotlib scales them."""
    from matplotlib import lines

    offset, seq = lines._get_dash_pattern(ls)
    return lines._scale_dashes(offset, seq, lw)


class PanelLegend(Artist):
    """A legend drawn in one pass: ``keys`` in ``ncols`` columns (filled column by column,
    as matplotlib's), each a handle and its label, on a white frame of ``frame_alpha``.
    ``loc`` is the corner placed at ``anchor`` (in ``transform``'s coordinates) plus a
    half-em border: ``"upper left"`` or ``"lower center"``."""

    def __init__(
        self,
        keys: Sequence[Key],
        *,
        anchor: tuple[float, float],
        transform,
        loc: str = "upper left",
        size: float = 5.5,
        ncols: int = 1,
        handle_len: float = 1.5,
        frame_alpha: float | None = 0.6,
        gid: str = "legend",
    ):
        super().__init__()
        self.keys = list(keys)
        self.anchor, self.loc, self.size, self.ncols = anchor, loc, size, max(1, ncols)
        self.handle_len, self.frame_alpha = handle_len, frame_alpha
        self.set_transform(transform)
        self.set_gid(gid)
        self.set_zorder(5)

    def texts(self) -> list[str]:
        return [k.label for k in self.keys]

    def draw(self, renderer):
        if not self.get_visible() or not self.keys:
            return
        em = renderer.points_to_pixels(self.size)
        prop = _font(self.size, None)
        sizes = [_extent(renderer, k.label, prop) for k in self.keys]
        rows = math.ceil(len(self.keys) / self.ncols)
        cols = [
            list(range(c * rows, min(len(self.keys), (c + 1) * rows))) for c in range(self.ncols)
        ]
        cols = [c for c in cols if c]
        handle, gap, colgap, border = self.handle_len * em, 0.8 * em, 2.0 * em, 0.4 * em
        line_h = max(a + d for _, a, d in sizes)
        row_h = line_h + 0.5 * em
        widths = [handle + gap + max(sizes[i][0] for i in c) for c in cols]
        W = sum(widths) + colgap * (len(cols) - 1) + 2 * border
        H = rows * row_h - 0.5 * em + 2 * border
        ax_, ay_ = self.get_transform().transform(self.anchor)
        off = 0.5 * em  # matplotlib's border between legend and anchor
        if self.loc == "upper left":
            left, top = ax_ + off, ay_ - off
        elif self.loc == "lower center":
            left, top = ax_ - W / 2, ay_ + off + H
        else:
            raise ValueError(f"unsupported loc {self.loc!r}")
        gc = renderer.new_gc()
        try:
            if self.frame_alpha is not None:
                gc.set_alpha(self.frame_alpha)
                gc.set_foreground("0.8")
                gc.set_linewidth(0.8)
                frame = MplPath.unit_rectangle().transformed(
                    Affine2D().scale(W, H).translate(left, top - H)
                )
                renderer.draw_path(
                    gc, frame, IdentityTransform(), (1.0, 1.0, 1.0, self.frame_alpha)
                )
            x = left + border
            for c, width in zip(cols, widths, strict=True):
                for r, i in enumerate(c):
                    key, (_, a, d) = self.keys[i], sizes[i]
                    yc = top - border - r * row_h - line_h / 2
                    self._handle(renderer, key, x, x + handle, yc)
                    gc.set_alpha(1.0)
                    gc.set_foreground("black")
                    gc.set_dashes(0, None)
                    bx, by = _baseline(x + handle + gap, yc, sizes[i][0], a, d, 0, "left", "center")
                    _draw_string(renderer, gc, bx, by, key.label, prop, 0)
                x += width + colgap
        finally:
            gc.restore()
        self.stale = False

    def _handle(self, renderer, key: Key, x0: float, x1: float, y: float) -> None:
        gc = renderer.new_gc()
        try:
            gc.set_foreground(key.color)
            gc.set_alpha(key.alpha)
            if key.ls not in ("none", "None", "", " "):
                gc.set_linewidth(key.lw)
                gc.set_dashes(*_dashes(key.ls, key.lw))
                gc.set_capstyle("projecting" if key.lw > 3 else "butt")
                renderer.draw_path(gc, MplPath([(x0, y), (x1, y)]), IdentityTransform())
            if key.marker:
                path, trans, filled = _marker(key.marker)
                s = renderer.points_to_pixels(key.ms)
                gc.set_dashes(0, None)
                gc.set_linewidth(1.0)
                rgba = to_rgba(key.color, key.alpha)
                renderer.draw_markers(
                    gc,
                    path,
                    trans + Affine2D().scale(s),
                    MplPath([((x0 + x1) / 2, y)]),
                    IdentityTransform(),
                    rgba if filled else None,
                )
        finally:
            gc.restore()
