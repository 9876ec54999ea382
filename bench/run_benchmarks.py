"""qkcheck at the reference run's scale, side by side with its floors, in one run.

    python bench/run_benchmarks.py            # about 10 min on 2 idle cores

Builds ``bench/out/ref`` (bench/make_reference_run.py) unless present, then measures:

(a)  ``pytest validation/ --run-id bench/out/ref --samples 20 --plots none``: 4 layers × 20
     samples × 512 query positions = 40,960 items (+ 12 run-level quality items), serial,
     exactly as typed;
(a1) with ``--tuned``: the same with ``OMP_NUM_THREADS=1`` and ``-p no:logging``;
(b)  the floor: a generated suite with the same test names, ids and item count whose tests
     ``assert True`` (``bench/out/floor/``), in the same interpreter, config and plugins;
(c)  with ``--figure-items N``: figures (combined + validation) of N items through qkcheck
     (bench/figure_items.py), against
(d)  the reference script's dense method, top-N lists checked identical (the figures'
     own before/after benchmark is bench/figure_speed.py);
(e)  (a) with ``-n 2`` (pytest-xdist; qkcheck makes it ``--dist loadgroup``), and
(f)  (b) with ``-n 2``: what xdist costs per item on its own;
(g)  (a) as two ``--layers`` shards run at once as two processes, merged with
     ``python -m qkcheck.merge`` (the sharding recipe, on one machine), checked equal to
     (a)'s summary apart from settings and paths.

Targets (issue 12): (a)/(b) wall ≤ 1.3, (a)/(b) peak RSS ≤ 3, (e)/(f) wall ≤ 1.3.

(a), (a1) and (b) alternate in rounds so that a busy machine slows them alike; the report
takes medians over rounds. Every command runs in its own process: wall time, CPU time and
peak RSS (``wait4``) of the process, the peak of the summed RSS of its process tree
(sampled every 0.2 s, which is what counts under xdist), and, through
bench/pytest_timing.py, the split into startup / collection / test loop / summary.

Writes ``bench/out/results.json`` and ``bench/out/results.md`` (the tables in
docs/benchmarks.md). ``--repeats``, ``--xdist-repeats`` and ``--figure-items`` trade
precision for time; the defaults aim at 15 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"

TARGETS = {
    "suite_over_floor": 1.3,  # (a)/(b) wall, at most
    "rss_over_floor": 3.0,  # (a)/(b) peak RSS, at most
    "xdist_over_floor": 1.3,  # (e)/(f) wall, at most
    "collection_s": 15.0,  # collecting 40,960 items, at most
    "figures_speedup": 10.0,  # (d)/(c) wall, at least (with --figure-items)
    "figures_memory": 0.1,  # (c)/(d) peak memory, at most (with --figure-items)
}
AT_MOST = (
    "suite_over_floor",
    "rss_over_floor",
    "xdist_over_floor",
    "collection_s",
    "figures_memory",
)


# --- measuring one command ---------------------------------------------------------------------


@dataclass
class Measurement:
    name: str
    cmd: list[str]
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + sys of the process and its waited-for children
    maxrss: int = 0  # bytes, the largest single process (wait4)
    tree_rss: int = 0  # bytes, peak of the summed RSS of the process tree (sampled)
    rc: int = 0
    timing: dict = field(default_factory=dict)  # bench/pytest_timing.py
    log: str = ""


def _children_of() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree_rss(pid: int) -> int:
    kids, total, todo = _children_of(), 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure(
    name: str, cmd: list[str], env: dict | None = None, timing: bool = False
) -> Measurement:
    """Run ``cmd`` from the repository root; wall, CPU, RSS; its output goes to a log file."""
    return measure_parallel(name, [cmd], env, timing)


def measure_parallel(
    name: str, cmds: list[list[str]], env: dict | None = None, timing: bool = False
) -> Measurement:
    """Run ``cmds`` at once: wall until the last ends, CPU summed, RSS of all trees summed.
    Timing (bench/pytest_timing.py) and the log are the first command's."""
    m = Measurement(name, cmds[0] if len(cmds) == 1 else [" ".join(c) for c in cmds])
    logs = OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    files = []
    rcs: list[int] = []
    try:
        t0 = time.perf_counter()
        for k, cmd in enumerate(cmds):
            tag = name if len(cmds) == 1 else f"{name}.{k}"
            full_env = {**os.environ, **(env or {})}
            if timing:
                full_env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(BENCH), full_env.get("PYTHONPATH")) if p
                )
                full_env["BENCH_TIMING_OUT"] = str(logs / f"{tag}.timing.json")
                (logs / f"{tag}.timing.json").unlink(missing_ok=True)
            fh = open(logs / f"{tag}.log", "w")  # closed below
            files.append(fh)
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT)
            )
        peak = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], sum(_tree_rss(p.pid) for p in procs))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            rcs.append(proc.returncode)
            m.cpu_s += usage.ru_utime + usage.ru_stime
            m.maxrss = max(m.maxrss, usage.ru_maxrss * 1024)
        m.wall_s = time.perf_counter() - t0
        done.set()
        poller.join()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        for fh in files:
            fh.close()
    m.rc = next((rc for rc in rcs if rc != 0), 0)
    m.tree_rss = max(peak[0], m.maxrss)
    first = name if len(cmds) == 1 else f"{name}.0"
    m.log = str((logs / f"{first}.log").relative_to(ROOT))
    if timing and (logs / f"{first}.timing.json").is_file():
        m.timing = json.loads((logs / f"{first}.timing.json").read_text())
    status_word = "ok" if m.rc == 0 else f"EXIT {m.rc}"
    print(
        f"  {name:<18} {m.wall_s:7.1f} s wall {m.cpu_s:7.1f} s cpu "
        f"{m.tree_rss / 2**20:7.0f} MiB peak  {status_word}",
        flush=True,
    )
    return m


