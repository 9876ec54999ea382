"""The session's report page, ``qk-artifacts/<run>/index.html``: one self-contained page.

    python -m qkcheck.html_report ARTIFACTS_DIR      # (re)write it from summary.json

It shows, from ``summary.json`` (:mod:`qkcheck.report` schema) and the files beside it:

* the verdict (passed / failed / incomplete and why), test and quality-gate counts, the
  gate's failure messages and notes;
* settings and provenance (every setting; any provenance block of the summary — run, step,
  versions, git, times — as it is; the qkcheck version and time that wrote the page);
* the per-layer table: items, passed, failed, worst ``|r|/B`` and its item, max closure
  error, median and p99 ``|r|``, median ``|r|`` / logit std, ``‖Δ‖/‖W‖`` of q and k against
  ``--delta-budget``, and the layer's gate tests;
* per layer, a heat map of each item's ``|r|/B`` over sample × query position (the
  summary's ``item_ratios``): one colour scale for the whole page, viridis from 0 to the
  largest ratio up to 1, red above 1 (items beyond the bound), grey where there is no
  item; the worst cell is outlined;
* the items that got figures, worst ``|r|/B`` first (``figures.items`` when the summary
  has it, else the figure file names), each with its figures;
* the dataset-level view (``pairs_L<l>.png`` and each head's top pairs and components from
  ``pairs_L<l>.json``);
* links to ``summary.json``, every figure and data file, and to files in the folder the
  summary does not name (an earlier session's).

Self-contained means no network: inline CSS, no external scripts or fonts. Figures are
referenced by relative path to the PNGs beside the page (not embedded): the page stays
small however many figures there are, the images are the same files the links open, and
the artifacts folder — the unit a CI job uploads — keeps working when moved. The heat maps
are small generated PNGs embedded as ``data:`` URIs, so the page needs no file of its own.
One inline script marks an image that does not load with a visible note and records
``data-images="<loaded>/<total>"`` on ``<body>`` (what the browser test reads). Every text
from the run (token strings, names, messages) is HTML-escaped.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import json
import math
import os
import re
import struct
import sys
import urllib.parse
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qkcheck.util import write_atomic

#: summary keys the page shows in their own sections (others are shown as provenance)
KNOWN = {
    "run",
    "settings",
    "complete",
    "reason",
    "passed",
    "exit_status",
    "tests",
    "gate",
    "totals",
    "layers",
    "figures",
    "dataset_view",
    "skipped_layers",
}
#: figure kinds in the order an item shows them (others after, by name)
KIND_ORDER = ("validation", "components", "combined")
#: a per-item figure's file name: <run>_L<layer>_S<sample>_Q<query>_<kind>.png
FIGURE_NAME = re.compile(r"_L(\d+)_S(\d+)_Q(\d+)_([A-Za-z0-9_-]+)\.png$")
#: files of the folder worth a link when the summary does not name them
LISTED_SUFFIXES = (".png", ".json", ".xml", ".html", ".yml", ".svg")
#: heat-map cells above the bound that get a tooltip (the worst cell always has one)
MAX_HIT_CELLS = 2000


def write_html_report(summary: Mapping[str, Any], artifacts: Path) -> Path:
    """Write ``artifacts/index.html`` for ``summary`` atomically; returns its path."""
    artifacts = Path(artifacts)
    return write_atomic(artifacts / "index.html", render(summary, artifacts))


def try_write_html_report(
    summary: Mapping[str, Any], artifacts: Path
) -> tuple[Path | None, str | None]:
    """:func:`write_html_report` that never raises: ``(path, None)`` or ``(None, why)``,
    so the report can never hide the session's verdict."""
    try:
        return write_html_report(summary, artifacts), None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


# --- the page ---------------------------------------------------------------------------------


