"""The report page, ``qk-artifacts/<run>/index.html`` (qkcheck.html_report).

Unit tests of the page on hand-made summaries (the per-layer table, escaping, links that
resolve, the heat map's colours, both shapes of the figures block), of the summary's
``item_ratios`` grid, of the plugin writing the page (and a failure to write it being one
line, never the verdict's loss) — and a real headless browser (Debian's chromium) on the
page of a real demo session: no console output, every image loads, a non-blank screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from qkcheck.html_report import _png, main, render, write_html_report
from qkcheck.report import (
    build_summary,
    dumps,
    item_ratio_grid,
    merge_item_ratios,
    round_ratio,
    unfinished_summary,
)
from tests.pytester_suite import VALIDATION, make_suite, run

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
suite = pytest.fixture(make_suite, name="suite")


# --- reading the page -------------------------------------------------------------------------


class Page(HTMLParser):
    """What the tests read from a page: ids, links, images, tables, text, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.scripts = 0
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        if tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _png_file(path: Path, colour=(40, 120, 200)) -> Path:
    img = np.zeros((30, 40, 3), dtype=np.uint8)
    img[:] = colour
    img[10:20, 10:30] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(img))
    return path


def _summary(art: Path, run: str = "s-test01", **figures) -> dict:
    """Two layers × 3 samples × 5 query positions; L1-S2-Q3 breaks the bound (1.5)."""
    items = []
    for layer in (0, 1):
        for s in range(3):
            for q in range(5):
                ratio = 0.1 * (1 + s) + 0.01 * q + 0.2 * layer
                if (layer, s, q) == (1, 2, 3):
                    ratio = 1.5
                items.append(
                    {
                        "layer": layer,
                        "sample": s,
                        "query_pos": q,
                        "passed": ratio <= 1,
                        "ratio": ratio,
                        "closure_error": 1e-7,
                    }
                )
    quality = {
        0: {"median_abs_r": 0.1, "p99_abs_r": 0.4, "r_frac_of_logit_scale": 0.03},
        1: {"median_abs_r": 0.2, "p99_abs_r": 0.6, "r_frac_of_logit_scale": 0.05},
    }
    quality[0].update(delta_q=0.08, delta_k=0.1)
    quality[1].update(delta_q=0.31, delta_k=0.07)  # over the 0.25 budget
    paths = []
    for iid in ("L0-S1-Q2", "L1-S2-Q3"):
        layer, s, q = (int(x) for x in re.findall(r"\d+", iid))
        for kind in ("combined", "validation"):
            paths.append(str(_png_file(art / f"{run}_L{layer}_S{s}_Q{q}_{kind}.png")))
    s = build_summary(run, None, items, quality, paths, 7, exit_status=1)
    s["settings"] = {"delta_budget": "0.25", "residual_budget": "0.2", "plots": "failed"}
    s["gate"]["failed"] = 1
    s["gate"]["failures"] = [
        {
            "test": "validation/test_quality.py::"
            "test_weight_delta_is_within_budget[h.1.attn.q_proj]",
            "message": 'token "$5 or $6" <script>alert("x")</script> & more',
        }
    ]
    s["figures"].update(figures)
    return s


def _links_resolve(page: Page, art: Path) -> None:
    for url in page.hrefs + [i["src"] for i in page.imgs]:
        if url.startswith("#"):
            assert url[1:] in page.ids, url
        elif url.startswith("data:image/png;base64,"):
            continue
        else:
            assert "://" not in url and not url.startswith("/"), url  # relative, no network
            assert (art / urllib.parse.unquote(url)).is_file(), url


# --- the page from hand-made summaries ------------------------------------------------------


