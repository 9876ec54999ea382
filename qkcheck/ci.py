"""Causal-importance (CI) functions and sigmoids, evaluated as spd's ComponentModel does.

A decomposed module with input ``x`` (``batch pos d_in``) and components ``V`` (``d_in comp``)
has component activations ``a = x @ V``. Its CI function maps the input to one pre-sigmoid
value per component (``batch pos comp``); a sigmoid turns it into CI. Layouts, as in
``spd/models/components.py`` (every stack has exact-erf GELU between layers, and weights at
the even indices of ``layers``):

* ``mlp`` — one scalar MLP per component, reading that component's activation ``a_c``;
  ``layers.<i>.W`` is ``(comp, in, out)``, first ``in`` = 1, last ``out`` = 1;
* ``vector_mlp`` — one MLP per component reading the whole input ``x``; ``W`` is
  ``(comp, in, out)``, first ``in`` = ``d_in``, last ``out`` = 1;
* ``shared_mlp`` — one MLP reading ``x`` and writing all components; ``W`` is ``(in, out)``
  (not ``nn.Linear``'s ``(out, in)``), last ``out`` = ``comp``;
* ``global_shared_mlp`` — one MLP for every decomposed module together: the inputs of all
  modules, in sorted module-path order, concatenated on the last axis (an embedding module
  contributes its component activations ``V[token]``), and the output split back into each
  module's ``comp`` values in the same order.

Sigmoids (spd's ``SIGMOID_TYPES``): the *lower* CI, used for thresholding, is
``lower_leaky_hard`` — ``clamp(x, 0, 1)`` — when the run's sigmoid is ``leaky_hard`` and the
run's own sigmoid for every other type; the *upper* CI is ``upper_leaky_hard`` for
``leaky_hard`` and likewise the run's sigmoid otherwise. CI is evaluated deterministically
(spd's "continuous" sampling); the noise spd adds to the lower CI under "binomial" sampling
is a training device and is left out.

Identity a test can assert: for ``leaky_hard``, ``lower == clamp(pre_sigmoid, 0, 1)`` and
``lower == upper`` wherever ``0 <= pre_sigmoid <= 1``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from qkcheck.errors import CheckpointError, ConfigError, QKCheckError, UnsupportedError

SIGMOID_TYPES = (
    "normal",
    "hard",
    "leaky_hard",
    "upper_leaky_hard",
    "lower_leaky_hard",
    "swish_hard",
)
LAYERWISE_FN_TYPES = ("mlp", "vector_mlp", "shared_mlp")
GLOBAL_FN_TYPES = ("global_shared_mlp",)
#: module paths treated as embeddings unless the caller says otherwise
DEFAULT_EMBEDDING_PATHS = frozenset({"wte", "wpe"})

_LEAK = 0.01  # spd's alpha for the leaky sigmoids


def component_acts(x: Tensor, V: Tensor) -> Tensor:
    """Component activations ``x @ V``: ``(... d_in) @ (d_in comp) -> (... comp)``.

    Integer ``x`` holds token ids of an embedding module; then the activations are ``V[x]``.
    """
    if not x.dtype.is_floating_point:
        return V[x]
    return x.to(V.dtype) @ V


# --- sigmoids --------------------------------------------------------------------------------


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


def sigmoid(x: Tensor, sigmoid_type: str) -> Tensor:
    """spd's sigmoid of that name applied to pre-sigmoid values ``x``."""
    if sigmoid_type not in _SIGMOIDS:
        raise UnsupportedError(
            f"sigmoid_type '{sigmoid_type}' is not supported; "
            f"supported: {', '.join(SIGMOID_TYPES)}",
            field="sigmoid_type",
        )
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


# --- CI networks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stack:
    """Affine layers with exact GELU between them.

    ``parallel``: one network per component, weights ``(comp, in, out)``, input
    ``(... comp in)`` — or ``(... in)``, the same for every component, when ``shared_input``;
    output ``(... comp out)``. Otherwise one network, weights ``(in, out)``, ``(... in) -> (...
    out)``.
    """

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]
    parallel: bool
    shared_input: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = x.to(W.dtype)
            if not self.parallel:
                x = x @ W + b
            elif i == 0 and self.shared_input:
                x = torch.einsum("...i,cio->...co", x, W) + b
            else:
                x = torch.einsum("...ci,cio->...co", x, W) + b
            if i < last:
                x = F.gelu(x)
        return x


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(W|b)$")


