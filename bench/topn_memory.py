"""Peak memory and time of the exact top-N ranking at the reference run's scale.

    python bench/topn_memory.py

Each method runs in its own process; the figure is the growth of the process's peak RSS
(VmHWM) during ranking, after the inputs are built. Reference scale: 6 heads over 3 key
heads, C_q 250, C_k 200, 512 keys, d_head 32, float32.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from qkcheck.pairs import ItemFactors, top_pairs, dense_contributions, DEFAULT_BUDGET
torch.set_num_threads(1)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
g = torch.Generator().manual_seed(0)
f = ItemFactors(
    q=torch.randn(6, 250, 32, generator=g),
    k=torch.randn(3, 200, 512, 32, generator=g),
    scale=32 ** -0.5,
)
before = hwm()
t = time.perf_counter()
if sys.argv[1] == "chunked":
    top = top_pairs(f, 8)
    pairs = top.mean_pairs.tolist()
else:
    P = dense_contributions(f)  # (head, C_q, C_k, key): the reference script's tensor
    peak = P.mean(dim=0).abs().amax(dim=-1).flatten()
    pairs = [list(divmod(int(i), 200)) for i in peak.topk(8).indices]
elapsed = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "peak_bytes": hwm() - before, "pairs": pairs}))
"""


def main() -> None:
    dense_size = 6 * 250 * 200 * 512 * 4
    out = {}
    for method in ("chunked", "dense"):
        res = subprocess.run([sys.executable, "-c", CHILD, method], capture_output=True, text=True)
        out[method] = json.loads(res.stdout)
    same = out["chunked"]["pairs"] == out["dense"]["pairs"]
    print(f"dense pair tensor: {dense_size / 2**20:.0f} MiB")
    for m, r in out.items():
        print(f"{m:8s} peak +{r['peak_bytes'] / 2**20:7.1f} MiB  {r['seconds']:.2f} s")
    ratio = out["dense"]["peak_bytes"] / out["chunked"]["peak_bytes"]
    print(f"memory ratio dense/chunked: {ratio:.1f}")
    print(f"identical top-8 (head mean): {same}")


if __name__ == "__main__":
    main()
