"""CPU time per (layer, sample) group by query rows per chunk, at the reference scale.

    python bench/chunk_rows.py [--rows 512,256,128,96,64,32,16] [--run-dir bench/out/ref]

One torch thread, the reference-scale run's (bench/make_reference_run.py) four layers of
one sample, its forward capture made before the clock; for each row count every group is
walked in chunks of that many query rows (``qkcheck.chunks.MAX_ROWS`` picks the default),
best of three passes. 512 rows is the whole square in one block.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="512,256,128,96,64,32,16")
    p.add_argument("--run-dir", type=Path, default=ROOT / "bench" / "out" / "ref")
    a = p.parse_args()
    if not (a.run_dir / "final_config.yaml").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "make_reference_run.py"), str(a.run_dir)],
            check=True,
        )

    import torch

    import qkcheck.validate as validate
    from qkcheck.runs import load_run
    from qkcheck.settings import Settings

    torch.set_num_threads(1)
    run = load_run(str(a.run_dir))
    tokens = run.load_samples().tokens[:1]
    v = validate.Validator(run, tokens, [0], Settings(run_id=str(a.run_dir)))
    v.capture(0)
    print("rows  ms per group (CPU, best of 3)")
    for rows in (int(r) for r in a.rows.split(",")):

        def chunks(T, heads, itemsize, mib, rows=rows):
            return [(i, min(T, i + rows)) for i in range(0, T, rows)]

        validate.group_chunks = chunks
        v._compute_group(v.layers[0], 0)  # warm
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            for layer in v.layers:
                v._compute_group(layer, 0)
            best = min(best, (time.process_time() - t) / len(v.layers))
        print(f"{rows:4d}  {best * 1000:6.1f}")


if __name__ == "__main__":
    main()
