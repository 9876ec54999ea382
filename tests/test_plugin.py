"""The pytest wiring, run as a user would: usage errors, headers, artifacts, baselines."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import GENUINE_RUN_ID
from tests.pytester_suite import TOKENS, make_suite, run, summary_path

pytest_plugins = ["pytester"]

suite = pytest.fixture(make_suite, name="suite")

COMMITTED = Path(__file__).parents[1] / "validation" / "baselines" / GENUINE_RUN_ID


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
    """Each attachment is an existing PNG of that item, and they are exactly the figures
    written to disk and listed in the summary."""
    import xml.etree.ElementTree as ET

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
    attached: dict[str, list[Path]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        item = re.search(r"\[(L\d+-S\d+-Q\d+)\]", case.get("name")).group(1)
        out = "".join(e.text or "" for e in case.iter("system-out"))
        attached[item] = [Path(p) for p in re.findall(r"\[\[ATTACHMENT\|(.+?)\]\]", out)]
    assert sorted(attached) == ["L0-S0-Q3", "L0-S0-Q4", "L0-S0-Q5"]
    with_figures = [i for i, paths in attached.items() if paths]
    assert len(with_figures) == 2  # --max-plots 2: the third item is left out
    for item, paths in attached.items():
        _, layer, sample, query = re.match(r"(L(\d+)-S(\d+)-Q(\d+))", item).groups()
        for p in paths:
            assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
            assert f"_L{layer}_S{sample}_Q{query}_" in p.name, (item, p)
    on_disk = {p.resolve() for p in (suite.path / "art").rglob("*.png")}
    all_attached = {p.resolve() for paths in attached.values() for p in paths}
    assert all_attached == on_disk and len(on_disk) == 6  # 2 items × 3 figures

    path = summary_path(suite)
    summary = json.loads(path.read_text())
    assert summary["figures"]["left_out"] == 1

    def located(p: str) -> Path:
        candidates = [Path(p), suite.path / p, path.parent / p]
        return next((c.resolve() for c in candidates if c.is_file()), Path(p))

    assert {located(p) for p in summary["figures"]["paths"]} == on_disk


def _summary_worst(summary: dict) -> tuple[str, float]:
    layers = summary["layers"].values()
    best = max(layers, key=lambda r: r["worst_ratio"])
    return best["worst_item"], best["worst_ratio"]


@pytest.mark.parametrize(
    ("plots", "xdist"), [("failed", ()), ("worst", ()), ("failed", ("-n", "2"))]
)
def test_the_worst_item_gets_the_figures_and_the_junit_xml_attaches_them(suite, plots, xdist):
    """``--max-plots 1``: the item with the largest |r|/B (the summary's own worst item,
    computed apart) is drawn, listed in summary.json and the terminal, and attached to its
    JUnit testcase; failing items (tiny --delta-budget) or a passing run (--plots worst)."""
    import xml.etree.ElementTree as ET

    xml = suite.path / "out.xml"
    failing = ("--bound", "budget", "--delta-budget", "0.001") if plots == "failed" else ()
    result = run(
        suite, "--plots", plots, "--max-plots", "1", *failing, "--samples", "2",
        "--query-pos", "5,20,40", "-k", "test_items", f"--junitxml={xml}", *xdist,
    )  # fmt: skip
    if plots == "failed":
        result.assert_outcomes(failed=12)
    else:
        result.assert_outcomes(passed=12)
    summary = json.loads(summary_path(suite).read_text())
    worst, ratio = _summary_worst(summary)
    drawn = summary["figures"]["items"]
    assert [d["id"] for d in drawn] == [worst]
    assert drawn[0]["ratio"] == ratio
    names = [Path(p).name for p in drawn[0]["paths"]]
    stem = f"{GENUINE_RUN_ID}_{worst.replace('-', '_')}_weighted"
    assert names == [f"{stem}_{k}.png" for k in ("combined", "components", "validation")]
    assert sorted(summary["figures"]["paths"]) == sorted(drawn[0]["paths"])
    assert summary["figures"]["left_out"] == (11 if plots == "failed" else 0)
    out = result.stdout.str()
    listed = (
        rf"^  {worst}  \|r\|/B = {ratio:.3g}  \w+  {stem}_{{combined,components,validation}}.png$"
    )
    assert re.search(listed, out, re.M), out
    attached = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        text = "".join(e.text or "" for e in case.iter("system-out"))
        found = re.findall(r"\[\[ATTACHMENT\|(.+?)\]\]", text)
        if found:
            attached[re.search(r"\[(L\d+-S\d+-Q\d+)\]", case.get("name")).group(1)] = found
    assert list(attached) == [worst]
    assert [Path(p).name for p in attached[worst]] == names
    assert all(Path(p).is_file() for p in attached[worst])


def test_plot_selection_takes_the_worst_first_and_skips_one_key_queries():
    from qkcheck.pytest_plugin import select_plot_items

    def it(q, ratio, passed):
        return {"layer": 0, "sample": 0, "query_pos": q, "ratio": ratio, "passed": passed}

    items = [it(0, 50.0, False), it(1, 2.0, False), it(2, 11.3, False), it(3, 0.5, True)]
    items += [it(4, 3.0, False), it(5, 0.9, True)]
    chosen, left = select_plot_items(items, "failed", 2)
    assert [c["query_pos"] for c in chosen] == [2, 4] and left == 1  # Q0 (one key) skipped
    chosen, left = select_plot_items(items, "worst", 3)
    assert [c["query_pos"] for c in chosen] == [2, 4, 1] and left == 0
    chosen, left = select_plot_items(items, "all", 3)
    assert [c["query_pos"] for c in chosen] == [0, 2, 4] and left == 3
    assert select_plot_items(items, "none", 3) == ([], 0)


QUALITY = ("-k", "test_quality", "--query-pos", "last")


def _accepted(suite: pytest.Pytester) -> Path:
    """A committed-looking accepted baseline (the genuine run's) under another name."""
    accepted = suite.path / "baselines" / "accepted"
    shutil.copytree(COMMITTED, accepted)
    return accepted


@pytest.mark.parametrize("regen", ["--regen-all", "--force-regen"])
def test_recording_with_another_runs_baseline_is_refused_and_leaves_its_files_alone(suite, regen):
    accepted = _accepted(suite)
    before = {p.name: p.read_bytes() for p in accepted.iterdir()}
    result = run(suite, *QUALITY, "--baseline", "accepted", regen)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert f"ERROR: --baseline accepted with {regen}:" in err and "Traceback" not in err
    assert "collected" not in result.stdout.str()  # refused before any test ran
    assert {p.name: p.read_bytes() for p in accepted.iterdir()} == before
    assert sorted(p.name for p in (suite.path / "baselines").iterdir()) == ["accepted"]


def test_a_baseline_is_recorded_with_its_provenance_then_gates_one_sidedly(suite):
    first = run(suite, *QUALITY, "-rs")
    first.assert_outcomes(passed=4, skipped=2)
    assert "gated by budgets only — record one with --force-regen" in first.stdout.str()
    run(suite, *QUALITY, "--regen-all").assert_outcomes(passed=6)
    recorded = suite.path / "baselines" / GENUINE_RUN_ID / "L0.yml"
    data = yaml.safe_load(recorded.read_text())
    assert set(data["metrics"]) == {
        "median_abs_r",
        "p99_abs_r",
        "worst_ratio",
        "r_frac_of_logit_scale",
        "delta_q",
        "delta_k",
    }
    assert data["measured"] == {
        "run": GENUINE_RUN_ID,
        "step": data["measured"]["step"],
        "layer": 0,
        "samples": 8,
        "samples_sha256": data["measured"]["samples_sha256"],
        "query_positions": "0-63",
        "bound": "weight",
        "norm": "spectral",
        "dtype": "float32",
        "qkcheck": data["measured"]["qkcheck"],
    }
    assert data["measured"] == yaml.safe_load((COMMITTED / "L0.yml").read_text())["measured"]

    # an unchanged run re-recorded with --force-regen: no "baseline changed", file untouched
    written = recorded.read_bytes()
    again = run(suite, *QUALITY, "--force-regen")
    again.assert_outcomes(passed=6)
    assert recorded.read_bytes() == written

    # against a baseline that was much better, this run is worse: layer 0's gate fails
    data["metrics"] = {k: v / 2 for k, v in data["metrics"].items()}
    recorded.write_text(yaml.safe_dump(data))
    # and a named baseline that lacks layer 0 is an error for that layer
    other = suite.path / "baselines" / "accepted" / "L1.yml"
    other.parent.mkdir()
    shutil.copy(suite.path / "baselines" / GENUINE_RUN_ID / "L1.yml", other)
    own = run(suite, *QUALITY)
    own.assert_outcomes(passed=5, failed=1)
    assert "layer 0 is worse than baseline s-5eed0002" in own.stdout.str()
    named = run(suite, *QUALITY, "--baseline", "accepted")
    named.assert_outcomes(passed=5, failed=1)
    assert "--baseline accepted: no baseline for layer 0" in named.stdout.str()


def test_statistics_measured_differently_are_refused_not_gated(suite):
    accepted = _accepted(suite)
    out = run(suite, *QUALITY, "--baseline", "accepted", "--bound", "data", "--samples", "2")
    out.assert_outcomes(passed=4, failed=2)
    text = out.stdout.str()
    # once per layer in the failures section (the short summary repeats it, untruncated on CI)
    refused = r"^layer \d: cannot compare with baseline accepted: measured differently"
    assert len(re.findall(refused, text, flags=re.M)) == 2
    assert "samples: 2 here, 8 in the baseline" in text
    assert "bound: data here, weight in the baseline" in text
    assert "worse than baseline" not in text
    # the same number of other samples is compared, and the gate says so
    tokens = torch.load(TOKENS, weights_only=True)
    flipped = suite.path / "flipped.pt"
    torch.save(tokens.flip(0).clone(), flipped)
    for p in accepted.iterdir():  # this run's own numbers, so the comparison passes
        shutil.copy(COMMITTED / p.name, p)
    other = suite.runpytest_subprocess(
        "--run-id",
        GENUINE_RUN_ID,
        "--samples-file",
        str(flipped),
        "--artifacts-dir",
        str(suite.path / "art"),
        *QUALITY,
        "--baseline",
        "accepted",
    )
    other.assert_outcomes(passed=6)
    assert other.stdout.str().count("measured on other samples (sha256 ") == 2


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("  median_abs_r: .nan", "metrics.median_abs_r"),
        ("  p99_abs_r: null", "metrics.p99_abs_r"),
        ("  worst_ratio: '0.1'", "metrics.worst_ratio"),
    ],
)
def test_a_malformed_baseline_fails_the_gate_with_one_line(suite, line, key):
    accepted = _accepted(suite)
    path = accepted / "L0.yml"
    name = line.split(":")[0].strip()
    lines = path.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip().startswith(name + ":"))
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    lines[at] = indent + line.strip()
    path.write_text("\n".join(lines) + "\n")
    out = run(suite, *QUALITY, "--baseline", "accepted", "--layers", "0")
    out.assert_outcomes(passed=2, failed=1)
    (message,) = [ln for ln in out.stdout.lines if ln.startswith(f"{path}: {key}: expected")]
    assert out.stdout.lines.count(message) == 1  # one line, said once (no chained traceback)
    assert "Traceback" not in out.stdout.str() and "During handling" not in out.stdout.str()


