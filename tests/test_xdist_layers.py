"""Which tests pytest-xdist sends to one worker in a qkcheck session (qkcheck.xdist_layers).
The end-to-end check (two workers, one layer each) is in tests/test_plugin.py."""

from __future__ import annotations

import pytest

from qkcheck.xdist_layers import layer_scope

MODULES = {"h.0.attn.q_proj": 0, "h.0.attn.c_attn[k]": 0, "model.layers.11.self_attn.k_proj": 11}
ITEMS = "validation/test_items.py::test_decomposition_closes_and_stays_within_the_bound"
QUALITY = (
    "validation/test_quality.py::test_residuals_are_within_budget_and_no_worse_than_the_baseline"
)
DELTA = "validation/test_quality.py::test_weight_delta_is_within_budget"


@pytest.mark.parametrize(
    ("nodeid", "scope"),
    [
        (f"{ITEMS}[L0-S3-Q17]", "L0"),
        (f"{ITEMS}[L12-S0-Q0]", "L12"),
        (f"{QUALITY}[L12]", "L12"),
        (f"{DELTA}[h.0.attn.q_proj]", "L0"),
        (f"{DELTA}[h.0.attn.c_attn[k]]", "L0"),  # a fused module's side: brackets inside
        (f"{DELTA}[model.layers.11.self_attn.k_proj]", "L11"),
        (f"{DELTA}[h.5.attn.q_proj]", None),  # not a module of the run
        (f"{ITEMS}[L0-S3]", None),
        ("tests/test_other.py::test_x", None),
        ("tests/test_other.py::test_x[L1-S0-Q0-extra]", None),
    ],
)
def test_a_layers_items_quality_and_delta_tests_share_a_scope(nodeid, scope):
    assert layer_scope(nodeid, MODULES) == scope
