"""Baselines: a file format that carries how its numbers were measured, read strictly,
compared one-sidedly (worse beyond the tolerance fails, better never does) and only
between statistics measured the same way."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import yaml

from qkcheck import baseline
from qkcheck.errors import ConfigError

OLD = {
    "median_abs_r": 0.1,
    "p99_abs_r": 0.5,
    "worst_ratio": 0.1,
    "r_frac_of_logit_scale": 0.03,
    "delta_q": 0.1,
    "delta_k": 0.12,
}


def how(**changes) -> baseline.Provenance:
    fields = dict(
        run="s-accepted",
        step=400,
        layer=0,
        samples=16,
        samples_sha256="ab" * 32,
        query_positions="0-63",
        bound="weight",
        norm="spectral",
        dtype="float32",
        qkcheck="0.1.0",
    )
    return baseline.Provenance(**{**fields, **changes})


def valid() -> dict:
    return {
        "qkcheck_baseline": baseline.FORMAT,
        "measured": {
            "run": "s-accepted",
            "step": 400,
            "layer": 0,
            "samples": 16,
            "samples_sha256": "ab" * 32,
            "query_positions": "0-63",
            "bound": "weight",
            "norm": "spectral",
            "dtype": "float32",
            "qkcheck": "0.1.0",
        },
        "metrics": dict(OLD),
    }


def test_a_better_run_passes_and_a_worse_one_names_each_worsened_metric():
    better = {k: v / 2 for k, v in OLD.items()}
    assert baseline.regressions(better, OLD, 0.25) == []
    within = {**OLD, "median_abs_r": 0.12}
    assert baseline.regressions(within, OLD, 0.25) == []
    worse = {**OLD, "median_abs_r": 0.2, "delta_q": 0.5}
    lines = baseline.regressions(worse, OLD, 0.25)
    assert [line.split(":")[0] for line in lines] == ["median_abs_r", "delta_q"]
    assert "+100 %" in lines[0]


def test_a_baseline_round_trips_with_its_provenance_atomically(tmp_path):
    path = baseline.baseline_path(tmp_path, "run/with:odd chars", 0)
    baseline.dump(baseline.Baseline(how(), {**OLD, "max_closure_error": 1e-7}), path)
    assert path.name == "L0.yml" and path.parent.name == "run-with-odd-chars"
    loaded = baseline.load(path)
    assert loaded.provenance == how()
    assert loaded.metrics == OLD  # only the gated metrics, exactly (floats round-trip)
    assert [p.name for p in path.parent.iterdir()] == ["L0.yml"]  # no temporary left
    assert yaml.safe_load(path.read_text()) == valid()


def _drop(d: dict, *keys: str) -> dict:
    *outer, last = keys
    for k in outer:
        d = d[k]
    del d[last]


def _set(value, *keys: str):
    def mutate(d: dict) -> None:
        *outer, last = keys
        for k in outer:
            d = d[k]
        d[last] = value

    return mutate


def _text(text: str):
    return text


# (case id, how the valid baseline is broken, the key the one-line message must name)
MALFORMED = [
    ("string metric", _set("abc", "metrics", "median_abs_r"), "metrics.median_abs_r"),
    ("null metric", _set(None, "metrics", "p99_abs_r"), "metrics.p99_abs_r"),
    ("binary metric", _set(b"\x00\x01", "metrics", "worst_ratio"), "metrics.worst_ratio"),
    ("nan metric", _set(math.nan, "metrics", "delta_q"), "metrics.delta_q"),
    ("inf metric", _set(math.inf, "metrics", "delta_k"), "metrics.delta_k"),
    ("negative metric", _set(-0.1, "metrics", "median_abs_r"), "metrics.median_abs_r"),
    (
        "bool metric",
        _set(True, "metrics", "r_frac_of_logit_scale"),
        "metrics.r_frac_of_logit_scale",
    ),
    ("list metric", _set([0.1], "metrics", "median_abs_r"), "metrics.median_abs_r"),
    ("missing metric", lambda d: _drop(d, "metrics", "p99_abs_r"), "metrics.p99_abs_r"),
    ("unknown metric", _set(0.1, "metrics", "mean_abs_r"), "metrics.mean_abs_r"),
    ("metrics not a mapping", _set([1, 2], "metrics"), "metrics"),
    ("missing metrics", lambda d: _drop(d, "metrics"), "metrics"),
    ("missing measured", lambda d: _drop(d, "measured"), "measured"),
    ("unknown top-level key", _set(1, "comment"), "comment"),
    ("unknown format", _set(99, "qkcheck_baseline"), "qkcheck_baseline"),
    ("missing format", lambda d: _drop(d, "qkcheck_baseline"), "qkcheck_baseline"),
    ("missing bound", lambda d: _drop(d, "measured", "bound"), "measured.bound"),
    ("null bound", _set(None, "measured", "bound"), "measured.bound"),
    ("numeric norm", _set(2, "measured", "norm"), "measured.norm"),
    ("text sample count", _set("sixteen", "measured", "samples"), "measured.samples"),
    ("zero sample count", _set(0, "measured", "samples"), "measured.samples"),
    ("bad sample hash", _set("xyz", "measured", "samples_sha256"), "measured.samples_sha256"),
    ("float layer", _set(0.5, "measured", "layer"), "measured.layer"),
    ("wrong layer", _set(3, "measured", "layer"), "measured.layer"),
    ("text step", _set("last", "measured", "step"), "measured.step"),
    ("unknown measured key", _set("x", "measured", "seed"), "measured.seed"),
    ("measured not a mapping", _set("weight", "measured"), "measured"),
]
RAW = [
    ("a list", "- 0.1\n- 0.2\n", "top level"),
    ("a scalar", "0.1\n", "top level"),
    ("empty", "", "top level"),
    ("not YAML", "metrics: [1,\n", "not valid YAML"),
    ("binary file", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a UTF-8 text file"),
    ("old format", yaml.safe_dump(OLD), "re-record it"),
]


@pytest.mark.parametrize(
    ("mutate", "key"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_baseline_fails_with_one_line_naming_the_file_and_key(tmp_path, mutate, key):
    data = copy.deepcopy(valid())
    mutate(data)
    path = tmp_path / "L0.yml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        baseline.load(path, layer=0)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: ") or message.startswith(f"{path}: {key} ")


@pytest.mark.parametrize(("content", "what"), [c[1:] for c in RAW], ids=[c[0] for c in RAW])
def test_a_baseline_that_is_not_a_baseline_mapping_fails_with_one_line(tmp_path, content, what):
    path = tmp_path / "L0.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        baseline.load(path, layer=0)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and what in message


def test_the_valid_baseline_used_above_loads(tmp_path):
    path = tmp_path / "L0.yml"
    path.write_text(yaml.safe_dump(valid()))
    assert baseline.load(path, layer=0).metrics == OLD


def test_statistics_measured_differently_are_named_and_run_and_step_are_not():
    assert baseline.incomparable(how(), how()) == []
    other_run = how(run="s-new", step=100)
    assert baseline.incomparable(other_run, how()) == []
    differs = how(bound="data", samples=1, query_positions="0-31")
    lines = baseline.incomparable(differs, how())
    assert lines == [
        "samples: 1 here, 16 in the baseline",
        "query_positions: 0-31 here, 0-63 in the baseline",
        "bound: data here, weight in the baseline",
    ]
    for field, value in (("norm", "frobenius"), ("dtype", "float64"), ("layer", 1)):
        changed = how(**{field: value})
        assert [line.split(":")[0] for line in baseline.incomparable(changed, how())] == [field]


def test_another_sample_set_of_the_same_size_is_stated_not_refused():
    other = how(samples_sha256="cd" * 32)
    assert baseline.incomparable(other, how()) == []
    (note,) = baseline.notes(other, how())
    assert re.fullmatch(
        r"measured on other samples \(sha256 cdcdcdcdcdcd… here, abababababab… in "
        r"the baseline\)",
        note,
    )
    assert baseline.notes(how(), how()) == []


def test_recorded_values_are_unchanged_within_a_float_tolerance():
    assert baseline.changed(OLD, OLD) == []
    jitter = {k: v * (1 + 1e-9) + 1e-12 for k, v in OLD.items()}
    assert baseline.changed(jitter, OLD) == []
    moved = {**OLD, "median_abs_r": 0.11}
    assert baseline.changed(moved, OLD) == ["median_abs_r: 0.1 → 0.11"]


def test_the_sample_hash_is_sha256_of_little_endian_int64_ids_with_their_shape():
    import hashlib

    import numpy as np
    import torch

    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    expected = hashlib.sha256(b"2x3:" + np.array([1, 2, 3, 4, 5, 6], "<i8").tobytes()).hexdigest()
    assert baseline.samples_sha256(ids) == expected
    assert baseline.samples_sha256(ids.flip(0)) != expected


def test_old_baselines_path_is_unchanged(tmp_path: Path):
    assert baseline.baseline_path(tmp_path, "s-1", 3) == tmp_path / "s-1" / "L3.yml"
