"""The quantile sketch behind the run-level |r| statistics: its stated error, exact counts
and extremes, and merging that equals sketching the union."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qkcheck.sketch import ALPHA, QuantileSketch

QS = (0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0)


def _data(seed: int, n: int = 20_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # |r|-like: heavy-tailed over many decades, with exact zeros
    x = np.abs(rng.standard_cauchy(n)) * 10.0 ** rng.uniform(-8, 1, n)
    x[:50] = 0.0
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantiles_are_within_the_stated_relative_error(seed):
    x = _data(seed)
    sk = QuantileSketch().add(x)
    assert sk.count == x.size and sk.min == x.min() and sk.max == x.max()
    errors = []
    for q in QS:
        exact = float(np.quantile(x, q, method="lower"))
        got = sk.quantile(q)
        errors.append(abs(got - exact) / exact if exact else abs(got))
    assert max(errors) <= ALPHA * (1 + 1e-9)
    assert max(errors) > ALPHA / 100  # buckets, not the exact values (a test of the test)
    assert sk.quantile(1.0) == x.max()


def test_merging_parts_equals_sketching_the_whole_in_any_order():
    x = _data(3)
    parts = np.array_split(x, 5)
    whole = QuantileSketch().add(x)
    forward, backward = QuantileSketch(), QuantileSketch()
    for p in parts:
        forward.merge(QuantileSketch().add(p))
    for p in reversed(parts):
        backward.merge(QuantileSketch().add(p))
    assert forward == whole and backward == whole
    assert [forward.quantile(q) for q in QS] == [whole.quantile(q) for q in QS]


def test_the_dict_form_round_trips_through_json_and_is_checked():
    sk = QuantileSketch().add(_data(4))
    back = QuantileSketch.from_dict(json.loads(json.dumps(sk.to_dict())))
    assert back == sk and back.quantile(0.5) == sk.quantile(0.5)
    assert len(sk.to_dict()["counts"]) < 5000  # small: buckets, not values
    bad = {**sk.to_dict(), "count": sk.count + 1}
    with pytest.raises(ValueError, match="do not add up"):
        QuantileSketch.from_dict(bad)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="finite values ≥ 0"):
        QuantileSketch().add([1.0, -2.0])
    with pytest.raises(ValueError, match="finite values ≥ 0"):
        QuantileSketch().add([np.nan])
    with pytest.raises(ValueError, match="empty"):
        QuantileSketch().quantile(0.5)
    with pytest.raises(ValueError, match="cannot merge"):
        QuantileSketch(0.01).merge(QuantileSketch(0.02))


def test_a_tensor_is_bucketed_as_its_array_is():
    """The validator hands |r| over as a tensor (bucketed where it lies): same sketch."""
    import torch

    rng = np.random.default_rng(3)
    x = (np.abs(rng.standard_normal(5000)) * 10.0 ** rng.integers(-9, 4, 5000)).astype(np.float32)
    x[:7] = 0
    a, b = QuantileSketch().add(x), QuantileSketch().add(torch.from_numpy(x))
    assert (
        a == b and a.buckets == b.buckets and (a.zeros, a.count) == (b.zeros, b.count) == (7, 5000)
    )
    assert (a.min, a.max) == (b.min, b.max)
    with pytest.raises(ValueError, match="finite"):
        QuantileSketch().add(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="finite"):
        QuantileSketch().add(torch.tensor([-1.0]))
