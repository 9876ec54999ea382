"""Sharding a validation across CI jobs: per-shard summaries merge into the single run's.

The end-to-end test runs the suite on the genuine run three times at once — whole, and as
two ``--layers`` shards — in subprocesses, then merges the shards with
``python -m qkcheck.merge``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qkcheck.merge import MergeError, merge_summaries
from qkcheck.sketch import ALPHA, QuantileSketch, residual_statistics

from .conftest import GENUINE, GENUINE_OUT, GENUINE_RUN_ID

ROOT = Path(__file__).resolve().parent.parent


def _suite(artifacts: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "validation/",
        "--run-id",
        GENUINE_RUN_ID,
        "--samples-file",
        str(GENUINE / "reference" / "tokens.pt"),
        "--query-pos",
        "last",
        "--plots",
        "none",
        "--artifacts-dir",
        str(artifacts),
        "-q",
        *extra,
    ]


def _run_all(runs: dict[str, list[str]]) -> tuple[dict, dict]:
    """Start every suite command at once on the genuine run; wait for all of them.
    Returns the finished processes and their combined output, by name."""
    env = {**os.environ, "SPD_OUT_DIR": str(GENUINE_OUT)}
    procs = {
        name: subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, cmd in runs.items()
    }
    return procs, {name: p.communicate(timeout=300)[0] for name, p in procs.items()}


def _comparable(summary: dict) -> dict:
    """A summary without what legitimately differs between shards and a whole run."""
    out = copy.deepcopy(summary)
    del out["settings"]
    out["figures"]["paths"] = []
    out["figures"]["items"] = []
    return out


def test_two_layer_shards_merge_into_the_single_run_summary(tmp_path):
    runs = {
        "whole": _suite(tmp_path / "whole"),
        "shard0": _suite(tmp_path / "shard0", "--layers", "0"),
        "shard1": _suite(tmp_path / "shard1", "--layers", "1"),
    }
    procs, outputs = _run_all(runs)
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{outputs[name][-3000:]}"

    merged_path = tmp_path / "merged.json"
    merge = subprocess.run(
        [
            sys.executable,
            "-m",
            "qkcheck.merge",
            str(tmp_path / "shard0" / "summary.json"),
            str(tmp_path / "shard1" / "summary.json"),
            "-o",
            str(merged_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert merge.returncode == 0, merge.stderr

    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    merged = json.loads(merged_path.read_text())
    assert whole["totals"]["items"] == 16  # 2 layers × 8 samples × the last query position
    assert set(merged["layers"]) == {"0", "1"}
    assert _comparable(merged) == _comparable(whole)
    assert merged["settings"]["layers"] != whole["settings"]["layers"]  # the shards' own


def test_two_sample_shards_merge_into_the_single_run_summary(tmp_path):
    """Split by samples: counts, worst items and closure errors merge exactly; the medians
    come from the merged |r| sketches, which equal the whole run's sketch bucket for bucket.
    Each shard's baseline comparison is refused (its 4 samples are not the baseline's 8),
    so the shards exit 1: the gate of a sample-split run is the merged summary's."""
    runs = {
        "whole": _suite(tmp_path / "whole"),
        "first": _suite(tmp_path / "first", "--samples", "0-3"),
        "second": _suite(tmp_path / "second", "--samples", "4-7"),
    }
    procs, outputs = _run_all(runs)
    assert procs["whole"].returncode == 0, outputs["whole"][-3000:]
    for name in ("first", "second"):
        assert "cannot compare with baseline" in outputs[name], outputs[name][-3000:]
    shards = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("first", "second")]
    merged = merge_summaries(shards, ["first", "second"])
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert merged["totals"] == whole["totals"] and whole["totals"]["items"] == 16
    assert len(merged["settings"]["samples"]) == 2  # the shards' own selections
    for layer, want in whole["layers"].items():
        got = merged["layers"][layer]
        assert got["samples"] == want["samples"] == list(range(8))
        assert got["abs_r_sketch"] == want["abs_r_sketch"]  # exactly: bucket counts add
        for key in ("items", "passed", "failed", "worst_ratio", "worst_item", "max_closure_error"):
            assert got[key] == want[key], key
        for key in ("median_abs_r", "p99_abs_r", "delta_q", "delta_k"):
            assert got[key] == want[key], key
        # the target logits' moments are float sums in another order
        assert got["r_frac_of_logit_scale"] == pytest.approx(want["r_frac_of_logit_scale"])
        for shard in shards:  # each shard's own median is another number: a real merge
            assert shard["layers"][layer]["abs_r_sketch"]["count"] < want["abs_r_sketch"]["count"]


# --- merge rules on hand-made summaries ---------------------------------------------------------


def _summary(rows: dict, **settings) -> dict:
    return {
        "run": "r",
        "settings": {"layers": "all", "samples": "all", "artifacts_dir": "a", **settings},
        "totals": {},
        "layers": rows,
        "figures": {"paths": [], "left_out": 0},
    }


def _layer(items=4, failed=0, ratio=0.1, worst="L0-S0-Q3", median=0.2) -> dict:
    return {
        "items": items,
        "passed": items - failed,
        "failed": failed,
        "worst_ratio": ratio,
        "worst_item": worst,
        "max_closure_error": 1e-7,
        "median_abs_r": median,
        "p99_abs_r": 0.9,
        "r_frac_of_logit_scale": 0.03,
        "delta_q": 0.1,
        "delta_k": 0.1,
    }


