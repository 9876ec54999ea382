"""A mergeable quantile sketch of non-negative values (DDSketch's log-bucket histogram).

The run-level statistics (median and 99th percentile of |r| over every head and causal
(i, j) of a layer) used to keep every |r| — 240 MiB at the reference scale. A
:class:`QuantileSketch` keeps one count per logarithmic bucket instead: value ``x > 0``
falls in bucket ``k = ⌈log_γ x⌉`` (``γ = (1 + α)/(1 − α)``), i.e. ``γ^(k−1) < x ≤ γ^k``,
and the bucket reports ``2γ^k/(γ + 1)``, which is within relative error ``α`` of every
value in it. Hence the guarantee (Masson, Rim & Lee, *DDSketch*, VLDB 2019):

    quantile(q) is within relative error α (default 0.5 %) of the exact order statistic
    of rank ⌊q·(n − 1)⌋ (numpy's ``method="lower"``).

Count, minimum and maximum are exact; ``quantile(1.0)`` is the exact maximum. Values at or
below :data:`ZERO` count as 0 (a bucket of their own). Sketches of disjoint parts
:meth:`merge` into exactly the sketch of the whole (bucket counts add), in any order — what
lets shards split by samples merge their medians (``python -m qkcheck.merge``). Size: one
integer per occupied bucket, about 230 per decade of values at α = 0.5 %.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

#: default relative accuracy of :meth:`QuantileSketch.quantile`
ALPHA = 0.005
#: values at or below this count as zero
ZERO = 1e-30
#: where :meth:`QuantileSketch.add` puts them while bucketing: a key below any value > ZERO
_BELOW_ZERO = 1e-33


class QuantileSketch:
    """Counts of non-negative values in logarithmic buckets of relative width ``alpha``."""

    def __init__(self, alpha: float = ALPHA) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self._log_gamma = math.log((1 + alpha) / (1 - alpha))
        self.buckets: dict[int, int] = {}
        self.zeros = 0
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def add(self, values: Any) -> QuantileSketch:
        """Count every value of ``values`` (array-like, ≥ 0, finite); returns ``self``. A
        torch tensor is bucketed where it lies (a GPU's values never cross to the host:
        only the occupied buckets' counts do), in float64 as an array is."""
        torch = sys.modules.get("torch")  # a tensor implies torch is imported: never import it
        if torch is not None and isinstance(values, torch.Tensor):
            return self._add_counts(values.detach().reshape(-1).double(), torch)
        return self._add_counts(np.asarray(values, dtype=np.float64).reshape(-1), np)

    def _add_counts(self, x, xp) -> QuantileSketch:
        """:meth:`add` for a flat float64 array of module ``xp`` (numpy or torch): every
        value's bucket key in one pass, values at or below :data:`ZERO` sent to a key of
        their own below every positive value's (no boolean gather), then one bincount."""
        n = int(x.shape[0])
        if not n:
            return self
        lo_value, hi_value = float(x.min()), float(x.max())
        if not (lo_value >= 0 and hi_value < math.inf):  # NaN fails both comparisons
            raise ValueError("QuantileSketch takes finite values ≥ 0")
        zero_key = math.ceil(math.log(_BELOW_ZERO) / self._log_gamma)
        keys = xp.ceil(xp.log(xp.where(x > ZERO, x, _BELOW_ZERO)) / self._log_gamma)
        keys = keys.astype(np.int64) if xp is np else keys.long()
        lo = min(int(keys.min()), zero_key)
        counts = xp.bincount(keys - lo)
        occupied = xp.flatnonzero(counts) if xp is np else counts.nonzero()[:, 0]
        for k, c in zip(occupied.tolist(), counts[occupied].tolist(), strict=True):
            if k + lo == zero_key:
                self.zeros += int(c)
            else:
                self.buckets[k + lo] = self.buckets.get(k + lo, 0) + int(c)
        self.count += n
        self.min = min(self.min, lo_value)
        self.max = max(self.max, hi_value)
        return self

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Add ``other``'s counts (same ``alpha``); returns ``self``."""
        if other.alpha != self.alpha:
            raise ValueError(f"cannot merge sketches of alpha {self.alpha} and {other.alpha}")
        for k, c in other.buckets.items():
            self.buckets[k] = self.buckets.get(k, 0) + c
        self.zeros += other.zeros
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def quantile(self, q: float) -> float:
        """The value of rank ``⌊q·(n − 1)⌋`` within relative error ``alpha``."""
        if not self.count:
            raise ValueError("quantile of an empty sketch")
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q}")
        rank = math.floor(q * (self.count - 1))
        if rank == self.count - 1:
            return self.max
        if rank < self.zeros:
            return 0.0 if self.min <= ZERO else self.min
        seen = self.zeros
        gamma = math.exp(self._log_gamma)
        for k in sorted(self.buckets):
            seen += self.buckets[k]
            if seen > rank:
                value = 2 * math.exp(k * self._log_gamma) / (gamma + 1)
                return min(max(value, self.min), self.max)
        return self.max  # unreachable: the counts sum to count

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form: ``{"alpha", "count", "zeros", "min", "max", "offset", "counts"}``
        with ``counts[i]`` the count of bucket ``offset + i``."""
        if self.buckets:
            lo, hi = min(self.buckets), max(self.buckets)
            counts = [self.buckets.get(k, 0) for k in range(lo, hi + 1)]
        else:
            lo, counts = 0, []
        return {
            "alpha": self.alpha,
            "count": self.count,
            "zeros": self.zeros,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "offset": lo,
            "counts": counts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantileSketch:
        out = cls(float(data["alpha"]))
        out.buckets = {int(data["offset"]) + i: int(c) for i, c in enumerate(data["counts"]) if c}
        out.zeros, out.count = int(data["zeros"]), int(data["count"])
        if out.count:
            out.min, out.max = float(data["min"]), float(data["max"])
        if out.zeros + sum(out.buckets.values()) != out.count:
            raise ValueError("sketch counts do not add up to its count")
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantileSketch) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        n = len(self.buckets)
        return f"QuantileSketch(alpha={self.alpha}, count={self.count}, buckets={n})"


def residual_statistics(sketch: QuantileSketch, moments: Mapping[str, float]) -> dict[str, float]:
    """``median_abs_r``, ``p99_abs_r`` and ``r_frac_of_logit_scale`` from a |r| sketch and the
    target logits' moments (``sum``, ``sumsq``, ``count``): the layer statistics of
    :mod:`qkcheck.validate`, recomputed by :mod:`qkcheck.merge` from merged shards."""
    n = moments["count"]
    mean = moments["sum"] / n
    var = max(moments["sumsq"] / n - mean**2, 0.0)
    median = sketch.quantile(0.5)
    return {
        "median_abs_r": median,
        "p99_abs_r": sketch.quantile(0.99),
        "r_frac_of_logit_scale": median / max(var**0.5, 1e-30),
    }
