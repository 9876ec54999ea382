"""Run-level residual baselines: a strict file format with provenance, and the comparisons.

A baseline is one small YAML file per (run, layer), ``validation/baselines/<run>/L<layer>.yml``::

    qkcheck_baseline: 2                 # format version
    measured:                           # how the numbers were measured (provenance)
      run: s-qkdemo01                   # the run and checkpoint step they come from
      step: 600
      layer: 0                          # must equal the file name's layer
      samples: 16                       # number of samples ...
      samples_sha256: 3f…               # ... and samples_sha256() of their token ids
      query_positions: 0-63             # the query positions the statistics cover
      bound: weight                     # data | weight | budget <--delta-budget>
      norm: spectral                    # operator norm in B_weight
      dtype: float32                    # precision of the decomposition
      qkcheck: 0.1.0                    # version that measured them
    metrics:                            # the gated statistics, all "smaller is better"
      median_abs_r: 0.144
      …

Reading is strict: every key present, none unknown, each value of its type; metrics are
finite numbers ≥ 0 (not text, null, booleans or binary). Anything else is a
:class:`~qkcheck.errors.ConfigError` of one line naming the file and the key.

Comparing: statistics can only be compared when measured the same way —
:data:`MUST_MATCH` fields differ → :func:`incomparable` names each (refused, not a
regression). ``run``/``step`` differ by design (gating a new run against an accepted one);
another sample set of the same size is stated by :func:`notes`, not refused. A metric
regresses when ``new > old·(1 + tolerance) + ABS_SLACK``; better never fails. A recorded
value is unchanged when within :data:`RECORD_RTOL` relative (float32 rounding of the
residual, which cancels, moves medians by ~1e-6 between thread counts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qkcheck.errors import ConfigError
from qkcheck.util import safe_name, write_atomic

#: the file format written by :func:`dump` (``qkcheck_baseline:``)
FORMAT = 2
#: metrics compared against a baseline (all "smaller is better")
GATED = ("median_abs_r", "p99_abs_r", "worst_ratio", "r_frac_of_logit_scale", "delta_q", "delta_k")
#: absolute slack so metrics that are ~0 do not fail on rounding
ABS_SLACK = 1e-6
#: relative difference below which a re-recorded value counts as unchanged
RECORD_RTOL = 1e-4
#: provenance fields that must be equal for two measurements to be compared
MUST_MATCH = ("layer", "samples", "query_positions", "bound", "norm", "dtype")

_TOP = ("qkcheck_baseline", "measured", "metrics")
_SHA = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Provenance:
    """How a layer's statistics were measured (the ``measured:`` block)."""

    run: str
    step: int | None
    layer: int
    samples: int
    samples_sha256: str
    query_positions: str
    bound: str
    norm: str
    dtype: str
    qkcheck: str


@dataclass(frozen=True)
class Baseline:
    provenance: Provenance
    metrics: dict[str, float]


def baseline_path(root: Path, name: str, layer: int) -> Path:
    return root / safe_name(name) / f"L{layer}.yml"


# --- provenance of a measurement -------------------------------------------------------------


def samples_sha256(tokens) -> str:
    """sha256 of ``b"<n>x<T>:"`` followed by the token ids ``(n, T)`` as little-endian
    int64, row-major — the same ids in the same order give the same hash."""
    import numpy as np

    ids = np.ascontiguousarray(np.asarray(tokens.cpu() if hasattr(tokens, "cpu") else tokens))
    n, t = ids.shape
    return hashlib.sha256(f"{n}x{t}:".encode() + ids.astype("<i8").tobytes()).hexdigest()


def positions_text(positions) -> str:
    """Query positions as compact ranges: ``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    out: list[str] = []
    ps = sorted(set(positions))
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}-{ps[j]}")
        i = j + 1
    return ",".join(out)


def bound_text(bound: str, delta_budget: float) -> str:
    """``--bound`` as recorded: the budget bound depends on ``--delta-budget`` too."""
    return f"budget {delta_budget:g}" if bound == "budget" else bound


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("qkcheck")
    except PackageNotFoundError:
        return "unknown"


# --- files -----------------------------------------------------------------------------------


def dump(b: Baseline, path: Path) -> None:
    """Write ``b`` (its gated metrics only) atomically."""
    data = {
        "qkcheck_baseline": FORMAT,
        "measured": dataclasses.asdict(b.provenance),
        "metrics": {k: float(b.metrics[k]) for k in GATED},
    }
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def load(path: Path, layer: int | None = None) -> Baseline:
    """Read and check a baseline file (for ``layer``, when given); any defect is a
    one-line :class:`ConfigError` naming ``path`` and the key."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; a baseline is YAML") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the baseline: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None
    return parse(data, path, layer)


