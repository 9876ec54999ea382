"""A param-decomp run behind qkcheck's :class:`~qkcheck.runs.run.Run` interface.

``load_param_decomp_run(source)`` resolves the reference, reads ``launch_config.yaml``, the
checkpoint's ``_METADATA`` (shapes only) and the target model; component arrays are read on
first use, one stack slice per module (see :mod:`qkcheck.runs.param_decomp.orbax`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkcheck.errors import (
    CheckpointError,
    ConfigError,
    QKCheckError,
    SamplesError,
    UnsupportedError,
)
from qkcheck.models.base import Capture
from qkcheck.models.common import TargetModel
from qkcheck.runs.param_decomp.launch_config import LaunchConfig, read_launch_config
from qkcheck.runs.param_decomp.orbax import CheckpointItem, find_item
from qkcheck.runs.param_decomp.resolve import (
    ParamDecompFiles,
    output_roots,
    resolve_param_decomp,
)
from qkcheck.runs.param_decomp.samples import dataset_tokens
from qkcheck.runs.param_decomp.sites import Site, build_sites, check_stack
from qkcheck.runs.param_decomp.target import (
    build_hf_target,
    find_pretrain_cache,
    load_pretrained_target,
)
from qkcheck.runs.target_run import TargetRun
from qkcheck.samples import (
    TOKEN_FILE_SUFFIXES,
    Samples,
    TokenLabels,
    check_tokens,
    read_token_file,
)

#: why binary mode is refused (``--mode binary``)
BINARY_UNSUPPORTED = (
    "param-decomp's CI functions ({ci}) are not readable from its checkpoints yet, so binary "
    "mode (CI-gated terms) cannot be computed; use --mode weighted"
)


@dataclass(frozen=True)
class ParamDecompRunFiles:
    """Every file a param-decomp run was loaded from (None: not present / not used)."""

    run_dir: Path
    config: Path  # launch_config.yaml
    checkpoint: Path  # the decomposition item directory of the chosen step
    pretrain_dir: Path | None
    model_config: Path | None
    pretrain_checkpoint: Path | None
    tokenizer: Path | None = None
    samples: Path | None = None


def load_param_decomp_run(
    source: str | os.PathLike[str], *, step: int | None = None
) -> ParamDecompRun:
    """Load a param-decomp run (see :mod:`qkcheck.runs.param_decomp.resolve` for the forms)."""
    found = resolve_param_decomp(source, step)
    config = read_launch_config(found.launch_config)
    item = CheckpointItem(find_item(found.step_dir))
    item.shapes  # noqa: B018 — a missing or corrupt _METADATA fails at load time
    spec = config.target.spec
    if spec.kind == "hf":
        model, model_config = build_hf_target(config)
        cache = None
    else:
        cache = find_pretrain_cache(config, found.root)
        model, model_config = load_pretrained_target(config, cache)
    files = ParamDecompRunFiles(
        run_dir=found.run_dir,
        config=found.launch_config,
        checkpoint=item.dir,
        pretrain_dir=cache.dir if cache else None,
        model_config=cache.model_config if cache else None,
        pretrain_checkpoint=cache.weights if cache else None,
    )
    return ParamDecompRun(found, files, config, model_config, model, item, os.fspath(source))


class ParamDecompRun(TargetRun):
    """One param-decomp run at one checkpoint step, with the attributes and methods of
    :class:`~qkcheck.runs.run.Run` (shapes ``batch pos query_pos key_pos head comp``)."""

    #: this run's CI functions cannot be evaluated (binary mode is a usage error)
    binary_mode_unsupported: str

    def __init__(
        self,
        found: ParamDecompFiles,
        files: ParamDecompRunFiles,
        config: LaunchConfig,
        model_config: dict[str, Any],
        model: TargetModel,
        item: CheckpointItem,
        source: str = "",
    ) -> None:
        self.source = source
        self.name = found.run_id
        self.step: int | None = found.step
        self.steps = found.steps
        self.files = files
        self.config = config
        self.model_config = model_config
        self.model = model.eval()
        self._item = item
        self._root = found.root
        self._sites: dict[str, Site] = build_sites(config, model.n_layer)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        ci = config.decomposition.ci.type if config.decomposition.ci else "none"
        self.binary_mode_unsupported = BINARY_UNSUPPORTED.format(ci=ci)
        for kind in dict.fromkeys(s.kind for s in self._sites.values()):
            site = next(s for s in self._sites.values() if s.kind == kind)
            n = sum(s.kind == kind for s in self._sites.values())
            check_stack(site, n, item.shape(site.V_key), item.shape(site.U_key), str(item.dir))

    # --- the decomposition -------------------------------------------------------------------

    @property
    def module_paths(self) -> list[str]:
        """Every decomposed module (kinds in ``cs`` order, layers ascending)."""
        return list(self._sites)

    def components(self, path: str) -> tuple[Tensor, Tensor]:
        """``(V, U)`` of a decomposed module: ``V`` ``(d_in, comp)``, ``U`` ``(comp, d_out)``
        (float32; only this module's stack slice is read, once)."""
        if path not in self._cache:
            site = self._site(path)
            V = torch.from_numpy(self._item.read(site.V_key, site.index))
            U = torch.from_numpy(self._item.read(site.U_key, site.index))
            W, _ = self._weight(path)
            if (U.shape[1], V.shape[0]) != tuple(W.shape):
                raise CheckpointError(
                    f"{self._item.dir}: arrays {site.V_key!r}/{site.U_key!r} slice {site.index} "
                    f"({path}) give a ({U.shape[1]}, {V.shape[0]}) weight, but the target's "
                    f"{path}.weight is {tuple(W.shape)}"
                )
            self._cache[path] = (V, U)
        return self._cache[path]

    def target_weight(self, path: str) -> tuple[Tensor, Tensor | None]:
        """The decomposed module's target weight ``W`` ``(d_out, d_in)`` in the run's
        ``weights_dtype``, and its bias (or None)."""
        self._site(path)
        return self._weight(path)

    def _weight(self, path: str) -> tuple[Tensor, Tensor | None]:
        module = self.model.get_submodule(path)
        bias = getattr(module, "bias", None)
        # on the CPU wherever the model runs (:meth:`to`)
        return module.weight.detach().cpu(), None if bias is None else bias.detach().cpu()

    def _site(self, path: str) -> Site:
        try:
            return self._sites[path]
        except KeyError:
            raise QKCheckError(
                f"run {self.name}: module {path!r} is not decomposed "
                f"({self.files.config}: decomposition.sites); decomposed modules: "
                f"{', '.join(self._sites)}"
            ) from None

    # --- causal importances ------------------------------------------------------------------

    def causal_importances(
        self, tokens: Tensor, paths: Sequence[str] | None = None, capture: Capture | None = None
    ) -> dict[str, Tensor]:
        raise UnsupportedError(f"{self.files.config}: {self.binary_mode_unsupported}")

    # --- samples and labels ------------------------------------------------------------------

    samples: Tensor | None = None  # param-decomp runs ship no samples

    def load_samples(
        self,
        samples_file: str | os.PathLike[str] | None = None,
        *,
        n: int = 8,
        seq_len: int | None = None,
    ) -> Samples:
        """Token ids from ``samples_file`` (``.npy``/``.pt``), or with ``None``/``"dataset"``
        the first ``n`` rows of the run's eval data set (pre-tokenized parquet)."""
        if samples_file is not None and os.fspath(samples_file) != "dataset":
            path = Path(samples_file).expanduser()
            if path.suffix not in TOKEN_FILE_SUFFIXES:
                raise SamplesError(
                    f"{path}: param-decomp runs take token ids ({', '.join(TOKEN_FILE_SUFFIXES)}) "
                    "or 'dataset'; text needs a tokenizer, which these runs do not ship"
                )
            tokens = read_token_file(path, vocab_size=self.vocab_size, n_ctx=self.n_ctx)
            return Samples(tokens, str(path))
        data = self.config.data
        named = (data.eval or data.train) if data else None
        if named is None:
            raise ConfigError(
                f"{self.files.config}: field 'data': no eval or train data set named; pass "
                "--samples-file"
            )
        roots = list(dict.fromkeys([*([self._root] if self._root else []), *output_roots()]))
        tokens = dataset_tokens(named.name, roots, n=n, seq_len=seq_len or self.n_ctx)
        source = f"data set {named.name!r}"
        tokens = check_tokens(tokens, vocab_size=self.vocab_size, n_ctx=self.n_ctx, source=source)
        return Samples(tokens, source)

    @cached_property
    def _labels(self) -> TokenLabels:
        return TokenLabels()

    def token_labels(self, ids: Tensor | Sequence[int]) -> list[str]:
        return self._labels(ids)
