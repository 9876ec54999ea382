"""Option parsing: every bad value names the option and what it takes."""

from __future__ import annotations

import pytest

from qkcheck.settings import (
    OptionError,
    Selection,
    parse_query_pos,
    parse_samples,
    parse_settings,
)

DEFAULTS = {
    "qk_run_id": "demo",
    "qk_samples": "all",
    "qk_samples_file": None,
    "qk_layers": "all",
    "qk_query_pos": "all",
    "qk_mode": "weighted",
    "qk_ci_threshold": 0.1,
    "qk_top_n": 8,
    "qk_plots": "failed",
    "qk_max_plots": 20,
    "qk_artifacts_dir": None,
    "qk_device": "cpu",
    "qk_dtype": "float32",
    "qk_bound": "weight",
    "qk_norm": "spectral",
    "qk_delta_budget": 0.25,
    "qk_residual_budget": 0.2,
    "qk_gate_tolerance": 0.25,
    "qk_baseline": None,
    "qk_batch_size": 4,
    "qk_doc_ids": None,
    "qk_doc_sep": None,
}


def settings(**changes):
    values = {**DEFAULTS, **changes}
    return parse_settings(values.__getitem__)


def test_defaults_parse():
    s = settings()
    assert (s.mode, s.bound, s.plots, s.top_n) == ("weighted", "weight", "failed", 8)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("qk_mode", "dense", r"--mode: 'dense' is not one of weighted, binary"),
        ("qk_plots", "maybe", r"--plots: 'maybe' is not one of none, failed, all"),
        ("qk_bound", "tight", r"--bound: 'tight' is not one of data, weight, budget"),
        ("qk_dtype", "float16", r"--dtype: 'float16' is not one of float32, float64"),
        ("qk_top_n", "0", r"--top-n: '0' must be >= 1"),
        ("qk_top_n", "many", r"--top-n: 'many' is not a int"),
        ("qk_ci_threshold", "1.5", r"--ci-threshold: '1.5' must be in \[0.0, 1.0\]"),
        ("qk_samples", "1,x", r"--samples: '1,x' is not a list of indices"),
        ("qk_query_pos", "5-2", r"--query-pos: '5-2' is not a list of indices"),
        ("qk_device", "tpu", r"--device: 'tpu' is not cpu or cuda"),
    ],
)
def test_a_bad_option_value_names_the_option_and_what_it_takes(option, value, message):
    with pytest.raises(OptionError, match=message):
        settings(**{option: value})


def test_samples_are_a_count_or_indices_and_ranges():
    assert parse_samples("3") == Selection(count=3)
    assert parse_samples("0,4-6,4") == Selection(indices=(0, 4, 5, 6))
    assert parse_samples("all").resolve(5, "samples", "--samples") == [0, 1, 2, 3, 4]


def test_selections_out_of_range_say_what_the_run_has():
    with pytest.raises(OptionError, match=r"--samples: samples \[9\] out of range; this run has 4"):
        parse_samples("1,9").resolve(4, "samples", "--samples")
    with pytest.raises(OptionError, match="asked for 10 samples, the run has 4"):
        parse_samples("10").resolve(4, "samples", "--samples")
    assert parse_query_pos("last").resolve(64, "query positions", "--query-pos") == [63]
