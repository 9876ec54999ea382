"""Every command-line option of qkcheck, declared once.

The pytest plugin's ``pytest_addoption``, the defaults of :class:`qkcheck.settings.Settings`
and :func:`qkcheck.settings.parse_settings` all read :data:`OPTIONS`; tests read defaults
from it too. An option's pytest ``dest`` is ``qk_<field>``, its :class:`Settings` field
``field``. This module imports nothing heavy (pytest's option parsing imports it before any
run is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qkcheck.chunks import DEFAULT_MIB

Kind = Literal[
    "text",
    "path",
    "int",
    "float",
    "choice",
    "samples",
    "layers",
    "query_pos",
    "device",
    "threads",
    "flag",
]


@dataclass(frozen=True)
class Option:
    """One option: ``flag`` on the command line, ``default`` as it would be typed (None:
    unset), ``kind`` how :func:`qkcheck.settings.parse_settings` reads it (``choices`` for
    ``choice``; ``lo``/``hi`` bound a number)."""

    flag: str
    field: str
    default: Any
    help: str
    kind: Kind = "text"
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    #: read by the quality gate (how a baseline is recorded), not a Settings field
    gate_only: bool = False

    @property
    def dest(self) -> str:
        return f"qk_{self.field}"

    @property
    def metavar(self) -> str:
        return self.flag.removeprefix("--").removeprefix("qk-").upper().replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option(
        "--run-id",
        "run_id",
        None,
        "run to validate: 'demo', a run directory or checkpoint, or a W&B reference "
        "(wandb:entity/project/runs/ID, a URL, or a bare id such as s-55ea3f9b or p-…)",
    ),
    Option(
        "--samples",
        "samples",
        "all",
        "samples to use: a count N (first N) or indices 0,3,7 / 0-7",
        "samples",
    ),
    Option(
        "--samples-file",
        "samples_file",
        None,
        "token ids (.pt/.npy, shape (n, T)), text lines (.txt), or 'dataset' (the run's own)",
        "path",
    ),
    Option("--layers", "layers", "all", "attention layers: all, or indices such as 0,2", "layers"),
    Option(
        "--query-pos",
        "query_pos",
        "all",
        "query positions: all, last, or a list such as 5,17",
        "query_pos",
    ),
    Option(
        "--mode",
        "mode",
        "weighted",
        "figures: weighted (activation-weighted logits) or binary (CI-gated weight-only terms)",
        "choice",
        ("weighted", "binary"),
    ),
    Option(
        "--ci-threshold",
        "ci_threshold",
        0.1,
        "binary mode: a pair counts where both CIs exceed it",
        "float",
        lo=0.0,
        hi=1.0,
    ),
    Option(
        "--top-n",
        "top_n",
        8,
        "pairs coloured in the figures, per head and for the head mean",
        "int",
        lo=1,
    ),
    Option(
        "--plots",
        "plots",
        "failed",
        "figures at session end for: none; failed items (the worst by |r|/B first); the "
        "worst items, passed or not; or all selected items",
        "choice",
        ("none", "failed", "worst", "all"),
    ),
    Option(
        "--max-plots",
        "max_plots",
        20,
        "at most this many items get figures (the worst)",
        "int",
        lo=0,
    ),
    Option(
        "--show-attention",
        "show_attention",
        False,
        "validation figure: add a row per head with the attention pattern, the softmax over "
        "keys j <= i of the target logits and of the component sum",
        "flag",
    ),
    Option(
        "--dataset-top-k",
        "dataset_top_k",
        0,
        "write pairs_L<l>.json/.png: each head's top-K component pairs by |contribution| mass "
        "over the selected data (weighted mode; 0: off)",
        "int",
        lo=0,
    ),
    Option(
        "--artifacts-dir",
        "artifacts_dir",
        None,
        "where figures and summary.json go; default qk-artifacts/<run>/",
        "path",
    ),
    Option(
        "--device",
        "device",
        "cpu",
        "torch device of the target forward pass and the decomposition: cpu or cuda[:N]",
        "device",
    ),
    Option(
        "--dtype",
        "dtype",
        "float32",
        "precision of the decomposition: float32 or float64",
        "choice",
        ("float32", "float64"),
    ),
    Option(
        "--chunk-mib",
        "chunk_mib",
        DEFAULT_MIB,
        "working memory of one (layer, sample) decomposition, MiB: query positions are "
        "walked in chunks of rows under it, at least one row each (results do not depend "
        "on it; 0: one row at a time)",
        "float",
        lo=0.0,
    ),
    Option(
        "--bound",
        "bound",
        "weight",
        "bound asserted per item: data (B_data), weight (B_weight), or budget (B_weight with "
        "‖Δ‖ replaced by --delta-budget·‖W‖); both B_data and B_weight are reported",
        "choice",
        ("data", "weight", "budget"),
    ),
    Option(
        "--norm",
        "norm",
        "spectral",
        "operator norm in B_weight: spectral or frobenius",
        "choice",
        ("spectral", "frobenius"),
    ),
    Option(
        "--delta-budget",
        "delta_budget",
        0.25,
        "quality gate: largest allowed ‖Δ‖_F/‖W‖_F per q/k module (also --bound budget's fraction)",
        "float",
        lo=0.0,
    ),
    Option(
        "--residual-budget",
        "residual_budget",
        0.2,
        "quality gate: largest allowed median |r| as a fraction of the target logits' std",
        "float",
        lo=0.0,
    ),
    Option(
        "--gate-tolerance",
        "gate_tolerance",
        0.25,
        "quality gate: a metric fails when worse than its baseline by more than this fraction",
        "float",
        lo=0.0,
    ),
    Option(
        "--baseline",
        "baseline",
        None,
        "compare residual statistics against this stored baseline (validation/baselines/NAME/)",
    ),
    Option("--qk-batch-size", "batch_size", 1, "samples per target forward pass", "int", lo=1),
    Option(
        "--qk-threads",
        "threads",
        "auto",
        "torch CPU threads per process: N, or auto (the cores idle at start by the 1-minute "
        "load average, at least 1; under pytest-xdist the cores divided among the workers)",
        "threads",
    ),
    Option(
        "--doc-ids",
        "doc_ids",
        None,
        "document ids per token (.npy/.pt, shaped like the samples; -1 = padding): positions "
        "restart per document and only same-document keys count",
        "path",
    ),
    Option(
        "--doc-sep",
        "doc_sep",
        None,
        "token id that starts each new document (see --doc-ids)",
        "int",
        lo=0,
    ),
    Option(
        "--record-partial",
        "record_partial",
        False,
        "with --force-regen/--regen-all: allow recording this run's baseline from a "
        "selection of samples or layers",
        "flag",
        gate_only=True,
    ),
)

BY_FIELD: dict[str, Option] = {o.field: o for o in OPTIONS}
#: pytest dest → raw default, as pytest hands it to the plugin when nothing is typed
DEFAULTS: dict[str, Any] = {o.dest: o.default for o in OPTIONS}
