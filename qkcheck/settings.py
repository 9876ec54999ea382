"""Validation settings: what to check and how, parsed from command-line strings.

Parsing is separate from pytest so it can be tested plainly; every bad value raises
:class:`OptionError` naming the option, the value and what it takes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qkcheck.errors import QKCheckError
from qkcheck.options import BY_FIELD, OPTIONS, Option


class OptionError(QKCheckError):
    """A validation option has a value it does not take."""


Mode = Literal["weighted", "binary"]
Bound = Literal["data", "weight", "budget"]
Plots = Literal["none", "failed", "worst", "all"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
assert tuple(DTYPES) == BY_FIELD["dtype"].choices


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


def parse_value(option: Option, value: Any) -> Any:
    """One option's raw value (as typed, or its default) → the Settings field's value."""
    kind, flag = option.kind, option.flag
    if kind == "samples":
        return parse_samples(value)
    if kind == "layers":
        return parse_layers(value)
    if kind == "query_pos":
        return parse_query_pos(value)
    if kind == "choice":
        return choice(flag, value, option.choices)
    if kind in ("int", "float"):
        if value is None:
            return None
        lo = option.lo if option.lo is not None else -math.inf
        return number(flag, value, int if kind == "int" else float, lo, option.hi)
    if kind == "path":
        return Path(value) if value else None
    if kind == "device":
        if value != "cpu" and not value.startswith("cuda"):
            raise OptionError(f"{flag}: {value!r} is not cpu or cuda[:N]")
        return value
    if kind == "threads":
        return "auto" if value == "auto" else number(flag, value, int, 1)
    return value


def torch_threads(setting: int | str, workers: int | None = None) -> int:
    """The torch CPU thread count for ``--qk-threads``: N as given; ``auto``: under
    pytest-xdist the cores divided among the ``workers``, else the cores idle at start (the
    1-minute load average subtracted, at least 1). A validation group is ~60 elementwise
    passes: a thread waiting for a core another process holds stalls every pass (measured on
    2 shared cores: 2.5× the CPU time of one thread), while on idle cores two threads save
    about a third."""
    if setting != "auto":
        return int(setting)
    cores = os.cpu_count() or 1
    if workers:
        return max(1, cores // workers)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # not on Windows
    return max(1, min(cores, int(cores - load + 0.5)))


def parse_settings(opt) -> Settings:
    """Build :class:`Settings` from ``opt(dest) -> raw value`` (pytest's getoption), every
    option of :data:`qkcheck.options.OPTIONS` but the gate's own."""
    values = {o.field: parse_value(o, opt(o.dest)) for o in OPTIONS if not o.gate_only}
    device = values["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device: {device!r} asked for, but torch sees no CUDA device")
    if values["doc_ids"] is not None and values["doc_sep"] is not None:
        raise OptionError("--doc-ids and --doc-sep: give one way to mark documents, not both")
    return Settings(**values)


def _default(name: str) -> Any:
    """A Settings field's default: its option's default, parsed."""
    return parse_value(BY_FIELD[name], BY_FIELD[name].default)


@dataclass(frozen=True)
class Settings:
    """What to validate and how; one field per option (:data:`qkcheck.options.OPTIONS`,
    defaults from there)."""

    run_id: str
    samples: Selection = _default("samples")
    samples_file: Path | None = _default("samples_file")
    layers: Selection = _default("layers")
    query_pos: Selection = _default("query_pos")
    mode: Mode = _default("mode")
    ci_threshold: float = _default("ci_threshold")
    top_n: int = _default("top_n")
    plots: Plots = _default("plots")
    max_plots: int = _default("max_plots")
    #: the validation figure gets a row per head with softmax(target) and softmax(sum)
    show_attention: bool = _default("show_attention")
    #: pairs per head in pairs_L<l>.json (the dataset-level view); 0: not written
    dataset_top_k: int = _default("dataset_top_k")
    artifacts_dir: Path | None = _default("artifacts_dir")
    device: str = _default("device")
    dtype: str = _default("dtype")
    #: MiB of per-entry working memory per (layer, sample) group (qkcheck.chunks)
    chunk_mib: float = _default("chunk_mib")
    bound: Bound = _default("bound")
    norm: Literal["spectral", "frobenius"] = _default("norm")
    delta_budget: float = _default("delta_budget")
    residual_budget: float = _default("residual_budget")
    gate_tolerance: float = _default("gate_tolerance")
    baseline: str | None = _default("baseline")
    batch_size: int = _default("batch_size")
    #: "auto" or a count (:func:`torch_threads`)
    threads: int | str = _default("threads")
    doc_ids: Path | None = _default("doc_ids")
    doc_sep: int | None = _default("doc_sep")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def artifacts_for(self, run_name: str) -> Path:
        return self.artifacts_dir or Path("qk-artifacts") / run_name
