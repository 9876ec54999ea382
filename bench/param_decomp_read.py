"""How param-decomp checkpoint reading scales: time to open the fixture run, and bytes read
for one layer's q/k components of a large synthetic checkpoint (orbax layout: OCDBT store,
zarr arrays chunked one stack slice per chunk, as orbax writes stacked arrays).

    .venv/bin/python bench/param_decomp_read.py [--layers 32 --d 1024 --c 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorstore as ts

sys.path.insert(0, str(Path(__file__).parents[1]))

from qkcheck import load_run
from qkcheck.runs.param_decomp.orbax import CheckpointItem

FIXTURE = Path(__file__).parents[1] / "tests" / "data" / "param-decomp-small"


def bytes_read() -> int:
    m = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v.get("value", 0) for x in m for v in x.get("values", []))


def open_fixture(repeats: int = 5) -> tuple[float, float]:
    os.environ["PARAM_DECOMP_OUT_DIR"] = str(FIXTURE)
    opens, firsts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run = load_run("p-5eed0a01")
        t1 = time.perf_counter()
        run.components("h.0.attn.q_proj")
        run.components("h.0.attn.k_proj")
        firsts.append(time.perf_counter() - t1)
        opens.append(t1 - t0)
    return statistics.median(opens), statistics.median(firsts)


def write_large(item: Path, layers: int, d: int, c: int) -> dict[str, tuple[int, ...]]:
    item.mkdir(parents=True)
    base = {"driver": "ocdbt", "base": f"file://{item}/"}
    shapes = {}
    rng = np.random.default_rng(0)
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for i, shape in ((0, (layers, d, c)), (1, (layers, c, d))):
            key = f"components.stacks.{kind}.{i}"
            meta = {"shape": list(shape), "dtype": "<f4", "chunks": [1, *shape[1:]]}
            t = ts.open(
                {"driver": "zarr", "kvstore": base, "path": key, "metadata": meta, "create": True}
            ).result()
            for s in range(layers):
                t[s].write(rng.standard_normal(shape[1:], dtype=np.float32)).result()
            shapes[key] = shape
    tree = {
        str(tuple(k.split("."))): {
            "key_metadata": [{"key": p, "key_type": 2} for p in k.split(".")],
            "value_metadata": {"value_type": "jax.Array", "write_shape": list(s)},
        }
        for k, s in shapes.items()
    }
    (item / "_METADATA").write_text(json.dumps({"tree_metadata": tree, "use_zarr3": False}))
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--c", type=int, default=1024)
    a = ap.parse_args()
    t_open, t_first = open_fixture()
    print(
        f"fixture p-5eed0a01: load_run {t_open * 1e3:.1f} ms, first layer's q/k "
        f"{t_first * 1e3:.1f} ms (medians of 5)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        shapes = write_large(Path(tmp) / "decomposition", a.layers, a.d, a.c)
        total = sum(int(np.prod(s)) * 4 for s in shapes.values())
        item = CheckpointItem(Path(tmp) / "decomposition")
        before = bytes_read()
        t0 = time.perf_counter()
        for kind in ("q_proj", "k_proj"):
            for i in (0, 1):
                item.read(f"components.stacks.{kind}.{i}", a.layers // 2)
        dt = time.perf_counter() - t0
        used = bytes_read() - before
        one_layer = 4 * a.d * a.c * 4
        print(
            f"synthetic {a.layers} layers, d {a.d}, C {a.c}: checkpoint {total / 2**20:.0f} MiB; "
            f"one layer's q/k read {used / 2**20:.1f} MiB ({used / one_layer:.2f}x its arrays, "
            f"{used / total:.3%} of the item) in {dt * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