def _read_stack(
    state: Mapping[str, Tensor],
    prefix: str,
    *,
    parallel: bool,
    shared_input: bool = False,
    n_parallel: int,
    d_in: int,
    d_out: int,
    hidden_dims: Sequence[int] | None,
    where: str,
) -> _Stack:
    """Read ``<prefix>layers.<i>.{W,b}`` and check the shapes chain from ``d_in`` to ``d_out``."""
    found: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith(prefix) and (m := _LAYER_KEY.match(key[len(prefix) :])):
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not found:
        raise CheckpointError(f"{where}: no CI function weights under '{prefix}layers.'")
    indices = sorted(found)
    if indices != list(range(0, 2 * len(indices), 2)):
        raise CheckpointError(
            f"{where}: CI layers under '{prefix}layers.' sit at indices {indices}, "
            f"expected 0, 2, 4, … (GELU between them)"
        )
    weights, biases = [], []
    width = d_in
    for n, i in enumerate(indices):
        key = f"{prefix}layers.{i}"
        for part in ("W", "b"):
            if part not in found[i]:
                raise CheckpointError(f"{where}: missing CI key '{key}.{part}'")
            value = found[i][part]
            if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
                raise CheckpointError(f"{where}: CI key '{key}.{part}' is not a float tensor")
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{where}: CI key '{key}.{part}' has non-finite values")
        W, b = found[i]["W"], found[i]["b"]
        lead = (n_parallel,) if parallel else ()
        is_last = n == len(indices) - 1
        out = d_out if is_last else W.shape[-1]
        if not is_last and hidden_dims is not None and n < len(hidden_dims):
            out = hidden_dims[n]
        for part, tensor, shape in (("W", W, (*lead, width, out)), ("b", b, (*lead, out))):
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{where}: CI key '{key}.{part}' has shape {tuple(tensor.shape)}, "
                    f"expected {shape}"
                )
        weights.append(W)
        biases.append(b)
        width = out
    if hidden_dims is not None and len(hidden_dims) != len(indices) - 1:
        raise CheckpointError(
            f"{where}: CI function under '{prefix}' has {len(indices) - 1} hidden layers, "
            f"the config's hidden_dims {list(hidden_dims)} say {len(hidden_dims)}"
        )
    return _Stack(tuple(weights), tuple(biases), parallel, shared_input)


