"""pytest wiring for ``pytest validation/ --run-id RUN``: options, parametrization,
artifacts, summary. Registered as a ``pytest11`` entry point; heavy imports stay lazy.

Items are parametrized over (layer, sample, query_pos) from run metadata only (no forward
pass at collection), with ids like ``L1-S3-Q17``; under pytest-xdist (``-n N``) each layer
goes to one worker (:mod:`qkcheck.xdist_layers`), so each (layer, sample) group is computed
once.
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
    """Every option of :data:`qkcheck.options.OPTIONS`, under the group 'qkcheck'."""
    from qkcheck.options import OPTIONS

    g = parser.getgroup(GROUP, "qkcheck: validate an SPD run's attention decomposition")
    for o in OPTIONS:
        if o.kind == "flag":
            g.addoption(o.flag, dest=o.dest, action="store_true", default=o.default, help=o.help)
        else:
            g.addoption(
                o.flag,
                dest=o.dest,
                default=o.default,
                metavar=o.metavar,
                help=f"{o.help} (default: {o.default})",
            )


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
        #: items drawn at session end: {"id", "layer", "sample", "query_pos", "ratio", "paths"}
        self.drawn: list[dict[str, Any]] = []
        self.nodeids: dict[tuple[int, int, int], str] = {}
        # summary bookkeeping (controller): final outcome per test, why a session stopped
        self.outcomes: dict[str, str] = {}
        self.gate_tests: set[str] = set()
        self.gate_failures: dict[str, str] = {}
        self.baselines: dict[int, dict[str, Any]] = {}
        self.finished = 0
        self.reason: str | None = None
        self.signal: str | None = None
        self.finishing = False
        self.summary: dict[str, Any] | None = None
        self.summary_path: Path | None = None
        self.report_path: Path | None = None
        self.report_error: str | None = None
        self._previous_sigterm: Any = None
        self.measured = None  # qkcheck.gate.Measured, built by the first qk_baseline
        self.threads: int | None = None  # torch CPU threads (--qk-threads), set at configure
        self._drawing_started = False

    @property
    def validator(self):
        if self._validator is None:
            self._validator = build_validator(self.settings)
            if hasattr(self.config, "workerinput"):  # an xdist worker gets whole layers
                self._validator.expect_layer_major()
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
            # figure slots of qkcheck before figures were drawn at session end
            shutil.rmtree(self.artifacts / ".plot-slots", ignore_errors=True)
            lock.release()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._count(report)
        data = getattr(report, "qkcheck", None)
        if not data or report.when != "call":
            return
        if "item" in data:
            it = data["item"]
            self.items.append(it)
            self.nodeids[(it["layer"], it["sample"], it["query_pos"])] = report.nodeid
            if not self._drawing_started and _due_a_figure(it, self.settings):
                self._start_drawing()
        if "layer" in data:
            self.layers.setdefault(data["layer"]["layer"], {}).update(data["layer"])
        if "baseline" in data:
            self.baselines[data["baseline"]["layer"]] = data["baseline"]
        self.figures.extend(data.get("figures", []))
        self.plots_left_out += data.get("left_out", 0)
        if "figure_error" in data:
            self.figure_errors.append(f"{report.nodeid}: {data['figure_error']}")

    # --- the summary's verdict: outcomes, completeness, interruptions ------------------------

    def _count(self, report: pytest.TestReport) -> None:
        """Final outcome per test (failed > error > skipped > passed) and gate failures."""
        nodeid, before = report.nodeid, self.outcomes.get(report.nodeid)
        if report.when == "teardown":
            self.finished += 1
        if report.failed:
            now = "failed" if report.when == "call" else "errors"
        elif report.skipped and report.when in ("setup", "call"):
            now = "skipped"
        elif report.passed and report.when == "call":
            now = "passed"
        else:
            return
        rank = ("passed", "skipped", "errors", "failed")
        if before is None or rank.index(now) > rank.index(before):
            self.outcomes[nodeid] = now
        if "qk_gate" in report.keywords:
            self.gate_tests.add(nodeid)
            if report.failed and nodeid not in self.gate_failures:
                self.gate_failures[nodeid] = _failure_message(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Replace a previous session's summary by one saying this session has not finished,
        so an interrupted or killed run never leaves a stale verdict next to new figures."""
        if not self._writes_summary():
            return
        import datetime

        from qkcheck.report import unfinished_summary, write_json

        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.summary_path = self.artifacts / "summary.json"
        unfinished = unfinished_summary(
            self.validator.run.name, self.settings, started, os.getpid()
        )
        write_json(unfinished, self.summary_path)
        self.write_report(unfinished)  # never the previous run's page beside this summary

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo) -> None:
        v = excinfo.value
        if self.signal:
            self.reason = f"interrupted: {self.signal}"
        elif isinstance(v, pytest.exit.Exception):
            self.reason = f"stopped by pytest.exit: {v.msg}"
        elif type(v) is KeyboardInterrupt:
            self.reason = "interrupted: KeyboardInterrupt (Ctrl-C)"
        else:  # xdist's or pytest's Interrupted: -x/--maxfail, stepwise, a worker's Ctrl-C
            self.reason = f"stopped early: {v}"

    def pytest_internalerror(self, excinfo: pytest.ExceptionInfo) -> None:
        if self.reason is None:
            first = (str(excinfo.value).splitlines() or [""])[0]
            self.reason = f"internal error: {type(excinfo.value).__name__}: {first}".rstrip(": ")

    @pytest.hookimpl(tryfirst=True)  # before junitxml and pytest-html write their reports
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Draw the figures of the worst items, then write the summary (atomically) with the
        verdict pytest exits with."""
        self.finishing = True
        if not self._writes_summary():
            return
        from qkcheck.report import build_summary, write_json

        reason = self.reason or _stop_reason(session, int(exitstatus), self.finished)
        if reason is None or not reason.startswith("interrupted"):
            self._draw_figures()
        gate = {
            k: sum(self.outcomes.get(t) == k for t in self.gate_tests)
            for k in ("passed", "failed", "errors", "skipped")
        }
        gate["failed"] += gate.pop("errors")
        gate["failures"] = [{"test": t, "message": m} for t, m in self.gate_failures.items()]
        gate["notes"] = [
            f"layer {layer}: {note}"
            for layer, b in sorted(self.baselines.items())
            if b["outcome"] in ("compared", "worse")
            for note in b["notes"]
        ]
        tests = {k: sum(v == k for v in self.outcomes.values()) for k in _OUTCOMES}
        self.summary = build_summary(
            self.validator.run.name,
            self.settings,
            self.items,
            self.layers,
            self.figures,
            self.plots_left_out,
            exit_status=int(exitstatus),
            complete=reason is None,
            reason=reason,
            gate=gate,
            tests=tests,
            drawn=self.drawn,
        )
        self.summary["skipped_layers"] = {
            str(k): why for k, why in sorted(self.validator.skipped_layers.items())
        }
        if self.settings.dataset_top_k and reason is None:
            self.summary["dataset_view"] = self._dataset_view()
        self.summary_path = write_json(self.summary, self.artifacts / "summary.json")
        self.write_report(self.summary)

    def write_report(self, summary: dict[str, Any]) -> None:
        """index.html from ``summary``; a failure is a line of the terminal summary."""
        from qkcheck.html_report import try_write_html_report

        self.report_path, self.report_error = try_write_html_report(summary, self.artifacts)

    def _start_drawing(self) -> None:
        """Start the figure workers' fork server (qkcheck.workers) once an item is due a
        figure, so that it imports matplotlib while the session goes on (controller only)."""
        self._drawing_started = True
        if self._writes_summary():
            from qkcheck import workers

            workers.start()

    def _draw_figures(self) -> None:
        """The ``--max-plots`` worst items due a figure (:func:`select_plot_items`), drawn in
        parallel worker processes, attached to the JUnit XML and pytest-html reports."""
        s = self.settings
        chosen, self.plots_left_out = select_plot_items(self.items, s.plots, s.max_plots)
        if not chosen:
            return
        import qkcheck.figures as figures
        from qkcheck.util import item_id

        keys = [(it["layer"], it["sample"], it["query_pos"]) for it in chosen]
        try:
            results = figures.write_figures(self.validator, keys, self.artifacts)
        except Exception as e:  # e.g. worker processes that cannot start: say so, per item
            results = [e] * len(keys)
        for it, key, res in zip(chosen, keys, results, strict=True):
            nodeid = self.nodeids.get(key, item_id(*key))
            if isinstance(res, BaseException):
                self.figure_errors.append(f"{nodeid}: {type(res).__name__}: {res}")
                continue
            paths = [str(p) for p in res]
            self.figures.extend(paths)
            self.drawn.append(
                {
                    "id": item_id(*key),
                    "layer": key[0],
                    "sample": key[1],
                    "query_pos": key[2],
                    "ratio": it["ratio"],
                    "passed": it["passed"],
                    "paths": paths,
                }
            )
            _attach(self.config, nodeid, [Path(p) for p in paths])

    def _dataset_view(self) -> dict[str, Any]:
        """pairs_L<l>.json and heat maps for a complete session (docs/design.md §9)."""
        from qkcheck.dataset_view import unsupported_layers, write_dataset_view

        if self.settings.mode != "weighted":
            return {"paths": [], "error": "the dataset-level view is computed in weighted mode"}
        try:
            paths = write_dataset_view(self.validator, self.artifacts, self.settings.dataset_top_k)
        except QKCheckError as e:
            return {"paths": [], "error": str(e)}
        except Exception as e:  # never lose the summary (or the verdict) to this extra view
            return {"paths": [], "error": f"{type(e).__name__}: {e}"}
        skipped = {str(k): why for k, why in unsupported_layers(self.validator).items()}
        return {"paths": [str(p) for p in paths], "skipped": skipped}

    def _writes_summary(self) -> bool:
        """Only the controller of a qkcheck session writes the summary (not for
        ``--collect-only``)."""
        c = self.config
        return (
            self.settings is not None
            and not hasattr(c, "workerinput")
            and not c.getoption("collectonly", default=False)
        )

    def install_sigterm(self) -> None:
        """SIGTERM (a CI job cancelled, ``kill``) becomes an interruption, like Ctrl-C, so
        the session finishes and its summary says so; only where nobody else handles it."""
        import signal
        import threading

        if (
            threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        ):
            return

        def on_sigterm(signum, frame):
            self.signal = "SIGTERM"
            if not self.finishing:  # while the summary is written, let it finish
                raise KeyboardInterrupt("SIGTERM")

        self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.release_artifacts()  # no lock or figure-slot files are left behind
        if self._previous_sigterm is not None:
            import signal

            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


_OUTCOMES = ("passed", "failed", "errors", "skipped")


def _brace(names: list[str]) -> str:
    """``a_x.png, a_y.png`` → ``a_{x,y}.png`` (the figures of one item share a stem)."""
    if len(names) < 2:
        return ", ".join(names)
    stem = os.path.commonprefix(names)  # noqa: RUF071  (file names, not paths)
    stem = stem[: stem.rfind("_") + 1]
    parts = [n[len(stem) :].removesuffix(".png") for n in names]
    if not stem or not all(n.endswith(".png") for n in names):
        return ", ".join(names)
    return f"{stem}{{{','.join(parts)}}}.png"


def _failure_message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(report.longrepr)
    return text.strip()


def _stop_reason(session: pytest.Session, exitstatus: int, finished: int) -> str | None:
    """Why a session that was not interrupted did not run all its tests, or ``None``."""
    if session.shouldfail:
        return f"stopped early: {session.shouldfail}"
    if session.shouldstop:
        return f"stopped early: {session.shouldstop}"
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        return "interrupted"
    if exitstatus == pytest.ExitCode.INTERNAL_ERROR:
        return "internal error"
    if finished < session.testscollected:
        return f"{session.testscollected - finished} of {session.testscollected} tests did not run"
    return None


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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_cmdline_main(config: pytest.Config):
    """``-n N`` on a qkcheck session means ``--dist loadgroup`` (whole layers per worker,
    :mod:`qkcheck.xdist_layers`) unless ``--dist`` is given; set before xdist picks ``load``."""
    if (
        config.getoption("qk_run_id", default=None)
        and config.getoption("numprocesses", default=None)
        and config.getoption("dist", default=None) == "no"
    ):
        config.option.dist = "loadgroup"
    return (yield)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` on a qkcheck session: one layer per worker (its items, quality
    test and Δ tests), so no (layer, sample) group is computed twice. (pytest-xdist's own
    ``xdist_group`` marks rename node ids, which pytest 9 no longer allows.)"""
    state = config.stash.get(_STATE, None)
    if state is None or state.settings is None or config.getoption("dist") != "loadgroup":
        return None
    from qkcheck.xdist_layers import LayerScheduling

    specs = state.validator.specs
    modules = {name: i for i, sp in specs.items() for name in (sp.q_name, sp.k_name)}
    return LayerScheduling(config, log, module_layers=modules)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qkcheck: a qkcheck validation item")
    config.addinivalue_line("markers", "qk_gate: a run-level quality-gate test of qkcheck")
    from qkcheck.gate import check_options, check_selection

    check_options(config)  # before the run is loaded: refused combinations cost nothing
    try:
        state = _State(config)
        if state.settings is not None:
            check_selection(config, state.validator)  # loads the run: a bad one is a usage error
        if state.settings is not None and not hasattr(config, "workerinput"):
            state.lock_artifacts()
    except QKCheckError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[_STATE] = state
    config.pluginmanager.register(state, "qkcheck-session")
    if state.settings is not None and not hasattr(config, "workerinput"):
        state.install_sigterm()
    if state.settings is not None:
        import torch  # already imported by the run

        from qkcheck.settings import torch_threads

        # xdist workers share the cores, and so does anything else running: torch's default
        # of one thread per core oversubscribes them (measured: a group up to 10x slower)
        workers = getattr(config, "workerinput", {}).get("workercount")
        state.threads = torch_threads(state.settings.threads, workers and int(workers))
        torch.set_num_threads(state.threads)


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
    state = _state(config)
    s = state.settings
    if s is None:
        return None
    skipped = [
        f"qkcheck: layer {layer} skipped: {why}"
        for layer, why in sorted(state.validator.skipped_layers.items())
    ]
    return [
        f"qkcheck: run {s.run_id} · samples {_describe(s.samples)} · layers "
        f"{_describe(s.layers)} · query_pos {_describe(s.query_pos)} · bound {s.bound} "
        f"({s.norm}) · mode {s.mode} · dtype {s.dtype} · device {s.device} · threads "
        f"{state.threads}" + (" (auto)" if s.threads == "auto" else ""),
        f"qkcheck: gate ‖Δ‖/‖W‖ ≤ {s.delta_budget}, median|r|/std ≤ {s.residual_budget}, "
        f"tolerance {s.gate_tolerance} vs baseline {s.baseline or '(this run)'} · plots "
        f"{s.plots} (max {s.max_plots}) · top-n {s.top_n}",
        *skipped,
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

    gate = pytest.mark.qk_gate
    # under pytest-xdist, each layer's tests go to one worker (qkcheck.xdist_layers)
    if "qk_item" in names:
        items = v.items()
        metafunc.parametrize("qk_item", items, ids=[item_id(*it) for it in items])
    if "qk_layer" in names:
        params = [pytest.param(layer, id=f"L{layer}", marks=gate) for layer in v.layers]
        metafunc.parametrize("qk_layer", params)
    if "qk_module" in names:
        paths = [p for sp in v.specs.values() for p in (sp.q_name, sp.k_name)]
        metafunc.parametrize("qk_module", [pytest.param(p, id=p, marks=gate) for p in paths])


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


@pytest.fixture
def qk_baseline(request: pytest.FixtureRequest, qk, qk_settings, qk_record):
    """The session's baseline policy, a :class:`~qkcheck.gate.BaselineGate`:
    ``qk_baseline.check(layer, stats)`` records, skips, compares or fails. Baselines live
    in ``baselines/`` next to the test module."""
    from qkcheck.gate import BaselineGate, Measured, recording_flag

    state = _state(request.config)
    if state.measured is None:
        state.measured = Measured(qk)
    flag = recording_flag(request.config)
    return BaselineGate(
        root=request.path.parent / "baselines",
        name=qk_settings.baseline or qk.run.name,
        own=qk_settings.baseline is None,
        mode="compare" if flag is None else "force" if flag == "--force-regen" else "record",
        tolerance=qk_settings.gate_tolerance,
        measured=state.measured,
        record=qk_record,
    )


# --- artifacts: figures of the worst items, drawn at session end -----------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and _RECORD in item.stash:
        report.qkcheck = item.stash[_RECORD]


def _due_a_figure(item: dict[str, Any], settings) -> bool:
    """Whether ``item`` is one :func:`select_plot_items` could choose."""
    if settings.plots == "none" or settings.max_plots <= 0:
        return False
    if settings.plots == "all":
        return True
    return item["query_pos"] >= 1 and (settings.plots == "worst" or not item["passed"])


def select_plot_items(
    items: list[dict[str, Any]], plots: str, max_plots: int
) -> tuple[list[dict[str, Any]], int]:
    """The items ``--plots`` draws, worst ``|r|/B`` first, at most ``max_plots``, and how
    many that were due one are left out. ``failed``: failed items; ``worst``: every item
    (passed or not); both skip queries with fewer than 2 keys (``query_pos`` 0: one key, no
    curve to read). ``all``: every item."""
    if plots == "none":
        return [], 0
    if plots == "all":
        due = list(items)
    else:
        due = [it for it in items if it["query_pos"] >= 1]
        if plots == "failed":
            due = [it for it in due if not it["passed"]]

    def key(it: dict[str, Any]) -> tuple:
        ratio = it["ratio"]
        return (-(ratio if ratio == ratio else -1.0), it["layer"], it["sample"], it["query_pos"])

    due.sort(key=key)
    chosen = due[:max_plots]
    return chosen, 0 if plots == "worst" else len(due) - len(chosen)


def _attach(config: pytest.Config, nodeid: str, paths: list[Path]) -> None:
    """Attach an item's figures to the reports being written at session end: its JUnit XML
    testcase (``[[ATTACHMENT|path]]`` lines in its system-out) and its pytest-html entry
    (embedded PNGs). Both reports have already taken in the item's results; their writers
    run after this (qkcheck's sessionfinish is tryfirst)."""
    _attach_junit(config, nodeid, paths)
    _attach_html(config, nodeid, paths)


def _attach_junit(config: pytest.Config, nodeid: str, paths: list[Path]) -> None:
    try:
        from _pytest.junitxml import mangle_test_address, xml_key
    except ImportError:  # pragma: no cover - pytest internals moved
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    names = mangle_test_address(nodeid)
    if xml.prefix:
        names.insert(0, xml.prefix)
    want = {"classname": ".".join(names[:-1]), "name": names[-1]}
    text = "".join(f"[[ATTACHMENT|{p.resolve()}]]\n" for p in paths)
    for reporter in xml.node_reporters_ordered:
        case = reporter.to_xml()
        if case.get("classname") == want["classname"] and case.get("name") == want["name"]:
            out = case.find("system-out")
            if out is None:
                import xml.etree.ElementTree as ET

                out = ET.SubElement(case, "system-out")
                out.text = ""
            out.text = (out.text or "") + text
            return


def _attach_html(config: pytest.Config, nodeid: str, paths: list[Path]) -> None:
    try:
        import pytest_html  # type: ignore[import-not-found]
        from pytest_html.basereport import BaseReport  # type: ignore[import-not-found]
    except ImportError:
        return
    import base64
    from types import SimpleNamespace

    plugin = next(
        (p for p in config.pluginmanager.get_plugins() if isinstance(p, BaseReport)), None
    )
    if plugin is None:
        return
    tests = plugin._report.data["tests"].get(nodeid)
    if not tests:
        return
    # embedded, not linked: --self-contained-html warns on (and filterwarnings=error turns
    # into an INTERNALERROR) any image given as a path; embedded images serve both modes
    extras = [
        pytest_html.extras.png(base64.b64encode(p.read_bytes()).decode("ascii"), name=p.name)
        for p in paths
    ]
    processed = plugin._process_extras(SimpleNamespace(extras=extras), nodeid + "::qkcheck")
    tests[-1].setdefault("extras", []).extend(processed)


# --- summary ---------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = _state(config)
    summary = state.summary
    if summary is None or hasattr(config, "workerinput"):
        return
    from qkcheck.report import format_table

    tr = terminalreporter
    tr.section("qkcheck summary")
    if summary["totals"]["items"] or summary["layers"]:
        for line in format_table(summary):
            tr.write_line(line)
    for layer, why in summary.get("skipped_layers", {}).items():
        tr.write_line(f"layer {layer} not validated: {why}")
    for note in summary["gate"]["notes"]:
        tr.write_line(f"baseline {state.settings.baseline or summary['run']}, {note}")
    if summary["figures"]["left_out"]:
        tr.write_line(
            f"{summary['figures']['left_out']} item(s) due a figure got none (--max-plots "
            f"{state.settings.max_plots}); draw one with -k <id> --plots all"
        )
    view = summary.get("dataset_view")
    if view is not None:
        if view.get("error"):
            tr.write_line(f"dataset view not written: {view['error']}", red=True)
        else:
            tr.write_line(f"dataset view: {len(view['paths'])} files in {state.artifacts}")
        for layer, why in view.get("skipped", {}).items():
            tr.write_line(f"dataset view: layer {layer} left out: {why}")
    for line in state.figure_errors:
        tr.write_line(f"figure failed: {line}", red=True)
    tr.write_line(f"figures: {len(summary['figures']['paths'])} in {state.artifacts}")
    for d in summary["figures"].get("items", []):
        verdict = "passed" if d["passed"] else "FAILED"
        names = _brace([Path(p).name for p in d["paths"]])
        tr.write_line(f"  {d['id']}  |r|/B = {d['ratio']:.3g}  {verdict}  {names}")
    if state.report_error:
        tr.write_line(f"report not written: {state.report_error}", red=True)
    else:
        tr.write_line(f"report: {state.report_path}")
    verdict = "passed" if summary["passed"] else "failed"
    if not summary["complete"]:
        verdict = f"INCOMPLETE ({summary['reason']})"
    tr.write_line(f"summary: {state.summary_path} — {verdict}")
