"""Write a synthetic SPD run at the reference run's scale (s-55ea3f9b) in spd's on-disk layout.

Usage::

    python bench/make_reference_run.py OUT_DIR [--samples 20] [--seed 0]

then ``pytest validation/ --run-id OUT_DIR``. ``OUT_DIR`` is the SPD run directory; its
target model's pretrain run sits beside it, in ``OUT_DIR/pretrain/``::

    OUT_DIR/final_config.yaml       spd's Config; pretrained_model_path = the checkpoint below
    OUT_DIR/model_1000.pth          target_model.*, _components.<path>.{V,U}, ci_fn._ci_fns.*
    OUT_DIR/samples.pt              int64 (n_samples, 512) token ids (no tokenizer needed)
    OUT_DIR/pretrain/model_config.yaml, final_config.yaml, model_step_4999.pt

Scale (the seed PR's run): LlamaSimpleMLP, 4 layers, d_model 192, 6 heads, 3 key/value
heads (head_dim 32), n_ctx 512, vocab 4096, n_intermediate 768; decomposed modules
``q_proj`` C = 250, ``k_proj`` C = 200, ``v_proj`` C = 200, ``o_proj`` C = 250; layerwise
``shared_mlp`` CI functions of hidden width 800 (``layers.0``: d_in × 800, GELU,
``layers.2``: 800 × C), ``leaky_hard`` sigmoid.

The weights are random, not trained: components ``V`` (d_in × C), ``U`` (C × d_out) with
``(V U)ᵀ`` of entry std ``WEIGHT_STD``, and the target weight ``W = (V U)ᵀ + Δ`` with a
random ``Δ`` of ``‖Δ‖_F = DELTA_FRACTION · ‖W‖_F`` (the reference run had about 11 %). The
pre-softmax logits then have a standard deviation of a few units, as a trained model's do.
Everything is seeded; the files take about 45 MB (never commit them: ``bench/out/`` is
git-ignored).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tools/

from qkcheck.models import build_target_model
from tools.spd_layout import (
    MODEL_CLASS,
    llama_simple_mlp_config,
    pretrain_run_files,
    spd_run_files,
    spd_state,
    under,
    write_files,
)

RUN_NAME = "s-55ea3f9b"
SPD_STEP = 1000
PRETRAIN_STEP = 4999
N_LAYER, N_EMBD, N_HEAD, N_KV_HEADS, N_CTX = 4, 192, 6, 3, 512
VOCAB, N_INTERMEDIATE = 4096, 768
COMPONENTS = {"q_proj": 250, "k_proj": 200, "v_proj": 200, "o_proj": 250}
CI_HIDDEN = 800
WEIGHT_STD = 0.1  # entry std of the q/k/v/o weights: logits of std ≈ (0.1·√192)² ≈ 2
DELTA_FRACTION = 0.10  # ‖Δ‖_F / ‖W‖_F


def model_config() -> dict:
    return llama_simple_mlp_config(
        n_layer=N_LAYER,
        n_embd=N_EMBD,
        n_head=N_HEAD,
        n_kv_heads=N_KV_HEADS,
        n_ctx=N_CTX,
        vocab_size=VOCAB,
        n_intermediate=N_INTERMEDIATE,
    )


def spd_config(pretrain_checkpoint: Path) -> dict:
    """The fields of spd's ``Config`` that qkcheck reads, plus the usual neighbours."""
    return {
        "wandb_project": None,
        "seed": 0,
        "ci_config": {"mode": "layerwise", "fn_type": "shared_mlp", "hidden_dims": [CI_HIDDEN]},
        "sampling": "continuous",
        "sigmoid_type": "leaky_hard",
        "module_info": [{"module_pattern": f"h.*.attn.{n}", "C": c} for n, c in COMPONENTS.items()],
        "use_delta_component": True,
        "steps": SPD_STEP,
        "pretrained_model_class": MODEL_CLASS,
        "pretrained_model_path": str(pretrain_checkpoint.resolve()),
        "pretrained_model_name": None,
        "pretrained_model_output_attr": "idx_0",
        "tokenizer_name": None,
        "task_config": {
            "task_name": "lm",
            "max_seq_len": N_CTX,
            "dataset_name": "bench/synthetic-random-tokens",
            "column_name": "input_ids",
            "train_data_split": "train",
            "eval_data_split": "test",
            "is_tokenized": True,
            "streaming": False,
        },
    }


def decomposed(
    W_shape: tuple[int, int],
    C: int,
    g: torch.Generator,
    weight_std: float = WEIGHT_STD,
    f: float = DELTA_FRACTION,
) -> tuple:
    """``(W, V, U)`` with ``(V U)ᵀ`` of entry std ``weight_std`` and ``‖W − (V U)ᵀ‖ = f‖W‖``."""
    d_out, d_in = W_shape
    V = torch.randn(d_in, C, generator=g) / math.sqrt(d_in)
    U = torch.randn(C, d_out, generator=g) * weight_std * math.sqrt(d_in / C)
    W_hat = (V @ U).T
    D = torch.randn(d_out, d_in, generator=g)
    # ‖Δ‖ = f ‖W_hat + Δ‖ ≈ f √(‖W_hat‖² + ‖Δ‖²) for a random Δ  ⇒  ‖Δ‖ = f ‖W_hat‖ / √(1 − f²)
    D *= f * W_hat.norm() / math.sqrt(1 - f * f) / D.norm()
    return W_hat + D, V, U


def build(out: Path, n_samples: int, seed: int) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mc = model_config()
    model = build_target_model(MODEL_CLASS, mc, None)
    target = {k: v.detach().clone() for k, v in model.state_dict().items()}
    components: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ci_layers: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer in range(N_LAYER):
        for name, C in COMPONENTS.items():
            path = f"h.{layer}.attn.{name}"
            W, V, U = decomposed(tuple(target[f"{path}.weight"].shape), C, g)
            target[f"{path}.weight"] = W
            components[path] = (V.contiguous(), U.contiguous())
            d_in = V.shape[0]
            W0 = torch.randn(d_in, CI_HIDDEN, generator=g) / math.sqrt(d_in)
            W2 = torch.randn(CI_HIDDEN, C, generator=g) / math.sqrt(CI_HIDDEN)
            ci_layers[path] = [(W0, torch.zeros(CI_HIDDEN)), (W2, torch.zeros(C))]
    # tied embedding: wte.weight and lm_head.weight are one tensor in the model
    target["lm_head.weight"] = target["wte.weight"]

    checkpoint = out / "pretrain" / f"model_step_{PRETRAIN_STEP}.pt"
    train_config = {"model": mc, "num_iterations": PRETRAIN_STEP + 1}
    tokens = torch.randint(0, VOCAB, (n_samples, N_CTX), generator=g, dtype=torch.int64)
    state = spd_state(target, components, ci_layers)
    files = spd_run_files(spd_config(checkpoint), state, SPD_STEP, tokens)
    files |= under("pretrain", pretrain_run_files(mc, train_config, target, PRETRAIN_STEP))
    write_files(out, files)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the run directory to write (created)")
    p.add_argument("--samples", type=int, default=20, help="dataset samples (default 20)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.samples < 1:
        p.error("--samples must be at least 1")
    a.out.mkdir(parents=True, exist_ok=True)
    build(a.out, a.samples, a.seed)
    print(f"wrote {a.out} ({RUN_NAME}-scale synthetic run); pytest validation/ --run-id {a.out}")


if __name__ == "__main__":
    main()
