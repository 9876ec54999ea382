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
                            "logit_moments": {"sum", "sumsq", "count"} | null}},
     "figures": {"paths": [str], "left_out": int,
                 "items": [{"id": str, "layer", "sample", "query_pos": int,   # drawn items,
                            "ratio": float, "passed": bool, "paths": [str]}]}}  # worst first

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qkcheck.util import item_id, write_atomic

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
    for row in per_layer.values():
        for key in LAYER_STATS:
            row.setdefault(key, None)
        row["samples"] = sorted(row.get("samples", ()))
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
    """Write ``data`` as JSON to ``path`` atomically (temporary file, then rename)."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
