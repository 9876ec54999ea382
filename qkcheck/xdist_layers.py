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
    """xdist's ``loadscope`` with the layer (:func:`layer_scope`) as the scope.

    Its bookkeeping is made linear: xdist counts a worker's pending tests by scanning every
    test of its scopes after each report, and finds each test's index by a list search —
    quadratic in a scope's size, minutes for 10,000-item layers (measured: 41k items under
    ``-n 2`` spent most of their controller time there). Here a worker's pending count is
    kept as tests are assigned and completed, and indices come from a dict."""

    def __init__(self, config, log=None, module_layers: Mapping[str, int] | None = None):
        super().__init__(config, log)
        self.module_layers = dict(module_layers or {})
        self._index: dict = {}  # node -> {nodeid: its index in the node's collection}
        self._pending: dict = {}  # node -> tests assigned to it and not yet completed

    def _split_scope(self, nodeid: str) -> str:
        return layer_scope(nodeid, self.module_layers) or nodeid

    def add_node_collection(self, node, collection) -> None:
        super().add_node_collection(node, collection)
        if node in self.registered_collections:
            self._index[node] = {nodeid: i for i, nodeid in enumerate(collection)}

    def _assign_work_unit(self, node) -> None:
        scope, work_unit = self.workqueue.popitem(last=False)
        self.assigned_work.setdefault(node, {})[scope] = work_unit
        index = self._index[node]
        todo = [index[nodeid] for nodeid, done in work_unit.items() if not done]
        self._pending[node] = self._pending.get(node, 0) + len(todo)
        node.send_runtest_some(todo)

    def mark_test_complete(self, node, item_index: int, duration: float = 0) -> None:
        nodeid = self.registered_collections[node][item_index]
        work_unit = self.assigned_work[node][self._split_scope(nodeid)]
        if not work_unit[nodeid]:
            work_unit[nodeid] = True
            self._pending[node] -= 1
        self._reschedule(node)

    def _pending_of(self, workload) -> int:
        for node, assigned in self.assigned_work.items():
            if assigned is workload:
                return self._pending.get(node, 0)
        return super()._pending_of(workload)  # a removed node's workload (a crash)
