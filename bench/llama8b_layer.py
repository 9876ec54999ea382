"""One Llama-8B-sized attention layer: time and peak memory of one (layer, sample) group.

    python bench/llama8b_layer.py [--T 2048] [--chunk-mib 64,256,1024] [--device cpu]
                                  [--unchunked auto|yes|no] [--json bench/out/llama8b_layer.json]

Builds (once, under ``bench/out/llama8b-layer/``, git-ignored; ~1.7 GB) a synthetic spd run
in spd's on-disk layout (``tools/spd_layout.py``, as ``bench/make_reference_run.py``
does): a one-layer LlamaSimpleMLP of Llama-3-8B's attention shape — d_model 4096, 32 query
heads over 8 key/value heads, head_dim 128, RoPE, MLP width 14336, n_ctx 2048, a 512-token
vocabulary — with q_proj and k_proj decomposed into C = 4096 random components and a
random Δ of ‖Δ‖/‖W‖ = 0.1. Then, per chunk budget (``--chunk-mib``; ``--unchunked``: one
chunk, the old full-square computation, when it fits in memory), on a fresh
:class:`~qkcheck.validate.Validator` (the layer's weights prepared beforehand, as a
session does once per layer): the target forward pass (``Validator.capture``) and the
group's decomposition and reduction (``Validator.group``), each with wall time, CPU time
(all threads) and peak resident memory above what the process held before (sampled every
2 ms; on cuda ``torch.cuda.max_memory_allocated`` above the allocation before). Prints a
table and writes JSON with the analytic FLOPs of each part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tools/

from bench.make_reference_run import decomposed
from qkcheck.chunks import LIVE_BLOCKS, group_chunks
from qkcheck.models import build_target_model
from qkcheck.runs import load_run
from qkcheck.settings import Settings
from qkcheck.validate import Validator
from tools.spd_layout import (
    MODEL_CLASS,
    llama_simple_mlp_config,
    pretrain_run_files,
    spd_run_files,
    spd_state,
    under,
    write_files,
)

OUT = Path(__file__).resolve().parent / "out"
D_MODEL, N_HEAD, N_KV_HEADS, HEAD_DIM, N_CTX = 4096, 32, 8, 128, 2048
N_INTERMEDIATE, VOCAB, C = 14336, 512, 4096
WEIGHT_STD = 0.02  # q/k entry std (‖Δ‖/‖W‖ 0.1, as make_reference_run.py)
CI_HIDDEN = 16
SPD_STEP, PRETRAIN_STEP = 1000, 1
#: a budget no group reaches: one chunk, the whole square at once
ONE_CHUNK = 1e9


def model_config() -> dict:
    return llama_simple_mlp_config(
        n_layer=1,
        n_embd=D_MODEL,
        n_head=N_HEAD,
        n_kv_heads=N_KV_HEADS,
        n_ctx=N_CTX,
        vocab_size=VOCAB,
        n_intermediate=N_INTERMEDIATE,
    )


def spd_config(pretrain_checkpoint: Path) -> dict:
    return {
        "seed": 0,
        "ci_config": {"mode": "layerwise", "fn_type": "shared_mlp", "hidden_dims": [CI_HIDDEN]},
        "sigmoid_type": "leaky_hard",
        "module_info": [{"module_pattern": f"h.*.attn.{n}", "C": C} for n in ("q_proj", "k_proj")],
        "use_delta_component": True,
        "steps": SPD_STEP,
        "pretrained_model_class": MODEL_CLASS,
        "pretrained_model_path": str(pretrain_checkpoint.resolve()),
        "pretrained_model_name": None,
        "tokenizer_name": None,
        "task_config": {"task_name": "lm", "max_seq_len": N_CTX, "is_tokenized": True},
    }


def build(out: Path, seed: int = 0) -> None:
    """The run directory: target weights with q/k = (V U)ᵀ + Δ, V ``(d, C)``, U ``(C, d_out)``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mc = model_config()
    target = {
        k: v.detach().clone()
        for k, v in build_target_model(MODEL_CLASS, mc, None).state_dict().items()
    }
    components, ci_layers = {}, {}
    for name in ("q_proj", "k_proj"):
        path = f"h.0.attn.{name}"
        W, V, U = decomposed(tuple(target[f"{path}.weight"].shape), C, g, WEIGHT_STD)
        target[f"{path}.weight"] = W
        components[path] = (V, U)
        d_in = V.shape[0]
        W0 = torch.randn(d_in, CI_HIDDEN, generator=g) / math.sqrt(d_in)
        W2 = torch.randn(CI_HIDDEN, C, generator=g) / math.sqrt(CI_HIDDEN)
        ci_layers[path] = [(W0, torch.zeros(CI_HIDDEN)), (W2, torch.zeros(C))]
    target["lm_head.weight"] = target["wte.weight"]
    checkpoint = out / "pretrain" / f"model_step_{PRETRAIN_STEP}.pt"
    tokens = torch.randint(0, VOCAB, (2, N_CTX), generator=g, dtype=torch.int64)
    state = spd_state(target, components, ci_layers)
    files = spd_run_files(spd_config(checkpoint), state, SPD_STEP, tokens)
    train = {"model": mc, "num_iterations": PRETRAIN_STEP + 1}
    files |= under("pretrain", pretrain_run_files(mc, train, target, PRETRAIN_STEP))
    write_files(out, files)


