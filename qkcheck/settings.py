"""Validation settings: what to check and how, parsed from command-line strings.

Parsing is separate from pytest so it can be tested plainly; every bad value raises
:class:`OptionError` naming the option, the value and what it takes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from qkcheck.errors import QKCheckError


class OptionError(QKCheckError):
    """A validation option has a value it does not take."""


Mode = Literal["weighted", "binary"]
Bound = Literal["data", "weight", "budget"]
Plots = Literal["none", "failed", "worst", "all"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Selection:
    """A count (first N), explicit indices, or everything (``None`` for both)."""

    count: int | None = None
    indices: tuple[int, ...] | None = None
    last: bool = False

    def resolve(self, n: int, what: str, option: str) -> list[int]:
        """Concrete indices out of ``n`` available; out-of-range → OptionError."""
        if self.last:
            return [n - 1]
        if self.indices is not None:
            bad = [i for i in self.indices if not 0 <= i < n]
            if bad:
                shown = bad if len(bad) <= 5 else [*bad[:3], "…", bad[-1]]
                listed = f"[{', '.join(map(str, shown))}]" + (
                    f" ({len(bad)} indices)" if len(bad) > 5 else ""
                )
                raise OptionError(
                    f"{option}: {what} {listed} out of range; this run has {n} {what} (0..{n - 1})"
                )
            return list(self.indices)
        if self.count is not None:
            if self.count > n:
                raise OptionError(f"{option}: asked for {self.count} {what}, the run has {n}")
            return list(range(self.count))
        return list(range(n))


@dataclass(frozen=True)
class Settings:
    run_id: str
    samples: Selection = Selection()
    samples_file: Path | None = None
    layers: Selection = Selection()
    query_pos: Selection = Selection()
    mode: Mode = "weighted"
    ci_threshold: float = 0.1
    top_n: int = 8
    plots: Plots = "failed"
    max_plots: int = 20
    #: pairs per head in pairs_L<l>.json (the dataset-level view); 0: not written
    dataset_top_k: int = 0
    artifacts_dir: Path | None = None
    device: str = "cpu"
    dtype: str = "float32"
    bound: Bound = "weight"
    norm: Literal["spectral", "frobenius"] = "spectral"
    delta_budget: float = 0.25
    residual_budget: float = 0.2
    gate_tolerance: float = 0.25
    baseline: str | None = None
    batch_size: int = 4
    doc_ids: Path | None = None
    doc_sep: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def artifacts_for(self, run_name: str) -> Path:
        return self.artifacts_dir or Path("qk-artifacts") / run_name


#: the most indices one selection may name (a range beyond any run's size is a typo; the
#: run's real size is checked later by :meth:`Selection.resolve`)
MAX_INDEX = 1_000_000
#: an index list, its parts split at commas: ``3`` or ``0-7`` with ASCII digits only
_PART = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")


def parse_indices(text: str, option: str) -> tuple[int, ...]:
    """``"3"``, ``"0,2,5"`` or ranges ``"0-7,12"`` → indices, in order, without repeats.

    Only ASCII digits count (``int`` and ``str.isdigit`` accept ``'³'`` or ``'٣'``);
    indices above :data:`MAX_INDEX` are refused before any range is expanded.
    """
    bounds: list[tuple[int, int]] = []
    for raw in text.split(","):
        part = raw.strip()
        m = _PART.match(part)
        if m is None:
            if part.startswith("-") and _PART.match(part[1:]):
                raise OptionError(f"{option}: {text!r} has a negative index")
            raise OptionError(
                f"{option}: {_short(text)!r} is not a list of indices; expected e.g. 3, 0,2,5 "
                "or 0-7"
            )
        lo = _bounded_int(m.group(1))
        hi = _bounded_int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise OptionError(
                f"{option}: {text!r} is not a list of indices; expected e.g. 3, 0,2,5 or 0-7 "
                f"(range {part} runs backwards)"
            )
        if hi > MAX_INDEX:
            digits = m.group(m.lastindex or 1).lstrip("0")
            shown = digits if len(digits) <= 12 else f"{digits[:12]}…"
            raise OptionError(
                f"{option}: index {shown} in {_short(text)!r} is too large; indices must lie in "
                f"[0, {MAX_INDEX}] (and within the run)"
            )
        bounds.append((lo, hi))
    out: dict[int, None] = {}
    for lo, hi in bounds:
        out.update(dict.fromkeys(range(lo, hi + 1)))
    return tuple(out)


def _bounded_int(digits: str) -> int:
    """ASCII digits as an int, capped just above :data:`MAX_INDEX` (so a 5000-digit index
    neither hits Python's int-parsing limit nor expands a range)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else 10 * MAX_INDEX + 1


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def parse_samples(text: str | None) -> Selection:
    """``--samples``: a count ``N`` (first N samples) or indices ``i,j,k`` / ``a-b``."""
    if text is None or text == "all":
        return Selection()
    if text.isascii() and text.isdigit():
        count = _bounded_int(text)
        if count < 1:
            raise OptionError("--samples: count must be at least 1")
        if count > MAX_INDEX:
            raise OptionError(
                f"--samples: count {_short(text)} is too large; it must lie in [1, {MAX_INDEX}]"
            )
        return Selection(count=count)
    return Selection(indices=parse_indices(text, "--samples"))


def parse_layers(text: str | None) -> Selection:
    if text is None or text == "all":
        return Selection()
    return Selection(indices=parse_indices(text, "--layers"))


def parse_query_pos(text: str | None) -> Selection:
    if text is None or text == "all":
        return Selection()
    if text == "last":
        return Selection(last=True)
    return Selection(indices=parse_indices(text, "--query-pos"))


def choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise OptionError(f"{option}: {value!r} is not one of {', '.join(allowed)}")
    return value


def number(option: str, value: str | float, kind: type, lo: float, hi: float | None = None):
    """``value`` as ``kind`` (int or float) in ``[lo, hi]``; NaN and ±inf are never a value
    (every comparison with NaN is False, so a NaN budget or tolerance would pass anything)."""
    name = "an integer" if kind is int else "a number"
    text = value.strip() if isinstance(value, str) else value
    if kind is int and isinstance(text, str):
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise OptionError(f"{option}: {_short(text)!r} is not {name}")
        if len(text.lstrip("+-").lstrip("0")) > 9:
            raise OptionError(f"{option}: {_short(text)!r} is too large")
    try:
        x = kind(text)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(f"{option}: {_short(str(value))!r} is not {name}") from None
    if isinstance(x, float) and not math.isfinite(x):
        raise OptionError(f"{option}: {value!r} is not a finite number")
    if x < lo or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise OptionError(f"{option}: {value!r} must be {rng}")
    return x


def parse_settings(opt) -> Settings:
    """Build :class:`Settings` from ``opt(name) -> raw value`` (pytest's getoption)."""
    device = opt("qk_device")
    if device != "cpu" and not device.startswith("cuda"):
        raise OptionError(f"--device: {device!r} is not cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device: {device!r} asked for, but torch sees no CUDA device")
    samples_file = opt("qk_samples_file")
    artifacts = opt("qk_artifacts_dir")
    return Settings(
        run_id=opt("qk_run_id"),
        samples=parse_samples(opt("qk_samples")),
        samples_file=Path(samples_file) if samples_file else None,
        layers=parse_layers(opt("qk_layers")),
        query_pos=parse_query_pos(opt("qk_query_pos")),
        mode=choice("--mode", opt("qk_mode"), ("weighted", "binary")),  # type: ignore[arg-type]
        ci_threshold=number("--ci-threshold", opt("qk_ci_threshold"), float, 0.0, 1.0),
        top_n=number("--top-n", opt("qk_top_n"), int, 1),
        plots=choice("--plots", opt("qk_plots"), ("none", "failed", "worst", "all")),  # type: ignore[arg-type]
        max_plots=number("--max-plots", opt("qk_max_plots"), int, 0),
        dataset_top_k=number("--dataset-top-k", opt("qk_dataset_top_k"), int, 0),
        artifacts_dir=Path(artifacts) if artifacts else None,
        device=device,
        dtype=choice("--dtype", opt("qk_dtype"), tuple(DTYPES)),
        bound=choice("--bound", opt("qk_bound"), ("data", "weight", "budget")),  # type: ignore[arg-type]
        norm=choice("--norm", opt("qk_norm"), ("spectral", "frobenius")),  # type: ignore[arg-type]
        delta_budget=number("--delta-budget", opt("qk_delta_budget"), float, 0.0),
        residual_budget=number("--residual-budget", opt("qk_residual_budget"), float, 0.0),
        gate_tolerance=number("--gate-tolerance", opt("qk_gate_tolerance"), float, 0.0),
        baseline=opt("qk_baseline"),
        batch_size=number("--qk-batch-size", opt("qk_batch_size"), int, 1),
        **_documents(opt),
    )


def _documents(opt) -> dict:
    """``--doc-ids FILE`` / ``--doc-sep TOKEN_ID`` (at most one)."""
    ids, sep = opt("qk_doc_ids"), opt("qk_doc_sep")
    if ids and sep is not None:
        raise OptionError("--doc-ids and --doc-sep: give one way to mark documents, not both")
    return {
        "doc_ids": Path(ids) if ids else None,
        "doc_sep": None if sep is None else number("--doc-sep", sep, int, 0),
    }
