"""spd's sigmoids (``SIGMOID_TYPES``) and which one gives the lower and the upper CI.

The *lower* CI, used for thresholding, is ``lower_leaky_hard`` — ``clamp(x, 0, 1)`` — when the
run's sigmoid is ``leaky_hard`` and the run's own sigmoid for every other type; the *upper* CI
is ``upper_leaky_hard`` for ``leaky_hard`` and likewise the run's sigmoid otherwise.

Identity a test can assert: for ``leaky_hard``, ``lower == clamp(pre_sigmoid, 0, 1)`` and
``lower == upper`` wherever ``0 <= pre_sigmoid <= 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qkcheck.errors import UnsupportedError

SIGMOID_TYPES = (
    "normal",
    "hard",
    "leaky_hard",
    "upper_leaky_hard",
    "lower_leaky_hard",
    "swish_hard",
)

_LEAK = 0.01  # spd's alpha for the leaky sigmoids


def _swish(x: Tensor, beta: float) -> Tensor:
    return x * torch.sigmoid(beta * x)


def _upside_down_swish(x: Tensor, beta: float) -> Tensor:
    return x * torch.sigmoid(-beta * x)


def _swish_hard(x: Tensor, beta: float = 10.0) -> Tensor:
    """A hard sigmoid whose corners are swish-smoothed (spd's parameters: scale 0.5, shifts
    0.5); tends to ``clamp(x, 0, 1)`` as ``beta`` grows."""
    x = x - 0.5
    return (
        0.5
        + (_upside_down_swish(x - 0.5, beta) - _swish(x, beta))
        + (_swish(x + 0.5, beta) - _upside_down_swish(x, beta))
    )


_SIGMOIDS: dict[str, Callable[[Tensor], Tensor]] = {
    "normal": torch.sigmoid,
    "hard": lambda x: x.clamp(0.0, 1.0),
    "leaky_hard": lambda x: torch.where(x > 0, x.clamp(max=1.0), _LEAK * x),
    "upper_leaky_hard": lambda x: torch.where(x > 1, 1 + _LEAK * (x - 1), x.clamp(0.0, 1.0)),
    # forward of spd's LowerLeakyHardSigmoidFunction; the leak lives only in its gradient
    "lower_leaky_hard": lambda x: x.clamp(0.0, 1.0),
    "swish_hard": _swish_hard,
}


def unsupported_sigmoid(sigmoid_type: str) -> UnsupportedError:
    return UnsupportedError(
        f"sigmoid_type '{sigmoid_type}' is not supported; supported: {', '.join(SIGMOID_TYPES)}",
        field="sigmoid_type",
    )


def sigmoid(x: Tensor, sigmoid_type: str) -> Tensor:
    """spd's sigmoid of that name applied to pre-sigmoid values ``x``."""
    if sigmoid_type not in _SIGMOIDS:
        raise unsupported_sigmoid(sigmoid_type)
    return _SIGMOIDS[sigmoid_type](x)


def lower_ci(pre_sigmoid: Tensor, sigmoid_type: str) -> Tensor:
    """The lower CI spd thresholds on: ``lower_leaky_hard`` for ``leaky_hard``, else the run's
    sigmoid itself."""
    return sigmoid(
        pre_sigmoid, "lower_leaky_hard" if sigmoid_type == "leaky_hard" else sigmoid_type
    )


def upper_ci(pre_sigmoid: Tensor, sigmoid_type: str) -> Tensor:
    """The upper CI: ``upper_leaky_hard`` for ``leaky_hard``, else the run's sigmoid itself."""
    return sigmoid(
        pre_sigmoid, "upper_leaky_hard" if sigmoid_type == "leaky_hard" else sigmoid_type
    )
