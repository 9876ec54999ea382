"""pytest wiring for ``pytest validation/ --run-id RUN``: options, parametrization,
artifacts, summary. Registered as a ``pytest11`` entry point; heavy imports stay lazy.

Items are parametrized over (layer, sample, query_pos) from run metadata only (no forward
pass at collection), with ids like ``L1-S3-Q17`` and one ``xdist_group`` per
(layer, sample), so ``-n auto --dist loadgroup`` computes each group once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from qkcheck.errors import QKCheckError, UnsupportedError

GROUP = "qkcheck"
#: what an item records for the session summary: {"item": {...}, "layer": {...},
#: "figures": [paths], "left_out": n}; copied onto its report as ``report.qkcheck`` so it
#: reaches the xdist controller (extra report attributes are serialized), and kept out of
#: the JUnit XML (user_properties would go there, and warn under xunit2)
_RECORD = pytest.StashKey[dict]()
_STATE = pytest.StashKey["_State"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup(GROUP, "qkcheck: validate an SPD run's attention decomposition")

    def add(name: str, dest: str, default: Any, help: str, **kw: Any) -> None:
        metavar = name.removeprefix("--").removeprefix("qk-").upper().replace("-", "_")
        g.addoption(
            name,
            dest=dest,
            default=default,
            metavar=metavar,
            help=f"{help} (default: {default})",
            **kw,
        )

    add(
        "--run-id",
        "qk_run_id",
        None,
        "run to validate: 'demo', a run directory or checkpoint, or a W&B reference "
        "(wandb:entity/project/runs/ID, a URL, or a bare id such as s-55ea3f9b)",
    )
    add(
        "--samples",
        "qk_samples",
        "all",
        "samples to use: a count N (first N) or indices 0,3,7 / 0-7",
    )
    add(
        "--samples-file",
        "qk_samples_file",
        None,
        "token ids (.pt/.npy, shape (n, T)), text lines (.txt), or 'dataset' (the run's own)",
    )
    add("--layers", "qk_layers", "all", "attention layers: all, or indices such as 0,2")
    add("--query-pos", "qk_query_pos", "all", "query positions: all, last, or a list such as 5,17")
    add(
        "--mode",
        "qk_mode",
        "weighted",
        "figures: weighted (activation-weighted logits) or binary (CI-gated weight-only terms)",
    )
    add(
        "--ci-threshold",
        "qk_ci_threshold",
        0.1,
        "binary mode: a pair counts where both CIs exceed it",
    )
    add("--top-n", "qk_top_n", 8, "pairs coloured in the figures, per head and for the head mean")
    add("--plots", "qk_plots", "failed", "figures for: none, failed items, or all selected items")
    add("--max-plots", "qk_max_plots", 20, "at most this many items get figures")
    add(
        "--artifacts-dir",
        "qk_artifacts_dir",
        None,
        "where figures and summary.json go; default qk-artifacts/<run>/",
    )
    add("--device", "qk_device", "cpu", "torch device for the decomposition: cpu or cuda[:N]")
    add("--dtype", "qk_dtype", "float32", "precision of the decomposition: float32 or float64")
    add(
        "--bound",
        "qk_bound",
        "weight",
        "bound asserted per item: data (B_data), weight (B_weight), or budget (B_weight with "
        "‖Δ‖ replaced by --delta-budget·‖W‖); both B_data and B_weight are reported",
    )
    add("--norm", "qk_norm", "spectral", "operator norm in B_weight: spectral or frobenius")
    add(
        "--delta-budget",
        "qk_delta_budget",
        0.25,
        "quality gate: largest allowed ‖Δ‖_F/‖W‖_F per q/k module (also --bound budget's fraction)",
    )
    add(
        "--residual-budget",
        "qk_residual_budget",
        0.2,
        "quality gate: largest allowed median |r| as a fraction of the target logits' std",
    )
    add(
        "--gate-tolerance",
        "qk_gate_tolerance",
        0.25,
        "quality gate: a metric fails when worse than its baseline by more than this fraction",
    )
    add(
        "--baseline",
        "qk_baseline",
        None,
        "compare residual statistics against this stored baseline (validation/baselines/NAME/)",
    )
    add("--qk-batch-size", "qk_batch_size", 4, "samples per target forward pass")
    add(
        "--doc-ids",
        "qk_doc_ids",
        None,
        "document ids per token (.npy/.pt, shaped like the samples; -1 = padding): positions "
        "restart per document and only same-document keys count",
    )
    add("--doc-sep", "qk_doc_sep", None, "token id that starts each new document (see --doc-ids)")


class _State:
    """Per-process session state, registered as a plugin: settings, the lazily built
    validator, and the results items report (from this process or from xdist workers)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.settings = None
        if config.getoption("qk_run_id"):
            from qkcheck.settings import parse_settings  # imports torch: only when needed

            self.settings = parse_settings(config.getoption)
        self._validator = None
        self.items: list[dict[str, Any]] = []
        self.layers: dict[int, dict[str, Any]] = {}
        self.figures: list[str] = []
        self.plots_left_out = 0
        self.figure_errors: list[str] = []

    @property
    def validator(self):
        if self._validator is None:
            self._validator = build_validator(self.settings)
        return self._validator

    @property
    def artifacts(self) -> Path:
        return self.settings.artifacts_for(self.validator.run.name)

    def lock_artifacts(self) -> None:
        """Check the artifacts directory and hold it for this session (the controller)."""
        from qkcheck.artifacts import ArtifactsLock, check_artifacts_dir

        self._lock = ArtifactsLock(check_artifacts_dir(self.artifacts)).acquire()

    def release_artifacts(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            shutil.rmtree(self.artifacts / ".plot-slots", ignore_errors=True)
            lock.release()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = getattr(report, "qkcheck", None)
        if not data or report.when != "call":
            return
        if "item" in data:
            self.items.append(data["item"])
        if "layer" in data:
            self.layers.setdefault(data["layer"]["layer"], {}).update(data["layer"])
        self.figures.extend(data.get("figures", []))
        self.plots_left_out += data.get("left_out", 0)
        if "figure_error" in data:
            self.figure_errors.append(f"{report.nodeid}: {data['figure_error']}")


def build_validator(settings):
    """Load the run and its samples and build the :class:`~qkcheck.validate.Validator`."""
    from qkcheck.runs import load_run
    from qkcheck.validate import Validator

    run = load_run(settings.run_id)
    if settings.mode == "binary" and getattr(run, "binary_mode_unsupported", None):
        raise UnsupportedError(f"--mode binary: run {run.name}: {run.binary_mode_unsupported}")
    samples = run.load_samples(settings.samples_file)
    if samples.note:  # printed before the header (xdist workers' stdout is not shown)
        print(f"qkcheck: {samples.note}")
    tokens = samples.tokens
    ids = settings.samples.resolve(tokens.shape[0], "samples", "--samples")
    return Validator(
        run, tokens[ids], ids, settings, document_ids=_document_ids(settings, tokens, ids)
    )


def _document_ids(settings, tokens, ids):
    """Document ids of the selected samples from --doc-ids / --doc-sep, else None."""
    from qkcheck.documents import ids_from_separator, read_document_ids

    if settings.doc_ids is not None:
        return read_document_ids(settings.doc_ids, tuple(tokens.shape))[ids]
    if settings.doc_sep is not None:
        return ids_from_separator(tokens[ids], settings.doc_sep)
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qkcheck: a qkcheck validation item")
    try:
        state = _State(config)
        if state.settings is not None:
            state.validator  # noqa: B018 — load the run now: a bad run is a usage error
        if state.settings is not None and not hasattr(config, "workerinput"):
            state.lock_artifacts()
    except QKCheckError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[_STATE] = state
    config.pluginmanager.register(state, "qkcheck-session")
    workers = getattr(config, "workerinput", {}).get("workercount")
    if state.settings is not None and workers:
        import torch  # already imported by the run

        # xdist workers share the cores: torch's default of one thread per core in every
        # worker oversubscribes them (measured: a (layer, sample) group 10x slower)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def require_run_id(config: pytest.Config) -> None:
    """Called by validation/conftest.py: the suite needs a run."""
    if not config.getoption("qk_run_id"):
        raise pytest.UsageError(
            "validation/ needs a run: pytest validation/ --run-id RUN "
            "(try --run-id demo; see --help, group 'qkcheck')"
        )


def _state(config: pytest.Config) -> _State:
    return config.stash[_STATE]


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    s = _state(config).settings
    if s is None:
        return None
    return [
        f"qkcheck: run {s.run_id} · samples {_describe(s.samples)} · layers "
        f"{_describe(s.layers)} · query_pos {_describe(s.query_pos)} · bound {s.bound} "
        f"({s.norm}) · mode {s.mode} · dtype {s.dtype} · device {s.device}",
        f"qkcheck: gate ‖Δ‖/‖W‖ ≤ {s.delta_budget}, median|r|/std ≤ {s.residual_budget}, "
        f"tolerance {s.gate_tolerance} vs baseline {s.baseline or '(this run)'} · plots "
        f"{s.plots} (max {s.max_plots}) · top-n {s.top_n}",
    ]


def _describe(sel) -> str:
    if sel.last:
        return "last"
    if sel.indices is not None:
        return ",".join(map(str, sel.indices))
    return f"first {sel.count}" if sel.count is not None else "all"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = {"qk_item", "qk_layer", "qk_module"} & set(metafunc.fixturenames)
    if not names:
        return
    state = _state(metafunc.config)
    if state.settings is None:
        require_run_id(metafunc.config)
    v = state.validator
    from qkcheck.util import item_id

    if "qk_item" in names:
        params = [
            pytest.param(
                item, id=item_id(*item), marks=pytest.mark.xdist_group(f"L{item[0]}-S{item[1]}")
            )
            for item in v.items()
        ]
        metafunc.parametrize("qk_item", params)
    if "qk_layer" in names:
        params = [
            pytest.param(layer, id=f"L{layer}", marks=pytest.mark.xdist_group("qk-quality"))
            for layer in v.layers
        ]
        metafunc.parametrize("qk_layer", params)
    if "qk_module" in names:
        paths = [p for sp in v.specs.values() for p in (sp.q_path, sp.k_path)]
        params = [pytest.param(p, id=p, marks=pytest.mark.xdist_group("qk-quality")) for p in paths]
        metafunc.parametrize("qk_module", params)


@pytest.fixture(scope="session")
def qk(request: pytest.FixtureRequest):
    """The session's :class:`~qkcheck.validate.Validator` (read-only apart from its caches)."""
    return _state(request.config).validator


@pytest.fixture(scope="session")
def qk_settings(request: pytest.FixtureRequest):
    """The session's :class:`~qkcheck.settings.Settings`."""
    return _state(request.config).settings


@pytest.fixture
def qk_record(request: pytest.FixtureRequest):
    """``qk_record(kind, data)``: record an item's (``"item"``) or a layer's (``"layer"``)
    results for the end-of-session summary."""

    def record(kind: str, data: dict[str, Any]) -> None:
        request.node.stash.setdefault(_RECORD, {})[kind] = data

    return record


# --- artifacts: figures for failed (or all) items -------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    paths: list[Path] = []
    callspec = getattr(item, "callspec", None)
    if call.when == "call" and callspec is not None and "qk_item" in callspec.params:
        state = _state(item.config)
        s = state.settings
        failed = call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception)
        if s is not None and (s.plots == "all" or (s.plots == "failed" and failed)):
            paths = _plot_item(state, item, callspec.params["qk_item"])
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and _RECORD in item.stash:
        report.qkcheck = item.stash[_RECORD]
    if paths:
        _attach_html(report, paths)


