"""pytest-xdist scheduling for a validation session: one layer to one worker.

A layer's items share its (layer, sample) groups, and its quality test reads the statistics
of every group of the layer (:meth:`qkcheck.validate.Validator.layer_quality`): spread over
workers, each worker would compute the groups again. :class:`LayerScheduling` is xdist's
scope scheduler with a layer as the scope — the items ``[L<l>-S<s>-Q<q>]``, the quality
test ``[L<l>]`` and the Δ-budget tests of the layer's q/k modules go to one worker, in
collection order (items first, so the gate finds its groups computed). Other tests are
scopes of their own. Imported only when pytest-xdist asks for a scheduler.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from xdist.scheduler import LoadScopeScheduling

_LAYER_ID = re.compile(r"L(\d+)(?:-S\d+-Q\d+)?")


def layer_scope(nodeid: str, module_layers: Mapping[str, int]) -> str | None:
    """``"L<l>"`` for a test of layer ``l`` (by its parameter id), else None."""
    _, bracket, rest = nodeid.partition("[")
    if not bracket or not rest.endswith("]"):
        return None
    param = rest[:-1]
    m = _LAYER_ID.fullmatch(param)
    if m:
        return f"L{m.group(1)}"
    layer = module_layers.get(param)
    return None if layer is None else f"L{layer}"


class LayerScheduling(LoadScopeScheduling):
    """xdist's ``loadscope`` with the layer (:func:`layer_scope`) as the scope."""

    def __init__(self, config, log=None, module_layers: Mapping[str, int] | None = None):
        super().__init__(config, log)
        self.module_layers = dict(module_layers or {})

    def _split_scope(self, nodeid: str) -> str:
        return layer_scope(nodeid, self.module_layers) or nodeid