def test_the_layer_table_has_one_row_per_layer_with_the_summary_numbers(tmp_path):
    page = Page(render(_summary(tmp_path), tmp_path))
    header, *rows = page.tables["layer-table"]
    assert header[:6] == ["layer", "items", "passed", "failed", "worst |r|/B", "worst item"]
    assert [r[:6] for r in rows] == [
        ["0", "15", "15", "0", "0.34", "L0-S2-Q4"],
        ["1", "15", "14", "1", "1.5", "L1-S2-Q3"],
    ]
    col = header.index("‖Δ‖/‖W‖ q")
    assert [r[col] for r in rows] == ["0.080", "0.310"]
    gate = header.index("gate")
    assert rows[0][gate] == "pass"
    assert rows[1][gate].startswith("FAIL") and "h.1.attn.q_proj" in rows[1][gate]


def test_layers_not_validated_are_listed_with_their_reason(tmp_path):
    summary = _summary(tmp_path) | {"skipped_layers": {"2": "only h.2.attn.q_proj <q>"}}
    text = render(summary, tmp_path)
    assert '<ul id="skipped-layers"><li>layer 2: only h.2.attn.q_proj &lt;q&gt;</li></ul>' in text
    assert "skipped-layers" not in render(_summary(tmp_path), tmp_path)


def test_text_from_the_run_is_escaped(tmp_path):
    run = 's-<marquee>"x"&'
    text = render(_summary(tmp_path, run=run), tmp_path)
    page = Page(text)
    assert page.scripts == 1  # the page's own: the message's <script> is text
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;x&quot;)" in text
    assert "<marquee>" not in text and "s-&lt;marquee&gt;&quot;x&quot;&amp;" in text
    assert 'token "$5 or $6" <script>alert("x")</script> & more' in "".join(page.text)


def test_every_link_and_image_resolves_and_the_summary_and_figures_are_linked(tmp_path):
    s = _summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps(s))
    _png_file(tmp_path / "old_L0_S0_Q0_combined.png")  # an earlier session's figure
    page = Page(write_html_report(s, tmp_path).read_text())
    _links_resolve(page, tmp_path)
    linked = {urllib.parse.unquote(u) for u in page.hrefs}
    assert {"summary.json", "old_L0_S0_Q0_combined.png"} <= linked
    assert {Path(p).name for p in s["figures"]["paths"]} <= linked
    figs = [i["src"] for i in page.imgs if not i["src"].startswith("data:")]
    assert sorted(figs) == sorted(Path(p).name for p in s["figures"]["paths"])
    assert "#item-L1-S2-Q3" in page.hrefs  # the layer's worst item links to its figures