def _plot_item(state: _State, item: pytest.Item, key: tuple[int, int, int]) -> list[Path]:
    from qkcheck.figures import write_item_figures

    record = item.stash.setdefault(_RECORD, {})
    if not _claim_plot_slot(state.artifacts, state.settings.max_plots):
        record["left_out"] = 1
        return []
    try:
        paths = write_item_figures(state.validator, *key, state.artifacts)
    except Exception as e:  # a figure must never hide the verdict, nor fail silently
        why = f"{type(e).__name__}: {e}"
        item.add_report_section("call", "qkcheck", f"figure failed: {why}")
        record["figure_error"] = why
        return []
    text = "\n".join(f"[[ATTACHMENT|{p.resolve()}]]" for p in paths)
    item.add_report_section("call", "stdout", text + "\n")
    record["figures"] = [str(p) for p in paths]
    return paths


def _claim_plot_slot(artifacts: Path, max_plots: int) -> bool:
    """Claim one of ``max_plots`` figure slots, shared by every process of the session."""
    slots = artifacts / ".plot-slots"
    slots.mkdir(parents=True, exist_ok=True)
    for n in range(max_plots):
        try:
            os.close(os.open(slots / str(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def _attach_html(report: pytest.TestReport, paths: list[Path]) -> None:
    try:
        import pytest_html  # type: ignore[import-not-found]
    except ImportError:
        return
    import base64

    # embedded, not linked: --self-contained-html warns on (and filterwarnings=error turns
    # into an INTERNALERROR) any image given as a path; embedded images serve both modes
    extras = getattr(report, "extras", [])
    extras.extend(
        pytest_html.extras.png(base64.b64encode(p.read_bytes()).decode("ascii"), name=p.name)
        for p in paths
    )
    report.extras = extras


def pytest_sessionstart(session: pytest.Session) -> None:
    """Free the figure slots of an earlier session (the controller, before any worker)."""
    state = _state(session.config)
    if state.settings is None or hasattr(session.config, "workerinput"):
        return
    shutil.rmtree(state.artifacts / ".plot-slots", ignore_errors=True)


# --- summary ---------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = _state(config)
    if state.settings is None or hasattr(config, "workerinput"):
        return
    if not state.items and not state.layers:
        return
    from qkcheck.report import build_summary, format_table, write_json

    run_name, artifacts = state.validator.run.name, state.artifacts
    summary = build_summary(
        run_name, state.settings, state.items, state.layers, state.figures, state.plots_left_out
    )
    path = write_json(summary, artifacts / "summary.json")
    tr = terminalreporter
    tr.section("qkcheck summary")
    for line in format_table(summary):
        tr.write_line(line)
    if summary["figures"]["left_out"]:
        tr.write_line(
            f"{summary['figures']['left_out']} item(s) due a figure got none (--max-plots "
            f"{state.settings.max_plots}); draw one with -k <id> --plots all"
        )
    for line in state.figure_errors:
        tr.write_line(f"figure failed: {line}", red=True)
    tr.write_line(f"figures: {len(summary['figures']['paths'])} in {artifacts}")
    tr.write_line(f"summary: {path}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Release the artifacts directory; no figure-slot files are left behind."""
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.release_artifacts()
