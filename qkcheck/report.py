"""The end-of-session summary: a per-layer table for the terminal and the same as JSON.

JSON schema (``summary.json`` in the artifacts directory)::

    {"run": str, "settings": {option: value as text},
     "complete": bool,            # every selected test ran (no interruption, -x, crash)
     "reason": str | null,        # why not complete
     "passed": bool,              # complete and pytest's exit status is 0
     "exit_status": int,          # pytest's exit status (0 ok, 1 failures, 2 interrupted, …)
     "tests": {"passed", "failed", "errors", "skipped": int},   # every test, final outcome
     "gate": {"passed", "failed", "skipped": int,              # the run-level quality tests
              "failures": [{"test": nodeid, "message": str}],
              "notes": [str]},    # what a passing comparison should say (e.g. other samples)
     "totals": {"items": int, "passed": int, "failed": int},
     "layers": {"<layer>": {"items", "passed", "failed": int,
                            "worst_ratio": float, "worst_item": str,   # max |r|/B and where
                            "max_closure_error": float,
                            "median_abs_r", "p99_abs_r", "r_frac_of_logit_scale": float | null,
                            "delta_q", "delta_k": float | null,        # ‖Δ‖_F/‖W‖_F
                            "samples": [int],          # the samples its items covered
                            "abs_r_sketch": {…} | null,   # qkcheck.sketch, for merging
                            "logit_moments": {"sum", "sumsq", "count"} | null,
                            "item_ratios": {…} | null}},   # the heat map, see below
     "figures": {"paths": [str], "left_out": int,
                 "items": [{"id": str, "layer", "sample", "query_pos": int,   # drawn items,
                            "ratio": float, "passed": bool, "paths": [str]}]},  # worst first
     "skipped_layers": {"<layer>": str},   # attention layers not validated, and why
     "dataset_view": {"paths": [str],      # with --dataset-top-k > 0, complete sessions only
                      "skipped": {"<layer>": str},   # layers left out of it, and why
                      "error": str}}       # instead of paths/skipped when it failed

``item_ratios`` (what the report's heat map draws, :func:`item_ratio_grid`): every item's
``|r|/B`` (its worst head and key) on a grid of samples × query positions, bounded in size::

    {"samples": [[lo, hi], …],      # rows: the samples covered, in order, ≤ 64 rows
     "query_pos": [[lo, hi], …],    # columns: the query positions, in order, ≤ 256 columns
     "ratios": [[float | null, …], …]}   # [row][column]; null: no item there

Each row and column is a bin of consecutive covered samples / query positions (``lo == hi``
until there are more than 64 samples or 256 positions; then bins of equal counts) and a
cell holds the *largest* ``|r|/B`` of the items in it, to 3 significant digits rounded away
from 1 (never across it: a cell is above 1 exactly when an item in it is); ``Infinity``
where an item had ``B = 0 < |r|``. A cell at most 1 can still hold an item that failed
closure; the layer's ``failed`` count is the verdict. Rows of numbers are written on one
line each. Merged summaries (:mod:`qkcheck.merge`) join the rows of sample shards when
their columns agree, otherwise the layer's ``item_ratios`` is null.

Residual statistics and Δ fractions come from the run-level quality tests; they are null
when those were deselected. Medians and percentiles come from a mergeable quantile sketch
(:mod:`qkcheck.sketch`, within 0.5 % relative of the exact order statistic); counts, maxima
and worst items are exact. While a session runs, the file is :func:`unfinished_summary`
(``"complete": false``, ``"exit_status": null``): a run that is killed leaves that, never
the previous run's verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qkcheck.util import item_id, write_atomic

#: the most rows (sample bins) and columns (query-position bins) of ``item_ratios``
MAX_RATIO_ROWS = 64
MAX_RATIO_COLS = 256

#: per-layer statistics of the run-level quality tests (null when those did not run)
LAYER_STATS = (
    "median_abs_r",
    "p99_abs_r",
    "r_frac_of_logit_scale",
    "delta_q",
    "delta_k",
    "abs_r_sketch",
    "logit_moments",
)


def build_summary(
    run: str,
    settings: Any,
    items: Iterable[Mapping[str, Any]],
    layers: Mapping[int, Mapping[str, Any]],
    figures: Iterable[str],
    left_out: int,
    *,
    exit_status: int = 0,
    complete: bool = True,
    reason: str | None = None,
    gate: Mapping[str, Any] | None = None,
    tests: Mapping[str, int] | None = None,
    drawn: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Aggregate per-item records (``layer``, ``sample``, ``query_pos``, ``passed``,
    ``ratio``, ``closure_error``) and per-layer quality records into the summary, with the
    session's verdict (``exit_status``, ``complete``/``reason``, ``gate`` and ``tests``
    counts)."""
    per_layer: dict[int, dict[str, Any]] = {}
    items = list(items)
    for it in items:
        row = per_layer.setdefault(
            it["layer"],
            {
                "items": 0,
                "passed": 0,
                "failed": 0,
                "worst_ratio": -1.0,
                "worst_item": None,
                "max_closure_error": 0.0,
                "samples": set(),
            },
        )
        row["samples"].add(it["sample"])
        row["items"] += 1
        row["passed" if it["passed"] else "failed"] += 1
        if it["ratio"] > row["worst_ratio"]:
            row["worst_ratio"] = it["ratio"]
            row["worst_item"] = item_id(it["layer"], it["sample"], it["query_pos"])
        row["max_closure_error"] = max(row["max_closure_error"], it["closure_error"])
    for layer, q in layers.items():
        row = per_layer.setdefault(
            layer,
            {
                "items": 0,
                "passed": 0,
                "failed": 0,
                "worst_ratio": None,
                "worst_item": None,
                "max_closure_error": None,
            },
        )
        for key in LAYER_STATS:
            if key in q:
                row[key] = q[key]
    by_layer: dict[int, list[Mapping[str, Any]]] = {}
    for it in items:
        by_layer.setdefault(it["layer"], []).append(it)
    for layer, row in per_layer.items():
        for key in LAYER_STATS:
            row.setdefault(key, None)
        row["samples"] = sorted(row.get("samples", ()))
        row["item_ratios"] = item_ratio_grid(by_layer.get(layer, ()))
    rows = per_layer.values()
    return {
        "run": run,
        "settings": _settings_text(settings),
        "complete": complete,
        "reason": reason,
        "passed": complete and exit_status == 0,
        "exit_status": exit_status,
        "tests": dict(tests or {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}),
        "gate": dict(gate or {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "notes": []}),
        "totals": totals(rows),
        "layers": {str(k): per_layer[k] for k in sorted(per_layer)},
        "figures": {
            "paths": sorted(figures),
            "left_out": left_out,
            "items": [dict(d) for d in drawn],
        },
    }


