"""Build the embedded demo run: a synthetic corpus, a small trained LlamaSimpleMLP, and an
SPD decomposition of its attention projections, written in spd's on-disk layout.

Run ``python tools/build_demo.py [--out DIR]`` from the repository root (default:
``qkcheck/demo/run``). It writes::

    DIR/spd/s-qkdemo01/               final_config.yaml, model_<step>.pth, metrics.jsonl,
                                      samples.pt (int64 (n, n_ctx) held-out token ids)
    DIR/pretrain_cache/spd-t-qkdemo00/  model_config.yaml, final_config.yaml,
                                      model_step_<N>.pt, tokenizer.json,
                                      tokenizer_config.json, special_tokens_map.json

Everything is seeded and runs single-threaded with deterministic algorithms, so two builds
with the same torch on the same machine write identical files. The steps:

1. **Corpus.** Word tokens ``t2 … t<V-1>`` (``[UNK]`` = 0, ``[EOS]`` = 1), drawn uniformly;
   most sequences repeat a random segment after a random prefix, so predicting the repeats
   needs a previous-token head feeding an induction head.
2. **Target model.** qkcheck's own ``LlamaSimpleMLP`` (:mod:`qkcheck.models`), spd's init,
   trained with AdamW on next-token cross-entropy.
3. **Decomposition.** spd's recipe, compactly: per module ``V`` (``d_in × C``) and ``U``
   (``C × d_out``), a layerwise ``shared_mlp`` CI function (``W`` stored ``(in, out)``, exact
   GELU between layers) and the ``leaky_hard`` sigmoid. Losses: faithfulness
   ``mean (W − (V U)ᵀ)²``; stochastic reconstruction ``KL(target ‖ masked)`` with masks
   ``ci_lower + (1 − ci_lower)·u``, ``u ~ U(0, 1)`` and the weight delta switched on with a
   uniform per-position mask, once on every module and once on a uniform-k subset of
   modules; importance minimality ``Σ_c mean (ci_upper + ε)^p`` with ``p`` annealed 2 → 0.5.
   A faithfulness-only warm-up comes first, as in spd.

Before writing, the build measures what the demo is for — previous-token and induction
scores of every head, ``‖W − (V U)ᵀ‖_F / ‖W‖_F`` per module, and the fraction of lower CI
above 0.01 — and refuses to write a run outside the demo's budgets for q/k (see
:data:`DELTA_FRACTION_RANGE`, :data:`MAX_CI_ACTIVE_FRACTION`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

if __package__ in (None, ""):  # run as ``python tools/build_demo.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qkcheck.models import TargetModel, build_target_model
from qkcheck.util import write_atomic
from tools.spd_layout import (
    MODEL_CLASS,
    dashed,
    llama_simple_mlp_config,
    pretrain_run_files,
    spd_run_files,
    under,
    write_files,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "qkcheck" / "demo" / "run"
SPD_RUN_ID = "s-qkdemo01"
PRETRAIN_RUN_ID = "t-qkdemo00"
PROJECT = "spd"
SPECIAL_TOKENS = ("[UNK]", "[EOS]")
#: the demo's budget for ‖Δ‖_F / ‖W‖_F of every q_proj / k_proj (docs/design.md §5)
DELTA_FRACTION_RANGE = (0.05, 0.20)
#: the demo's budget for the fraction of lower CI values above CI_THRESHOLD, per q/k module
MAX_CI_ACTIVE_FRACTION = 0.3
#: the modules the budgets apply to (v/o are decomposed and reported, not budgeted)
BUDGETED = ("q_proj", "k_proj")
CI_THRESHOLD = 0.01
_LEAK = 0.01  # spd's alpha of the leaky-hard sigmoids


@dataclass(frozen=True)
class BuildConfig:
    """Every number the build depends on. :meth:`tiny` is a seconds-long variant for tests."""

    # corpus
    vocab_size: int = 256
    n_ctx: int = 64
    n_train_seqs: int = 16384
    n_test_seqs: int = 512
    n_samples: int = 16
    corpus_seed: int = 0  # the train split uses it, the test split corpus_seed + 1
    # target model (spd's LlamaSimpleMLP)
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_heads: int = 2
    n_intermediate: int = 256
    pretrain_seed: int = 1
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_lr_final_frac: float = 1.0  # 1.0: constant after warm-up (spd's default)
    pretrain_warmup: int = 100
    grad_clip: float = 1.0
    # decomposition
    spd_seed: int = 2
    components: tuple[tuple[str, int], ...] = (
        ("q_proj", 48),
        ("k_proj", 32),
        ("v_proj", 32),
        ("o_proj", 48),
    )
    ci_hidden_dims: tuple[int, ...] = (64,)
    spd_steps: int = 600
    spd_batch: int = 32
    spd_lr: float = 2e-3
    spd_lr_final_frac: float = 0.1
    faithfulness_warmup_steps: int = 200
    faithfulness_warmup_lr: float = 1e-3
    faithfulness_coeff: float = 500.0  # spd's usual 3000 leaves ‖Δ‖/‖W‖ at 3–5 % on q/k
    importance_coeff: float = 2e-2
    pnorm: float = 2.0
    pnorm_final: float = 0.5
    importance_eps: float = 1e-12
    recon_coeff: float = 0.5
    recon_subset_coeff: float = 0.5
    train_log_freq: int = 50
    eval_freq: int = 200
    n_eval_seqs: int = 256  # held-out sequences for the final measurements
    threads: int = 1  # one thread: deterministic, and robust on a shared machine

    @classmethod
    def tiny(cls) -> BuildConfig:
        """A build in a few seconds: same layout and code path, nothing trained to speak of."""
        return cls(
            vocab_size=32,
            n_ctx=16,
            n_train_seqs=64,
            n_test_seqs=32,
            n_samples=16,
            n_embd=16,
            n_head=2,
            n_kv_heads=1,
            n_intermediate=32,
            pretrain_steps=4,
            pretrain_batch=8,
            pretrain_warmup=2,
            components=(("q_proj", 6), ("k_proj", 4), ("v_proj", 4), ("o_proj", 6)),
            ci_hidden_dims=(8,),
            spd_steps=4,
            spd_batch=4,
            faithfulness_warmup_steps=2,
            train_log_freq=2,
            eval_freq=2,
            n_eval_seqs=8,
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def module_paths(self) -> dict[str, int]:
        """Decomposed module path -> C, in model order (``h.0.attn.q_proj``, …)."""
        return {
            f"h.{layer}.attn.{name}": c
            for layer in range(self.n_layer)
            for name, c in self.components
        }


# --- corpus and tokenizer ---------------------------------------------------------------------


def make_corpus(n_seqs: int, seq_len: int, vocab_size: int, seed: int) -> Tensor:
    """``(n_seqs, seq_len)`` int64 token ids of word tokens ``[2, vocab_size)``.

    Nine sequences in ten are a random prefix (0–8 tokens) followed by one random segment
    (4–24 tokens) repeated back to back; the rest are uniform noise. Drawn from numpy's
    PCG64, whose streams are the same on every platform.
    """
    rng = np.random.default_rng(seed)
    first = len(SPECIAL_TOKENS)
    out = np.empty((n_seqs, seq_len), dtype=np.int64)
    for n in range(n_seqs):
        if rng.random() < 0.1:
            out[n] = rng.integers(first, vocab_size, seq_len)
            continue
        prefix = rng.integers(first, vocab_size, rng.integers(0, 9))
        segment = rng.integers(first, vocab_size, rng.integers(4, 25))
        repeats = -(-(seq_len - len(prefix)) // len(segment))
        out[n] = np.concatenate([prefix, np.tile(segment, repeats)])[:seq_len]
    return torch.from_numpy(out)


def token_names(vocab_size: int) -> list[str]:
    """``["[UNK]", "[EOS]", "t2", …, "t<vocab_size-1>"]``: the string of every token id."""
    return [*SPECIAL_TOKENS, *(f"t{i}" for i in range(len(SPECIAL_TOKENS), vocab_size))]


def _token_entry(content: str) -> dict[str, Any]:
    """A special token's flags, keys sorted as HF's JSON files list them."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def tokenizer_files(vocab_size: int) -> dict[str, dict[str, Any]]:
    """The three JSON files of a ``tokenizers`` WordLevel tokenizer, as HF's
    ``PreTrainedTokenizerFast.save_pretrained`` writes them (same fields as the spd fixture)."""
    names = token_names(vocab_size)
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL_TOKENS)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {name: i for i, name in enumerate(names)},
            "unk_token": "[UNK]",
        },
    }
    config = {
        "added_tokens_decoder": {
            str(i): {**_token_entry(s), "special": True} for i, s in enumerate(SPECIAL_TOKENS)
        },
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
    }
    special_map = {"eos_token": _token_entry("[EOS]"), "unk_token": _token_entry("[UNK]")}
    return {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }


