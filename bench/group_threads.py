"""Time one (layer, sample) group of the validation engine at 1 and at the default number
of torch threads, alternating, on the reference-scale run.

    python bench/group_threads.py [RUN_DIR] [--rounds 3]

A group is what ``Validator`` computes once per (layer, sample) for all 512 query
positions: ~60 elementwise passes over ``(head, query_pos, key_pos)`` tensors of 1.5 M
entries and a few small products. Prints wall and CPU seconds per group for each setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from qkcheck.runs import load_run
from qkcheck.settings import Selection, Settings
from qkcheck.validate import Validator


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="bench/out/ref")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    default = torch.get_num_threads()
    run = load_run(Path(a.run))
    tokens = run.samples
    v = Validator(run, tokens[:4], [0, 1, 2, 3], Settings(run_id=a.run, samples=Selection(4)))
    v.capture(0)
    for layer in v.layers:
        v.weights(layer)
    v._compute_group(0, 0)  # warm-up
    results: dict[int, list[tuple[float, float]]] = {1: [], default: []}
    for r in range(a.rounds):
        for n in dict.fromkeys((1, default)):
            torch.set_num_threads(n)
            t, c = time.perf_counter(), time.process_time()
            for s in range(4):
                v._compute_group(v.layers[r % len(v.layers)], s)
            results[n].append(((time.perf_counter() - t) / 4, (time.process_time() - c) / 4))
    for n, rows in results.items():
        walls = sorted(w for w, _ in rows)
        cpus = sorted(c for _, c in rows)
        print(
            f"torch threads {n}: median per group {walls[len(walls) // 2]:.3f} s wall, "
            f"{cpus[len(cpus) // 2]:.3f} s CPU"
        )


if __name__ == "__main__":
    main()
