"""The validation suite as a user runs it, inside a pytester directory: a test module
defines ``suite = pytest.fixture(make_suite)`` and calls :func:`run`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import GENUINE, GENUINE_RUN_ID

VALIDATION = Path(__file__).parents[1] / "validation"
TOKENS = str(GENUINE / "reference" / "tokens.pt")


def make_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """validation/ copied into a pytester directory, with the genuine run on SPD_OUT_DIR."""
    pytester.makeconftest((VALIDATION / "conftest.py").read_text())
    for name in ("test_items.py", "test_quality.py"):
        shutil.copy(VALIDATION / name, pytester.path / name)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p no:randomly\n")
    pytester._monkeypatch.setenv("SPD_OUT_DIR", str(GENUINE / "spd_out"))
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    """``pytest --run-id <genuine run> --samples-file <its tokens> --artifacts-dir art ARGS``."""
    return suite.runpytest_subprocess(
        "--run-id",
        GENUINE_RUN_ID,
        "--samples-file",
        TOKENS,
        "--artifacts-dir",
        str(suite.path / "art"),
        *args,
    )


def summary_path(suite: pytest.Pytester) -> Path:
    """The session's ``summary.json`` under ``art/`` (directly, or in a session subfolder)."""
    art = suite.path / "art"
    direct = art / "summary.json"
    if direct.is_file():
        return direct
    found = sorted(art.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    assert found, f"no summary.json under {art}"
    return found[-1]