# --- configs as spd writes them ---------------------------------------------------------------


def model_config(cfg: BuildConfig) -> dict[str, Any]:
    """``model_config.yaml``: spd's LlamaSimpleMLPConfig fields (keys sorted, as spd dumps)."""
    return llama_simple_mlp_config(
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        n_head=cfg.n_head,
        n_kv_heads=cfg.n_kv_heads,
        n_ctx=cfg.n_ctx,
        vocab_size=cfg.vocab_size,
        n_intermediate=cfg.n_intermediate,
    )


DATASET_NAME = "qkcheck/demo-synthetic-induction"  # generated by this script; not on the hub
TOKENIZER_NAME = "qkcheck/demo-synthetic-induction-tokenizer"


def _dataset_config(cfg: BuildConfig, split: str) -> dict[str, Any]:
    return {
        "column_name": "input_ids",
        "hf_tokenizer_path": TOKENIZER_NAME,
        "is_tokenized": True,
        "n_ctx": cfg.n_ctx + 1,
        "name": DATASET_NAME,
        "seed": cfg.corpus_seed,
        "shuffle_each_epoch": True,
        "split": split,
        "streaming": False,
    }


def pretrain_config(cfg: BuildConfig) -> dict[str, Any]:
    """The pretrain run's ``final_config.yaml`` (spd's pretrain ``Config`` fields)."""
    return {
        "batch_size": cfg.pretrain_batch,
        "compile": False,
        "device": "cpu",
        "dtype": "float32",
        "from_pretrained": None,
        "grad_clip": cfg.grad_clip,
        "inference_only": False,
        "intermediate_checkpoints": False,
        "learning_rate": cfg.pretrain_lr,
        "learning_rate_decay_frac": cfg.pretrain_lr_final_frac,
        "model": model_config(cfg),
        "num_iterations": cfg.pretrain_steps,
        "output_dir": "out/target_models",
        "sample_every": 0,
        "seed": cfg.pretrain_seed,
        "tensorcores": False,
        "train_dataset_config": _dataset_config(cfg, "train"),
        "train_log_every": cfg.train_log_freq,
        "val_dataset_config": _dataset_config(cfg, "test"),
        "val_loss_every": 0,
        "val_max_steps": 0,
        "wandb_project": None,
        "warmup_iters": cfg.pretrain_warmup,
        "weight_decay": 0.0,
        "zero_stage": 0,
    }


