"""Which attention layers of a run can be validated: those with both q and k decomposed.

A run may decompose only some layers, or only one side of a layer (spd's
``target_module_patterns``, param-decomp's ``decomposition.sites``). The logits of a layer
are a sum over (query-component, key-component) pairs only when both projections are
decomposed; a one-sided layer is *skipped* with its reason rather than validated with the
other side's whole weight as Δ (that would pass closure trivially and say nothing about the
decomposition). A fused projection (GPT-2's ``c_attn``) is one module serving both sides.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from qkcheck.models.base import AttentionSpec


@dataclass(frozen=True)
class LayerCoverage:
    """``decomposed``: layer indices with q and k decomposed, ascending; ``skipped``:
    ``{layer: why}`` for the others."""

    decomposed: list[int]
    skipped: dict[int, str] = field(default_factory=dict)


def layer_coverage(specs: Sequence[AttentionSpec], modules: Collection[str]) -> LayerCoverage:
    """Split ``specs`` by whether their q and k projections are among ``modules`` (the
    run's decomposed module paths)."""
    decomposed: list[int] = []
    skipped: dict[int, str] = {}
    for sp in specs:
        has_q, has_k = sp.q_path in modules, sp.k_path in modules
        if has_q and has_k:
            decomposed.append(sp.layer)
        elif sp.q_path == sp.k_path:
            skipped[sp.layer] = f"{sp.q_path} is not decomposed"
        elif not (has_q or has_k):
            skipped[sp.layer] = f"neither {sp.q_path} nor {sp.k_path} is decomposed"
        else:
            have, lack = (sp.q_path, sp.k_path) if has_q else (sp.k_path, sp.q_path)
            skipped[sp.layer] = (
                f"only {have} is decomposed ({lack} is not); a layer's logits decompose into "
                "component pairs only with both sides"
            )
    return LayerCoverage(decomposed, skipped)
