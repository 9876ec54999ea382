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

import pytest

from qkcheck.merge import MergeError, merge_summaries

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


def _comparable(summary: dict) -> dict:
    """A summary without what legitimately differs between shards and a whole run."""
    out = copy.deepcopy(summary)
    del out["settings"]
    out["figures"]["paths"] = []
    return out


def test_two_layer_shards_merge_into_the_single_run_summary(tmp_path):
    env = {**os.environ, "SPD_OUT_DIR": str(GENUINE_OUT)}
    runs = {
        "whole": _suite(tmp_path / "whole"),
        "shard0": _suite(tmp_path / "shard0", "--layers", "0"),
        "shard1": _suite(tmp_path / "shard1", "--layers", "1"),
    }
    procs = {
        name: subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, cmd in runs.items()
    }
    outputs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
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


def test_shards_with_different_medians_for_one_layer_are_refused():
    a = _summary({"0": _layer(median=0.2)})
    b = _summary({"0": _layer(median=0.25)})
    with pytest.raises(MergeError, match=r"layer 0: median_abs_r is 0.2 in a.json but 0.25 in "):
        merge_summaries([a, b], ["a.json", "b.json"])


def test_overlapping_shards_are_refused_rather_than_counted_twice():
    a = _summary({"0": _layer()}, layers="0,1")
    b = _summary({"0": _layer(), "1": _layer()}, layers="all")
    with pytest.raises(MergeError, match=r"layer 0: a.json and b.json both report .* overlap"):
        merge_summaries([a, b], ["a.json", "b.json"])


def test_shards_of_different_runs_or_settings_are_refused():
    a = _summary({"0": _layer()})
    with pytest.raises(MergeError, match="shards validate different runs"):
        merge_summaries([a, {**a, "run": "other"}])
    with pytest.raises(MergeError, match=r"shards differ in setting 'samples' .*'all'.*'0-9'"):
        merge_summaries([a, _summary({"1": _layer()}, samples="0-9")])
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
