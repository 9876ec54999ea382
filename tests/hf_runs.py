"""Tiny Hugging Face targets and spd-layout runs around them, for the HF tests.

The targets are real transformers models (``config → model → save_pretrained``), written
into the hub-cache layout ``models--tiny--<kind>/snapshots/<rev>/``. The runs around them
are spd-layout folders (``final_config.yaml`` from the genuine HF run's, ``model_<step>.pth``
with spd's keys): components are a truncated SVD of each decomposed weight plus noise, so
the weight delta is small but not zero, and a shared-MLP CI function with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from tools.spd_layout import spd_run_files, spd_state, under, write_files

GENUINE_HF = Path(__file__).parent / "data" / "spd-genuine-hf"
REVISION = "0123456789abcdef0123456789abcdef01234567"
KINDS = ("llama", "qwen3", "gpt2")
CLASSES = {
    "llama": "transformers.LlamaForCausalLM",
    "qwen3": "transformers.Qwen3ForCausalLM",
    "gpt2": "transformers.GPT2LMHeadModel",
}


def hf_config(kind: str):
    """A tiny config exercising each class's features: llama3 RoPE scaling and GQA (Llama),
    an explicit head_dim ≠ hidden/heads and QK-norm (Qwen3), fused c_attn with bias (GPT-2)."""
    import transformers

    common = {"vocab_size": 96, "bos_token_id": 0, "eos_token_id": 0}
    if kind == "llama":
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            attention_bias=True,
            **common,
        )
    if kind == "qwen3":
        return transformers.Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            max_position_embeddings=64,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            **common,
        )
    if kind == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0, embd_pdrop=0, **common
        )
    raise ValueError(kind)


def tiny_hf_model(kind: str, seed: int = 0):
    """A random model of ``kind`` (float32, eager attention); Qwen3's q_norm/k_norm gains
    and every bias are drawn away from their initial 1 / 0, so they matter."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(kind)
    config._attn_implementation = "eager"
    cls = getattr(transformers, CLASSES[kind].split(".")[1])
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def write_snapshot(kind: str, cache: Path, seed: int = 0) -> tuple[str, Path]:
    """Save a tiny model into hub-cache layout under ``cache``; returns (hub name, folder)."""
    name = f"tiny/{kind}"
    repo = cache / f"models--tiny--{kind}"
    snapshot = repo / "snapshots" / REVISION
    tiny_hf_model(kind, seed).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return name, snapshot


def decomposed_paths(kind: str, layers=(0, 1)) -> list[str]:
    if kind == "gpt2":
        return [f"transformer.h.{i}.attn.c_attn" for i in layers]
    return [f"model.layers.{i}.self_attn.{s}_proj" for i in layers for s in ("q", "k")]


def write_run(
    kind: str,
    out: Path,
    cache: Path,
    *,
    run_id: str | None = None,
    C: int = 32,
    noise: float = 0.01,
    weights_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """An spd-layout run decomposing ``kind``'s q/k (GPT-2: c_attn) under ``out/spd/<id>``,
    its target in ``cache``. Target weights are stored in ``weights_dtype`` (bf16: the
    values a low-precision target holds). Returns the run folder."""
    run_id = run_id or f"s-{kind}0001"
    name, _ = write_snapshot(kind, cache, seed)
    model = tiny_hf_model(kind, seed)
    target = {k: v.to(weights_dtype) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    components, ci = {}, {}
    for path in decomposed_paths(kind):
        W = target[f"{path}.weight"].double()
        W = W if kind != "gpt2" else W.T  # (d_out, d_in)
        u, s, vh = torch.linalg.svd(W, full_matrices=False)
        r = min(C, s.numel())
        V = (vh[:r].T * s[:r].sqrt()).float()  # (d_in, r)
        U = (u[:, :r] * s[:r].sqrt()).T.float()  # (r, d_out)
        V = torch.cat([V, torch.randn(V.shape[0], C - r, generator=g) * 0.1], 1)
        U = torch.cat([U, torch.zeros(C - r, U.shape[1])], 0)
        U = U + noise * torch.randn(U.shape, generator=g)
        components[path] = (V, U)
        d_in = V.shape[0]
        ci[path] = [
            (torch.randn(d_in, 8, generator=g) * 0.3, torch.zeros(8)),
            (torch.randn(8, C, generator=g) * 0.3, torch.zeros(C)),
        ]
    config = yaml.safe_load((GENUINE_HF / "spd_out/spd/s-5eed0101/final_config.yaml").read_text())
    config.update(
        pretrained_model_class=CLASSES[kind],
        pretrained_model_name=name,
        pretrained_model_path=None,
        tokenizer_name=None,
        module_info=[{"module_pattern": p, "C": C} for p in decomposed_paths(kind)],
    )
    config["ci_config"] = {"mode": "layerwise", "fn_type": "shared_mlp", "hidden_dims": [8]}
    state = spd_state(target, components, ci)
    samples = torch.randint(1, 96, (3, 40), generator=g)
    write_files(out, under(f"spd/{run_id}", spd_run_files(config, state, 100, samples)))
    return out / "spd" / run_id