# --- the suites --------------------------------------------------------------------------------


def suite_command(run_dir: Path, samples: int, extra: list[str], artifacts: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "validation/",
        "--run-id",
        str(run_dir),
        "--samples",
        str(samples),
        "--plots",
        "none",
        "-q",
        "-p",
        "pytest_timing",
        "--artifacts-dir",
        str(artifacts),
        *extra,
    ]


FLOOR_ITEMS = '''"""Floor for the benchmark: the validation suite's items, each asserting True."""

import json
from pathlib import Path

import pytest

IDS = json.loads((Path(__file__).parent / "ids.json").read_text())


@pytest.mark.parametrize("item", IDS["items"], ids=IDS["items"])
def test_decomposition_closes_and_stays_within_the_bound(item):
    assert True
'''

FLOOR_QUALITY = '''"""Floor for the benchmark: the run-level quality items, each asserting True."""

import json
from pathlib import Path

import pytest

IDS = json.loads((Path(__file__).parent / "ids.json").read_text())


@pytest.mark.parametrize("module", IDS["modules"], ids=IDS["modules"])
def test_weight_delta_is_within_budget(module):
    assert True


@pytest.mark.parametrize("layer", IDS["layers"], ids=IDS["layers"])
def test_residuals_are_within_budget_and_no_worse_than_the_baseline(layer):
    assert True
'''


def collect_ids(run_dir: Path, samples: int) -> tuple[dict[str, list[str]], Measurement]:
    """The validation suite's test ids, from ``--collect-only -q`` (also timed)."""
    cmd = suite_command(run_dir, samples, ["--collect-only"], OUT / "artifacts" / "collect")
    m = measure("collect-only", cmd, timing=True)
    ids: dict[str, list[str]] = {"items": [], "modules": [], "layers": []}
    for line in (ROOT / m.log).read_text().splitlines():
        if "::" not in line or "[" not in line:
            continue
        func, param = line.split("::", 1)[1].split("[", 1)
        param = param.rstrip("]")
        if func.startswith("test_decomposition"):
            ids["items"].append(param)
        elif func.startswith("test_weight_delta"):
            ids["modules"].append(param)
        elif func.startswith("test_residuals"):
            ids["layers"].append(param)
    return ids, m


def write_floor(ids: dict[str, list[str]]) -> Path:
    """The floor suite (its parameters are not named qk_*: the qkcheck plugin owns those)."""
    floor = OUT / "floor"
    floor.mkdir(parents=True, exist_ok=True)
    for stale in floor.glob("test_*.py"):
        stale.unlink()
    (floor / "ids.json").write_text(json.dumps(ids))
    (floor / "test_items.py").write_text(FLOOR_ITEMS)
    (floor / "test_quality.py").write_text(FLOOR_QUALITY)
    return floor


def _comparable(path: Path) -> dict:
    """A summary without what differs between shards and a whole run (settings, paths)."""
    data = json.loads(path.read_text())
    data.pop("settings", None)
    data["figures"]["paths"] = []
    return data


