"""qkcheck: validate SPD decompositions of attention layers."""

from qkcheck.errors import (
    CheckpointError,
    ConfigError,
    QKCheckError,
    RunNotFoundError,
    SamplesError,
    UnsupportedError,
)
from qkcheck.runs import load_run

__all__ = [
    "CheckpointError",
    "ConfigError",
    "QKCheckError",
    "RunNotFoundError",
    "SamplesError",
    "UnsupportedError",
    "load_run",
]
