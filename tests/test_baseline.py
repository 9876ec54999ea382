"""Baselines compare one-sidedly: worse beyond the tolerance fails, better never does."""

from __future__ import annotations

import pytest

from qkcheck import baseline
from qkcheck.errors import ConfigError

OLD = {"median_abs_r": 0.1, "p99_abs_r": 0.5, "worst_ratio": 0.1, "delta_q": 0.1}


def test_a_better_run_passes_and_a_worse_one_names_each_worsened_metric():
    better = {k: v / 2 for k, v in OLD.items()}
    assert baseline.regressions(better, OLD, 0.25) == []
    within = {**OLD, "median_abs_r": 0.12}
    assert baseline.regressions(within, OLD, 0.25) == []
    worse = {**OLD, "median_abs_r": 0.2, "delta_q": 0.5}
    lines = baseline.regressions(worse, OLD, 0.25)
    assert [line.split(":")[0] for line in lines] == ["median_abs_r", "delta_q"]
    assert "+100 %" in lines[0]


def test_baselines_round_trip_atomically_with_only_gated_metrics(tmp_path):
    path = baseline.baseline_path(tmp_path, "run/with:odd chars", 2)
    baseline.dump({**OLD, "max_closure_error": 1e-7}, path)
    assert path.name == "L2.yml" and path.parent.name == "run-with-odd-chars"
    assert baseline.load(path) == OLD
    assert [p.name for p in path.parent.iterdir()] == ["L2.yml"]  # no temporary left


def test_a_malformed_baseline_names_the_file(tmp_path):
    path = tmp_path / "L0.yml"
    path.write_text("median_abs_r: [1,\n")
    with pytest.raises(ConfigError, match=r"L0.yml: baseline is not valid YAML"):
        baseline.load(path)