def spd_config(cfg: BuildConfig) -> dict[str, Any]:
    """The SPD run's ``final_config.yaml``: the fields spd's ``Config`` dumps, in its order."""
    return {
        "wandb_project": None,
        "wandb_run_name": None,
        "wandb_run_name_prefix": "",
        "seed": cfg.spd_seed,
        "autocast_bf16": False,
        "n_mask_samples": 1,
        "ci_config": {
            "mode": "layerwise",
            "fn_type": "shared_mlp",
            "hidden_dims": list(cfg.ci_hidden_dims),
        },
        "sampling": "continuous",
        "sigmoid_type": "leaky_hard",
        "module_info": [
            {"module_pattern": f"h.*.attn.{name}", "C": c} for name, c in cfg.components
        ],
        "identity_module_info": None,
        "init_spd_checkpoint": None,
        "use_delta_component": True,
        "loss_metric_configs": [
            {
                "coeff": cfg.importance_coeff,
                "classname": "ImportanceMinimalityLoss",
                "pnorm": cfg.pnorm,
                "beta": 0.0,
                "p_anneal_start_frac": 0.0,
                "p_anneal_final_p": cfg.pnorm_final,
                "p_anneal_end_frac": 1.0,
                "eps": cfg.importance_eps,
            },
            {
                "coeff": cfg.recon_subset_coeff,
                "classname": "StochasticReconSubsetLoss",
                "routing": {"type": "uniform_k_subset"},
            },
            {"coeff": cfg.recon_coeff, "classname": "StochasticReconLoss"},
            {"coeff": cfg.faithfulness_coeff, "classname": "FaithfulnessLoss"},
        ],
        "output_loss_type": "kl",
        "lr_schedule": {
            "start_val": cfg.spd_lr,
            "warmup_pct": 0.0,
            "final_val_frac": cfg.spd_lr_final_frac,
            "fn_type": "cosine",
        },
        "steps": cfg.spd_steps,
        "batch_size": cfg.spd_batch,
        "grad_clip_norm_components": None,
        "grad_clip_norm_ci_fns": None,
        "faithfulness_warmup_steps": cfg.faithfulness_warmup_steps,
        "faithfulness_warmup_lr": cfg.faithfulness_warmup_lr,
        "faithfulness_warmup_weight_decay": 0.0,
        "train_log_freq": cfg.train_log_freq,
        "eval_freq": cfg.eval_freq,
        "eval_batch_size": cfg.spd_batch,
        "slow_eval_freq": cfg.spd_steps,
        "n_eval_steps": 1,
        "slow_eval_on_first_step": False,
        "save_freq": None,
        "eval_metric_configs": [
            {"classname": "CI_L0", "groups": None},
            {"classname": "CEandKLLosses", "rounding_threshold": 0.0},
        ],
        "ci_alive_threshold": 0.0,
        "pretrained_model_class": MODEL_CLASS,
        "pretrained_model_path": None,
        "pretrained_model_name": f"wandb:goodfire/{PROJECT}/runs/{PRETRAIN_RUN_ID}",
        "pretrained_model_output_attr": "idx_0",
        "tokenizer_name": TOKENIZER_NAME,
        "task_config": {
            "task_name": "lm",
            "max_seq_len": cfg.n_ctx,
            "buffer_size": 1000,
            "dataset_name": DATASET_NAME,
            "column_name": "input_ids",
            "train_data_split": "train",
            "eval_data_split": "test",
            "shuffle_each_epoch": True,
            "is_tokenized": True,
            "streaming": False,
        },
    }


# --- the target model ------------------------------------------------------------------------