# --- report ------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _stats(ms: list[dict]) -> dict:
    """Medians of one variant's measurements."""
    out = {
        "n": len(ms),
        "wall": med([m["wall_s"] for m in ms]),
        "cpu": med([m["cpu_s"] for m in ms]),
        "rss": med([m["tree_rss"] for m in ms]),
    }
    for part in ("startup", "collection", "run", "finish"):
        out[part] = med([m["timing"].get(part, float("nan")) for m in ms])
    return out


def summarize(res: dict) -> dict:
    """Medians, ratios and verdicts from the raw measurements."""
    runs = res["runs"]
    s: dict = {"variants": {k: _stats(v) for k, v in runs.items() if v}}
    v = s["variants"]
    s["suite_over_floor"] = v["a"]["wall"] / v["b"]["wall"]
    s["suite_over_floor_paired"] = med(
        [x["wall_s"] / y["wall_s"] for x, y in zip(runs["a"], runs["b"], strict=False)]
    )
    s["suite_over_floor_cpu"] = v["a"]["cpu"] / v["b"]["cpu"]
    s["rss_over_floor"] = v["a"]["rss"] / v["b"]["rss"]
    if "a1" in v:
        s["tuned_over_floor"] = v["a1"]["wall"] / v["b"]["wall"]
        s["tuned_over_floor_paired"] = med(
            [x["wall_s"] / y["wall_s"] for x, y in zip(runs["a1"], runs["b"], strict=False)]
        )
    s["collection_s"] = v["a"]["collection"]
    s["collect_only_wall"] = res["collect_only"]["wall_s"]
    if "e" in v:
        s["xdist_speedup"] = v["a"]["wall"] / v["e"]["wall"]
    if "f" in v:
        s["floor_xdist_speedup"] = v["b"]["wall"] / v["f"]["wall"]
    if "e" in v and "f" in v:
        s["xdist_over_floor"] = v["e"]["wall"] / v["f"]["wall"]
        s["xdist_over_floor_cpu"] = v["e"]["cpu"] / v["f"]["cpu"]
    if "g" in v:
        serial = v["a"]
        s["shards_speedup"] = serial["wall"] / v["g"]["wall"]
        s["shards_merge_equal"] = all(m.get("merge_equals_whole") for m in runs["g"])
    fig = res.get("figures")
    if fig:
        c, d = fig["qkcheck"], fig["dense"]
        s["figure_items"] = len(c["item_seconds"])
        s["c_total"], s["d_total"] = sum(c["item_seconds"]), sum(d["item_seconds"])
        s["c_item"], s["d_item"] = med(c["item_seconds"]), med(d["item_seconds"])
        s["c_rank"], s["d_rank"] = med(c["ranking_seconds"]), med(d["ranking_seconds"])
        s["figures_speedup"] = s["d_total"] / s["c_total"]
        s["ranking_speedup"] = s["d_rank"] / s["c_rank"]
        s["c_peak"], s["d_peak"] = c["peak_rss"], d["peak_rss"]
        s["c_growth"] = c["peak_rss"] - c["rss_setup"]
        s["d_growth"] = d["peak_rss"] - d["rss_setup"]
        s["figures_memory"] = s["c_peak"] / s["d_peak"]
        s["figures_memory_growth"] = s["c_growth"] / max(s["d_growth"], 1)
        s["top_identical"] = c["top"] == d["top"]
    verdicts = {}
    for key, target in TARGETS.items():
        if key not in s:
            continue
        at_most = key in AT_MOST
        ok = s[key] <= target if at_most else s[key] >= target
        verdicts[key] = {"value": s[key], "target": target, "at_most": at_most, "met": ok}
    s["verdicts"] = verdicts
    return s


LABELS = {
    "a": "(a) `pytest validation/ … --plots none`",
    "a1": "(a1) (a) with `OMP_NUM_THREADS=1 … -p no:logging`",
    "b": "(b) floor: same ids, `assert True`",
    "e": "(e) (a) with `-n 2` (qkcheck picks `--dist loadgroup`)",
    "f": "(f) (b) with `-n 2`",
    "g": "(g) (a) as two `--layers` shards in parallel processes + merge",
}


