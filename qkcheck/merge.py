"""Merge the ``summary.json`` of several shards of one validation into one summary.

    python -m qkcheck.merge SHARD.json [SHARD.json ...] -o OUT.json

Shard a run by layer, by samples, or both: one CI job per ``--layers`` and/or ``--samples``
selection, every job with the same ``--run-id``, ``--query-pos`` and options (and the same
``--samples-file``, if any). The merged summary equals a single-machine run's
(:mod:`qkcheck.report` schema) apart from ``settings`` and figure paths: exactly for counts,
worst ``|r|/B`` and its item, closure errors and ``‖Δ‖/‖W‖``; within the quantile sketch's
stated error (:mod:`qkcheck.sketch`, 0.5 % relative) for ``median_abs_r``, ``p99_abs_r``
and ``r_frac_of_logit_scale``.

The rule behind that: a layer's item counts, worst ``|r|/B`` and closure error combine
across shards (sums and maxima); its medians and percentiles combine through the |r|
sketches and target-logit moments each shard's summary carries (``abs_r_sketch``,
``logit_moments``): bucket counts and moments add, and the statistics are recomputed from
the sum. ``delta_q``/``delta_k`` are properties of the weights and must agree. A layer may
come from several shards only when each shard's summary row lists the ``samples`` it
covered and those lists are disjoint; otherwise the shards overlap and merging raises
:class:`MergeError` (exit 2) naming the layer and both shards, rather than counting items
twice. Summaries of older qkcheck versions (no sketch) merge by layer only: a layer's
statistics from two such shards are refused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qkcheck.errors import QKCheckError
from qkcheck.report import LAYER_STATS, merge_item_ratios, totals
from qkcheck.sketch import QuantileSketch, residual_statistics

#: settings that may differ between shards of one validation
SHARD_SETTINGS = ("layers", "samples", "artifacts_dir", "chunk_mib")
#: per-layer statistics of a layer's quality test (combined through the sketch, or refused)
WHOLE_LAYER_STATS = LAYER_STATS
#: the statistics recomputed from merged sketches and moments
SKETCHED = ("median_abs_r", "p99_abs_r", "r_frac_of_logit_scale")


class MergeError(QKCheckError):
    """Shard summaries that do not belong to one validation, or cannot be combined."""


def merge_summaries(
    summaries: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """One summary from the shards' summaries (``names``, e.g. file paths, for messages).

    ``settings`` of the result: the shards' common settings; a setting in
    :data:`SHARD_SETTINGS` that differs becomes the list of the shards' values.
    """
    if not summaries:
        raise MergeError("no shard summaries to merge")
    names = list(names) if names is not None else [f"shard {i}" for i in range(len(summaries))]
    for s, name in zip(summaries, names, strict=True):
        missing = {"run", "settings", "totals", "layers", "figures"} - set(s)
        if missing:
            raise MergeError(f"{name}: not a qkcheck summary (no {', '.join(sorted(missing))})")
    runs = {s["run"] for s in summaries}
    if len(runs) > 1:
        raise MergeError(f"shards validate different runs: {_by_shard(summaries, names, 'run')}")
    settings = _merge_settings(summaries, names)

    layers: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    for s, name in zip(summaries, names, strict=True):
        for layer, row in s["layers"].items():
            if layer not in layers:
                layers[layer] = dict(row)
                origin[(layer, "items")] = name
                origin.update(
                    {(layer, k): name for k in WHOLE_LAYER_STATS if row.get(k) is not None}
                )
                continue
            layers[layer] = _merge_layer(layers[layer], row, layer, name, origin)
            origin[(layer, "items")] = f"{origin[(layer, 'items')]} and {name}"

    verdict = _merge_verdict(summaries, names)
    return {
        "run": summaries[0]["run"],
        "settings": settings,
        **verdict,
        "totals": totals(layers.values()),
        "layers": {k: layers[k] for k in sorted(layers, key=int)},
        "figures": {
            "paths": sorted({p for s in summaries for p in s["figures"]["paths"]}),
            "left_out": sum(s["figures"]["left_out"] for s in summaries),
            # the drawn items of every shard, worst |r|/B first
            "items": sorted(
                (d for s in summaries for d in s["figures"].get("items", [])),
                key=lambda d: (-d["ratio"], d["id"]),
            ),
        },
        # the same run in every shard: its skipped layers are too (absent in older summaries)
        "skipped_layers": {k: v for s in summaries for k, v in s.get("skipped_layers", {}).items()},
    }


def _merge_verdict(summaries: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict:
    """complete/passed only if every shard's is; counts summed; a shard's reason named.
    Summaries without these fields (older qkcheck) give nothing."""
    if not all("complete" in s for s in summaries):
        return {}
    pairs = list(zip(summaries, names, strict=True))
    reasons = [f"{n}: {s['reason']}" for s, n in pairs if not s["complete"]]
    statuses = [s["exit_status"] for s in summaries]
    gates = [s.get("gate", {}) for s in summaries]
    return {
        "complete": not reasons,
        "reason": "; ".join(reasons) or None,
        "passed": all(s["passed"] for s in summaries),
        "exit_status": None if None in statuses else max(statuses),
        "tests": {
            k: sum(s.get("tests", {}).get(k, 0) for s in summaries)
            for k in ("passed", "failed", "errors", "skipped")
        },
        "gate": {
            **{k: sum(g.get(k, 0) for g in gates) for k in ("passed", "failed", "skipped")},
            "failures": [f for g in gates for f in g.get("failures", [])],
            "notes": [x for g in gates for x in g.get("notes", [])],
        },
    }


def _by_shard(summaries: Iterable[Mapping[str, Any]], names: Sequence[str], key: str) -> str:
    return "; ".join(f"{n}: {s[key]!r}" for s, n in zip(summaries, names, strict=True))


def _merge_settings(summaries: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict:
    keys = sorted({k for s in summaries for k in s["settings"]})
    merged: dict[str, Any] = {}
    for key in keys:
        values = [s["settings"].get(key) for s in summaries]
        if all(v == values[0] for v in values):
            merged[key] = values[0]
        elif key in SHARD_SETTINGS:
            merged[key] = values
        else:
            shown = "; ".join(f"{n}: {v!r}" for n, v in zip(names, values, strict=True))
            raise MergeError(
                f"shards differ in setting {key!r} ({shown}); shards of one validation may "
                f"differ only in {', '.join(SHARD_SETTINGS)}"
            )
    return merged


def _merge_layer(
    a: dict[str, Any],
    b: Mapping[str, Any],
    layer: str,
    name: str,
    origin: dict[tuple[str, str], str],
) -> dict[str, Any]:
    """Layer ``layer`` reported by several shards of disjoint samples: counts add, maxima
    combine, quality statistics merge through their sketches."""
    first = origin.get((layer, "items"), "an earlier shard")
    covered_a, covered_b = a.get("samples"), b.get("samples")
    if covered_a is None or covered_b is None:
        raise MergeError(
            f"layer {layer}: {first} and {name} both validated it and their summaries do not "
            "say which samples each covered, so the shards overlap as far as merging can "
            "tell; merging would count its items twice. Give each shard its own --layers"
        )
    both = sorted(set(covered_a) & set(covered_b))
    if both:
        raise MergeError(
            f"layer {layer}: {first} and {name} both validated samples "
            f"{both[:5]}{'…' if len(both) > 5 else ''} of it: the shards overlap, and merging "
            "would count those items twice"
        )
    out = dict(a)
    out["samples"] = sorted({*covered_a, *covered_b})
    out["item_ratios"] = merge_item_ratios(a.get("item_ratios"), b.get("item_ratios"))
    for key in ("items", "passed", "failed"):
        out[key] = a[key] + b[key]
    if b["worst_ratio"] is not None and (
        a["worst_ratio"] is None or b["worst_ratio"] > a["worst_ratio"]
    ):
        out["worst_ratio"], out["worst_item"] = b["worst_ratio"], b["worst_item"]
    errors = [e for e in (a["max_closure_error"], b["max_closure_error"]) if e is not None]
    out["max_closure_error"] = max(errors) if errors else None
    reported = [k for k in WHOLE_LAYER_STATS if b.get(k) is not None]
    if not reported:
        return out
    if all(a.get(k) is None for k in WHOLE_LAYER_STATS):
        for key in reported:
            out[key] = b[key]
            origin[(layer, key)] = name
        return out
    for key in ("delta_q", "delta_k"):
        if None not in (a.get(key), b.get(key)) and not math.isclose(a[key], b[key], rel_tol=1e-9):
            raise MergeError(
                f"layer {layer}: {key} is {a[key]!r} in {origin.get((layer, key), first)} "
                f"but {b[key]!r} in {name}: the shards decomposed different weights "
                "(another run or step)"
            )
    if any(x.get(k) is None for x in (a, b) for k in ("abs_r_sketch", "logit_moments")):
        raise MergeError(
            f"layer {layer}: {origin.get((layer, 'median_abs_r'), first)} and {name} both "
            "report its median |r| without the sketch needed to combine them (a summary of an "
            "older "
            "qkcheck): a median of a union is not a function of the parts' medians. Shard "
            "by --layers, or rerun the shards with this qkcheck"
        )
    sketch = QuantileSketch.from_dict(a["abs_r_sketch"]).merge(
        QuantileSketch.from_dict(b["abs_r_sketch"])
    )
    moments = {k: a["logit_moments"][k] + b["logit_moments"][k] for k in ("sum", "sumsq", "count")}
    out.update(residual_statistics(sketch, moments))
    out["abs_r_sketch"], out["logit_moments"] = sketch.to_dict(), moments
    for key in SKETCHED:
        origin[(layer, key)] = f"{origin.get((layer, key), first)} and {name}"
    return out


def read_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise MergeError(f"{path}: cannot read shard summary: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise MergeError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected a summary object, got {type(data).__name__}")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    from qkcheck.report import format_table, write_json

    p = argparse.ArgumentParser(
        prog="python -m qkcheck.merge",
        description="Merge per-shard summary.json files of one validation into one summary.",
    )
    p.add_argument("shards", nargs="+", type=Path, help="summary.json of each shard")
    p.add_argument("-o", "--output", type=Path, required=True, help="merged summary.json")
    a = p.parse_args(argv)
    try:
        merged = merge_summaries([read_summary(s) for s in a.shards], [str(s) for s in a.shards])
    except MergeError as e:
        print(f"qkcheck.merge: {e}", file=sys.stderr)
        return 2
    write_json(merged, a.output)
    for line in format_table(merged):
        print(line)
    print(f"merged {len(a.shards)} shard(s) into {a.output}")
    return 1 if merged["totals"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
