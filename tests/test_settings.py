"""Option parsing: every bad value names the option and what it takes.

The defaults come from the one option table (:data:`qkcheck.options.OPTIONS`); a
recording parser checks that the plugin registers exactly that table.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from qkcheck import pytest_plugin
from qkcheck.options import DEFAULTS, OPTIONS
from qkcheck.settings import (
    MAX_INDEX,
    OptionError,
    Selection,
    Settings,
    parse_indices,
    parse_query_pos,
    parse_samples,
    parse_settings,
    torch_threads,
)


class _Recorder:
    """Stands in for pytest's parser and option group: records each option's definition."""

    def __init__(self) -> None:
        self.options: dict[str, dict[str, Any]] = {}

    def getgroup(self, *_args: Any, **_kw: Any) -> _Recorder:
        return self

    def addoption(self, name: str, **kw: Any) -> None:
        self.options[kw["dest"]] = {"name": name, **kw}


def plugin_options() -> dict[str, dict[str, Any]]:
    recorder = _Recorder()
    pytest_plugin.pytest_addoption(recorder)  # type: ignore[arg-type]
    return recorder.options


def test_the_plugin_registers_every_option_of_the_table_with_its_default():
    registered = plugin_options()
    assert list(registered) == [o.dest for o in OPTIONS]
    for o in OPTIONS:
        assert (registered[o.dest]["name"], registered[o.dest]["default"]) == (o.flag, o.default)
        assert o.help in registered[o.dest]["help"]


def settings(**changes):
    values = {**DEFAULTS, "qk_run_id": "demo", **changes}
    return parse_settings(values.__getitem__)


# options that only decide how a baseline is recorded: the gate reads them, not Settings
GATE_OPTIONS = {"qk_record_partial"}


def test_the_plugin_defines_every_option_settings_reads():
    read: list[str] = []
    parse_settings(lambda dest: read.append(dest) or {**DEFAULTS, "qk_run_id": "demo"}[dest])
    assert set(read) == set(DEFAULTS) - GATE_OPTIONS
    assert not set(read) & GATE_OPTIONS


@pytest.mark.parametrize("dest", sorted(GATE_OPTIONS))
def test_the_gate_reads_its_own_options(dest):
    """An option Settings does not read must be read by the gate, or it is dead."""
    from qkcheck import gate

    read: list[str] = []

    class Config:
        def getoption(self, name, default=None):
            read.append(name)
            return {"qk_record_partial": True}.get(name, default)

    with pytest.raises(pytest.UsageError, match="--record-partial"):
        gate.check_options(Config())  # type: ignore[arg-type]
    assert dest in read


@pytest.mark.parametrize("option", [o for o in OPTIONS if not o.gate_only], ids=lambda o: o.flag)
def test_parsing_the_table_defaults_gives_the_settings_defaults(option):
    """What a user gets typing nothing equals what ``Settings(run_id=…)`` holds."""
    parsed, plain = settings(), Settings(run_id="demo")
    assert getattr(parsed, option.field) == getattr(plain, option.field)
    assert getattr(parsed, option.field) is not None or option.default is None


def test_the_selection_defaults_mean_everything():
    s = settings()
    for sel in (s.samples, s.layers, s.query_pos):
        assert sel.resolve(7, "x", "--x") == list(range(7))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("qk_mode", "dense", r"--mode: 'dense' is not one of weighted, binary"),
        ("qk_plots", "maybe", r"--plots: 'maybe' is not one of none, failed, worst, all"),
        ("qk_bound", "tight", r"--bound: 'tight' is not one of data, weight, budget"),
        ("qk_dtype", "float16", r"--dtype: 'float16' is not one of float32, float64"),
        ("qk_top_n", "0", r"--top-n: '0' must be >= 1"),
        ("qk_top_n", "many", r"--top-n: 'many' is not an integer"),
        ("qk_top_n", "³", r"--top-n: '³' is not an integer"),
        ("qk_top_n", "1e3", r"--top-n: '1e3' is not an integer"),
        ("qk_top_n", "9" * 5000, r"--top-n: '9{39}…' is too large"),
        ("qk_ci_threshold", "1.5", r"--ci-threshold: '1.5' must be in \[0.0, 1.0\]"),
        ("qk_samples", "1,x", r"--samples: '1,x' is not a list of indices"),
        ("qk_query_pos", "5-2", r"--query-pos: '5-2' is not a list of indices"),
        ("qk_device", "tpu", r"--device: 'tpu' is not cpu or cuda"),
        ("qk_threads", "0", r"--qk-threads: '0' must be >= 1"),
        ("qk_threads", "all", r"--qk-threads: 'all' is not an integer"),
    ],
)
def test_a_bad_option_value_names_the_option_and_what_it_takes(option, value, message):
    with pytest.raises(OptionError, match=message):
        settings(**{option: value})


FLOAT_OPTIONS = [dest for dest, d in DEFAULTS.items() if isinstance(d, float)]


def test_every_float_option_is_found():
    assert {"qk_ci_threshold", "qk_delta_budget", "qk_residual_budget", "qk_gate_tolerance"} <= set(
        FLOAT_OPTIONS
    )


@pytest.mark.parametrize("dest", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999"])
def test_nan_and_inf_are_refused_for_every_float_option(dest, value):
    name = plugin_options()[dest]["name"]
    with pytest.raises(OptionError, match=rf"^{name}: '{value}' is not a finite number$"):
        settings(**{dest: value})


@pytest.mark.parametrize("option", ["qk_samples", "qk_layers", "qk_query_pos"])
@pytest.mark.parametrize(
    "value", ["³", "٣", "1,²", "0-³", "١-٣", "½", "--1", "1-2-3", "", ",", " ", "0x10", "1_0"]
)
def test_non_ascii_digits_and_junk_are_refused_not_crashed_on(option, value):
    with pytest.raises(OptionError, match=r"is not a list of indices|count must be at least 1"):
        settings(**{option: value})


def test_a_negative_index_is_named():
    with pytest.raises(OptionError, match=r"--layers: '-1' has a negative index"):
        settings(qk_layers="-1")


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("qk_query_pos", "0-20000000", "20000000"),
        ("qk_samples", "5,0-999999999999", "999999999999"),
        ("qk_layers", "1-" + "9" * 5000, "9" * 12 + "…"),
    ],
)
def test_huge_ranges_are_refused_at_once_naming_the_valid_range(option, value, shown):
    start = time.perf_counter()
    with pytest.raises(OptionError) as info:
        settings(**{option: value})
    assert time.perf_counter() - start < 0.5  # no range was expanded
    message = str(info.value)
    assert f"index {shown} in " in message
    assert f"indices must lie in [0, {MAX_INDEX}]" in message
    assert len(message) < 200


def test_a_huge_count_is_refused():
    with pytest.raises(
        OptionError, match=rf"--samples: count 9+… is too large; .*\[1, {MAX_INDEX}"
    ):
        settings(qk_samples="9" * 5000)


def test_out_of_range_indices_are_summarised_not_listed():
    sel = parse_query_pos("0-99999")
    with pytest.raises(OptionError) as info:
        sel.resolve(64, "query positions", "--query-pos")
    assert str(info.value) == (
        "--query-pos: query positions [64, 65, 66, …, 99999] (99936 indices) out of range; "
        "this run has 64 query positions (0..63)"
    )


def test_samples_are_a_count_or_indices_and_ranges():
    assert parse_samples("3") == Selection(count=3)
    assert parse_samples(" 0 , 4-6,4") == Selection(indices=(0, 4, 5, 6))
    assert parse_samples("all").resolve(5, "samples", "--samples") == [0, 1, 2, 3, 4]
    assert parse_indices("007,1", "--x") == (7, 1)


def test_selections_out_of_range_say_what_the_run_has():
    with pytest.raises(OptionError, match=r"--samples: samples \[9\] out of range; this run has 4"):
        parse_samples("1,9").resolve(4, "samples", "--samples")
    with pytest.raises(OptionError, match="asked for 10 samples, the run has 4"):
        parse_samples("10").resolve(4, "samples", "--samples")
    assert parse_query_pos("last").resolve(64, "query positions", "--query-pos") == [63]


def test_threads_are_as_given_or_the_idle_cores_or_the_workers_share(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert settings(qk_threads="3").threads == 3 and torch_threads(3) == 3
    assert settings().threads == "auto"
    assert torch_threads("auto", workers=3) == 2  # 8 cores over 3 xdist workers
    assert torch_threads("auto", workers=16) == 1
    for load, idle in ((0.0, 8), (2.4, 6), (6.6, 1), (30.0, 1)):
        monkeypatch.setattr("os.getloadavg", lambda load=load: (load, load, load))
        assert torch_threads("auto") == idle, load
