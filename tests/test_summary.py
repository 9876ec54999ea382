"""summary.json tells the truth: complete or not and why, gate failures, and the same
verdict as pytest's exit status — after a clean run, a failing gate, -x, Ctrl-C, SIGTERM,
an internal error, or a hard kill (never the previous run's summary next to new figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pytester_suite import VALIDATION, make_suite, run, summary_path

pytest_plugins = ["pytester"]

suite = pytest.fixture(make_suite, name="suite")

#: one (layer, sample) group: 2 items, 2 Δ-budget tests and 1 residual test
SMALL = ("--layers", "0", "--samples", "1", "--query-pos", "3,4")
LAST_ITEM = "[L0-S0-Q4]"


def _hook(suite: pytest.Pytester, body: str) -> None:
    """The validation conftest plus a hook that misbehaves after item L0-S0-Q3."""
    suite.makeconftest((VALIDATION / "conftest.py").read_text() + "\n\n" + body)


def _summary(suite: pytest.Pytester) -> dict:
    return json.loads(summary_path(suite).read_text())


def test_a_clean_run_is_complete_and_passed(suite):
    result = run(suite, *SMALL)
    result.assert_outcomes(passed=4, skipped=1)
    s = _summary(suite)
    assert (s["complete"], s["passed"], s["exit_status"]) == (True, True, 0)
    assert s["reason"] is None
    assert s["gate"] == {"passed": 2, "failed": 0, "skipped": 1, "failures": [], "notes": []}
    assert s["tests"] == {"passed": 4, "failed": 0, "errors": 0, "skipped": 1}
    assert s["totals"] == {"items": 2, "passed": 2, "failed": 0}


def test_a_failing_quality_gate_is_recorded_and_agrees_with_the_exit_status(suite):
    result = run(suite, *SMALL, "--residual-budget", "0")
    result.assert_outcomes(passed=4, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    s = _summary(suite)
    assert (s["complete"], s["passed"], s["exit_status"]) == (True, False, 1)
    assert s["totals"]["failed"] == 0  # every item passed: the gate is what failed
    assert (s["gate"]["passed"], s["gate"]["failed"]) == (2, 1)
    (failure,) = s["gate"]["failures"]
    assert failure["test"].endswith(
        "test_residuals_are_within_budget_and_no_worse_than_the_baseline[L0]"
    )
    assert "above the budget 0.0 (--residual-budget)" in failure["message"]


def test_stopping_at_the_first_failure_is_not_complete(suite):
    result = run(suite, *SMALL, "--residual-budget", "0", "--delta-budget", "0", "-x")
    result.assert_outcomes(passed=2, failed=1)
    s = _summary(suite)
    assert (s["complete"], s["passed"], s["exit_status"]) == (False, False, result.ret)
    assert "stopping after 1 failures" in s["reason"]


def test_ctrl_c_leaves_an_incomplete_summary_saying_so(suite):
    _hook(
        suite,
        "def pytest_runtest_teardown(item):\n"
        f"    if item.nodeid.endswith({LAST_ITEM[:-2] + '3]'!r}):\n"
        "        raise KeyboardInterrupt\n",
    )
    result = run(suite, *SMALL)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    s = _summary(suite)
    assert (s["complete"], s["passed"], s["exit_status"]) == (False, False, 2)
    assert s["reason"].startswith("interrupted: KeyboardInterrupt")
    assert s["totals"]["items"] == 1


def test_sigterm_is_an_interruption_with_a_summary_saying_so(suite):
    _hook(
        suite,
        "import os, signal\n\n"
        "def pytest_runtest_teardown(item):\n"
        f"    if item.nodeid.endswith({LAST_ITEM[:-2] + '3]'!r}):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n",
    )
    result = run(suite, *SMALL)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    s = _summary(suite)
    assert (s["complete"], s["passed"], s["exit_status"]) == (False, False, 2)
    assert s["reason"].startswith("interrupted: SIGTERM")
    assert "Traceback" not in result.stderr.str()


def test_an_internal_error_leaves_an_incomplete_summary_saying_so(suite):
    _hook(
        suite,
        "def pytest_runtest_logreport(report):\n"
        f"    if report.when == 'teardown' and report.nodeid.endswith({LAST_ITEM!r}):\n"
        "        raise RuntimeError('boom')\n",
    )
    result = run(suite, *SMALL)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    s = _summary(suite)
    assert (s["complete"], s["passed"], s["exit_status"]) == (False, False, 3)
    assert s["reason"] == "internal error: RuntimeError: boom"


def test_a_killed_run_never_leaves_the_previous_summary_next_to_new_figures(suite):
    art = suite.path / "art"
    art.mkdir()
    stale = {"run": "s-5eed0002", "complete": True, "passed": True, "exit_status": 0}
    (art / "summary.json").write_text(json.dumps(stale))
    _hook(
        suite,
        "import os, signal\n\n"
        "def pytest_runtest_teardown(item):\n"
        f"    if item.nodeid.endswith({LAST_ITEM!r}):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    result = run(suite, *SMALL, "--plots", "all")
    assert result.ret == -9
    assert not list(art.rglob("*.png"))  # figures are drawn at session end: none here ...
    s = _summary(suite)  # ... and the summary is not the stale one
    assert s != stale
    assert (s["complete"], s["passed"]) == (False, False)
    assert s["reason"].startswith("did not finish")


def test_the_dataset_view_is_written_for_a_complete_session_and_listed(suite):
    """--dataset-top-k writes pairs_L<l>.json/.png over exactly the session's selection
    (query rows 3 and 4 of sample 0: 4 + 5 attended keys per head) and lists them."""
    result = run(suite, *SMALL, "--dataset-top-k", "3")
    result.assert_outcomes(passed=4, skipped=1)
    s = _summary(suite)
    paths = [Path(p) for p in s["dataset_view"]["paths"]]
    assert sorted(p.name for p in paths) == ["pairs_L0.json", "pairs_L0.png"]
    view = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    assert (view["layer"], view["samples"], view["entries"]) == (0, [0], 9)
    assert all(len(h["pairs"]) == 3 for h in view["heads"])
    assert "dataset view: 2 files in" in result.stdout.str()
    # off by default: nothing written, nothing listed
    run(suite, *SMALL)
    assert "dataset_view" not in _summary(suite)
