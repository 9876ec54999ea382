"""A run's CI functions, built from its ``ci_config`` and checkpoint, ready to evaluate.

Layerwise layouts, as in spd's ``spd/models/components.py`` (every stack has exact-erf GELU
between layers, and weights at the even indices of ``layers``):

* ``mlp`` — one scalar MLP per component, reading that component's activation ``a_c``;
  ``layers.<i>.W`` is ``(comp, in, out)``, first ``in`` = 1, last ``out`` = 1;
* ``vector_mlp`` — one MLP per component reading the whole input ``x``; ``W`` is
  ``(comp, in, out)``, first ``in`` = ``d_in``, last ``out`` = 1;
* ``shared_mlp`` — one MLP reading ``x`` and writing all components; ``W`` is ``(in, out)``
  (not ``nn.Linear``'s ``(out, in)``), last ``out`` = ``comp``.

Global layouts (one network over every decomposed module): :mod:`qkcheck.ci.global_`.
CI is evaluated deterministically (spd's "continuous" sampling); the noise spd adds to the
lower CI under "binomial" sampling is a training device and is left out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from torch import Tensor

from qkcheck.ci.fields import CIFields
from qkcheck.ci.global_ import GLOBAL_FN_TYPES, GlobalFunction, read_global
from qkcheck.ci.layers import Stack, StateReader
from qkcheck.ci.sigmoids import SIGMOID_TYPES, lower_ci, unsupported_sigmoid, upper_ci
from qkcheck.errors import CheckpointError, ConfigError, QKCheckError, UnsupportedError

LAYERWISE_FN_TYPES = ("mlp", "vector_mlp", "shared_mlp")
#: module paths treated as embeddings unless the caller says otherwise
DEFAULT_EMBEDDING_PATHS = frozenset({"wte", "wpe"})


def component_acts(x: Tensor, V: Tensor) -> Tensor:
    """Component activations ``x @ V``: ``(... d_in) @ (d_in comp) -> (... comp)``.

    Integer ``x`` holds token ids of an embedding module; then the activations are ``V[x]``.
    """
    if not x.dtype.is_floating_point:
        return V[x]
    return x.to(V.dtype) @ V


def unsupported_fn_type(fn_type: str, mode: str) -> UnsupportedError:
    return UnsupportedError(
        f"CI function type '{fn_type}' (mode '{mode}') is not supported; supported: "
        f"layerwise {', '.join(LAYERWISE_FN_TYPES)}, global {', '.join(GLOBAL_FN_TYPES)}",
        field="ci_config",
    )


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
        layerwise: Mapping[str, Stack],
        global_fn: GlobalFunction | None,
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
            inputs = {
                p: component_acts(module_inputs[p], self._V[p])
                if p in self._embedding_paths
                else module_inputs[p]
                for p in self.paths
            }
            out = self._global(inputs)
            return {p: out[p] for p in paths}
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


def build_ci_functions(
    ci_config: Mapping[str, Any],
    sigmoid_type: str,
    ci_state: Mapping[str, Tensor],
    components: Mapping[str, tuple[Tensor, Tensor]],
    source: str = "",
    *,
    embedding_paths: Collection[str] | None = None,
    config_source: str = "",
) -> CIFunctions:
    """Read a run's CI functions.

    ``ci_config``: the run config's ``ci_config`` (``mode``, ``fn_type``, ``hidden_dims`` and
    the global functions' fields). ``ci_state``: the checkpoint's CI tensors, keys after
    ``"ci_fn."`` (a leading ``"ci_fn."`` is also accepted), e.g.
    ``_ci_fns.h-0-attn-q_proj.layers.0.W`` or ``_global_ci_fn.layers.0.W``. ``components``:
    ``path -> (V, U)`` for every decomposed module, paths with dots, **in module_info order**
    (``global_reverse_residual`` concatenates a block's inputs in that order).
    ``embedding_paths``: modules that are embeddings (default ``wte``/``wpe`` when
    decomposed). ``source`` names the checkpoint and ``config_source`` the config file in
    messages (the config falls back to ``source``).
    """
    where = source or "CI state"
    state = {k.removeprefix("ci_fn."): v for k, v in ci_state.items()}
    embeds = DEFAULT_EMBEDDING_PATHS if embedding_paths is None else frozenset(embedding_paths)
    embeds = embeds & set(components)
    mode = str(ci_config.get("mode", "layerwise")) if isinstance(ci_config, Mapping) else ""
    fn_type = str(ci_config.get("fn_type", "")) if isinstance(ci_config, Mapping) else ""
    problems: dict[str | None, QKCheckError] = {}
    layerwise: dict[str, Stack] = {}
    global_fn: GlobalFunction | None = None

    def finish() -> CIFunctions:
        return CIFunctions(
            mode, fn_type, sigmoid_type, components, layerwise, global_fn, embeds, problems
        )

    if sigmoid_type not in SIGMOID_TYPES:
        problems[None] = unsupported_sigmoid(sigmoid_type)
        return finish()
    if not isinstance(ci_config, Mapping):
        problems[None] = ConfigError(
            f"{where}: ci_config must be a mapping, got {ci_config!r}", field="ci_config"
        )
        return finish()
    supported = (*LAYERWISE_FN_TYPES, *GLOBAL_FN_TYPES)
    if fn_type not in supported or (fn_type in GLOBAL_FN_TYPES) != (mode == "global"):
        problems[None] = unsupported_fn_type(fn_type, mode)
        return finish()
    fields = CIFields(ci_config, config_source or where)

    if mode == "global":
        modules = {
            path: (V.shape[1] if path in embeds else V.shape[0], V.shape[1])
            for path, (V, _U) in components.items()
        }
        reader = StateReader(state, f"{where} ({fn_type} CI over {len(components)} modules)")
        try:
            global_fn = read_global(fn_type, fields, reader, modules)
        except (CheckpointError, ConfigError) as e:
            problems[None] = e
        return finish()

    try:
        hidden = fields.int_list("hidden_dims", None)
    except ConfigError as e:
        problems[None] = e
        return finish()
    for path, (V, _U) in components.items():
        d_in, n_comp = V.shape
        reader = StateReader(state, f"{where} ({path})")
        try:
            layerwise[path] = reader.stack(
                f"_ci_fns.{path.replace('.', '-')}.layers.",
                parallel=fn_type != "shared_mlp",
                shared_input=fn_type == "vector_mlp",
                n_parallel=n_comp,
                d_in=1 if fn_type == "mlp" else d_in,
                d_out=n_comp if fn_type == "shared_mlp" else 1,
                hidden_dims=hidden,
            )
        except CheckpointError as e:
            problems[path] = e
    return finish()
