"""Draw the figures (combined + validation) of many items, one method per process.

    python bench/figure_items.py RUN_DIR --method qkcheck|dense [--samples 20]
        [--items N] [--out-dir DIR] [--json OUT]

Items are (layer, sample, last query position) for every layer and the first ``--samples``
samples, sample-major, at most ``--items`` of them. Both methods go through
:func:`qkcheck.figures.write_item_figures` — the same factors, figures and files — and
differ only in how the pairs are ranked and their curves taken:

* ``qkcheck``: qkcheck's exact top-N (:func:`qkcheck.pairs.top_pairs`, which never builds
  the pair tensor) and :func:`~qkcheck.pairs.pair_curves`;
* ``dense``: the reference script's method, written plainly here: the full
  ``(head, C_q, C_k, key_pos)`` pair tensor by einsum (0.6 GB in float32 at the reference
  scale's last query position), peak |P| over keys, ``topk``; curves and the component sum
  are read off the dense tensor.

The JSON holds per-item wall times (whole item, and the ranking alone), each item's top-N
lists (to check that the methods agree), and memory: ``rss_setup`` (VmRSS once the run is
loaded and the first forward pass done) and ``peak_rss`` (VmHWM at the end), in bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# --- the reference script's dense method --------------------------------------------------------


class Dense:
    """Dense ranking with the interface qkcheck.figures calls: ``top_pairs``, ``pair_curves``,
    ``component_sum``. Keeps the last item's pair tensor for the curves and the sum."""

    def __init__(self) -> None:
        self.P: torch.Tensor | None = None

    def top_pairs(self, f, n: int, budget_bytes: int | None = None):
        H, Cq, Ck, _ = f.shape
        self.P = None  # free the previous item's tensor first
        k = f.k.repeat_interleave(f.group, dim=0)  # (head, C_k, key_pos, d_head)
        P = torch.einsum("hcx,hdjx->hcdj", f.q, k) * f.scale  # (head, C_q, C_k, key_pos)
        n = min(n, Cq * Ck)
        peak = P.abs().amax(dim=-1)  # (head, C_q, C_k)
        hv, hi = peak.reshape(H, -1).topk(n, dim=-1)
        mean_peak = P.mean(dim=0).abs().amax(dim=-1)  # (C_q, C_k)
        mv, mi = mean_peak.reshape(-1).topk(n)
        self.P = P

        def unravel(flat: torch.Tensor) -> torch.Tensor:
            return torch.stack((flat // Ck, flat % Ck), dim=-1)

        return SimpleNamespace(
            head_pairs=unravel(hi), head_peaks=hv, mean_pairs=unravel(mi), mean_peaks=mv
        )

    def pair_curves(self, f, pairs: torch.Tensor) -> torch.Tensor:
        assert self.P is not None
        return self.P[:, pairs[:, 0], pairs[:, 1], :]  # (head, m, key_pos)

    def component_sum(self, f) -> torch.Tensor:
        assert self.P is not None
        return self.P.sum(dim=(1, 2))  # (head, key_pos)


# --- driver ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory or reference (as --run-id takes)")
    p.add_argument("--method", choices=("qkcheck", "dense"), required=True)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--items", type=int, default=None, help="at most this many items")
    p.add_argument("--out-dir", type=Path, default=Path("bench/out/figures"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    import qkcheck.figures as figures
    from qkcheck.runs import load_run
    from qkcheck.settings import Selection, Settings
    from qkcheck.validate import Validator

    run = load_run(a.run)
    tokens = run.load_samples().tokens
    ids = list(range(a.samples))
    settings = Settings(
        run_id=a.run, samples=Selection(count=a.samples), query_pos=Selection(last=True)
    )
    v = Validator(run, tokens[ids], ids, settings)
    last = v.query_positions[-1]
    items = [(layer, s, last) for s in ids for layer in v.layers][: a.items]

    ranking: list[float] = []
    ranked: list[dict] = []
    rank_fn = figures.top_pairs
    if a.method == "dense":
        dense = Dense()
        rank_fn = dense.top_pairs
        figures.pair_curves = dense.pair_curves
        figures.component_sum = dense.component_sum

    def timed_rank(*args, **kw):
        t = time.perf_counter()
        out = rank_fn(*args, **kw)
        ranking.append(time.perf_counter() - t)
        return out

    plot_data = figures.item_plot_data

    def recorded_plot_data(*args, **kw):
        d = plot_data(*args, **kw)
        ranked.append({"head_top": d.head_top, "mean_top": d.mean_top})
        return d

    for name in ("top_pairs", "pair_curves", "component_sum", "item_plot_data"):
        if not hasattr(figures, name):
            raise SystemExit(f"qkcheck.figures has no {name}: update bench/figure_items.py")
    figures.top_pairs = timed_rank
    figures.item_plot_data = recorded_plot_data

    v.capture(items[0][1])  # the first forward pass belongs to the setup
    import qkcheck.plots  # noqa: F401  (matplotlib imported before the baseline)

    rss_setup = proc_status("VmRSS")
    out_dir = a.out_dir / a.method
    times: list[float] = []
    for layer, sample, q in items:
        t = time.perf_counter()
        figures.write_item_figures(v, layer, sample, q, out_dir)
        times.append(time.perf_counter() - t)
    result = {
        "method": a.method,
        "items": [list(it) for it in items],
        "item_seconds": times,
        "ranking_seconds": ranking,
        "top": [
            {
                "head_top": [[list(p) for p in h] for h in r["head_top"]],
                "mean_top": [list(p) for p in r["mean_top"]],
            }
            for r in ranked
        ],
        "rss_setup": rss_setup,
        "peak_rss": proc_status("VmHWM"),
        "torch_threads": torch.get_num_threads(),
    }
    text = json.dumps(result)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
