"""A pytest plugin for the benchmarks: where a session's wall time goes.

Loaded with ``-p pytest_timing`` (``bench/`` on ``PYTHONPATH``); writes JSON to
``$BENCH_TIMING_OUT`` at the end of the session (the controller only, under xdist)::

    {"startup": s, "collection": s, "run": s, "finish": s, "items": n}

``startup``: process start to the start of collection (imports, plugins, qkcheck loading the
run); ``collection``: collecting and parametrizing; ``run``: the test loop; ``finish``:
the end of the loop to the end of the terminal summary. Under xdist the controller's
``collection`` is short and ``run`` includes the workers' start-up and collection.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

_T: dict[str, float] = {}


def _process_start() -> float:
    """This process's start, as a Unix time (Linux: /proc/self/stat and /proc/stat btime)."""
    stat = Path("/proc/self/stat").read_text()
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
    lines = Path("/proc/stat").read_text().splitlines()
    boot = next(float(line.split()[1]) for line in lines if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    # a wrapper: xdist's controller answers the hook itself (its workers collect)
    _T.setdefault("collection_start", time.time())
    yield
    _T.setdefault("collection_end", time.time())


def pytest_collection_finish(session) -> None:
    _T["collection_end"] = time.time()
    _T["items"] = len(session.items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    _T.setdefault("run_start", time.time())
    yield
    _T["run_end"] = time.time()


def pytest_unconfigure(config) -> None:
    out = os.environ.get("BENCH_TIMING_OUT")
    if not out or hasattr(config, "workerinput") or "collection_start" not in _T:
        return
    start = _process_start()
    end = time.time()
    run_start = _T.get("run_start", _T.get("collection_end", end))
    run_end = _T.get("run_end", end)
    data = {
        "startup": _T["collection_start"] - start,
        "collection": _T.get("collection_end", end) - _T["collection_start"],
        "run": max(run_end - run_start, 0.0),
        "finish": end - run_end,
        "items": _T.get("items", 0),
    }
    Path(out).write_text(json.dumps(data))