def test_recording_from_a_selection_needs_record_partial(suite):
    refused = run(suite, *QUALITY, "--samples", "2", "--regen-all")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "--regen-all: recording a baseline from a selection (--samples 2)" in refused.stderr.str()
    )
    assert "--record-partial" in refused.stderr.str()
    assert not (suite.path / "baselines").exists()
    run(suite, *QUALITY, "--samples", "2", "--regen-all", "--record-partial").assert_outcomes(
        passed=6
    )
    data = yaml.safe_load((suite.path / "baselines" / GENUINE_RUN_ID / "L1.yml").read_text())
    assert data["measured"]["samples"] == 2


def test_two_workers_run_each_layer_with_its_gate_on_one_worker(suite):
    """``-n 2`` alone schedules whole layers (qkcheck.xdist_layers): a layer's items, its
    quality test and its modules' Δ tests share one worker, so the gate reads the groups
    that worker computed instead of computing them again. ``--dist load`` is respected."""
    result = run(suite, "-n", "2", "-v", "--samples", "2", "--query-pos", "5,63")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, out
    assert "scheduling tests via LayerScheduling" in out
    ran = re.findall(r"^\[(gw\d)\] \[\s*\d+%\] (?:PASSED|SKIPPED) \S+?\[(\S+)\]\s*$", out, re.M)
    assert len(ran) == 2 * 2 * 2 + 2 + 4, ran
    worker_of: dict[str, set[str]] = {}
    for worker, test_id in ran:
        layer = re.match(r"(?:L|h\.)(\d+)", test_id).group(1)
        worker_of.setdefault(layer, set()).add(worker)
    assert sorted(worker_of) == ["0", "1"]
    assert all(len(w) == 1 for w in worker_of.values()), worker_of
    assert worker_of["0"] != worker_of["1"], "two layers, two workers: one each"
    explicit = run(suite, "-n", "2", "-v", "--dist", "load", "--samples", "1", "--query-pos", "63")
    assert "scheduling tests via LoadScheduling" in explicit.stdout.str()