def flops(T: int, chunks: list[tuple[int, int]]) -> dict[str, float]:
    """Multiply-adds × 2 of the target forward (one layer and the lm head), the group's
    projections (both sides, components and Δ, once) and its per-block score products
    (three grouped ``q kᵀ`` per block without biases: components, Δ·k̂, Δq·(k̂+Δk))."""
    d, H, KV, hd = D_MODEL, N_HEAD, N_KV_HEADS, HEAD_DIM
    forward = 2 * T * (d * (2 * H * hd + 2 * KV * hd) + 2 * d * N_INTERMEDIATE + d * VOCAB)
    forward += 2 * 2 * H * T * T * hd  # scores and pattern @ v over the whole square
    proj = 2 * T * (d * C + C * H * hd + H * hd * d) + 2 * T * (d * C + C * KV * hd + KV * hd * d)
    entries = sum((i1 - i0) * i1 for i0, i1 in chunks)
    return {
        "forward": float(forward),
        "projections": float(proj),
        "scores": float(3 * 2 * H * entries * hd),
        "block_entries": float(H * entries),
    }


class PeakRSS:
    """Peak resident set size (bytes) while the block runs, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(fn, device: str) -> dict[str, float]:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    wall, cpu = time.perf_counter(), time.process_time()
    with PeakRSS() as rss:
        fn()
        if cuda:
            torch.cuda.synchronize()
    out = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "rss_before_mib": rss.before / 2**20,
        "peak_rss_mib": rss.peak / 2**20,
    }
    if cuda:
        out["cuda_peak_above_mib"] = (torch.cuda.max_memory_allocated() - alloc0) / 2**20
    return out


def child(a: argparse.Namespace, mib: float) -> dict:
    """One budget in this (fresh) process: load, prepare the layer, then forward and group."""
    t = time.perf_counter()
    run = load_run(a.run_dir)
    tokens = run.samples[:1, : a.T]
    settings = Settings(run_id=str(a.run_dir), device=a.device, chunk_mib=mib)
    v = Validator(run, tokens, [0], settings)
    w = v.weights(0)
    for m, n in (("W_hat_Q", N_HEAD), ("W_hat_K", N_KV_HEADS), ("delta_Q", N_HEAD)):
        w.head_norms(m, n, "spectral")  # the layer's one-off work, not the group's
    w.head_norms("delta_K", N_KV_HEADS, "spectral")
    setup = time.perf_counter() - t
    fwd = measure(lambda: v.capture(0), a.device)
    grp = measure(lambda: v.group(0, 0), a.device)
    g = v.group(0, 0)
    chunks = group_chunks(a.T, N_HEAD, 4, mib)
    return {
        "chunk_mib": None if mib == ONE_CHUNK else mib,
        "chunks": len(chunks),
        "setup_s": setup,
        "forward": fwd,
        "group": grp,
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "flops": flops(a.T, chunks),
        "worst_ratio": float(g.ratio.max()),
        "max_closure_error": float(g.closure_error.max()),
        "closure_tol": g.closure_tol,
        "median_abs_r": g.abs_r.quantile(0.5),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=N_CTX, help=f"positions per sample (≤ {N_CTX})")
    p.add_argument("--chunk-mib", default="64,256,1024", help="chunk budgets, MiB, comma-separated")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--unchunked",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also one chunk (full squares); auto: when it fits in available memory",
    )
    p.add_argument("--run-dir", type=Path, default=OUT / "llama8b-layer")
    p.add_argument("--json", type=Path, default=OUT / "llama8b_layer.json")
    p.add_argument("--one", type=float, help=argparse.SUPPRESS)  # a child: this budget only
    a = p.parse_args(argv)
    if not 1 <= a.T <= N_CTX:
        p.error(f"--T must be in [1, {N_CTX}]")
    if a.one is not None:
        print(json.dumps(child(a, a.one)))
        return
    if not (a.run_dir / f"model_{SPD_STEP}.pth").is_file():
        t = time.perf_counter()
        a.run_dir.mkdir(parents=True, exist_ok=True)
        build(a.run_dir)
        print(f"built {a.run_dir} in {time.perf_counter() - t:.0f} s", flush=True)
    budgets = [float(b) for b in a.chunk_mib.split(",") if b]
    full = LIVE_BLOCKS * N_HEAD * a.T * a.T * 4 / 2**20
    avail = _available_mib()
    unchunked = a.unchunked == "yes" or (a.unchunked == "auto" and 1.5 * full + 4096 < avail)
    if unchunked:
        budgets.append(ONE_CHUNK)
    rows = []
    for mib in budgets:  # each in a fresh process: its peak RSS is its own
        cmd = [sys.executable, __file__, "--T", str(a.T), "--device", a.device]
        cmd += ["--run-dir", str(a.run_dir), "--one", repr(mib)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        _print_row(rows[-1])
    result = {
        "T": a.T,
        "device": a.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "unchunked_estimate_mib": full,
        "available_mib": avail,
        "unchunked_measured": unchunked,
        "rows": rows,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.json}")


def _print_row(r: dict) -> None:
    """Memory columns: peak RSS while the forward (the group) ran, above the RSS the process
    held after setup (run, layer weights), MiB."""
    if not hasattr(_print_row, "done"):
        print(
            f"{'chunk MiB':>10} {'chunks':>6} | {'fwd wall s':>10} {'fwd cpu s':>9} "
            f"{'fwd +MiB':>8} | {'group wall s':>12} {'group cpu s':>11} {'group +MiB':>10} | "
            f"{'GFLOP':>6} {'base MiB':>8}"
        )
        _print_row.done = True
    f, g = r["forward"], r["group"]
    base = f["rss_before_mib"]
    gflop = (r["flops"]["projections"] + r["flops"]["scores"]) / 1e9
    label = "one chunk" if r["chunk_mib"] is None else f"{r['chunk_mib']:g}"
    print(
        f"{label:>10} {r['chunks']:>6} | {f['wall_s']:>10.2f} {f['cpu_s']:>9.2f} "
        f"{f['peak_rss_mib'] - base:>8.0f} | {g['wall_s']:>12.2f} {g['cpu_s']:>11.2f} "
        f"{g['peak_rss_mib'] - base:>10.0f} | {gflop:>6.0f} {base:>8.0f}",
        flush=True,
    )


def _available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


if __name__ == "__main__":
    main()
