"""The pytest wiring, run as a user would: usage errors, headers, artifacts, baselines."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import GENUINE, GENUINE_RUN_ID

pytest_plugins = ["pytester"]

VALIDATION = Path(__file__).parents[1] / "validation"
TOKENS = str(GENUINE / "reference" / "tokens.pt")


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """validation/ copied into a pytester directory, with the genuine run on SPD_OUT_DIR."""
    pytester.makeconftest((VALIDATION / "conftest.py").read_text())
    for name in ("test_items.py", "test_quality.py"):
        shutil.copy(VALIDATION / name, pytester.path / name)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p no:randomly\n")
    pytester._monkeypatch.setenv("SPD_OUT_DIR", str(GENUINE / "spd_out"))
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    return suite.runpytest_subprocess(
        "--run-id",
        GENUINE_RUN_ID,
        "--samples-file",
        TOKENS,
        "--artifacts-dir",
        str(suite.path / "art"),
        *args,
    )


def test_the_suite_without_a_run_gives_a_one_line_usage_message(suite):
    result = suite.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.lines[0].startswith("ERROR: validation/ needs a run: pytest validation/")
    assert "Traceback" not in result.stderr.str()


def test_a_bad_run_or_option_is_a_usage_error_naming_it(suite):
    result = suite.runpytest_subprocess("--run-id", "s-00000000")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "cannot find SPD run goodfire/spd/runs/s-00000000. Tried:" in result.stderr.str()
    result = run(suite, "--query-pos", "70")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--query-pos: query positions [70] out of range; this run has 64" in result.stderr.str()


def test_items_are_ids_by_layer_sample_and_query_and_the_header_shows_the_settings(suite):
    result = run(suite, "--collect-only", "-q", "--samples", "2", "--layers", "1")
    ids = re.findall(r"\[(L\d+-S\d+-Q\d+)\]", result.stdout.str())
    assert ids[:3] == ["L1-S0-Q0", "L1-S0-Q1", "L1-S0-Q2"] and len(ids) == 2 * 64
    header = run(suite, "--collect-only", "--samples", "2").stdout.str()
    assert "qkcheck: run s-5eed0002 · samples first 2 · layers all" in header


def test_figures_of_selected_items_are_attached_to_the_junit_xml(suite):
    xml = suite.path / "out.xml"
    result = run(
        suite,
        "--plots",
        "all",
        "--max-plots",
        "2",
        "--layers",
        "0",
        "--samples",
        "1",
        "--query-pos",
        "3,4,5",
        "-k",
        "test_items",
        f"--junitxml={xml}",
        "-o",
        "junit_logging=system-out",
    )
    result.assert_outcomes(passed=3)
    attached = re.findall(r"\[\[ATTACHMENT\|(.+?)\]\]", xml.read_text())
    assert len(attached) == 4 and all(Path(p).is_file() for p in attached)
    summary = json.loads((suite.path / "art" / "summary.json").read_text())
    assert summary["figures"]["left_out"] == 1
    assert sorted(summary["figures"]["paths"]) == sorted(
        str(Path(p).relative_to(suite.path)) if not Path(p).is_absolute() else p
        for p in summary["figures"]["paths"]
    )


def test_a_baseline_is_recorded_then_gates_one_sidedly(suite):
    args = ("-k", "test_quality", "--query-pos", "last")
    first = run(suite, *args, "-rs")
    first.assert_outcomes(passed=4, skipped=2)
    assert "gated by budgets only — record one with --force-regen" in first.stdout.str()
    run(suite, *args, "--regen-all").assert_outcomes(passed=6)
    recorded = suite.path / "baselines" / GENUINE_RUN_ID / "L0.yml"
    stats = yaml.safe_load(recorded.read_text())
    assert set(stats) >= {"median_abs_r", "p99_abs_r", "worst_ratio", "delta_q", "delta_k"}

    # against a baseline that was much better, this run is worse: layer 0's gate fails
    recorded.write_text(yaml.safe_dump({k: v / 2 for k, v in stats.items()}))
    # and a named baseline that lacks layer 0 is an error for that layer
    other = suite.path / "baselines" / "accepted" / "L1.yml"
    other.parent.mkdir()
    shutil.copy(suite.path / "baselines" / GENUINE_RUN_ID / "L1.yml", other)
    own = run(suite, *args)
    own.assert_outcomes(passed=5, failed=1)
    assert "layer 0 is worse than baseline s-5eed0002" in own.stdout.str()
    named = run(suite, *args, "--baseline", "accepted")
    named.assert_outcomes(passed=5, failed=1)
    assert "--baseline accepted: no baseline for layer 0" in named.stdout.str()