def render(summary: Mapping[str, Any], artifacts: Path) -> str:
    """The page's HTML for ``summary``, whose files lie in ``artifacts``."""
    files = _Files(Path(artifacts))
    run = str(summary.get("run", "?"))
    layers = summary.get("layers") or {}
    scale = _Scale(layers)
    parts = [
        _verdict(summary),
        _settings(summary),
        _layer_table(summary, files),
        _heatmaps(layers, scale),
        _figure_items(summary, files),
        _dataset_view(summary, files),
        _links(summary, files),
    ]
    body = "\n".join(p for p in parts if p)
    return _PAGE.format(title=_e(f"qkcheck — {run}"), run=_e(run), body=body, script=_SCRIPT)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(v: Any, fmt: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return _e(v)


def _verdict(s: Mapping[str, Any]) -> str:
    totals = s.get("totals") or {}
    tests = s.get("tests") or {}
    gate = s.get("gate") or {}
    if not s.get("complete"):
        cls, word = "incomplete", "INCOMPLETE"
    elif s.get("passed"):
        cls, word = "pass", "PASSED"
    else:
        cls, word = "fail", "FAILED"
    lines = [f'<div class="verdict {cls}" id="verdict"><b>{word}</b>']
    if s.get("reason"):
        lines.append(f" — {_e(s['reason'])}")
    lines.append("</div>")
    facts = []
    if totals:
        facts.append(
            f"items: {totals.get('items', 0)} ({totals.get('passed', 0)} passed, "
            f"{totals.get('failed', 0)} failed)"
        )
    if tests:
        facts.append("tests: " + ", ".join(f"{v} {k}" for k, v in tests.items()))
    if gate:
        facts.append(
            f"quality gate: {gate.get('passed', 0)} passed, {gate.get('failed', 0)} failed, "
            f"{gate.get('skipped', 0)} skipped"
        )
    facts.append(f"pytest exit status: {_e(s.get('exit_status'))}")
    lines.append("<p>" + " · ".join(_e(f) for f in facts) + "</p>")
    for n, f in enumerate(gate.get("failures", [])):
        lines.append(
            f'<details class="gatefail"{" open" if n < 3 else ""}>'
            f"<summary>gate failed: {_e(f.get('test'))}</summary>"
            f"<pre>{_e(f.get('message', ''))}</pre></details>"
        )
    for note in gate.get("notes", []):
        lines.append(f'<p class="note">baseline: {_e(note)}</p>')
    return "\n".join(lines)


def _setting_text(value: Any) -> str:
    """A setting as the summary writes it, selections (``{'count': …}``) in words."""
    text = str(value)
    if text.startswith("{") and "'indices'" in text:
        try:
            import ast

            sel = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if sel.get("last"):
            return "last"
        if sel.get("indices") is not None:
            return ",".join(str(i) for i in sel["indices"])
        if sel.get("count") is not None:
            return f"first {sel['count']}"
        return "all"
    return text


def _settings(s: Mapping[str, Any]) -> str:
    settings = s.get("settings") or {}
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(_setting_text(v))}</td></tr>"
        for k, v in sorted(settings.items())
    )
    prov = [
        f"<tr><th>{_e(k)}</th><td><code>{_e(_compact(v))}</code></td></tr>"
        for k, v in sorted(s.items())
        if k not in KNOWN
    ]
    prov.append(f"<tr><th>run</th><td>{_e(s.get('run'))}</td></tr>")
    prov.append(
        f"<tr><th>this page</th><td>written {_e(_now())} by qkcheck {_e(_version())}</td></tr>"
    )
    return (
        '<h2 id="settings">Settings and provenance</h2><div class="cols">'
        f'<table class="kv"><caption>settings</caption>{rows}</table>'
        f'<table class="kv"><caption>provenance</caption>{"".join(prov)}</table></div>'
    )