def test_figures_are_found_after_the_folder_moved(tmp_path):
    """Paths in summary.json name the folder it was written in; the page links the files
    beside it."""
    s = _summary(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    page = Page(render(s, tmp_path / "b"))
    _links_resolve(page, tmp_path / "b")
    assert len([i for i in page.imgs if not i["src"].startswith("data:")]) == 4


def test_a_missing_figure_is_said_not_drawn_as_a_broken_image(tmp_path):
    s = _summary(tmp_path)
    missing = s["figures"]["paths"][0]
    Path(missing).unlink()
    page = Page(render(s, tmp_path))
    assert Path(missing).name not in [i["src"] for i in page.imgs]
    assert f"figure not found: {missing}" in "".join(page.text)
    _links_resolve(page, tmp_path)


def test_items_with_figures_come_worst_first_from_names_or_from_figures_items(tmp_path):
    s = _summary(tmp_path)
    order = [i for i in Page(render(s, tmp_path)).ids if i.startswith("item-")]
    text = render(s, tmp_path)
    assert text.index('id="item-L1-S2-Q3"') < text.index('id="item-L0-S1-Q2"')
    assert set(order) == {"item-L1-S2-Q3", "item-L0-S1-Q2"}
    # the ratio of a figure-only item comes from its heat-map cell: 0.1·2 + 0.02
    assert "L0-S1-Q2 — |r|/B 0.22" in "".join(Page(text).text)
    # figures.items (worst first by its own ratio), validation figure before combined
    paths = s["figures"]["paths"]
    s["figures"]["items"] = [
        {"id": "L1-S2-Q3", "layer": 1, "sample": 2, "query_pos": 3, "ratio": 0.5,
         "paths": paths[2:]},
        {"id": "L0-S1-Q2", "layer": 0, "sample": 1, "query_pos": 2, "ratio": 2.5,
         "paths": paths[:2]},
    ]  # fmt: skip
    text = render(s, tmp_path)
    assert text.index('id="item-L0-S1-Q2"') < text.index('id="item-L1-S2-Q3"')
    assert "L0-S1-Q2 — |r|/B 2.5" in "".join(Page(text).text)
    srcs = [i["src"] for i in Page(text).imgs if not i["src"].startswith("data:")]
    assert srcs[0].endswith("L0_S1_Q2_validation.png")
    assert srcs[1].endswith("L0_S1_Q2_combined.png")


def _heat(page: Page, layer: int) -> np.ndarray:
    from PIL import Image

    (img,) = [i for i in page.imgs if i.get("alt") == f"heat map of |r|/B, layer {layer}"]
    data = base64.b64decode(img["src"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_the_heat_map_is_red_exactly_where_an_item_breaks_the_bound(tmp_path):
    s = _summary(tmp_path)
    s["layers"]["0"]["item_ratios"]["ratios"][0][4] = None  # no item there
    page = Page(render(s, tmp_path))
    for layer in (0, 1):
        img = _heat(page, layer)
        grid = s["layers"][str(layer)]["item_ratios"]["ratios"]
        ch, cw = img.shape[0] // len(grid), img.shape[1] // len(grid[0])
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                r, g, b = img[i * ch + ch // 2, j * cw + cw // 2]
                red = r > 90 and r > 2 * g and r > 2 * b
                if v is None:
                    assert r == g == b == 224, (layer, i, j)
                else:  # red above 1, viridis (never red: bright only with green) at most 1
                    assert red == (v > 1), (layer, i, j, v)
    # one scale for the page: a larger ratio is brighter (viridis' green+red rises)
    low, high = _heat(page, 0)[0, 0], _heat(page, 1)[-1, -1]
    assert sum(high[:2]) > sum(low[:2])


def test_an_unfinished_summary_renders_as_incomplete_with_its_reason(tmp_path):
    s = unfinished_summary("s-test01", None, "2026-01-01T00:00:00+00:00", 123)
    page = Page(render(s, tmp_path))
    text = "".join(page.text)
    assert "INCOMPLETE" in text and "did not finish" in text and "PASSED" not in text


def test_provenance_fields_of_the_summary_are_shown(tmp_path):
    s = _summary(tmp_path)
    s["provenance"] = {"step": 400, "git": "abc123", "torch": "2.13.0"}
    rows = Page(render(s, tmp_path)).tables["table1"]  # settings, then provenance
    prov = dict(r for r in rows if len(r) == 2)
    assert "abc123" in prov["provenance"] and "400" in prov["provenance"]
    assert prov["run"] == "s-test01" and "by qkcheck" in prov["this page"]


def test_the_cli_writes_the_page_from_summary_json(tmp_path, capsys):
    s = _summary(tmp_path)
    (tmp_path / "summary.json").write_text(dumps(s))
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "index.html").is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "index.html")
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "cannot read" in capsys.readouterr().err


# --- item_ratios in the summary -------------------------------------------------------------


def test_item_ratios_hold_every_item_and_are_bounded_by_pooling_maxima():
    items = [
        {"sample": s, "query_pos": q, "ratio": (s * 1000 + q) / 1e5}
        for s in range(10)
        for q in range(0, 40, 2)  # 20 positions
    ]
    full = item_ratio_grid(items)
    assert full["samples"] == [[s, s] for s in range(10)]
    assert full["query_pos"] == [[q, q] for q in range(0, 40, 2)]
    assert full["ratios"][3][5] == round_ratio((3000 + 10) / 1e5)
    small = item_ratio_grid(items, max_rows=4, max_cols=6)
    assert len(small["ratios"]) <= 4 and len(small["ratios"][0]) <= 6
    assert small["samples"] == [[0, 2], [3, 5], [6, 8], [9, 9]]
    assert small["query_pos"] == [[0, 6], [8, 14], [16, 22], [24, 30], [32, 38]]
    # each cell is the largest ratio of its bin
    assert small["ratios"][0][0] == round_ratio((2000 + 6) / 1e5)
    assert max(map(max, small["ratios"])) == max(map(max, full["ratios"]))
    assert item_ratio_grid([]) is None


@pytest.mark.parametrize("x", [1.0, 1.0004, 0.99996, 1 + 1e-12, 1 - 1e-12, 0.148, 3.14159e-6])
def test_rounding_a_ratio_never_moves_it_across_the_bound(x):
    y = round_ratio(x)
    assert (y > 1) == (x > 1)
    assert math.isclose(y, x, rel_tol=0.01)
    assert float(f"{y:.3g}") == y  # 3 significant digits


def test_item_ratios_of_sample_shards_join_and_summary_rows_are_one_line_each():
    a = item_ratio_grid([{"sample": 0, "query_pos": q, "ratio": 0.1} for q in range(6)])
    b = item_ratio_grid([{"sample": 5, "query_pos": q, "ratio": 0.2} for q in range(6)])
    joined = merge_item_ratios(b, a)
    assert joined["samples"] == [[0, 0], [5, 5]]
    assert joined["ratios"] == [[0.1] * 6, [0.2] * 6]
    other = item_ratio_grid([{"sample": 7, "query_pos": 1, "ratio": 0.3}])
    assert merge_item_ratios(a, other) is None  # other columns: not joinable
    text = dumps({"item_ratios": joined, "name": "\x00x"})
    assert json.loads(text) == {"item_ratios": joined, "name": "\x00x"}
    lines = [ln.strip().rstrip(",") for ln in text.splitlines()]
    assert "[0.1, 0.1, 0.1, 0.1, 0.1, 0.1]" in lines and "[5, 5]" in lines


# --- the plugin writes the page ---------------------------------------------------------------

SMALL = ("--layers", "0", "--samples", "1", "--query-pos", "3,4")


def test_the_session_writes_the_page_and_names_it(suite):
    result = run(suite, *SMALL)
    assert result.ret == 0
    art = suite.path / "art"
    line = f"report: {art / 'index.html'}"
    assert line in result.stdout.lines
    page = Page((art / "index.html").read_text())
    assert [r[:4] for r in page.tables["layer-table"][1:]] == [["0", "2", "2", "0"]]
    s = json.loads((art / "summary.json").read_text())
    assert s["layers"]["0"]["item_ratios"]["query_pos"] == [[3, 3], [4, 4]]


def test_a_page_that_cannot_be_written_is_one_line_and_the_verdict_stands(suite):
    (suite.path / "art" / "index.html").mkdir(parents=True)  # os.replace onto a folder fails
    result = run(suite, *SMALL)
    assert result.ret == 0
    (line,) = [ln for ln in result.stdout.lines if ln.startswith("report not written: ")]
    assert "index.html" in line
    assert any(ln.endswith("summary.json — passed") for ln in result.stdout.lines)
    assert json.loads((suite.path / "art" / "summary.json").read_text())["passed"] is True


def test_a_killed_session_never_leaves_the_previous_page(suite):
    """The page is written at the start too, from the summary saying "did not finish"."""
    art = suite.path / "art"
    art.mkdir()
    (art / "index.html").write_text("<p>PASSED (an earlier session)</p>")
    suite.makeconftest(
        (VALIDATION / "conftest.py").read_text() + "\n\nimport os, signal\n\n"
        "def pytest_runtest_teardown(item):\n"
        "    if item.nodeid.endswith('[L0-S0-Q4]'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert run(suite, *SMALL).ret == -9
    text = "".join(Page((art / "index.html").read_text()).text)
    assert "INCOMPLETE" in text and "did not finish" in text and "PASSED" not in text


# --- a real browser on a real session's page ------------------------------------------------

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (/usr/bin/chromium): the browser test of the "
    "report needs it; .ci/run installs it with apt-get where it can (apt-get install -y "
    "chromium)",
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",  # run the page's load handlers before dumping
)


def _chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )


def load(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """The DOM after the load event, and every console line the page produced."""
    p = _chromium(page, tmp, "--enable-logging=stderr", "--v=0", "--dump-dom")
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]


def screenshot(page: Path, tmp: Path, height: int = 3000) -> np.ndarray:
    from PIL import Image

    shot = tmp / f"{page.stem}.png"
    p = _chromium(page, tmp, f"--window-size=1300,{height}", f"--screenshot={shot}")
    assert p.returncode == 0 and shot.is_file(), p.stderr[-3000:]
    return np.asarray(Image.open(shot).convert("RGB")).astype(float)


@pytest.fixture(scope="module")
def demo_artifacts(tmp_path_factory) -> Path:
    """A real session on the demo run: 2 samples, the budget bound at ‖Δ‖ = 0.004‖W‖ so
    layer 1 fails, figures for 2 failing items, the dataset-level view."""
    art = tmp_path_factory.mktemp("report") / "art"
    cmd = [sys.executable, "-m", "pytest", "validation/", "--run-id", "demo", "--samples", "2",
           "--bound", "budget", "--delta-budget", "0.004", "--max-plots", "2",
           "--dataset-top-k", "4", "--artifacts-dir", str(art), "-q",
           "-p", "no:cacheprovider"]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and (art / "index.html").is_file(), p.stdout[-3000:]
    return art


@needs_chromium
def test_the_page_loads_in_a_browser_with_every_image_and_no_console_output(
    demo_artifacts, tmp_path
):
    page = demo_artifacts / "index.html"
    source = Page(page.read_text())
    n_img = len(source.imgs)
    assert n_img == 2 + 6 + 2  # 2 heat maps, 2 items × 3 figures, 2 dataset heat maps
    _links_resolve(source, demo_artifacts)
    dom, console = load(page, tmp_path)
    assert console == []  # no error, warning, exception nor log
    assert f'data-images="{n_img}/{n_img}"' in dom  # every <img> has naturalWidth > 0
    assert 'class="broken"' not in dom  # no note of an image that did not load
    shot = screenshot(page, tmp_path)
    assert shot.std() > 20  # not blank: text, tables, heat maps
    assert (shot.sum(axis=2) < 600).mean() > 0.05  # a real share of the page is drawn
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    red = (r > 90) & (r > 2 * g) & (r > 2 * b)
    assert red.sum() > 1000  # layer 1's cells beyond the bound


@needs_chromium
def test_the_browser_check_sees_a_broken_image_console_output_and_a_blank_page(
    demo_artifacts, tmp_path
):
    """The checks above have teeth: the same page with a figure deleted, with a script
    that logs, and an empty page fail them."""
    art = tmp_path / "art"
    shutil.copytree(demo_artifacts, art)
    next(art.glob("*_validation.png")).unlink()
    dom, console = load(art / "index.html", tmp_path)
    n = len(Page((art / "index.html").read_text()).imgs)
    assert f'data-images="{n - 1}/{n}"' in dom and 'class="broken"' in dom
    assert console == []
    noisy = art / "noisy.html"
    noisy.write_text(
        (art / "index.html")
        .read_text()
        .replace("</body>", "<script>console.error('x'); nope();</script></body>")
    )
    _, console = load(noisy, tmp_path)
    assert len(console) == 2 and "Uncaught ReferenceError" in console[1]
    blank = art / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    assert screenshot(blank, tmp_path, height=400).std() < 1