def parse(data: Any, path: Path, layer: int | None = None) -> Baseline:
    """A loaded YAML document → :class:`Baseline` (see the module docstring)."""
    if isinstance(data, Mapping) and data and set(map(str, data)) <= set(GATED):
        raise ConfigError(
            f"{path}: a baseline in the old format, without how it was measured; re-record it: "
            f"pytest validation/ --run-id <run> --force-regen"
        )
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path}: top level: expected a mapping with keys {', '.join(_TOP)}, got {_show(data)}"
        )
    _keys(data, _TOP, path, "")
    if data["qkcheck_baseline"] != FORMAT or isinstance(data["qkcheck_baseline"], bool):
        raise ConfigError(
            f"{path}: qkcheck_baseline: format {_show(data['qkcheck_baseline'])} is not the "
            f"one this qkcheck reads ({FORMAT}); re-record it with --force-regen"
        )
    measured = data["measured"]
    if not isinstance(measured, Mapping):
        raise ConfigError(f"{path}: measured: expected a mapping, got {_show(measured)}")
    fields = [f.name for f in dataclasses.fields(Provenance)]
    _keys(measured, fields, path, "measured.")

    def text(key: str) -> str:
        v = measured[key]
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{path}: measured.{key}: expected text, got {_show(v)}")
        return v

    def integer(key: str, lo: int, *, null: bool = False) -> int | None:
        v = measured[key]
        if v is None and null:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            what = f"an integer ≥ {lo}" + (" or null" if null else "")
            raise ConfigError(f"{path}: measured.{key}: expected {what}, got {_show(v)}")
        return v

    sha = text("samples_sha256")
    if not _SHA.fullmatch(sha):
        raise ConfigError(
            f"{path}: measured.samples_sha256: expected 64 hex digits, got {_show(sha)}"
        )
    prov = Provenance(
        run=text("run"),
        step=integer("step", 0, null=True),
        layer=integer("layer", 0),  # type: ignore[arg-type]
        samples=integer("samples", 1),  # type: ignore[arg-type]
        samples_sha256=sha,
        query_positions=text("query_positions"),
        bound=text("bound"),
        norm=text("norm"),
        dtype=text("dtype"),
        qkcheck=text("qkcheck"),
    )
    if layer is not None and prov.layer != layer:
        raise ConfigError(
            f"{path}: measured.layer: {prov.layer}, but the file is layer {layer}'s (L{layer}.yml)"
        )
    metrics = data["metrics"]
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"{path}: metrics: expected a mapping, got {_show(metrics)}")
    _keys(metrics, GATED, path, "metrics.")
    out: dict[str, float] = {}
    for key in GATED:
        v = metrics[key]
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if not ok:
            raise ConfigError(
                f"{path}: metrics.{key}: expected a finite number ≥ 0, got {_show(v)}"
            )
        out[key] = float(v)
    return Baseline(prov, out)


def _keys(data: Mapping, expected, path: Path, prefix: str) -> None:
    for key in expected:
        if key not in data:
            raise ConfigError(f"{path}: {prefix}{key}: missing")
    for key in data:
        if key not in expected:
            raise ConfigError(
                f"{path}: {prefix}{key}: unknown key (expected {', '.join(expected)})"
            )


def _show(v: Any) -> str:
    """A value for a one-line message: its repr, short, with its YAML-level kind."""
    if v is None:
        return "null"
    if isinstance(v, bytes):
        return f"binary data ({len(v)} bytes)"
    if isinstance(v, float) and math.isnan(v):
        return ".nan"
    text = repr(v).replace("\n", " ")
    return text if len(text) <= 40 else text[:39] + "…"


# --- comparisons -----------------------------------------------------------------------------


def incomparable(here: Provenance, there: Provenance) -> list[str]:
    """One line per :data:`MUST_MATCH` field measured differently (empty: comparable)."""
    return [
        f"{key}: {getattr(here, key)} here, {getattr(there, key)} in the baseline"
        for key in MUST_MATCH
        if getattr(here, key) != getattr(there, key)
    ]


def notes(here: Provenance, there: Provenance) -> list[str]:
    """What differs without preventing the comparison, to state in the gate's output."""
    out = []
    if here.samples_sha256 != there.samples_sha256:
        out.append(
            f"measured on other samples (sha256 {here.samples_sha256[:12]}… here, "
            f"{there.samples_sha256[:12]}… in the baseline)"
        )
    return out


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


def changed(new: Mapping[str, float], old: Mapping[str, float]) -> list[str]:
    """Lines naming each gated metric whose re-recorded value moved by more than
    :data:`RECORD_RTOL` (relative; ``1e-12`` absolute near zero)."""
    return [
        f"{key}: {old[key]:.6g} → {new[key]:.6g}"
        for key in GATED
        if key in new
        and key in old
        and not math.isclose(new[key], old[key], rel_tol=RECORD_RTOL, abs_tol=1e-12)
    ]