def _compact(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qkcheck")
    except Exception:
        return "unknown"


_LAYER_OF_TEST = re.compile(r"\[(?:L(\d+)|[^\]\d]*?(\d+)[^\]]*)\]$")


def _gate_layer(test: str) -> int | None:
    """The layer a gate test is about: ``[L1]`` or the first number of a module path."""
    m = _LAYER_OF_TEST.search(test)
    if not m:
        return None
    return int(m.group(1) or m.group(2))


def _layer_table(s: Mapping[str, Any], files: _Files) -> str:
    layers = s.get("layers") or {}
    if not layers:
        return '<h2 id="layers">Layers</h2><p>No layer results in this summary.</p>'
    settings = s.get("settings") or {}
    budget = _float(settings.get("delta_budget"))
    r_budget = _float(settings.get("residual_budget"))
    failures = (s.get("gate") or {}).get("failures", [])
    drawn = {it["id"] for it in _items(s, files)}
    head = (
        "<tr><th>layer</th><th>items</th><th>passed</th><th>failed</th><th>worst |r|/B</th>"
        "<th>worst item</th><th>max closure err</th><th>median |r|</th><th>p99 |r|</th>"
        "<th>median |r| / logit std</th><th>‖Δ‖/‖W‖ q</th><th>‖Δ‖/‖W‖ k</th><th>gate</th></tr>"
    )
    rows = []

    def over(limit: float | None):
        return lambda v: limit is not None and v > limit

    for layer, r in layers.items():
        worst = r.get("worst_item")
        worst_cell = "–"
        if worst:
            worst_cell = (
                f'<a href="#item-{_e(worst)}">{_e(worst)}</a>' if worst in drawn else _e(worst)
            )
        ratio = r.get("worst_ratio")
        mine = [f for f in failures if _gate_layer(str(f.get("test", ""))) == _int(layer)]
        if mine:
            gate = '<span class="bad">FAIL</span><br>' + "<br>".join(
                f'<span title="{_e(f.get("message", ""))}">'
                f"{_e(_short_test(f.get('test', '')))}</span>"
                for f in mine
            )
        elif r.get("median_abs_r") is None and r.get("delta_q") is None:
            gate = '<span class="muted">not run</span>'
        else:
            gate = '<span class="good">pass</span>'
        rows.append(
            f'<tr id="layer-{_e(layer)}"><td>{_e(layer)}</td><td>{_num(r.get("items"), "d")}</td>'
            f"<td>{_num(r.get('passed'), 'd')}</td>"
            f"<td{_cls(r.get('failed'), lambda v: v > 0)}>{_num(r.get('failed'), 'd')}</td>"
            f"<td{_cls(ratio, lambda v: v > 1)}>{_num(ratio, '.3g')}</td><td>{worst_cell}</td>"
            f"<td>{_num(r.get('max_closure_error'), '.2g')}</td>"
            f"<td>{_num(r.get('median_abs_r'), '.3g')}</td>"
            f"<td>{_num(r.get('p99_abs_r'), '.3g')}</td>"
            f"<td{_cls(r.get('r_frac_of_logit_scale'), over(r_budget))}>"
            f"{_num(r.get('r_frac_of_logit_scale'), '.3f')}</td>"
            f"<td{_cls(r.get('delta_q'), over(budget))}>"
            f"{_num(r.get('delta_q'), '.3f')}</td>"
            f"<td{_cls(r.get('delta_k'), over(budget))}>"
            f"{_num(r.get('delta_k'), '.3f')}</td><td>{gate}</td></tr>"
        )
    notes = []
    if budget is not None:
        notes.append(f"‖Δ‖/‖W‖ budget {budget:g} (--delta-budget)")
    if r_budget is not None:
        notes.append(f"median |r| budget {r_budget:g} × logit std (--residual-budget)")
    notes.append("red: beyond the bound or a budget")
    skipped = "".join(
        f"<li>layer {_e(k)}: {_e(why)}</li>" for k, why in (s.get("skipped_layers") or {}).items()
    )
    skipped = f'<p>Not validated:</p><ul id="skipped-layers">{skipped}</ul>' if skipped else ""
    return (
        '<h2 id="layers">Layers</h2><table class="grid" id="layer-table">'
        f'{head}{"".join(rows)}</table><p class="note">{_e("; ".join(notes))}</p>{skipped}'
    )


#: short names of the quality-gate tests in the layer table
GATE_TESTS = {
    "test_weight_delta_is_within_budget": "‖Δ‖/‖W‖",
    "test_residuals_are_within_budget_and_no_worse_than_the_baseline": "residual",
}


def _short_test(test: str) -> str:
    """``…::test_weight_delta_is_within_budget[h.0.attn.q_proj]`` → ``‖Δ‖/‖W‖ h.0.attn.q_proj``."""
    name = test.rsplit("::", 1)[-1]
    func, _, param = name.partition("[")
    short = GATE_TESTS.get(func, func)
    param = param.rstrip("]")
    return f"{short} {param}" if param and not re.fullmatch(r"L\d+", param) else short


def _cls(v: Any, bad) -> str:
    try:
        return ' class="bad"' if v is not None and bad(v) else ""
    except TypeError:
        return ""


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# --- heat maps of |r|/B -----------------------------------------------------------------------


class _Scale:
    """One colour scale for every layer's heat map: viridis over [0, largest ratio ≤ 1],
    reds over (1, largest finite ratio] on a log scale, the darkest red for ∞."""

    def __init__(self, layers: Mapping[str, Any]) -> None:
        values = [
            v
            for r in layers.values()
            for line in ((r.get("item_ratios") or {}).get("ratios") or [])
            for v in line
            if v is not None
        ]
        ok = [v for v in values if v <= 1]
        high = [v for v in values if 1 < v < math.inf]
        self.ok_max = max(ok, default=0.0) or 1.0
        self.any_high = any(v > 1 for v in values)
        self.high_max = max(high, default=2.0)
        if self.high_max <= 1.0:
            self.high_max = 2.0
        from matplotlib import colormaps

        self.np = np
        self.viridis = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
        self.reds = (colormaps["Reds"](np.linspace(0.4, 1, 256))[:, :3] * 255).astype(np.uint8)

    def rgb(self, grid: Sequence[Sequence[float | None]]):
        np = self.np
        a = np.array([[np.nan if v is None else v for v in line] for line in grid], dtype=float)
        out = np.full((*a.shape, 3), 224, dtype=np.uint8)  # no item: light grey
        ok = a <= 1
        t = np.clip(np.nan_to_num(a / self.ok_max), 0, 1)
        out[ok] = self.viridis[(t[ok] * 255).round().astype(int)]
        high = a > 1
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.log(np.where(high, a, 1.0)) / math.log(self.high_max)
        u = np.clip(np.nan_to_num(u, posinf=1.0), 0, 1)
        out[high] = self.reds[(u[high] * 255).round().astype(int)]
        return out

    def legend(self) -> str:
        """The colour bar as inline SVG."""
        np = self.np
        w, h = 260, 14
        stops = []
        for i, t in enumerate(np.linspace(0, 1, 17)):
            c = self.viridis[round(t * 255)]
            stops.append(f'<stop offset="{i / 16:.4f}" stop-color="{_hex(c)}"/>')
        parts = [
            '<svg class="legend" width="760" height="44" role="img" '
            'aria-label="colour scale of |r|/B">',
            f'<defs><linearGradient id="g-ok">{"".join(stops)}</linearGradient>',
        ]
        stops = []
        for i, t in enumerate(np.linspace(0, 1, 17)):
            c = self.reds[round(t * 255)]
            stops.append(f'<stop offset="{i / 16:.4f}" stop-color="{_hex(c)}"/>')
        parts.append(f'<linearGradient id="g-high">{"".join(stops)}</linearGradient></defs>')
        parts.append(f'<rect x="10" y="4" width="{w}" height="{h}" fill="url(#g-ok)"/>')
        parts.append(
            f'<text x="10" y="36">0</text><text x="{10 + w}" y="36" '
            f'text-anchor="end">{self.ok_max:.3g}</text>'
        )
        x = 10 + w + 20
        if self.any_high:
            parts.append(f'<rect x="{x}" y="4" width="{w}" height="{h}" fill="url(#g-high)"/>')
            parts.append(
                f'<text x="{x}" y="36">&gt;1</text><text x="{x + w}" y="36" '
                f'text-anchor="end">{self.high_max:.3g} (log)</text>'
            )
        else:
            parts.append(
                f'<text x="{x}" y="16">no item above the bound (|r|/B ≤ 1 everywhere)</text>'
            )
        parts.append(
            f'<rect x="{x + w + 14 if self.any_high else x + 290}" y="4" width="14" height="{h}" '
            'fill="#e0e0e0"/>'
        )
        parts.append(
            f'<text x="{x + w + 32 if self.any_high else x + 308}" y="16">no item</text></svg>'
        )
        return "".join(parts)


def _hex(c) -> str:
    r, g, b = (int(v) for v in c)
    return f"#{r:02x}{g:02x}{b:02x}"


def _png(rgb) -> bytes:
    """An RGB ``uint8`` array as PNG bytes (no filter, zlib-compressed)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _heatmaps(layers: Mapping[str, Any], scale: _Scale) -> str:
    out = [
        '<h2 id="heatmaps">|r|/B per item: sample × query position</h2>',
        '<p class="note">Each cell: the item\'s |r|/B at its worst head and key (1 = the '
        "asserted bound). One colour scale for every layer.</p>",
        scale.legend(),
    ]
    for layer, r in layers.items():
        grid = r.get("item_ratios")
        out.append(f'<h3 id="heatmap-{_e(layer)}">Layer {_e(layer)}</h3>')
        if not grid or not grid.get("ratios"):
            out.append(
                '<p class="muted">No per-item ratios in this summary (no items, an older '
                "qkcheck, or a merge of shards with different query positions).</p>"
            )
            continue
        out.append(_heatmap(layer, grid, r, scale))
    return "\n".join(out)


def _heatmap(layer: str, grid: Mapping[str, Any], row: Mapping[str, Any], scale: _Scale) -> str:
    np = scale.np
    ratios, samples, qpos = grid["ratios"], grid["samples"], grid["query_pos"]
    n_rows, n_cols = len(ratios), len(qpos)
    cw = max(2, min(16, 900 // max(n_cols, 1)))
    ch = max(3, min(16, 320 // max(n_rows, 1)))
    img = np.repeat(np.repeat(scale.rgb(ratios), ch, axis=0), cw, axis=1)
    data = base64.b64encode(_png(img)).decode("ascii")
    w, h = n_cols * cw, n_rows * ch
    ml, mt, mb, mr = 64, 8, 40, 16
    svg = [f'<svg width="{ml + w + mr}" height="{mt + h + mb}" class="axes">']

    def label(lo: int, hi: int) -> str:
        return str(lo) if lo == hi else f"{lo}–{hi}"

    for i in _ticks(n_rows, max(2, h // 18)):
        y = mt + i * ch + ch / 2
        svg.append(
            f'<line x1="{ml - 4}" x2="{ml}" y1="{y}" y2="{y}"/>'
            f'<text x="{ml - 6}" y="{y + 4}" text-anchor="end">{label(*samples[i])}</text>'
        )
    for i in _ticks(n_cols, max(2, w // 45)):
        x = ml + i * cw + cw / 2
        svg.append(
            f'<line x1="{x}" x2="{x}" y1="{mt + h}" y2="{mt + h + 4}"/>'
            f'<text x="{x}" y="{mt + h + 16}" text-anchor="middle">{label(*qpos[i])}</text>'
        )
    svg.append(
        f'<text x="{ml + w / 2}" y="{mt + h + 34}" text-anchor="middle">query position</text>'
        f'<text transform="translate(14 {mt + h / 2}) rotate(-90)" '
        'text-anchor="middle">sample</text>'
    )

    def cell(i: int, j: int) -> str:
        where = f"sample {label(*samples[i])}, query {label(*qpos[j])}"
        return f"<title>{_e(where)}: |r|/B {_num(ratios[i][j], '.3g')}</title>"

    high = [
        (i, j)
        for i, line in enumerate(ratios)
        for j, v in enumerate(line)
        if v is not None and v > 1
    ]
    for i, j in high[:MAX_HIT_CELLS]:  # a tooltip on each cell beyond the bound
        svg.append(
            f'<rect class="hit" x="{ml + j * cw}" y="{mt + i * ch}" width="{cw}" '
            f'height="{ch}">{cell(i, j)}</rect>'
        )
    worst = _worst_cell(ratios)
    if worst is not None:
        i, j = worst
        svg.append(
            f'<rect class="worst" x="{ml + j * cw - 1}" y="{mt + i * ch - 1}" '
            f'width="{cw + 2}" height="{ch + 2}">{cell(i, j)}</rect>'
        )
    svg.append("</svg>")
    pooled = any(lo != hi for lo, hi in samples) or any(lo != hi for lo, hi in qpos)
    caption = (
        f"layer {layer}: {row.get('items', '?')} items, worst |r|/B "
        f"{_num(row.get('worst_ratio'), '.3g')} at {row.get('worst_item') or '–'} (outlined)"
    )
    if pooled:
        caption += "; cells are bins of samples / positions holding their largest |r|/B"
    alt = f"heat map of |r|/B, layer {layer}"
    return (
        f'<figure class="heat"><div class="plot" style="width:{ml + w + mr}px;'
        f'height:{mt + h + mb}px">{"".join(svg)}'
        f'<img class="cells" alt="{_e(alt)}" src="data:image/png;base64,{data}" '
        f'style="left:{ml}px;top:{mt}px;width:{w}px;height:{h}px"></div>'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _ticks(n: int, most: int) -> list[int]:
    if n <= most:
        return list(range(n))
    step = math.ceil(n / most)
    return list(range(0, n, step))


def _worst_cell(ratios: Sequence[Sequence[float | None]]) -> tuple[int, int] | None:
    best, at = -1.0, None
    for i, line in enumerate(ratios):
        for j, v in enumerate(line):
            if v is not None and v > best:
                best, at = v, (i, j)
    return at


# --- figures ------------------------------------------------------------------------------------


class _Files:
    """Paths of the summary as links relative to the page, and which were linked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.linked: set[Path] = set()

    def find(self, path: str | Path) -> Path | None:
        p = Path(path)
        tries = [p] if p.is_absolute() else [self.root / p, Path.cwd() / p]
        tries.append(self.root / p.name)  # the folder moved since the summary was written
        found = [t for t in tries if t.is_file()]
        inside = [t for t in found if _under(t, self.root)]
        return (inside or found or [None])[0]

    def href(self, path: str | Path) -> str | None:
        """The URL of ``path`` relative to the page, or None when the file is missing."""
        f = self.find(path)
        if f is None:
            return None
        self.linked.add(f.resolve())
        rel = os.path.relpath(f.resolve(), self.root.resolve())
        return urllib.parse.quote(Path(rel).as_posix())

    def link(self, path: str | Path, text: str | None = None) -> str:
        url = self.href(path)
        shown = _e(text if text is not None else Path(path).name)
        if url is None:
            return f'<span class="missing" title="not found">{shown} (missing)</span>'
        return f'<a href="{_e(url)}">{shown}</a>'

    def img(self, path: str | Path, alt: str) -> str:
        url = self.href(path)
        if url is None:
            return f'<p class="missing">figure not found: {_e(path)}</p>'
        return (
            f'<a href="{_e(url)}"><img class="fig" src="{_e(url)}" alt="{_e(alt)}" '
            'loading="eager"></a>'
        )


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _kind(path: str) -> str:
    m = FIGURE_NAME.search(Path(path).name)
    return m.group(4) if m else Path(path).stem


def _kind_rank(path: str) -> tuple[int, str]:
    kind = _kind(path)
    for i, k in enumerate(KIND_ORDER):
        if kind == k or kind.startswith(k + "_") or kind.endswith("_" + k):
            return i, kind
    return len(KIND_ORDER), kind


def _items(s: Mapping[str, Any], files: _Files) -> list[dict[str, Any]]:
    """Items with figures, worst |r|/B first: ``figures.items`` or the figure names."""
    figs = s.get("figures") or {}
    layers = s.get("layers") or {}
    items = [dict(it) for it in figs.get("items") or [] if isinstance(it, Mapping)]
    named = {str(p) for it in items for p in it.get("paths", [])}
    by_id: dict[str, dict[str, Any]] = {}
    for p in figs.get("paths") or []:
        if str(p) in named:
            continue
        m = FIGURE_NAME.search(Path(p).name)
        if not m:
            continue
        layer, sample, q = (int(m.group(i)) for i in (1, 2, 3))
        iid = f"L{layer}-S{sample}-Q{q}"
        it = by_id.setdefault(
            iid,
            {"id": iid, "layer": layer, "sample": sample, "query_pos": q, "paths": []},
        )
        it["paths"].append(str(p))
    for it in by_id.values():
        it["ratio"] = _ratio_of(layers.get(str(it["layer"])) or {}, it)
    items += by_id.values()
    for it in items:
        it.setdefault("id", f"L{it.get('layer')}-S{it.get('sample')}-Q{it.get('query_pos')}")
        it["paths"] = sorted((str(p) for p in it.get("paths", [])), key=_kind_rank)
    return sorted(items, key=lambda it: (-_sort_ratio(it.get("ratio")), it["id"]))


def _sort_ratio(v: Any) -> float:
    f = _float(v)
    return -1.0 if f is None or math.isnan(f) else f


def _ratio_of(row: Mapping[str, Any], it: Mapping[str, Any]) -> float | None:
    """An item's |r|/B: exact for the layer's worst item, else its heat-map cell when the
    cell holds that item alone."""
    if row.get("worst_item") == it["id"]:
        return row.get("worst_ratio")
    grid = row.get("item_ratios") or {}
    for i, (lo, hi) in enumerate(grid.get("samples") or []):
        if lo == hi == it["sample"]:
            for j, (qlo, qhi) in enumerate(grid.get("query_pos") or []):
                if qlo == qhi == it["query_pos"]:
                    return grid["ratios"][i][j]
    return None


def _figure_items(s: Mapping[str, Any], files: _Files) -> str:
    figs = s.get("figures") or {}
    items = _items(s, files)
    out = ['<h2 id="items">Items with figures (worst |r|/B first)</h2>']
    left = figs.get("left_out") or 0
    settings = s.get("settings") or {}
    out.append(
        f'<p class="note">{len(items)} item(s) drawn (--plots {_e(settings.get("plots", "?"))}, '
        f"--max-plots {_e(settings.get('max_plots', '?'))})"
        + (
            f"; {left} more were due a figure and got none: draw one with "
            "<code>-k &lt;id&gt; --plots all</code>"
            if left
            else ""
        )
        + ".</p>"
    )
    if items:
        out.append('<table class="grid"><tr><th>item</th><th>|r|/B</th><th>figures</th></tr>')
        for it in items:
            links = " ".join(files.link(p, _kind(p)) for p in it["paths"])
            out.append(
                f'<tr><td><a href="#item-{_e(it["id"])}">{_e(it["id"])}</a></td>'
                f"<td{_cls(_float(it.get('ratio')), lambda v: v > 1)}>"
                f"{_num(_float(it.get('ratio')), '.3g')}</td><td>{links}</td></tr>"
            )
        out.append("</table>")
    for it in items:
        out.append(
            f'<section class="item" id="item-{_e(it["id"])}"><h3>{_e(it["id"])} — |r|/B '
            f"{_num(_float(it.get('ratio')), '.3g')}</h3>"
        )
        out += [files.img(p, f"{it['id']} {_kind(p)}") for p in it["paths"]]
        out.append("</section>")
    other = [p for p in figs.get("paths") or [] if not any(str(p) in it["paths"] for it in items)]
    if other:
        out.append("<h3>Other figures</h3>")
        out += [files.img(p, Path(p).name) for p in other]
    return "\n".join(out)


# --- dataset-level view ---------------------------------------------------------------------


def _dataset_view(s: Mapping[str, Any], files: _Files) -> str:
    view = s.get("dataset_view")
    out = ['<h2 id="dataset">Which components carry each head (dataset-level view)</h2>']
    if view is None:
        out.append(
            '<p class="muted">Not written in this session (<code>--dataset-top-k</code> 0, '
            "or the session did not complete).</p>"
        )
        return "\n".join(out)
    if view.get("error"):
        out.append(f'<p class="bad">not written: {_e(view["error"])}</p>')
    paths = [str(p) for p in view.get("paths") or []]
    pngs = [p for p in paths if p.endswith(".png")]
    for p in paths:
        if not p.endswith(".json"):
            continue
        f = files.find(p)
        data = None
        if f is not None:
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                out.append(f'<p class="bad">{_e(Path(p).name)}: cannot read ({_e(e)})</p>')
        png = next((q for q in pngs if Path(q).stem == Path(p).stem), None)
        if isinstance(data, Mapping) and png is None and data.get("heatmap"):
            png = str(files.root / str(data["heatmap"]))
        out.append(_dataset_layer(p, data, png, files))
        if png in pngs:
            pngs.remove(png)
    out += [files.img(p, Path(p).name) for p in pngs]
    return "\n".join(out)


def _dataset_layer(path: str, data: Any, png: str | None, files: _Files) -> str:
    name = Path(path).stem
    if not isinstance(data, Mapping):
        head = f"<h3>{_e(name)}</h3><p>{files.link(path)}</p>"
        return head + (files.img(png, name) if png else "")
    out = [
        f'<h3 id="dataset-{_e(data.get("layer", name))}">Layer {_e(data.get("layer", "?"))}: '
        f"{_e(data.get('q_module', '?'))} × {_e(data.get('k_module', '?'))}</h3>",
        f'<p class="note">C_q {_e(data.get("C_q"))}, C_k {_e(data.get("C_k"))}, '
        f"{_e(len(data.get('samples') or []))} samples, {_e(data.get('entries'))} attended "
        f"(query, key) entries; masses are sums of |contribution| — {files.link(path)}</p>",
    ]
    if png:
        out.append(files.img(png, f"{name} heat map"))
    heads = data.get("heads") or []
    if heads:
        out.append(
            f'<table class="grid"><tr><th>head</th><th>top-{_e(data.get("top_k", "K"))} share</th>'
            "<th>top pairs (share)</th>"
            "<th>top query components</th><th>top key components</th></tr>"
        )
        for h in heads:
            pairs = "<br>".join(
                f"{_e(p.get('q_label'))} × {_e(p.get('k_label'))} ({_pct(p.get('share'))})"
                for p in (h.get("pairs") or [])[:5]
            )
            qc = "<br>".join(
                f"{_e(c.get('label'))} ({_pct(c.get('share'))})"
                for c in (h.get("query_components") or [])[:3]
            )
            kc = "<br>".join(
                f"{_e(c.get('label'))} ({_pct(c.get('share'))})"
                for c in (h.get("key_components") or [])[:3]
            )
            out.append(
                f"<tr><td>{_e(h.get('head'))}</td><td>{_pct(h.get('top_k_share'))}</td>"
                f"<td>{pairs}</td><td>{qc}</td><td>{kc}</td></tr>"
            )
        out.append("</table>")
    return "\n".join(out)


def _pct(v: Any) -> str:
    f = _float(v)
    return "–" if f is None else f"{100 * f:.1f} %"


# --- links ------------------------------------------------------------------------------------


def _links(s: Mapping[str, Any], files: _Files) -> str:
    out = ['<h2 id="files">Files</h2><ul class="files">']
    out.append(f"<li>{files.link(files.root / 'summary.json', 'summary.json')}</li>")
    figs = s.get("figures") or {}
    paths = [str(p) for p in figs.get("paths") or []]
    for it in figs.get("items") or []:
        paths += [str(p) for p in it.get("paths", []) if str(p) not in paths]
    for p in sorted(paths, key=lambda p: Path(p).name):
        out.append(f"<li>{files.link(p)}</li>")
    for p in (s.get("dataset_view") or {}).get("paths") or []:
        out.append(f"<li>{files.link(p)}</li>")
    out.append("</ul>")
    try:
        present = sorted(
            f
            for f in files.root.iterdir()
            if f.is_file()
            and f.suffix in LISTED_SUFFIXES
            and not f.name.startswith(".")
            and f.name != "index.html"
            and f.resolve() not in files.linked
        )
    except OSError:
        present = []
    if present:
        out.append(
            '<p class="note">In this folder but not named by summary.json (e.g. from an '
            'earlier session):</p><ul class="files">'
        )
        out += [f"<li>{files.link(f)}</li>" for f in present]
        out.append("</ul>")
    return "\n".join(out)


# --- template -------------------------------------------------------------------------------

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var im = imgs[i];
    if (im.complete && im.naturalWidth > 0) { ok++; continue; }
    var note = document.createElement("span");
    note.className = "broken";
    note.textContent = "image did not load: " + im.getAttribute("alt");
    im.parentNode.insertBefore(note, im.nextSibling);
  }
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1280px; padding: 0 1em; color: #222; background: #fff; }}
h1 {{ font-size: 1.5em; margin-bottom: .3em; }}
h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }}
nav a {{ margin-right: 1em; }}
.verdict {{ padding: .6em 1em; border-radius: 4px; font-size: 1.15em; }}
.verdict.pass {{ background: #e3f4e1; border: 1px solid #4a9a3f; }}
.verdict.fail {{ background: #fbe3e1; border: 1px solid #c0392b; }}
.verdict.incomplete {{ background: #fff3d6; border: 1px solid #c98a00; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
table.grid th, table.grid td {{ border: 1px solid #ddd; padding: .25em .5em;
                               font-variant-numeric: tabular-nums; vertical-align: top; }}
table.grid th {{ background: #f3f3f3; }}
#layer-table td {{ white-space: nowrap; }}
table.kv th {{ text-align: left; padding-right: 1em; font-weight: 600; }}
table.kv td, table.kv th {{ padding: .1em .4em; vertical-align: top; }}
caption {{ text-align: left; font-weight: 700; }}
.cols {{ display: flex; gap: 3em; flex-wrap: wrap; align-items: flex-start; }}
.bad {{ color: #b00020; font-weight: 600; }}
td.bad {{ background: #fdecea; }}
.good {{ color: #2e7d32; }}
.muted, .note {{ color: #666; }}
.missing, .broken {{ color: #b00020; display: block; }}
pre {{ white-space: pre-wrap; background: #f7f7f7; padding: .5em; }}
img.fig {{ max-width: 100%; display: block; margin: .5em 0; border: 1px solid #eee; }}
figure.heat {{ margin: .5em 0 1.2em 0; }}
.plot {{ position: relative; }}
.plot svg.axes {{ position: absolute; left: 0; top: 0; z-index: 1; pointer-events: none; }}
.plot svg.axes rect {{ pointer-events: all; }}
svg rect.hit {{ fill: transparent; }}
.plot img.cells {{ position: absolute; image-rendering: pixelated; }}
svg text {{ font-size: 11px; fill: #333; }}
svg line {{ stroke: #333; }}
svg rect.worst {{ fill: none; stroke: #ff00ff; stroke-width: 2; }}
ul.files {{ columns: 2; }}
code {{ font-size: .9em; }}
</style>
</head>
<body>
<h1>qkcheck report — {run}</h1>
<nav><a href="#verdict">verdict</a><a href="#settings">settings</a><a href="#layers">layers</a>
<a href="#heatmaps">|r|/B heat maps</a><a href="#items">items</a>
<a href="#dataset">dataset view</a><a href="#files">files</a></nav>
{body}
<script>{script}</script>
</body>
</html>
"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qkcheck.html_report",
        description="Write index.html for an artifacts folder from its summary.json.",
    )
    p.add_argument("artifacts", type=Path, help="the folder holding summary.json")
    a = p.parse_args(argv)
    src = a.artifacts / "summary.json"
    try:
        summary = json.loads(src.read_text())
    except OSError as e:
        print(f"qkcheck.html_report: {src}: cannot read: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"qkcheck.html_report: {src}: not JSON ({e})", file=sys.stderr)
        return 2
    if not isinstance(summary, dict):
        print(f"qkcheck.html_report: {src}: not a qkcheck summary", file=sys.stderr)
        return 2
    print(write_html_report(summary, a.artifacts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