def test_the_suite_collects_without_pytest_xdist(suite):
    result = run(suite, "--collect-only", "-q", "-p", "no:xdist", "--samples", "1")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    assert f"{2 * 64 + 6} tests collected" in result.stdout.str()


def test_last_failed_reruns_only_the_failures_with_the_project_config(suite):
    import tomllib

    config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    addopts = config["tool"]["pytest"]["ini_options"]["addopts"]
    suite.makeini(f"[pytest]\naddopts = {addopts} -p no:randomly\n")
    # the --samples-file path makes pytest pick the project as rootdir: keep the cache here
    cache = ("-o", f"cache_dir={suite.path / 'cache'}")
    args = ("--samples", "1", "--query-pos", "last", "--residual-budget", "0", *cache)
    first = run(suite, *args)
    first.assert_outcomes(passed=6, failed=2)
    again = run(suite, *args, "--lf")
    again.assert_outcomes(failed=2)
    assert "run-last-failure: rerun previous 2 failures" in again.stdout.str()
    run(suite, *args, "--ff").assert_outcomes(passed=6, failed=2)


@pytest.mark.parametrize("worker", [False, True])
def test_an_xdist_worker_captures_the_layer_at_hand_only(worker):
    """xdist hands a worker whole layers: its captures hold the layer asked (a deep model's
    worker holds one layer's logits, not all); one process holds every layer."""
    from types import SimpleNamespace

    from qkcheck.pytest_plugin import _State
    from qkcheck.settings import Selection, Settings

    config = SimpleNamespace(getoption=lambda name, default=None: None)
    if worker:
        config.workerinput = {"workerid": "gw0"}
    state = _State(config)
    state.settings = Settings(run_id="demo", samples=Selection(count=2))
    cap, _ = state.validator.capture(1, 1)
    assert set(cap.logits) == ({1} if worker else {0, 1})
