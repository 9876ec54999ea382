"""Causal-importance (CI) functions and sigmoids, evaluated as spd's ComponentModel does.

A decomposed module with input ``x`` (``batch pos d_in``) and components ``V`` (``d_in comp``)
has component activations ``a = x @ V``. Its CI function maps the input to one pre-sigmoid
value per component (``batch pos comp``); a sigmoid turns it into CI.

* :mod:`qkcheck.ci.functions` — :func:`build_ci_functions`, :class:`CIFunctions` and the
  layerwise layouts (``mlp``, ``vector_mlp``, ``shared_mlp``);
* :mod:`qkcheck.ci.global_` — the global layouts (``global_shared_mlp``,
  ``global_shared_transformer``, ``global_reverse_residual``);
* :mod:`qkcheck.ci.layers` — their building blocks (GELU MLPs, RMS norm, bidirectional RoPE
  self-attention) read from the checkpoint;
* :mod:`qkcheck.ci.sigmoids` — spd's sigmoids and the lower/upper CI choice.
"""

from qkcheck.ci.functions import (
    LAYERWISE_FN_TYPES,
    CIFunctions,
    build_ci_functions,
    component_acts,
)
from qkcheck.ci.global_ import GLOBAL_FN_TYPES
from qkcheck.ci.sigmoids import SIGMOID_TYPES, lower_ci, sigmoid, upper_ci

__all__ = [
    "GLOBAL_FN_TYPES",
    "LAYERWISE_FN_TYPES",
    "SIGMOID_TYPES",
    "CIFunctions",
    "build_ci_functions",
    "component_acts",
    "lower_ci",
    "sigmoid",
    "upper_ci",
]
