"""A loaded SPD run: config, checked checkpoint, and lazily the target model and CI functions.

``run = load_run(source)`` reads the run's config, its checkpoint (weights only) and the
target architecture, and checks the checkpoint against the config. Everything else — the
target model, CI functions, samples, token labels — is built on first use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkcheck.errors import (
    CheckpointError,
    ConfigError,
    QKCheckError,
    SamplesError,
    UnsupportedError,
)
from qkcheck.models import build_target_model, resolve_model_class
from qkcheck.models.base import Capture
from qkcheck.models.hf import HFTarget, hf_arch, is_hf_class, read_hf_config
from qkcheck.models.hf_hub import find_snapshot
from qkcheck.runs.checkpoint import (
    TARGET_PREFIX,
    Components,
    read_checkpoint,
    split_checkpoint,
    weight_modules,
)
from qkcheck.runs.config import (
    SPDConfig,
    expand_module_info,
    parse_model_config,
    read_spd_config,
    read_yaml,
)
from qkcheck.runs.resolve import (
    PretrainFiles,
    SPDRunFiles,
    resolve_pretrain,
    resolve_run,
)
from qkcheck.runs.target_run import TargetRun
from qkcheck.samples import (
    Samples,
    TokenLabels,
    check_tokens,
    dataset_samples,
    find_tokenizer,
    read_samples_file,
    read_token_file,
)


@dataclass(frozen=True)
class RunFiles:
    """Every file a run was loaded from (None: not present / not used)."""

    run_dir: Path
    config: Path
    checkpoint: Path
    pretrain_dir: Path
    model_config: Path  # model_config.yaml, or the pretrain final_config.yaml holding "model:"
    pretrain_checkpoint: Path | None
    tokenizer: Path | None
    samples: Path | None


def load_run(
    source: str | os.PathLike[str],
    *,
    step: int | None = None,
    pretrain: str | os.PathLike[str] | None = None,
) -> Run:
    """Load an SPD run.

    ``source``: ``"demo"``, a run directory, a ``model_<step>.pth`` file or a W&B reference
    (see :mod:`qkcheck.runs.resolve`), optionally ending in ``@STEP``. ``step``: the checkpoint
    step (default: the latest). ``pretrain``: the target model's pretrain run (a directory,
    checkpoint or W&B reference), overriding the config's ``pretrained_model_name``/``_path``.
    A param-decomp run (``p-xxxxxxxx`` forms, or a directory holding ``launch_config.yaml``)
    loads as a :class:`~qkcheck.runs.param_decomp.ParamDecompRun` with the same interface.
    """
    from qkcheck.runs.param_decomp import is_param_decomp, load_param_decomp_run

    if is_param_decomp(source):
        return load_param_decomp_run(source, step=step)  # type: ignore[return-value]
    spd_files = resolve_run(source, step)
    config = read_spd_config(spd_files.config)
    reference = pretrain if pretrain is not None else config.pretrained_reference
    if reference is None:
        raise ConfigError(
            f"{config.path}: neither field 'pretrained_model_name' nor 'pretrained_model_path' "
            "is set, so the target architecture is unknown; pass load_run(..., pretrain=PATH)"
        )
    if is_hf_class(config.pretrained_model_class):
        pre, model_config = _hf_pretrain(config, os.fspath(reference), spd_files.root)
    else:
        pre = resolve_pretrain(reference, near=spd_files.root)
        model_config = _read_model_config(pre, config)
        try:
            resolve_model_class(config.pretrained_model_class, model_config)
        except QKCheckError as e:
            raise type(e)(f"{config.path}: field 'pretrained_model_class': {e}") from e
    state = read_checkpoint(spd_files.checkpoint)
    if not any(k.startswith(TARGET_PREFIX) for k in state) and pre.checkpoint is not None:
        # Only old checkpoints lack the target weights; then they come from the pretrain run.
        state.update({TARGET_PREFIX + k: v for k, v in read_checkpoint(pre.checkpoint).items()})
    return Run(spd_files, pre, config, model_config, state, source=os.fspath(source))


def _hf_pretrain(
    config: SPDConfig, reference: str, near: Path | None
) -> tuple[PretrainFiles, dict[str, Any]]:
    """The HF snapshot of ``pretrained_model_name`` (folder, hub cache, or download) and its
    ``config.json``; the class is checked against :data:`qkcheck.models.hf.ARCHITECTURES`."""
    hf_arch(config.pretrained_model_class, f"{config.path}: field 'pretrained_model_class'")
    snapshot = find_snapshot(reference, near=near)
    tokenizer = snapshot / "tokenizer.json"
    files = PretrainFiles(
        dir=snapshot,
        model_config=snapshot / "config.json",
        config=None,
        checkpoint=None,
        tokenizer=tokenizer if tokenizer.is_file() else None,
    )
    return files, read_hf_config(snapshot)


def _read_model_config(pre: PretrainFiles, config: SPDConfig) -> dict[str, Any]:
    if pre.model_config is not None:
        return parse_model_config(
            read_yaml(pre.model_config), pre.model_config, config.pretrained_model_class
        )
    assert pre.config is not None  # resolve_pretrain returns a folder holding one or the other
    return parse_model_config(
        read_yaml(pre.config), pre.config, config.pretrained_model_class, nested=True
    )


class Run(TargetRun):
    """One SPD run at one checkpoint step. Build with :func:`load_run`.

    Tensors shapes use ``batch pos query_pos key_pos head comp d_in d_out``. Nothing here
    is mutated after construction; one Run may be shared (e.g. by a session-scoped fixture).
    """

    def __init__(
        self,
        spd_files: SPDRunFiles,
        pretrain_files: PretrainFiles,
        config: SPDConfig,
        model_config: dict[str, Any],
        state: dict[str, Tensor],
        source: str = "",
    ) -> None:
        self.source = source
        self.name: str = spd_files.name
        self.step: int | None = spd_files.step
        self.config = config
        self.model_config = model_config
        self.files = RunFiles(
            run_dir=spd_files.run_dir,
            config=spd_files.config,
            checkpoint=spd_files.checkpoint,
            pretrain_dir=pretrain_files.dir,
            model_config=pretrain_files.model_config or pretrain_files.config,  # type: ignore[arg-type]
            pretrain_checkpoint=pretrain_files.checkpoint,
            tokenizer=find_tokenizer(
                [pretrain_files.tokenizer, spd_files.run_dir / "tokenizer.json"],
                config.tokenizer_name,
            ),
            samples=spd_files.samples,
        )
        target = {
            k.removeprefix(TARGET_PREFIX): v
            for k, v in state.items()
            if k.startswith(TARGET_PREFIX)
        }
        self._modules = expand_module_info(config.module_info, weight_modules(target), config.path)
        split = split_checkpoint(state, self._modules, config.ci_config.mode, spd_files.checkpoint)
        self._target = split.target
        self._components: dict[str, Components] = split.components
        self._ci_state = split.ci_state

    # --- the decomposition -------------------------------------------------------------------

    @property
    def module_paths(self) -> list[str]:
        """Every decomposed module, in ``module_info`` order (as spd expands the patterns)."""
        return list(self._components)

    def components(self, path: str) -> tuple[Tensor, Tensor]:
        """``(V, U)`` of a decomposed module: ``V`` ``(d_in, comp)``, ``U`` ``(comp, d_out)``."""
        c = self._component(path)
        return c.V, c.U

    def target_weight(self, path: str) -> tuple[Tensor, Tensor | None]:
        """The decomposed module's target weight ``W`` ``(d_out, d_in)`` and bias (or None).

        Identity: ``W − (V @ U).T`` is the weight delta. An embedding's ``(vocab, d)`` weight
        is returned transposed, as a map from one-hot tokens.
        """
        c = self._component(path)
        d_in, d_out = c.V.shape[0], c.U.shape[1]
        if self._modules[path].identity:
            return torch.eye(d_in, dtype=c.V.dtype), None
        W = self._target.get(f"{path}.weight")
        if W is None:  # an HF run whose checkpoint left the weights to the snapshot
            W = self.model.get_submodule(path).weight.detach().cpu()  # the model may be on a GPU
        if self._stores_transposed(path, W, (d_out, d_in)):  # Conv1D, embeddings: (d_in, d_out)
            W = W.T
        if tuple(W.shape) != (d_out, d_in):
            raise CheckpointError(
                f"{self.files.checkpoint}: target weight '{path}.weight' is "
                f"{tuple(W.shape)} (as d_out × d_in), but the components "
                f"give a ({d_out}, {d_in}) map"
            )
        bias = self._target.get(f"{path}.bias", c.bias)
        return W, bias

    def _stores_transposed(self, path: str, W: Tensor, shape: tuple[int, int]) -> bool:
        """Orientation as the model declares it (HF: Conv1D); spd's own models store
        ``(d_out, d_in)`` except embeddings, ``(vocab, d)``."""
        declared = getattr(self.model, "stores_transposed", None)
        if declared is not None:
            return bool(declared(path))
        return isinstance(self._submodule(path), nn.Embedding)

    def _component(self, path: str) -> Components:
        try:
            return self._components[path]
        except KeyError:
            raise QKCheckError(
                f"run {self.name}: module {path!r} is not decomposed; decomposed modules: "
                f"{', '.join(self._components)}"
            ) from None

    # --- the target model --------------------------------------------------------------------

    @cached_property
    def model(self) -> nn.Module:
        """The target model with the checkpoint's target weights (built on first use)."""
        if is_hf_class(self.config.pretrained_model_class):
            return HFTarget.build(
                self.config.pretrained_model_class,
                self.files.pretrain_dir,
                self._target or None,
                source=str(self.files.checkpoint),
            )
        return build_target_model(
            self.config.pretrained_model_class,
            self.model_config,
            self._target,
            source=str(self.files.checkpoint),
            config_source=str(self.files.model_config),
        )

    # --- causal importances ------------------------------------------------------------------

    @cached_property
    def ci_functions(self) -> Any:
        """The run's CI functions (qkcheck.ci), built on first use."""
        from qkcheck.ci import build_ci_functions

        embeddings = [p for p in self._components if isinstance(self._submodule(p), nn.Embedding)]
        return build_ci_functions(
            self.config.ci_config.as_dict(),
            self.config.sigmoid_type,
            self._ci_state,
            {p: (c.V, c.U) for p, c in self._components.items()},
            source=str(self.files.checkpoint),
            embedding_paths=embeddings,
            config_source=str(self.config.path),
        )

    def _submodule(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def causal_importances(
        self, tokens: Tensor, paths: Sequence[str] | None = None, capture: Capture | None = None
    ) -> dict[str, Tensor]:
        """Lower (thresholding) CI, ``module path -> (batch, pos, comp)``, for ``paths``
        (default: every decomposed module). Pass ``capture`` to reuse a forward pass."""
        if capture is None:
            capture = self.capture(tokens, modules=self.module_paths)
        inputs = {p: t.cpu() for p, t in capture.module_inputs.items()}  # CI functions: CPU
        for path in self._components:
            if isinstance(self._submodule(path), nn.Embedding):
                inputs[path] = check_tokens(tokens, vocab_size=self.vocab_size, n_ctx=self.n_ctx)
        try:
            return self.ci_functions.lower(inputs, list(paths) if paths is not None else None)
        except UnsupportedError as e:
            field = e.field or "ci_config"
            raise UnsupportedError(f"{self.config.path}: field '{field}': {e}", field=field) from e

    # --- samples and labels ------------------------------------------------------------------

    @cached_property
    def samples(self) -> Tensor | None:
        """The samples the run ships (``samples.pt`` in its directory), else None.

        See :meth:`load_samples` for files, text and the run's dataset.
        """
        if self.files.samples is None:
            return None
        return read_token_file(self.files.samples, vocab_size=self.vocab_size, n_ctx=self.n_ctx)

    def load_samples(
        self,
        samples_file: str | os.PathLike[str] | None = None,
        *,
        n: int = 8,
        seq_len: int | None = None,
    ) -> Samples:
        """Samples checked against this run's model: from ``samples_file`` (token ids
        ``.pt``/``.npy``, text lines ``.txt``, or ``"dataset"``), else the run's own
        ``samples.pt``, else its dataset. ``n``/``seq_len`` apply to the dataset
        (``seq_len`` defaults to the smaller of the task's ``max_seq_len`` and ``n_ctx``).
        """
        limits = {"vocab_size": self.vocab_size, "n_ctx": self.n_ctx}
        if samples_file is None and self.samples is not None:
            return Samples(self.samples, str(self.files.samples))
        if samples_file is None or os.fspath(samples_file) == "dataset":
            task = self.config.task_config
            if task is None:
                raise SamplesError(
                    f"{self.config.path}: no task_config to read a dataset from; pass a samples "
                    "file"
                )
            length = seq_len or min(task.max_seq_len, self.n_ctx)
            tokens = dataset_samples(
                task, n=n, seq_len=length, tokenizer=self.files.tokenizer, **limits
            )
            return Samples(tokens, f"dataset {task.dataset_name!r}")
        return read_samples_file(
            Path(samples_file).expanduser(),
            tokenizer=self.files.tokenizer,
            no_tokenizer=f"looked in {self.files.pretrain_dir} and for tokenizer_name "
            f"{self.config.tokenizer_name!r}",
            **limits,
        )

    @cached_property
    def _labels(self) -> TokenLabels:
        if self.files.tokenizer is None:
            return TokenLabels()
        return TokenLabels.from_tokenizer_json(self.files.tokenizer)

    def token_labels(self, ids: Tensor | Sequence[int]) -> list[str]:
        """Display strings for token ids (the ids themselves when no vocabulary is known)."""
        return self._labels(ids)
