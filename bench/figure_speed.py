"""Figures per item, before vs after, side by side in one run, at the demo and reference scale.

    python bench/figure_speed.py [--before REV] [--items 4] [--scales demo,ref]
        [--json bench/out/figure_speed.json]

"before" is qkcheck as of git revision ``REV`` (default ``73e28de``, the last commit before
the figure rework of issue 11: combined + validation figures, first-come in makereport),
extracted with ``git archive`` into a temporary folder; "after" is this checkout (combined,
components and validation figures). Each side runs in its own process on the same items:
(layer, sample, last query position) for the first samples and every layer, at most
``--items`` of them. Their (layer, sample) groups are computed before the clock starts (the
validator's work, not the figures'), then:

* ``serial``: ``qkcheck.figures.write_item_figures`` per item, wall and CPU seconds;
* ``parallel`` (after only): ``qkcheck.figures.write_figures`` over all items at once —
  data assembled in the process, figures drawn in worker processes — wall seconds per item.

Each item's top-N lists (per head and for the head mean) are recorded on both sides and
compared. ``ref`` is ``bench/out/ref`` (built by bench/make_reference_run.py if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT = BENCH / "out"


def worker(run_id: str, n_items: int, out_dir: Path, parallel: bool) -> dict:
    import torch

    import qkcheck.figures as figures
    from qkcheck.runs import load_run
    from qkcheck.settings import Selection, Settings
    from qkcheck.validate import Validator

    run = load_run(run_id)
    tokens = run.load_samples().tokens
    n_layers = len(run.layers)
    n_samples = max(1, -(-n_items // n_layers))
    ids = list(range(n_samples))
    settings = Settings(
        run_id=run_id, samples=Selection(count=n_samples), query_pos=Selection(last=True)
    )
    v = Validator(run, tokens[ids], ids, settings)
    last = v.query_positions[-1]
    items = [(layer, s, last) for s in ids for layer in v.layers][:n_items]
    for layer, s, _ in items:  # the validator's work, before the clock
        v.group(layer, s)
    import qkcheck.plots  # noqa: F401  (matplotlib imported before the clock)

    ranked: list[dict] = []
    plot_data = figures.item_plot_data

    def recorded(*args, **kw):
        d = plot_data(*args, **kw)
        ranked.append(
            {
                "head_top": [[list(p) for p in h] for h in d.head_top],
                "mean_top": [list(p) for p in d.mean_top],
            }
        )
        return d

    figures.item_plot_data = recorded
    wall, cpu, files = [], [], []
    for it in items:
        t, c = time.perf_counter(), time.process_time()
        paths = figures.write_item_figures(v, *it, out_dir / "serial")
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        files.append([Path(p).name for p in paths])
    result = {
        "run": run.name,
        "shape": {
            "n_head": v.specs[v.layers[0]].n_head,
            "keys": last + 1,
            "C_q": int(v.weights(v.layers[0]).V_Q.shape[1]),
            "C_k": int(v.weights(v.layers[0]).V_K.shape[1]),
        },
        "items": [list(it) for it in items],
        "serial_wall": wall,
        "serial_cpu": cpu,
        "files": files,
        "top": ranked[: len(items)],
        "torch_threads": torch.get_num_threads(),
    }
    if parallel and hasattr(figures, "write_figures"):
        t = time.perf_counter()
        res = figures.write_figures(v, items, out_dir / "parallel")
        result["parallel_wall"] = time.perf_counter() - t
        bad = [str(r) for r in res if isinstance(r, BaseException)]
        if bad:
            raise SystemExit(f"parallel drawing failed: {bad}")
    return result


def extract(rev: str, dest: Path) -> Path:
    """qkcheck/ as of ``rev`` under ``dest`` (importable with PYTHONPATH=dest)."""
    tar = dest / "src.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(tar), rev, "qkcheck"],
        check=True,
    )
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest


def side(src: Path, run_id: str, n_items: int, out_dir: Path, parallel: bool) -> dict:
    out = out_dir / "result.json"
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--worker", run_id, "--items", str(n_items)]
    cmd += ["--out-dir", str(out_dir), "--json", str(out)] + (["--parallel"] if parallel else [])
    subprocess.run(cmd, check=True, env=env, cwd=src)
    return json.loads(out.read_text())


def med(x: list[float]) -> float:
    s = sorted(x)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", metavar="RUN", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, default=OUT / "figure_speed")
    p.add_argument("--before", default="73e28de")
    p.add_argument("--items", type=int, default=4)
    p.add_argument("--scales", default="demo,ref")
    p.add_argument("--json", type=Path, default=OUT / "figure_speed.json")
    a = p.parse_args(argv)
    if a.worker:
        res = worker(a.worker, a.items, a.out_dir, a.parallel)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res))
        return

    ref = OUT / "ref"
    runs = {"demo": "demo", "ref": str(ref)}
    if "ref" in a.scales and not (ref / "final_config.yaml").is_file():
        subprocess.run([sys.executable, str(BENCH / "make_reference_run.py"), str(ref)], check=True)
    results: dict = {"before": a.before, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        old = extract(a.before, Path(tmp))
        for scale in a.scales.split(","):
            run_id = runs[scale] if scale in runs else scale
            if scale == "ref":
                run_id = str(ref.resolve())
            before = side(old, run_id, a.items, a.out_dir / scale / "before", False)
            after = side(ROOT, run_id, a.items, a.out_dir / scale / "after", True)
            same = [b == c for b, c in zip(before["top"], after["top"], strict=True)]
            results[scale] = {"before": before, "after": after, "same_top": same}
    results["load_after"] = os.getloadavg()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1))
    print(
        f"load average before {results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f}"
    )
    print(
        "| scale | side | figures | s/item wall (median) | s/item CPU | s/item parallel "
        "| same top-N |"
    )
    print("|---|---|---|---|---|---|---|")
    for scale in a.scales.split(","):
        r = results[scale]
        sh = r["after"]["shape"]
        name = f"{scale} ({sh['n_head']} heads, {sh['keys']} keys, C {sh['C_q']}/{sh['C_k']})"
        for key in ("before", "after"):
            x = r[key]
            n = len(x["items"])
            par = f"{x['parallel_wall'] / n:.2f}" if "parallel_wall" in x else "–"
            print(
                f"| {name} | {key} | {len(x['files'][0])} | {med(x['serial_wall']):.2f} | "
                f"{med(x['serial_cpu']):.2f} | {par} | {sum(r['same_top'])}/{n} |"
            )
        b, c = r["before"], r["after"]
        best = min(med(c["serial_wall"]), c.get("parallel_wall", 1e9) / len(c["items"]))
        print(
            f"| {name} | before/after | | {med(b['serial_wall']) / best:.2f}× (best after) | | | |"
        )


if __name__ == "__main__":
    main()
