"""Run-level residual baselines: record, and compare one-sidedly.

A baseline is a small YAML file per (run, layer) under ``validation/baselines/<name>/``
holding the layer's residual statistics and Δ fractions. A new measurement fails against
it only where it is *worse* (larger) by more than a relative tolerance; being better never
fails. pytest-regressions decides when to record (``--force-regen``/``--regen-all``);
files are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from qkcheck.errors import ConfigError
from qkcheck.util import safe_name, write_atomic

#: metrics compared against a baseline (all "smaller is better")
GATED = ("median_abs_r", "p99_abs_r", "worst_ratio", "r_frac_of_logit_scale", "delta_q", "delta_k")
#: absolute slack so metrics that are ~0 do not fail on rounding
ABS_SLACK = 1e-6


def baseline_path(root: Path, name: str, layer: int) -> Path:
    return root / safe_name(name) / f"L{layer}.yml"


def dump(stats: Mapping[str, float], path: Path) -> None:
    text = yaml.safe_dump({k: float(stats[k]) for k in GATED if k in stats}, sort_keys=True)
    write_atomic(path, text)


def load(path: Path) -> dict[str, float]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: baseline is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: baseline must map metric names to numbers, got {data!r}")
    return {str(k): float(v) for k, v in data.items()}


def regressions(new: Mapping[str, float], old: Mapping[str, float], tolerance: float) -> list[str]:
    """Lines naming each gated metric that got worse than ``old·(1 + tolerance)``."""
    out = []
    for key in GATED:
        if key not in new or key not in old:
            continue
        limit = old[key] * (1 + tolerance) + ABS_SLACK
        if new[key] > limit:
            out.append(
                f"{key}: {new[key]:.4g} > baseline {old[key]:.4g} × (1 + {tolerance}) "
                f"(+{(new[key] / max(old[key], 1e-30) - 1) * 100:.0f} %)"
            )
    return out


def differs(new: Mapping[str, float], old: Mapping[str, float]) -> bool:
    """Whether a recorded baseline would change (for ``--force-regen``)."""
    keys = set(new) | set(old)
    return any(
        abs(new.get(k, float("nan")) - old.get(k, float("nan"))) > 0 or k not in old for k in keys
    )