class CIFunctions:
    """A run's CI functions, ready to evaluate on captured module inputs.

    Built without failing: an unsupported ``fn_type`` or sigmoid, or CI weights that do not
    fit, are kept as :attr:`problem` (per module where it concerns one module) and raised only
    by :meth:`pre_sigmoid`/:meth:`lower`/:meth:`upper` — weighted mode never needs CI.
    """

    def __init__(
        self,
        mode: str,
        fn_type: str,
        sigmoid_type: str,
        components: Mapping[str, tuple[Tensor, Tensor]],
        layerwise: Mapping[str, _Stack],
        global_fn: _Stack | None,
        embedding_paths: Collection[str],
        problems: Mapping[str | None, QKCheckError],
    ) -> None:
        self.mode = mode
        self.fn_type = fn_type
        self.sigmoid_type = sigmoid_type
        self.paths: tuple[str, ...] = tuple(sorted(components))
        self._V = {path: V for path, (V, _U) in components.items()}
        self._layerwise = dict(layerwise)
        self._global = global_fn
        self._embedding_paths = frozenset(embedding_paths)
        self._problems = dict(problems)

    @property
    def problem(self) -> str | None:
        """Why CI cannot be computed (for all modules, or the first module that fails), or None."""
        if not self._problems:
            return None
        key = None if None in self._problems else sorted(p for p in self._problems if p)[0]
        return str(self._problems[key])

    def _raise_for(self, paths: Sequence[str]) -> None:
        for key in (None, *paths):
            if key in self._problems:
                error = self._problems[key]
                raise type(error)(str(error), field=error.field)
        unknown = [p for p in paths if p not in self._V]
        if unknown:
            raise QKCheckError(
                f"no CI function for module(s) {', '.join(map(repr, unknown))}; "
                f"decomposed modules: {', '.join(self.paths)}"
            )

    def pre_sigmoid(
        self, module_inputs: Mapping[str, Tensor], paths: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """CI function outputs before the sigmoid, ``path -> (batch, pos, comp)``.

        ``module_inputs[path]`` is the module's input ``(batch, pos, d_in)``, or token ids
        ``(batch, pos)`` for an embedding; global CI needs every decomposed module's input.
        """
        paths = list(self.paths if paths is None else paths)
        self._raise_for(paths)
        if self._global is not None:
            missing = [p for p in self.paths if p not in module_inputs]
            if missing:
                raise QKCheckError(
                    f"global CI reads every decomposed module's input; missing "
                    f"{', '.join(map(repr, missing))} (embeddings take token ids)"
                )
            parts = [
                component_acts(module_inputs[p], self._V[p])
                if p in self._embedding_paths
                else module_inputs[p]
                for p in self.paths
            ]
            out = self._global(torch.cat([x.to(parts[0].dtype) for x in parts], dim=-1))
            sizes = [self._V[p].shape[1] for p in self.paths]
            split = dict(zip(self.paths, torch.split(out, sizes, dim=-1), strict=True))
            return {p: split[p] for p in paths}
        result = {}
        for path in paths:
            if path not in module_inputs:
                raise QKCheckError(f"no captured input for module '{path}'")
            x = module_inputs[path]
            if self.fn_type == "mlp":  # each component's network reads its own activation
                x = component_acts(x, self._V[path])[..., None]
            out = self._layerwise[path](x)
            result[path] = out if self.fn_type == "shared_mlp" else out[..., 0]
        return result

    def lower(
        self, module_inputs: Mapping[str, Tensor], paths: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Lower CI (for thresholding), ``path -> (batch, pos, comp)``."""
        return {
            p: lower_ci(v, self.sigmoid_type)
            for p, v in self.pre_sigmoid(module_inputs, paths).items()
        }

    def upper(
        self, module_inputs: Mapping[str, Tensor], paths: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Upper CI, ``path -> (batch, pos, comp)``."""
        return {
            p: upper_ci(v, self.sigmoid_type)
            for p, v in self.pre_sigmoid(module_inputs, paths).items()
        }


def _hidden_dims(ci_config: Mapping[str, Any], where: str) -> list[int] | None:
    dims = ci_config.get("hidden_dims")
    if dims is None:
        return None
    if not isinstance(dims, Sequence) or isinstance(dims, str):
        raise ConfigError(
            f"{where}: ci_config.hidden_dims must be a list of integers, got {dims!r}"
        )
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ConfigError(
            f"{where}: ci_config.hidden_dims must be non-negative integers, got {dims!r}"
        )
    return list(dims)


def build_ci_functions(
    ci_config: Mapping[str, Any],
    sigmoid_type: str,
    ci_state: Mapping[str, Tensor],
    components: Mapping[str, tuple[Tensor, Tensor]],
    source: str = "",
    *,
    embedding_paths: Collection[str] | None = None,
) -> CIFunctions:
    """Read a run's CI functions.

    ``ci_config``: the run config's ``ci_config`` (``mode``, ``fn_type``, ``hidden_dims``).
    ``ci_state``: the checkpoint's CI tensors, keys after ``"ci_fn."`` (a leading ``"ci_fn."``
    is also accepted), e.g. ``_ci_fns.h-0-attn-q_proj.layers.0.W`` or
    ``_global_ci_fn.layers.0.W``. ``components``: ``path -> (V, U)`` for every decomposed
    module, paths with dots. ``embedding_paths``: modules that are embeddings (default
    ``wte``/``wpe`` when decomposed). ``source`` names the checkpoint in messages.
    """
    where = source or "CI state"
    state = {k.removeprefix("ci_fn."): v for k, v in ci_state.items()}
    embeds = DEFAULT_EMBEDDING_PATHS if embedding_paths is None else frozenset(embedding_paths)
    embeds = embeds & set(components)
    mode = str(ci_config.get("mode", "layerwise")) if isinstance(ci_config, Mapping) else ""
    fn_type = str(ci_config.get("fn_type", "")) if isinstance(ci_config, Mapping) else ""
    problems: dict[str | None, QKCheckError] = {}
    layerwise: dict[str, _Stack] = {}
    global_fn: _Stack | None = None

    def finish() -> CIFunctions:
        return CIFunctions(
            mode, fn_type, sigmoid_type, components, layerwise, global_fn, embeds, problems
        )

    if sigmoid_type not in SIGMOID_TYPES:
        problems[None] = UnsupportedError(
            f"sigmoid_type '{sigmoid_type}' is not supported; "
            f"supported: {', '.join(SIGMOID_TYPES)}",
            field="sigmoid_type",
        )
        return finish()
    if not isinstance(ci_config, Mapping):
        problems[None] = ConfigError(
            f"{where}: ci_config must be a mapping, got {ci_config!r}", field="ci_config"
        )
        return finish()
    supported = (*LAYERWISE_FN_TYPES, *GLOBAL_FN_TYPES)
    if fn_type not in supported or (fn_type in GLOBAL_FN_TYPES) != (mode == "global"):
        problems[None] = UnsupportedError(
            f"CI function type '{fn_type}' (mode '{mode}') is not supported; supported: "
            f"layerwise {', '.join(LAYERWISE_FN_TYPES)}, global {', '.join(GLOBAL_FN_TYPES)}",
            field="ci_config",
        )
        return finish()
    try:
        hidden = _hidden_dims(ci_config, where)
    except ConfigError as e:
        problems[None] = e
        return finish()

    if mode == "global":
        dims = [
            V.shape[1] if path in embeds else V.shape[0]
            for path, (V, _U) in sorted(components.items())
        ]
        total_c = sum(V.shape[1] for V, _U in components.values())
        try:
            global_fn = _read_stack(
                state,
                "_global_ci_fn.",
                parallel=False,
                n_parallel=0,
                d_in=sum(dims),
                d_out=total_c,
                hidden_dims=hidden,
                where=f"{where} (global CI over {len(components)} modules)",
            )
        except CheckpointError as e:
            problems[None] = e
        return finish()

    for path, (V, _U) in components.items():
        d_in, n_comp = V.shape
        try:
            layerwise[path] = _read_stack(
                state,
                f"_ci_fns.{path.replace('.', '-')}.",
                parallel=fn_type != "shared_mlp",
                shared_input=fn_type == "vector_mlp",
                n_parallel=n_comp,
                d_in=1 if fn_type == "mlp" else d_in,
                d_out=n_comp if fn_type == "shared_mlp" else 1,
                hidden_dims=hidden,
                where=f"{where} ({path})",
            )
        except CheckpointError as e:
            problems[path] = e
    return finish()


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
