"""What every run format offers about its target model, written once: the adapters
(:class:`qkcheck.runs.run.Run`, :class:`qkcheck.runs.param_decomp.run.ParamDecompRun`)
provide ``model`` (a :class:`~qkcheck.models.common.TargetModel` or an HF target) and
inherit its attention specs, sizes, forward capture and device placement from here."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Self

import torch
from torch import Tensor

from qkcheck.models.base import AttentionSpec, Capture
from qkcheck.samples import check_tokens


class TargetRun:
    """The target-model half of the ``Run`` interface; subclasses set ``model`` (and
    ``name``, ``step``, ``files`` for the repr)."""

    model: Any
    name: str
    step: int
    files: Any  # the format's files; ``run_dir`` is the run's folder

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} step={self.step} from {self.files.run_dir}>"

    @property
    def layers(self) -> list[AttentionSpec]:
        """One spec per attention layer of the target model."""
        return self.model.attention_specs()

    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    @property
    def vocab_size(self) -> int:
        return int(self.model.vocab_size)

    def capture(
        self,
        tokens: Tensor,
        modules: Collection[str] | None = None,
        document_ids: Tensor | None = None,
        layers: Collection[int] | None = None,
    ) -> Capture:
        """One forward pass over ``tokens`` ``(batch, pos)``: every layer's attention input and
        pre-softmax logits (or only those of ``layers``), and the input of every Linear (or
        only of those in ``modules``). ``document_ids`` ``(batch, pos)``: see
        :mod:`qkcheck.documents`. Runs where the model is (:meth:`to`); the captured tensors
        are on that device."""
        tokens = check_tokens(tokens, vocab_size=self.vocab_size, n_ctx=self.n_ctx)
        return self.model.capture(tokens, modules, document_ids=document_ids, layers=layers)

    def target_attention_logits(self, tokens: Tensor) -> dict[int, Tensor]:
        """``layer -> (batch, head, query_pos, key_pos)`` pre-softmax logits from the target
        model's own attention (entries above the diagonal unspecified)."""
        return self.capture(tokens).logits

    def to(self, device: torch.device | str) -> Self:
        """Run the target model on ``device`` from now on (moved once, in place; nothing
        happens when it is there already): :meth:`capture` moves its tokens there and its
        captures stay there. Weights and components are still returned on the CPU."""
        self.model.to(device)
        return self