def test_a_layer_split_across_shards_adds_counts_and_keeps_the_worst_item():
    first = {**_layer(items=4, ratio=0.1, worst="L0-S0-Q3"), "samples": [0, 1]}
    second = {**_layer(items=6, failed=1, ratio=0.3, worst="L0-S5-Q3"), "samples": [5, 6, 7]}
    for key in ("median_abs_r", "p99_abs_r", "r_frac_of_logit_scale", "delta_q", "delta_k"):
        second[key] = None  # the layer's quality test ran in the first shard only
    merged = merge_summaries(
        [_summary({"0": first}, layers="a"), _summary({"0": second}, layers="b")]
    )
    row = merged["layers"]["0"]
    assert (row["items"], row["passed"], row["failed"]) == (10, 9, 1)
    assert (row["worst_ratio"], row["worst_item"]) == (0.3, "L0-S5-Q3")
    assert row["median_abs_r"] == 0.2
    assert merged["totals"] == {"items": 10, "passed": 9, "failed": 1}
    assert merged["settings"]["layers"] == ["a", "b"]


def _sketched(values, samples, delta=0.1) -> dict:
    """A layer row of a shard whose quality test saw |r| = ``values``."""
    sk = QuantileSketch().add(values)
    moments = {"sum": float(np.sum(values)), "sumsq": float(np.sum(values**2)), "count": 100}
    return {
        **_layer(items=len(samples)),
        **residual_statistics(sk, moments),
        "delta_q": delta,
        "abs_r_sketch": sk.to_dict(),
        "logit_moments": moments,
        "samples": samples,
    }


def test_sample_shards_merge_their_sketches_into_the_whole_layers_statistics():
    rng = np.random.default_rng(0)
    x, y = rng.exponential(0.2, 5000), rng.exponential(0.5, 3000)  # other medians
    merged = merge_summaries(
        [_summary({"0": _sketched(x, [0, 1])}), _summary({"0": _sketched(y, [2])})]
    )["layers"]["0"]
    both = np.concatenate([x, y])
    whole = QuantileSketch().add(both)
    assert merged["abs_r_sketch"] == whole.to_dict()
    assert merged["median_abs_r"] == whole.quantile(0.5)
    exact = float(np.quantile(both, 0.5, method="lower"))
    assert merged["median_abs_r"] == pytest.approx(exact, rel=ALPHA)
    assert merged["logit_moments"]["count"] == 200 and merged["samples"] == [0, 1, 2]


def test_shards_of_other_weights_or_without_sketches_are_refused():
    rng = np.random.default_rng(1)
    a, b = _sketched(rng.random(10), [0]), _sketched(rng.random(10), [1], delta=0.2)
    with pytest.raises(MergeError, match=r"layer 0: delta_q is 0.1 in a.json but 0.2 in b.json"):
        merge_summaries([_summary({"0": a}), _summary({"0": b})], ["a.json", "b.json"])
    old_a, old_b = {**_layer(), "samples": [0]}, {**_layer(median=0.25), "samples": [1]}
    with pytest.raises(MergeError, match=r"layer 0: a.json and b.json both report .*older"):
        merge_summaries([_summary({"0": old_a}), _summary({"0": old_b})], ["a.json", "b.json"])


def test_overlapping_shards_are_refused_rather_than_counted_twice():
    a = _summary({"0": _layer()}, layers="0,1")
    b = _summary({"0": _layer(), "1": _layer()}, layers="all")
    with pytest.raises(MergeError, match=r"layer 0: a.json and b.json both validated it .*twice"):
        merge_summaries([a, b], ["a.json", "b.json"])


def test_shards_of_different_runs_or_settings_are_refused():
    a = _summary({"0": _layer()})
    with pytest.raises(MergeError, match="shards validate different runs"):
        merge_summaries([a, {**a, "run": "other"}])
    with pytest.raises(MergeError, match=r"shards differ in setting 'bound' .*'weight'.*'data'"):
        merge_summaries([_summary({"0": _layer()}, bound="weight"), _summary({}, bound="data")])
    with pytest.raises(MergeError, match="no shard summaries"):
        merge_summaries([])


def _items_only(items=128) -> dict:
    row = _layer(items=items)
    for key in ("median_abs_r", "p99_abs_r", "r_frac_of_logit_scale", "delta_q", "delta_k"):
        row[key] = None
    return row


def test_overlapping_item_only_shards_are_refused_not_double_counted():
    a = _summary({"0": _items_only()}, layers="0")
    b = _summary({"0": _items_only()}, layers="0")
    with pytest.raises(MergeError, match=r"layer 0: a.json and b.json both validated it .*twice"):
        merge_summaries([a, b], ["a.json", "b.json"])


def test_shards_sharing_a_sample_of_a_layer_are_refused():
    a = _summary({"0": {**_items_only(), "samples": [0, 1, 2]}}, layers="x")
    b = _summary({"0": {**_items_only(), "samples": [2, 3]}}, layers="y")
    with pytest.raises(
        MergeError, match=r"layer 0: a.json and b.json both validated samples \[2\]"
    ):
        merge_summaries([a, b], ["a.json", "b.json"])


def test_the_merge_command_exits_2_naming_the_overlap(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_summary({"0": _items_only()})))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qkcheck.merge",
            str(tmp_path / "a.json"),
            str(tmp_path / "b.json"),
            "-o",
            str(tmp_path / "m.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "layer 0:" in proc.stderr and "twice" in proc.stderr
    assert not (tmp_path / "m.json").exists()
