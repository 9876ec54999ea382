"""The artifacts directory and figure delivery, run as a user would (issue "Trust" 6–8)."""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from qkcheck.artifacts import ArtifactsError, ArtifactsLock, check_artifacts_dir
from tests.conftest import GENUINE, GENUINE_RUN_ID

pytest_plugins = ["pytester"]

VALIDATION = Path(__file__).parents[1] / "validation"
TOKENS = str(GENUINE / "reference" / "tokens.pt")
#: a budget bound this tight fails every item past Q0, so failed items get figures
FAILING = ("--bound", "budget", "--delta-budget", "0.001")


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((VALIDATION / "conftest.py").read_text())
    for name in ("test_items.py", "test_quality.py"):
        shutil.copy(VALIDATION / name, pytester.path / name)
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider -p no:randomly\n")
    pytester._monkeypatch.setenv("SPD_OUT_DIR", str(GENUINE / "spd_out"))
    return pytester


def run(suite: pytest.Pytester, art: Path, *args: str) -> pytest.RunResult:
    return suite.runpytest_subprocess(
        "--run-id", GENUINE_RUN_ID, "--samples-file", TOKENS, "--samples", "1",
        "--layers", "0", "--artifacts-dir", str(art), *args,
    )  # fmt: skip


def test_an_artifacts_path_that_is_a_file_or_under_one_is_refused_before_any_test(suite):
    afile = suite.path / "afile"
    afile.write_text("not a directory")
    for target, why in ((afile, "is a file"), (afile / "sub", f"lies under the file {afile}")):
        result = run(suite, target)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        err = result.stderr.str()
        assert f"ERROR: --artifacts-dir {target}: {why}; expected a directory" in err
        assert "Traceback" not in err and "passed" not in result.stdout.str()
    assert afile.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_artifacts_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(ArtifactsError, match=r"--artifacts-dir .*ro: cannot write there"):
        check_artifacts_dir(ro)


def test_a_second_session_on_a_held_artifacts_dir_stops_at_start(suite):
    art = suite.path / "shared-art"
    check_artifacts_dir(art)
    (art / "summary.json").write_text('{"kept": true}')
    held = ArtifactsLock(art).acquire()
    try:
        busy = rf"in use by another qkcheck session \(pid {os.getpid()}\)"
        with pytest.raises(ArtifactsError, match=busy):
            ArtifactsLock(art).acquire()
        result = run(suite, art)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        assert "in use by another qkcheck session" in result.stderr.str()
        fix = "give each concurrent session (e.g. each --layers shard) its own"
        assert fix in result.stderr.str()
        assert (art / "summary.json").read_text() == '{"kept": true}'
    finally:
        held.release()
    # released: the next session gets it, and leaves neither the lock nor figure slots
    result = run(suite, art, "--query-pos", "5")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert not (art / ".qkcheck.lock").exists()


def test_failed_items_embed_their_figures_in_a_self_contained_html_report(suite):
    art = suite.path / "art"
    html = suite.path / "report.html"
    result = run(
        suite, art, "--query-pos", "3,4", "--max-plots", "2", *FAILING,
        f"--html={html}", "--self-contained-html",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()[-3000:]
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    text = html.read_text()
    pngs = sorted(art.glob("*.png"))
    assert len(pngs) == 6  # two items × (combined, components, validation)
    assert text.count("data:image/png;base64,") >= len(pngs)
    assert not re.search(r'(src|href)="[^"]*\.png"', text)  # no image linked outside the page
    # every written file is world-readable, and no figure-slot litter is left
    for p in [*pngs, art / "summary.json"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert not (art / ".plot-slots").exists()


def test_a_figure_that_cannot_be_drawn_is_reported_not_dropped(suite):
    suite.makepyfile(
        conftest_boom="""
import qkcheck.figures

def boom(*args, **kwargs):
    raise RuntimeError("no glyph for token 漢")

qkcheck.figures.item_plot_data = boom
"""
    )
    art = suite.path / "art"
    result = run(suite, art, "--query-pos", "3", "--plots", "all", "-p", "conftest_boom")
    out = result.stdout.str()
    why = r"figure failed: \S*L0-S0-Q3\S*: RuntimeError: no glyph for token 漢"
    assert re.search(why, out), out
    assert "figures: 0 in" in out