def markdown(res: dict, s: dict) -> str:
    mib = 2**20
    cfg = res["config"]
    v = s["variants"]
    rounds = ", ".join(f"{k} ×{x['n']}" for k, x in v.items())
    lines = [
        f"Machine: {cfg['machine']}, {cfg['cpus']} CPUs, load average {cfg['load_before']} "
        f"before and {cfg['load_after']} after; Python {cfg['python']}, torch {cfg['torch']} "
        f"({cfg['torch_threads']} threads by default). Runs: {rounds}; figures: "
        f"{s.get('figure_items', 0)} items per method. Total {res['total_s'] / 60:.1f} min.",
        "",
        "| measurement (medians) | wall | CPU | peak RSS | startup | collection | test loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, x in v.items():
        lines.append(
            f"| {LABELS[key]} | {x['wall']:.1f} s | {x['cpu']:.1f} s | "
            f"{x['rss'] / mib:.0f} MiB | {x['startup']:.1f} s | {x['collection']:.1f} s | "
            f"{x['run']:.1f} s |"
        )
    if "c_total" in s:
        n = s["figure_items"]
        lines += [
            "",
            "| figures (combined + validation) | total | per item | ranking per item | "
            "peak RSS | growth over setup |",
            "|---|---|---|---|---|---|",
            f"| (c) qkcheck, {n} items | {s['c_total']:.1f} s | {s['c_item']:.2f} s | "
            f"{s['c_rank']:.2f} s | {s['c_peak'] / mib:.0f} MiB | {s['c_growth'] / mib:.0f} MiB |",
            f"| (d) dense reference, {n} items | {s['d_total']:.1f} s | {s['d_item']:.2f} s | "
            f"{s['d_rank']:.2f} s | {s['d_peak'] / mib:.0f} MiB | {s['d_growth'] / mib:.0f} MiB |",
        ]
    names = {
        "suite_over_floor": "(a)/(b) wall",
        "rss_over_floor": "(a)/(b) peak RSS",
        "xdist_over_floor": "(e)/(f) wall: `-n 2` suite over `-n 2` floor",
        "collection_s": f"collection of {res['n_items']:,} items inside (a), s",
        "figures_speedup": "(d)/(c) wall, figures",
        "figures_memory": "(c)/(d) peak RSS, figures",
    }
    lines += ["", "| target | measured | target | met |", "|---|---|---|---|"]
    for key, x in s["verdicts"].items():
        op = "≤" if x["at_most"] else "≥"
        lines.append(
            f"| {names[key]} | {x['value']:.3g} | {op} {x['target']:g} | "
            f"{'yes' if x['met'] else 'no'} |"
        )
    extra = [
        f"(a)/(b) paired per round: {s['suite_over_floor_paired']:.3g}; CPU (a)/(b): "
        f"{s['suite_over_floor_cpu']:.3g}",
    ]
    if "tuned_over_floor" in s:
        extra.append(
            f"(a1)/(b): {s['tuned_over_floor']:.3g} (paired {s['tuned_over_floor_paired']:.3g})"
        )
    if "floor_xdist_speedup" in s:
        extra.append(f"floor (b)/(f), xdist on trivial items: {s['floor_xdist_speedup']:.3g}")
    if "xdist_over_floor_cpu" in s:
        extra.append(
            f"CPU (e)/(f): {s['xdist_over_floor_cpu']:.3g}; (a)/(e), what `-n 2` gains the "
            f"suite: {s['xdist_speedup']:.3g}"
        )
    if "shards_speedup" in s:
        extra.append(
            f"(a)/(g), two --layers shards in parallel: {s['shards_speedup']:.3g}; merged "
            f"summary equals (a)'s apart from settings and paths: {s['shards_merge_equal']}"
        )
    extra.append(f"`--collect-only` wall: {s['collect_only_wall']:.1f} s")
    if "c_total" in s:
        extra.append(
            f"figures: ranking alone (d)/(c) {s['ranking_speedup']:.3g}; per item (d)/(c) "
            f"{s['d_item'] / s['c_item']:.3g}; memory growth (c)/(d) "
            f"{s['figures_memory_growth']:.3g}; top-N lists identical: {s['top_identical']}"
        )
    lines += ["", *(f"* {e}" for e in extra)]
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------

TUNED_ENV = {"OMP_NUM_THREADS": "1"}
TUNED_ARGS = ["-p", "no:logging"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=OUT / "ref")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="rounds of (a), (a1), (b) (3)")
    p.add_argument("--xdist-repeats", type=int, default=1, help="rounds of (e), (f), (g) (1)")
    p.add_argument("--figure-items", type=int, default=0, help="items for (c)/(d) (0: skip)")
    p.add_argument("--tuned", action="store_true", help="also (a1)")
    a = p.parse_args(argv)
    started = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    run_dir = a.run_dir.resolve()
    if not (run_dir / "final_config.yaml").is_file():
        print(f"building the reference-scale run in {run_dir}", flush=True)
        subprocess.run(
            [sys.executable, str(BENCH / "make_reference_run.py"), str(run_dir)],
            cwd=ROOT,
            check=True,
        )

    import torch  # only for the report

    load_before = os.getloadavg()
    res: dict = {"runs": {"a": [], "a1": [], "b": [], "e": [], "f": [], "g": []}}
    runs = res["runs"]
    print("collecting the suite's ids", flush=True)
    ids, collect = collect_ids(run_dir, a.samples)
    if collect.rc != 0 or not ids["items"]:
        raise SystemExit(f"collection failed; see {collect.log}")
    res["collect_only"] = asdict(collect)
    res["n_items"] = sum(len(v) for v in ids.values())
    floor = write_floor(ids)
    floor_cmd = [sys.executable, "-m", "pytest", str(floor.relative_to(ROOT)), "-q"]
    floor_cmd += ["-p", "pytest_timing"]
    xdist = ["-n", "2"]

    def suite(name: str, extra: list[str], env: dict | None = None) -> dict:
        cmd = suite_command(run_dir, a.samples, extra, OUT / "artifacts" / name)
        return asdict(measure(name, cmd, env=env, timing=True))

    layers = [x.removeprefix("L") for x in ids["layers"]]
    halves = [layers[: len(layers) // 2], layers[len(layers) // 2 :]]

    def layer_shards(name: str) -> dict:
        """(a) as two --layers shards in two processes at once, then merged."""
        dirs = [OUT / "artifacts" / f"{name}.{k}" for k in range(2)]
        cmds = [
            suite_command(run_dir, a.samples, ["--layers", ",".join(h)], d)
            for h, d in zip(halves, dirs, strict=True)
        ]
        m = measure_parallel(name, cmds, timing=True)
        merged = OUT / "artifacts" / f"{name}.merged.json"
        merge = [sys.executable, "-m", "qkcheck.merge", *(str(d / "summary.json") for d in dirs)]
        t = time.perf_counter()
        done = subprocess.run([*merge, "-o", str(merged)], cwd=ROOT, capture_output=True)
        m.wall_s += time.perf_counter() - t
        out = asdict(m)
        out["merge_rc"] = done.returncode
        whole = OUT / "artifacts" / "a-0" / "summary.json"
        if merged.is_file() and whole.is_file():
            out["merge_equals_whole"] = _comparable(merged) == _comparable(whole)
        return out

    for r in range(max(a.repeats, a.xdist_repeats)):
        print(f"round {r + 1}", flush=True)
        if r < a.repeats:
            runs["a"].append(suite(f"a-{r}", []))
            if a.tuned:
                runs["a1"].append(suite(f"a1-{r}", TUNED_ARGS, TUNED_ENV))
            runs["b"].append(asdict(measure(f"b-{r}", floor_cmd, timing=True)))
        if r < a.xdist_repeats:
            runs["e"].append(suite(f"e-{r}", xdist))
            runs["f"].append(asdict(measure(f"f-{r}", [*floor_cmd, "-n", "2"], timing=True)))
            runs["g"].append(layer_shards(f"g-{r}"))
    bad = [m["name"] for ms in runs.values() for m in ms if m["rc"] != 0]
    if bad:
        print(f"WARNING: non-zero exit in {bad}; see bench/out/logs/", flush=True)

    if a.figure_items:
        res["figures"] = {}
        for method in ("qkcheck", "dense"):
            out = OUT / f"figures-{method}.json"
            cmd = [
                sys.executable,
                str(BENCH / "figure_items.py"),
                str(run_dir),
                "--method",
                method,
                "--samples",
                str(a.samples),
                "--items",
                str(a.figure_items),
                "--out-dir",
                str(OUT / "figures"),
                "--json",
                str(out),
            ]
            m = measure(f"{'c' if method == 'qkcheck' else 'd'}-figures-{method}", cmd)
            if m.rc != 0:
                raise SystemExit(f"figures ({method}) failed; see {m.log}")
            res["figures"][method] = {**json.loads(out.read_text()), "process": asdict(m)}

    res["total_s"] = time.perf_counter() - started
    res["config"] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "load_before": ", ".join(f"{x:.1f}" for x in load_before),
        "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(a).items()},
    }
    s = summarize(res)
    res["summary"] = s
    (OUT / "results.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res, s)
    (OUT / "results.md").write_text(md)
    print()
    print(md)
    print(f"written: {OUT / 'results.json'}, {OUT / 'results.md'}")


if __name__ == "__main__":
    main()
