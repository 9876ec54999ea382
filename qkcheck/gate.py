"""The baseline policy of a session — record, skip, compare or fail — in one place.

Structured like pytest-regressions' fixtures: the ``qk_baseline`` fixture returns a
:class:`BaselineGate`, and a test calls ``qk_baseline.check(layer, stats)`` once its own
budgets passed. Unlike ``perform_regression_check``, nothing else decides what is written:

* recording (``--force-regen`` or ``--regen-all``) only ever writes this run's own
  baseline; with ``--baseline NAME`` it is refused at configure time (see
  :func:`check_options`), as is recording from a selection of samples or layers without
  ``--record-partial``. A re-recorded layer measured the same way whose metrics are
  unchanged within :data:`~qkcheck.baseline.RECORD_RTOL` is left as it is (no churn);
  otherwise it is written atomically and, with ``--force-regen``, the test fails saying so;
* no baseline file: this run's own → skip (gated by the budgets alone); ``--baseline NAME``
  → fail;
* a malformed file → fail with its one-line message;
* measured differently (:data:`~qkcheck.baseline.MUST_MATCH`) → fail naming each difference;
  another sample set of the same size is compared and stated;
* a metric worse than the baseline by more than ``--gate-tolerance`` → fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import pytest

from qkcheck import baseline as bl
from qkcheck.errors import ConfigError

Mode = Literal["compare", "record", "force"]


def recording_flag(config: pytest.Config) -> str | None:
    """``--force-regen`` or ``--regen-all`` when given (pytest-regressions' options)."""
    if config.getoption("force_regen", default=False):
        return "--force-regen"
    if config.getoption("regen_all", default=False):
        return "--regen-all"
    return None


def check_options(config: pytest.Config) -> None:
    """Option combinations refused before any test runs (raises ``pytest.UsageError``)."""
    flag = recording_flag(config)
    name = config.getoption("qk_baseline", default=None)
    if flag and name:
        raise pytest.UsageError(
            f"--baseline {name} with {flag}: recording only ever writes this run's own baseline "
            f"(validation/baselines/<run>/), never {name}'s; drop --baseline to record this "
            f"run's, or drop {flag} to gate against {name}"
        )
    if config.getoption("qk_record_partial", default=False) and not flag:
        raise pytest.UsageError(
            "--record-partial: only applies when recording a baseline (--force-regen or "
            "--regen-all)"
        )


def check_selection(config: pytest.Config, validator) -> None:
    """Recording from a selection of samples or layers needs ``--record-partial``."""
    flag = recording_flag(config)
    if not flag or config.getoption("qk_record_partial", default=False):
        return
    s = validator.settings
    chosen = []
    if s.samples.count is not None or s.samples.indices is not None or s.samples.last:
        chosen.append(f"--samples {config.getoption('qk_samples')}")
    if validator.layers != list(range(len(validator.run.layers))):
        chosen.append(f"--layers {config.getoption('qk_layers')}")
    if chosen:
        raise pytest.UsageError(
            f"{flag}: recording a baseline from a selection ({', '.join(chosen)}) needs "
            f"--record-partial; a baseline normally covers every sample and layer of the run"
        )


class Measured:
    """The provenance of this session's measurements, per layer (hash computed once)."""

    def __init__(self, validator) -> None:
        s = validator.settings
        self._base = bl.Provenance(
            run=validator.run.name,
            step=validator.run.step,
            layer=-1,
            samples=len(validator.sample_ids),
            samples_sha256=bl.samples_sha256(validator.tokens),
            # layer statistics cover every query position of the selected samples
            query_positions=bl.positions_text(range(validator.tokens.shape[1])),
            bound=bl.bound_text(s.bound, s.delta_budget),
            norm=s.norm,
            dtype=s.dtype,
            qkcheck=bl.version(),
        )

    def __call__(self, layer: int) -> bl.Provenance:
        return dataclasses.replace(self._base, layer=layer)


class BaselineGate:
    """Compare (or record) one layer's statistics against the stored baseline."""

    def __init__(
        self,
        root: Path,
        name: str,
        own: bool,
        mode: Mode,
        tolerance: float,
        measured: Callable[[int], bl.Provenance],
        record: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.root, self.name, self.own, self.mode = root, name, own, mode
        self.tolerance, self.measured = tolerance, measured
        self._record = record or (lambda kind, data: None)

    def path(self, layer: int) -> Path:
        return bl.baseline_path(self.root, self.name, layer)

    def check(self, layer: int, stats: Mapping[str, float]) -> None:
        """Record, skip, pass or fail (``pytest.fail``/``pytest.skip``) — see the module."""
        __tracebackhide__ = True
        if self.mode != "compare":
            if not self.own:  # check_options refuses this before any test runs
                raise AssertionError("recording is only ever for this run's own baseline")
            return self._record_layer(layer, stats)
        path = self.path(layer)
        if not path.is_file():
            self._note(layer, "missing", [])
            if self.own:
                pytest.skip(
                    f"no baseline for run {self.name} layer {layer} ({path}); gated by budgets "
                    f"only — record one with --force-regen"
                )
            pytest.fail(f"--baseline {self.name}: no baseline for layer {layer} at {path}")
        try:
            old, bad = bl.load(path, layer), None
        except ConfigError as e:
            old, bad = None, str(e)
        if old is None:
            self._note(layer, "malformed", [bad])
            pytest.fail(bad, pytrace=False)
        here = self.measured(layer)
        differs = bl.incomparable(here, old.provenance)
        if differs:
            self._note(layer, "incomparable", differs)
            pytest.fail(
                f"layer {layer}: cannot compare with baseline {self.name}: measured differently "
                f"({path}): {'; '.join(differs)} — run with the baseline's settings, or record "
                f"a baseline measured like this run",
                pytrace=False,
            )
        notes = bl.notes(here, old.provenance)
        worse = bl.regressions(stats, old.metrics, self.tolerance)
        self._note(layer, "worse" if worse else "compared", notes)
        if worse:
            pytest.fail(
                f"layer {layer} is worse than baseline {self.name} ({old.provenance.run} step "
                f"{old.provenance.step}, {path}):\n" + "\n".join(worse + notes),
                pytrace=False,
            )

    def _record_layer(self, layer: int, stats: Mapping[str, float]) -> None:
        __tracebackhide__ = True
        path, here = self.path(layer), self.measured(layer)
        missing = [k for k in bl.GATED if k not in stats]
        if missing:
            raise AssertionError(f"layer {layer}: statistics lack {', '.join(missing)}")
        new = bl.Baseline(here, {k: float(stats[k]) for k in bl.GATED})
        what: list[str]
        try:
            old = bl.load(path, layer) if path.is_file() else None
        except ConfigError as e:
            old, what = None, [f"replaced a malformed baseline ({e})"]
        else:
            what = ["created"] if old is None else []
        if old is not None:
            same_how = dataclasses.replace(old.provenance, qkcheck=here.qkcheck) == here
            what = [] if same_how else [f"measured: {d}" for d in _provenance_changes(here, old)]
            what += bl.changed(new.metrics, old.metrics)
            if not what:
                self._note(layer, "unchanged", [])
                return
        bl.dump(new, path)
        self._note(layer, "recorded", what)
        if self.mode == "force":
            pytest.fail(
                f"baseline {path} recorded ({'; '.join(what)}); --force-regen fails the tests "
                f"it records, --regen-all passes them",
                pytrace=False,
            )

    def _note(self, layer: int, outcome: str, notes: list[str]) -> None:
        self._record(
            "baseline",
            {"layer": layer, "baseline": self.name, "outcome": outcome, "notes": notes},
        )


def _provenance_changes(here: bl.Provenance, old: bl.Baseline) -> list[str]:
    was = old.provenance
    return [
        f"{f.name} {getattr(was, f.name)} → {getattr(here, f.name)}"
        for f in dataclasses.fields(bl.Provenance)
        if f.name != "qkcheck" and getattr(was, f.name) != getattr(here, f.name)
    ]