def _cosine_lr(step: int, total: int, peak: float, final_frac: float, warmup: int = 0) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_target(
    cfg: BuildConfig, corpus: Tensor, log: Callable[[str], None] = print
) -> tuple[TargetModel, list[dict[str, Any]]]:
    """spd's LlamaSimpleMLP (qkcheck's implementation, spd's init) trained on next-token
    cross-entropy over ``corpus`` ``(n, n_ctx + 1)``; returns the model and its loss log."""
    torch.manual_seed(cfg.pretrain_seed)
    model = build_target_model(MODEL_CLASS, model_config(cfg), None).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    batches = torch.Generator().manual_seed(cfg.pretrain_seed)
    history: list[dict[str, Any]] = []
    for step in range(cfg.pretrain_steps):
        lr = _cosine_lr(
            step,
            cfg.pretrain_steps,
            cfg.pretrain_lr,
            cfg.pretrain_lr_final_frac,
            cfg.pretrain_warmup,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(corpus), (cfg.pretrain_batch,), generator=batches)
        seqs = corpus[idx]
        logits = model(seqs[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if step % cfg.train_log_freq == 0 or step == cfg.pretrain_steps - 1:
            history.append({"step": step, "train_loss": loss.item(), "lr": lr})
            log(f"pretrain step {step:5d}  loss {loss.item():.4f}")
    return model.eval(), history


def attention_patterns(model: TargetModel, tokens: Tensor) -> dict[int, Tensor]:
    """Per layer, softmax of the model's own causal-masked logits: ``(batch, head, query_pos,
    key_pos)``, rows summing to 1."""
    capture = model.capture(tokens)
    n_pos = tokens.shape[1]
    future = ~torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    return {
        layer: torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        for layer, logits in capture.logits.items()
    }


def head_scores(model: TargetModel, tokens: Tensor) -> dict[str, list[list[float]]]:
    """Per layer and head: ``previous_token`` = mean attention from query ``i`` to key ``i−1``
    (over ``i ≥ 1``); ``induction`` = mean attention from ``i`` to ``p+1``, where ``p < i − 1``
    is the latest earlier position holding the same token (over the ``i`` that have one).
    Uniform causal attention scores about ``1 / (i + 1)`` on both."""
    patterns = attention_patterns(model, tokens)
    batch, n_pos = tokens.shape
    rows, keys, samples = [], [], []
    for b in range(batch):
        last: dict[int, int] = {}
        for i, tok in enumerate(tokens[b].tolist()):
            p = last.get(tok)
            if p is not None and p + 1 < i:
                samples.append(b)
                rows.append(i)
                keys.append(p + 1)
            last[tok] = i
    qs = torch.arange(1, n_pos)
    scores: dict[str, list[list[float]]] = {"previous_token": [], "induction": []}
    for layer in sorted(patterns):
        pattern = patterns[layer]  # batch head query_pos key_pos
        prev = pattern[:, :, qs, qs - 1].mean(dim=(0, 2))
        ind = pattern[samples, :, rows, keys].mean(dim=0) if rows else torch.zeros(len(prev))
        scores["previous_token"].append([round(float(v), 4) for v in prev])
        scores["induction"].append([round(float(v), 4) for v in ind])
    return scores


# --- the decomposition -----------------------------------------------------------------------


class LinearComponents(nn.Module):
    """C rank-one pieces of one ``nn.Linear``: component weight ``(V @ U).T`` (``d_out × d_in``);
    spd's init ``V ~ N(0, 1/d_in)``, ``U ~ N(0, 1/C)``."""

    def __init__(self, d_in: int, d_out: int, C: int) -> None:
        super().__init__()
        self.V = nn.Parameter(torch.randn(d_in, C) / math.sqrt(d_in))
        self.U = nn.Parameter(torch.randn(C, d_out) / math.sqrt(C))

    @property
    def weight(self) -> Tensor:
        return (self.V @ self.U).T


class Affine(nn.Module):
    """``x @ W + b`` with ``W`` stored ``(in, out)`` (spd's CI-function ``Linear``); Kaiming
    normal init with the gain of the nonlinearity that follows."""

    def __init__(self, d_in: int, d_out: int, gain: float) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(d_in, d_out) * (gain / math.sqrt(d_in)))
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.W + self.b


class SharedMLPCI(nn.Module):
    """spd's ``shared_mlp`` CI function: module input ``(… d_in)`` → pre-sigmoid ``(… C)``
    through ``layers`` = Affine, GELU, …, Affine (weights at the even indices)."""

    def __init__(self, d_in: int, C: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.Sequential()
        width = d_in
        for hidden in hidden_dims:
            self.layers.append(Affine(width, hidden, gain=math.sqrt(2.0)))
            self.layers.append(nn.GELU())
            width = hidden
        self.layers.append(Affine(width, C, gain=1.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class LayerwiseCI(nn.Module):
    """Holds one CI function per module under ``_ci_fns.<path with dashes>`` (spd's keys)."""

    def __init__(self, fns: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self._ci_fns = nn.ModuleDict(fns)


class _LowerLeakyHard(torch.autograd.Function):
    """``clamp(x, 0, 1)``; below 0 the gradient passes at ``alpha`` when it pushes x up
    (spd's ``LowerLeakyHardSigmoidFunction``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        zero = torch.zeros_like(grad)
        below = torch.where(grad < 0, _LEAK * grad, zero)
        return torch.where(x <= 0, below, torch.where(x <= 1, grad, zero))


def lower_leaky_hard(x: Tensor) -> Tensor:
    return _LowerLeakyHard.apply(x)


def upper_leaky_hard(x: Tensor) -> Tensor:
    return torch.where(x > 1, 1 + _LEAK * (x - 1), x.clamp(0.0, 1.0))


@dataclass
class MaskPlan:
    """What the decomposed modules compute in one forward pass, per module path:
    ``masks`` ``(batch, pos, C)`` on the component activations, ``deltas`` (the weight delta,
    ``d_out × d_in``) with ``delta_masks`` ``(batch, pos)``, and ``routes`` ``(batch, pos)``
    bool: where False, the module keeps its target output."""

    masks: dict[str, Tensor]
    deltas: dict[str, Tensor] | None = None
    delta_masks: dict[str, Tensor] | None = None
    routes: dict[str, Tensor] | None = None


class Decomposition(nn.Module):
    """The target model, its components and CI functions, with spd's state-dict keys:
    ``target_model.*``, ``_components.<path-with-dashes>.{V,U}``,
    ``ci_fn._ci_fns.<path-with-dashes>.layers.<i>.{W,b}``."""

    def __init__(
        self, target: TargetModel, paths: Mapping[str, int], hidden_dims: Sequence[int]
    ) -> None:
        super().__init__()
        self.target_model = target
        for p in target.parameters():
            p.requires_grad_(False)
        linears = dict(target.named_modules())
        self.paths = list(paths)
        order = sorted(self.paths, key=dashed)  # spd's ModuleDicts are keyed in sorted order
        shapes = {p: linears[p].weight.shape for p in self.paths}  # (d_out, d_in)
        self._components = nn.ModuleDict(
            {dashed(p): LinearComponents(shapes[p][1], shapes[p][0], paths[p]) for p in order}
        )
        self.ci_fn = LayerwiseCI(
            {dashed(p): SharedMLPCI(shapes[p][1], paths[p], hidden_dims) for p in order}
        )

    def component(self, path: str) -> LinearComponents:
        return self._components[dashed(path)]  # type: ignore[return-value]

    def target_weight(self, path: str) -> Tensor:
        return self.target_model.get_submodule(path).weight

    def weight_deltas(self) -> dict[str, Tensor]:
        """``W − (V @ U).T`` per module, differentiable in V and U."""
        return {p: self.target_weight(p) - self.component(p).weight for p in self.paths}

    def clean_forward(self, tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The target's output logits and the input of every decomposed module (no grad)."""
        inputs: dict[str, Tensor] = {}

        def recorder(path: str) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
                inputs[path] = args[0]

            return hook

        with torch.no_grad(), self._hooks(recorder, pre=True):
            logits = self.target_model(tokens)
        return logits, inputs

    def pre_sigmoid(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {p: self.ci_fn._ci_fns[dashed(p)](inputs[p]) for p in self.paths}

    def masked_forward(self, tokens: Tensor, plan: MaskPlan) -> Tensor:
        """The target's forward pass with every decomposed module computing
        ``((x V) ⊙ mask) U + delta_mask · x Δᵀ`` (spd's ``LinearComponents.forward``)."""

        def replacer(path: str) -> Callable[..., Tensor]:
            comp = self.component(path)

            def hook(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
                x = args[0]
                out = ((x @ comp.V) * plan.masks[path]) @ comp.U
                if plan.deltas is not None and plan.delta_masks is not None:
                    out = out + plan.delta_masks[path][..., None] * (x @ plan.deltas[path].T)
                if plan.routes is not None:
                    out = torch.where(plan.routes[path][..., None], out, output)
                return out

            return hook

        with self._hooks(replacer, pre=False):
            return self.target_model(tokens)

    @contextlib.contextmanager
    def _hooks(self, make: Callable[[str], Callable[..., Any]], pre: bool) -> Iterator[None]:
        handles = []
        try:
            for path in self.paths:
                module = self.target_model.get_submodule(path)
                register = module.register_forward_pre_hook if pre else module.register_forward_hook
                handles.append(register(make(path)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def kl_per_position(pred_logits: Tensor, target_logits: Tensor) -> Tensor:
    """``KL(softmax(target) ‖ softmax(pred))`` per position: ``(batch, pos)``."""
    target_logp = F.log_softmax(target_logits, dim=-1)
    return (target_logp.exp() * (target_logp - F.log_softmax(pred_logits, dim=-1))).sum(-1)


def uniform_k_subset_routes(paths: Sequence[str], shape: tuple[int, ...]) -> dict[str, Tensor]:
    """Per position, k ~ U{1..n_modules} modules chosen at random are routed to components
    (spd's ``sample_uniform_k_subset_routing_masks``)."""
    n = len(paths)
    k = torch.randint(1, n + 1, shape)
    ranks = torch.rand(*shape, n).argsort(-1).argsort(-1)
    chosen = ranks < k[..., None]
    return {p: chosen[..., i] for i, p in enumerate(paths)}


@dataclass
class SPDResult:
    decomposition: Decomposition
    metrics: list[dict[str, Any]] = field(default_factory=list)


def decompose(
    cfg: BuildConfig,
    model: TargetModel,
    corpus: Tensor,
    eval_tokens: Tensor,
    log: Callable[[str], None] = print,
) -> SPDResult:
    """spd's optimisation of components and CI functions for the attention projections."""
    torch.manual_seed(cfg.spd_seed)
    decomp = Decomposition(model, cfg.module_paths(), cfg.ci_hidden_dims)
    result = SPDResult(decomp)
    batches = torch.Generator().manual_seed(cfg.spd_seed)

    def batch() -> Tensor:
        idx = torch.randint(len(corpus), (cfg.spd_batch,), generator=batches)
        return corpus[idx, : cfg.n_ctx]

    component_params = list(decomp._components.parameters())
    warmup = torch.optim.AdamW(component_params, lr=cfg.faithfulness_warmup_lr, weight_decay=0.0)
    for _ in range(cfg.faithfulness_warmup_steps):
        loss = faithfulness(decomp.weight_deltas())
        warmup.zero_grad(set_to_none=True)
        loss.backward()
        warmup.step()
    log(f"faithfulness warm-up: {cfg.faithfulness_warmup_steps} steps, loss {loss.item():.3g}")

    params = component_params + list(decomp.ci_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.spd_lr, weight_decay=0.0)
    for step in range(cfg.spd_steps + 1):
        lr = _cosine_lr(step, cfg.spd_steps, cfg.spd_lr, cfg.spd_lr_final_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step % cfg.eval_freq == 0 or step == cfg.spd_steps:
            result.metrics.append({"step": step, **evaluate(decomp, eval_tokens[: cfg.spd_batch])})
        if step == cfg.spd_steps:
            break
        tokens = batch()
        target_logits, inputs = decomp.clean_forward(tokens)
        pre = decomp.pre_sigmoid(inputs)
        lower = {p: lower_leaky_hard(v) for p, v in pre.items()}
        upper = {p: upper_leaky_hard(v) for p, v in pre.items()}
        deltas = decomp.weight_deltas()
        frac = step / cfg.spd_steps
        p_now = cfg.pnorm + (cfg.pnorm_final - cfg.pnorm) * frac
        losses = {
            "ImportanceMinimalityLoss": sum(
                ((u + cfg.importance_eps) ** p_now).flatten(0, -2).mean(0).sum()
                for u in upper.values()
            ),
            "StochasticReconSubsetLoss": stochastic_recon(
                decomp, tokens, target_logits, lower, deltas, subset=True
            ),
            "StochasticReconLoss": stochastic_recon(decomp, tokens, target_logits, lower, deltas),
            "FaithfulnessLoss": faithfulness(deltas),
        }
        coeffs = {
            "ImportanceMinimalityLoss": cfg.importance_coeff,
            "StochasticReconSubsetLoss": cfg.recon_subset_coeff,
            "StochasticReconLoss": cfg.recon_coeff,
            "FaithfulnessLoss": cfg.faithfulness_coeff,
        }
        total = sum(coeffs[k] * v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if step % cfg.train_log_freq == 0:
            line: dict[str, Any] = {"step": step}
            line |= {f"train/loss/{k}": v.item() for k, v in losses.items()}
            line["train/loss/total"] = total.item()
            line |= {
                f"train/l0/{p}": float((v > 0).float().sum(-1).mean()) for p, v in lower.items()
            }
            line["train/schedules/lr"] = lr
            result.metrics.append(line)
            log(
                f"spd step {step:5d}  total {total.item():.4f}  "
                + "  ".join(f"{k.removesuffix('Loss')} {v.item():.4g}" for k, v in losses.items())
            )
    return result


def faithfulness(deltas: Mapping[str, Tensor]) -> Tensor:
    """spd's FaithfulnessLoss: the mean squared entry of all weight deltas together."""
    total = sum((d**2).sum() for d in deltas.values())
    return total / sum(d.numel() for d in deltas.values())


def stochastic_recon(
    decomp: Decomposition,
    tokens: Tensor,
    target_logits: Tensor,
    lower: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor],
    subset: bool = False,
) -> Tensor:
    """Mean KL to the target with masks ``ci + (1 − ci)·u`` and a uniformly masked delta."""
    leading = tokens.shape
    plan = MaskPlan(
        masks={p: ci + (1 - ci) * torch.rand_like(ci) for p, ci in lower.items()},
        deltas=dict(deltas),
        delta_masks={p: torch.rand(leading) for p in lower},
        routes=uniform_k_subset_routes(list(lower), tuple(leading)) if subset else None,
    )
    return kl_per_position(decomp.masked_forward(tokens, plan), target_logits).mean()


@torch.no_grad()
def evaluate(decomp: Decomposition, tokens: Tensor) -> dict[str, float]:
    """spd-style eval metrics on held-out tokens: L0 of lower CI (threshold 0) per module and
    KL to the target with CI masks, all-ones masks, and stochastic masks."""
    target_logits, inputs = decomp.clean_forward(tokens)
    lower = {p: v.clamp(0.0, 1.0) for p, v in decomp.pre_sigmoid(inputs).items()}
    ones = {p: torch.ones_like(v) for p, v in lower.items()}
    stoch = {p: ci + (1 - ci) * torch.rand_like(ci) for p, ci in lower.items()}
    out: dict[str, float] = {
        f"l0/0.0_{p}": float((v > 0).float().sum(-1).mean()) for p, v in lower.items()
    }
    for name, masks in (("ci_masked", lower), ("unmasked", ones), ("stoch_masked", stoch)):
        pred = decomp.masked_forward(tokens, MaskPlan(masks))
        out[f"ce_kl/kl_{name}"] = float(kl_per_position(pred, target_logits).mean())
    return out


@torch.no_grad()
def measure(decomp: Decomposition, tokens: Tensor) -> dict[str, Any]:
    """What the demo promises, per module: ``‖Δ‖_F / ‖W‖_F`` and the fraction of lower CI
    values above :data:`CI_THRESHOLD` on ``tokens``; plus the mean L0 per position."""
    _, inputs = decomp.clean_forward(tokens)
    lower = {p: v.clamp(0.0, 1.0) for p, v in decomp.pre_sigmoid(inputs).items()}
    deltas = decomp.weight_deltas()
    return {
        "delta_fraction": {
            p: round(float(d.norm() / decomp.target_weight(p).norm()), 4) for p, d in deltas.items()
        },
        "ci_active_fraction": {
            p: round(float((v > CI_THRESHOLD).float().mean()), 4) for p, v in lower.items()
        },
        "ci_l0": {
            p: round(float((v > CI_THRESHOLD).float().sum(-1).mean()), 2) for p, v in lower.items()
        },
    }


def quality_problems(report: Mapping[str, Any]) -> list[str]:
    """Where a built run misses the demo's budgets (empty: it meets them)."""
    lo, hi = DELTA_FRACTION_RANGE
    problems = [
        f"{p}: ‖Δ‖/‖W‖ = {v:.3f} outside [{lo}, {hi}]"
        for p, v in report["delta_fraction"].items()
        if p.endswith(BUDGETED) and not lo <= v <= hi
    ]
    problems += [
        f"{p}: fraction of lower CI > {CI_THRESHOLD} is {v:.3f} > {MAX_CI_ACTIVE_FRACTION}"
        for p, v in report["ci_active_fraction"].items()
        if p.endswith(BUDGETED) and v > MAX_CI_ACTIVE_FRACTION
    ]
    return problems


# --- writing ---------------------------------------------------------------------------------


def run_file_names(cfg: BuildConfig) -> list[str]:
    """The paths, relative to the output folder, of every file a build writes."""
    spd_dir = f"spd/{SPD_RUN_ID}"
    pre_dir = f"pretrain_cache/{PROJECT}-{PRETRAIN_RUN_ID}"
    spd_files = ["final_config.yaml", f"model_{cfg.spd_steps}.pth", "metrics.jsonl", "samples.pt"]
    pre_files = [
        "model_config.yaml",
        "final_config.yaml",
        f"model_step_{cfg.pretrain_steps - 1}.pt",
        *tokenizer_files(len(SPECIAL_TOKENS)),
    ]
    return [f"{spd_dir}/{n}" for n in spd_files] + [f"{pre_dir}/{n}" for n in pre_files]


def untrained_file_names(cfg: BuildConfig) -> list[str]:
    """The files no training touches (configs, tokenizer, samples): a rebuild writes them byte
    for byte on any machine; the other three hold trained numbers (see :func:`compare`)."""
    trained = (
        f"model_{cfg.spd_steps}.pth",
        "metrics.jsonl",
        f"model_step_{cfg.pretrain_steps - 1}.pt",
    )
    return [n for n in run_file_names(cfg) if not n.endswith(trained)]


def untrained_files(cfg: BuildConfig) -> dict[str, bytes]:
    """The bytes of :func:`untrained_file_names`, computed without training (seconds)."""
    with _deterministic(cfg.threads):
        torch.manual_seed(cfg.pretrain_seed)
        model = build_target_model(MODEL_CLASS, model_config(cfg), None)
        decomp = Decomposition(model, cfg.module_paths(), cfg.ci_hidden_dims)
        test = make_corpus(cfg.n_test_seqs, cfg.n_ctx, cfg.vocab_size, cfg.corpus_seed + 1)
        files = run_files(cfg, model, decomp, test[: cfg.n_samples], [])
    return {n: files[n] for n in untrained_file_names(cfg)}


def run_files(
    cfg: BuildConfig,
    model: TargetModel,
    decomp: Decomposition,
    samples: Tensor,
    metrics: Sequence[Mapping[str, Any]],
) -> dict[str, bytes]:
    """Every file of the demo, by path relative to the output folder."""
    spd = spd_run_files(spd_config(cfg), decomp.state_dict(), cfg.spd_steps, samples, metrics)
    pretrain = pretrain_run_files(
        model_config(cfg),
        pretrain_config(cfg),
        model.state_dict(),
        cfg.pretrain_steps - 1,
        tokenizer_files(cfg.vocab_size),
    )
    files = under(f"spd/{SPD_RUN_ID}", spd) | under(
        f"pretrain_cache/{PROJECT}-{PRETRAIN_RUN_ID}", pretrain
    )
    assert sorted(files) == sorted(run_file_names(cfg))
    return files


# --- the manifest: what a rebuild elsewhere must reproduce -----------------------------------

MANIFEST = REPO / "qkcheck" / "demo" / "manifest.json"
#: how far a rebuilt trained weight may lie from the shipped one: max |a − b| over the entries
#: of every target-model tensor and of every module's component weight ``(V U)ᵀ``. CPU float
#: rounding differs between machines (vector widths, reduction order) and 2,300 training steps
#: amplify it: a rebuild on an AMD EPYC machine (torch 2.13.0) came within 0.025 of the
#: shipped target weights and 0.027 of its component weights, entries of order 0.1–1. The
#: factors ``V``, ``U`` and the CI functions are compared by hash only: they are not unique
#: (training moves them apart by up to 0.5 while ``(V U)ᵀ`` and the CI values stay close).
TRAINED_ATOL = 0.05


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: Tensor) -> str:
    return sha256(t.detach().contiguous().numpy().tobytes())


def manifest(root: Path, cfg: BuildConfig) -> dict[str, Any]:
    """The sha256 of every file of the run in ``root`` and of every tensor in its trained
    checkpoints, with the torch that wrote them."""
    files = {n: sha256((root / n).read_bytes()) for n in run_file_names(cfg)}
    untrained = set(untrained_file_names(cfg))
    tensors = {
        n: {
            k: {"shape": list(v.shape), "sha256": tensor_sha256(v)}
            for k, v in torch.load(root / n, weights_only=True).items()
        }
        for n in files
        if n not in untrained and n.endswith((".pt", ".pth"))
    }
    return {
        "hashed_with": f"torch {torch.__version__}, {platform.machine()}",
        "untrained": sorted(untrained),
        "files": files,
        "tensors": tensors,
        "trained_atol": TRAINED_ATOL,
    }


@dataclass
class Comparison:
    """A rebuilt run against the shipped one: what differs, and by how much."""

    failures: list[str] = field(default_factory=list)
    identical: int = 0  # trained tensors with the shipped sha256
    differing: int = 0  # the others
    max_abs_diff: float = 0.0  # over target tensors and component weights (V U)ᵀ

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        head = (
            f"{self.identical} of {self.identical + self.differing} trained tensors bit-identical;"
            f" target and component weights within {self.max_abs_diff:.3g}"
            f" (tolerance {TRAINED_ATOL})"
        )
        return "\n  ".join([head, *self.failures])

    def close(self, what: str, a: Tensor, b: Tensor) -> None:
        if a.shape != b.shape:
            self.failures.append(f"{what}: shape {list(a.shape)}, expected {list(b.shape)}")
            return
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        self.max_abs_diff = max(self.max_abs_diff, diff)
        if diff > TRAINED_ATOL:
            self.failures.append(f"{what}: max |diff| {diff:.3g} > {TRAINED_ATOL}")


def compare(rebuilt: Path, shipped: Path, recorded: Mapping[str, Any]) -> Comparison:
    """Compare the run in ``rebuilt`` with the one in ``shipped`` and its manifest
    ``recorded``: every untrained file byte for byte; every trained tensor by its sha256;
    target tensors and component weights ``(V U)ᵀ`` within :data:`TRAINED_ATOL`."""
    out = Comparison()
    for name in recorded["untrained"]:
        if sha256((rebuilt / name).read_bytes()) != recorded["files"][name]:
            out.failures.append(f"{name}: not byte-identical (an untrained file must be)")
    for name, entries in recorded["tensors"].items():
        ours = torch.load(rebuilt / name, weights_only=True)
        theirs = torch.load(shipped / name, weights_only=True)
        if sorted(ours) != sorted(entries):
            out.failures.append(f"{name}: other tensor names than the manifest's")
            continue
        for key, entry in entries.items():
            same = list(ours[key].shape) == entry["shape"]
            if same and tensor_sha256(ours[key]) == entry["sha256"]:
                out.identical += 1
                continue
            out.differing += 1
            if name.endswith(".pt") or key.startswith("target_model."):
                out.close(f"{name}:{key}", ours[key], theirs[key])
        for key in [k for k in entries if k.startswith("_components.") and k.endswith(".V")]:
            u = key[:-1] + "U"
            out.close(f"{name}:{key[:-2]} (V U)", ours[key] @ ours[u], theirs[key] @ theirs[u])
    return out


# --- the whole build -------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def build(
    cfg: BuildConfig,
    out: Path = DEFAULT_OUT,
    *,
    check: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the demo run into ``out`` and return its report (head scores, Δ fractions, CI
    sparsity, timings). With ``check``, a run missing the budgets is not written and
    ``ValueError`` lists why."""
    start = time.perf_counter()
    with _deterministic(cfg.threads):
        train = make_corpus(cfg.n_train_seqs, cfg.n_ctx + 1, cfg.vocab_size, cfg.corpus_seed)
        test = make_corpus(cfg.n_test_seqs, cfg.n_ctx, cfg.vocab_size, cfg.corpus_seed + 1)
        samples = test[: cfg.n_samples]
        held_out = test[cfg.n_samples : cfg.n_samples + cfg.n_eval_seqs]
        model, pretrain_log = train_target(cfg, train, log)
        t_pretrain = time.perf_counter() - start
        scores = head_scores(model, held_out)
        with torch.no_grad():
            logits = model(held_out[:, :-1])
            test_loss = float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), held_out[:, 1:].reshape(-1))
            )
        log(f"target: held-out loss {test_loss:.4f}; head scores {json.dumps(scores)}")
        spd = decompose(cfg, model, train, held_out, log)
        quality = measure(spd.decomposition, held_out)
        report = {
            "held_out_loss": round(test_loss, 4),
            "final_train_loss": round(pretrain_log[-1]["train_loss"], 4),
            "head_scores": scores,
            **quality,
            "final_eval": spd.metrics[-1],
            "seconds_pretrain": round(t_pretrain, 1),
            "seconds_total": round(time.perf_counter() - start, 1),
        }
        problems = quality_problems(report) if check else []
        if problems:
            raise ValueError(
                "the demo run misses its budgets, nothing written:\n  " + "\n  ".join(problems)
            )
        files = run_files(cfg, model, spd.decomposition, samples, spd.metrics)
        write_files(out, files)
        if Path(out).resolve() == DEFAULT_OUT:
            write_atomic(MANIFEST, json.dumps(manifest(out, cfg), indent=1) + "\n")
    report["bytes"] = sum(len(b) for b in files.values())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/build_demo.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a seconds-long toy build (for trying the script)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final report")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="after building into --out, compare it with the shipped demo and its manifest",
    )
    parser.add_argument(
        "--write-manifest",
        action="store_true",
        help=f"only (re)write {MANIFEST.relative_to(REPO)} from the shipped demo run",
    )
    args = parser.parse_args(argv)
    cfg = BuildConfig.tiny() if args.tiny else BuildConfig()
    if args.write_manifest:
        write_atomic(MANIFEST, json.dumps(manifest(DEFAULT_OUT, cfg), indent=1) + "\n")
        return 0
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    try:
        report = build(cfg, args.out, check=not args.tiny, log=log)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps({"config": asdict(cfg), **report}, indent=2))
    if args.verify:
        result = compare(args.out, DEFAULT_OUT, json.loads(MANIFEST.read_text()))
        print(("reproduced: " if result.ok else "NOT reproduced: ") + result.summary())
        return 0 if result.ok else 1
    return 0


__all__ = ["BuildConfig", "build", "main", "make_corpus", "tokenizer_files"]

if __name__ == "__main__":
    sys.exit(main())