def item_ratio_grid(
    items: Iterable[Mapping[str, Any]],
    max_rows: int = MAX_RATIO_ROWS,
    max_cols: int = MAX_RATIO_COLS,
) -> dict[str, Any] | None:
    """One layer's items (``sample``, ``query_pos``, ``ratio``) as the bounded grid of the
    module docstring (``item_ratios``); None without items."""
    items = list(items)
    if not items:
        return None
    samples = sorted({it["sample"] for it in items})
    positions = sorted({it["query_pos"] for it in items})
    rows, row_of = _bins(samples, max_rows)
    cols, col_of = _bins(positions, max_cols)
    grid: list[list[float | None]] = [[None] * len(cols) for _ in rows]
    for it in items:
        r, c = row_of[it["sample"]], col_of[it["query_pos"]]
        ratio = float(it["ratio"])
        if math.isnan(ratio):
            continue
        if grid[r][c] is None or ratio > grid[r][c]:
            grid[r][c] = ratio
    return {
        "samples": rows,
        "query_pos": cols,
        "ratios": [[None if v is None else round_ratio(v) for v in line] for line in grid],
    }


def _bins(values: list[int], most: int) -> tuple[list[list[int]], dict[int, int]]:
    """Sorted ``values`` cut into at most ``most`` runs of equal count: ``[lo, hi]`` per
    bin and each value's bin."""
    per = -(-len(values) // most)
    bins = [[values[i], values[min(i + per, len(values)) - 1]] for i in range(0, len(values), per)]
    return bins, {v: i // per for i, v in enumerate(values)}


def round_ratio(x: float) -> float:
    """``x`` to 3 significant digits, rounded away from 1 (down at most 1, up above it), so
    rounding never moves a ratio across the bound."""
    if x == 0 or not math.isfinite(x):
        return x
    q = 10.0 ** (math.floor(math.log10(abs(x))) - 2)
    v = (math.floor if x <= 1 else math.ceil)(x / q) * q
    out = float(f"{v:.3g}")
    if x <= 1 < out or out <= 1 < x:  # binary noise of the last step, on the wrong side
        out = v
    return out


def merge_item_ratios(
    a: Mapping[str, Any] | None, b: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """``item_ratios`` of one layer from two shards of disjoint samples: their rows in
    sample order when their columns agree, else None (the grid cannot be joined)."""
    if a is None or b is None or a["query_pos"] != b["query_pos"]:
        return None
    rows = sorted(
        zip(a["samples"] + b["samples"], a["ratios"] + b["ratios"], strict=True),
        key=lambda r: r[0],
    )
    return {
        "samples": [r[0] for r in rows],
        "query_pos": a["query_pos"],
        "ratios": [r[1] for r in rows],
    }


def totals(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The summary's ``totals`` block: items, passed and failed summed over per-layer rows."""
    rows = list(rows)
    return {key: sum(r[key] for r in rows) for key in ("items", "passed", "failed")}


def unfinished_summary(run: str, settings: Any, started: str, pid: int) -> dict[str, Any]:
    """What ``summary.json`` holds while a session runs (and after it was killed)."""
    return {
        "run": run,
        "settings": _settings_text(settings),
        "complete": False,
        "reason": (
            f"did not finish: the session started at {started} (pid {pid}) has not written "
            f"its summary — still running, or killed"
        ),
        "passed": False,
        "exit_status": None,
    }


def _settings_text(settings: Any) -> dict[str, str]:
    return {k: str(v) for k, v in dataclasses.asdict(settings).items()} if settings else {}


def format_table(summary: Mapping[str, Any]) -> list[str]:
    """The per-layer table as terminal lines."""
    head = (
        f"{'layer':>5} {'items':>7} {'passed':>7} {'failed':>7} {'worst |r|/B':>12} "
        f"{'median |r|':>11} {'max closure err':>16} {'‖Δ‖/‖W‖ q':>10} {'‖Δ‖/‖W‖ k':>10}"
    )
    lines = [f"run {summary['run']}", head]

    def num(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for layer, r in summary["layers"].items():
        lines.append(
            f"{layer:>5} {r['items']:>7} {r['passed']:>7} {r['failed']:>7} "
            f"{num(r['worst_ratio'], '.3g'):>12} {num(r['median_abs_r'], '.3g'):>11} "
            f"{num(r['max_closure_error'], '.2g'):>16} {num(r['delta_q'], '.3f'):>10} "
            f"{num(r['delta_k'], '.3f'):>10}"
        )
    t = summary["totals"]
    lines.append(f"total {t['items']} items: {t['passed']} passed, {t['failed']} failed")
    return lines


def write_json(data: Any, path: Path) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (temporary file, then rename); a list
    of plain numbers (a row of ``item_ratios``) goes on one line."""
    return write_atomic(path, dumps(data) + "\n")


def dumps(data: Any) -> str:
    """``json.dumps(data, indent=2, sort_keys=True)``, with each non-empty list of plain
    numbers (or nulls) on one line."""
    rows: list[str] = []
    tag = secrets.token_hex(8)  # no string of ``data`` can be taken for a placeholder

    def mark(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: mark(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            if x and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in x
            ):
                rows.append(json.dumps(list(x)))
                return f"\x00{tag}:{len(rows) - 1}\x00"
            return [mark(v) for v in x]
        return x

    text = json.dumps(mark(data), indent=2, sort_keys=True)
    placeholder = re.compile(rf'"\\u0000{tag}:(\d+)\\u0000"')
    return placeholder.sub(lambda m: rows[int(m.group(1))], text)
