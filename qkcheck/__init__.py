"""qkcheck: validate SPD decompositions of attention layers.

Re-exports only. Names that need torch are imported on first use, so that loading the
pytest plugin (registered for every pytest run) costs nothing until ``--run-id`` is given.
"""

from importlib import import_module
from typing import Any

from qkcheck.errors import (
    CheckpointError,
    ConfigError,
    QKCheckError,
    RunNotFoundError,
    SamplesError,
    UnsupportedError,
)

_LAZY = {
    "load_run": "qkcheck.runs",
    "Run": "qkcheck.runs",
    "decompose_layer": "qkcheck.decompose",
    "LayerWeights": "qkcheck.decompose",
    "HeadLayout": "qkcheck.decompose",
    "LayerDecomposition": "qkcheck.decompose",
    "RotaryConfig": "qkcheck.rotary",
    "weighted_factors": "qkcheck.pairs",
    "binary_factors": "qkcheck.pairs",
    "top_pairs": "qkcheck.pairs",
    "pair_curves": "qkcheck.pairs",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "QKCheckError",
    "RunNotFoundError",
    "SamplesError",
    "UnsupportedError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qkcheck' has no attribute {name!r}")
