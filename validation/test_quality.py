"""Run-level quality gate: is this decomposition good enough, and no worse than before?

Separate from faithfulness (test_items.py): a decomposition that does not belong to its
target still closes exactly — its Δ is simply large. Gated here:

* ‖Δ‖_F/‖W‖_F per q/k module within ``--delta-budget``;
* per layer, median |r| within ``--residual-budget`` of the target logits' std, and the
  residual statistics no worse than the stored baseline (``validation/baselines/<run>/``,
  or ``--baseline NAME``) by more than ``--gate-tolerance``, when measured the same way.
  The baseline policy (record / skip / compare / fail) is the ``qk_baseline`` fixture's
  (:class:`qkcheck.gate.BaselineGate`); record or update this run's baseline with
  ``--force-regen`` or ``--regen-all``.
"""


def test_weight_delta_is_within_budget(qk, qk_module, qk_settings, qk_record):
    fraction = qk.delta_fractions()[qk_module]
    layer = next(i for i, sp in qk.specs.items() if qk_module in (sp.q_name, sp.k_name))
    side = "delta_q" if qk.specs[layer].q_name == qk_module else "delta_k"
    qk_record("layer", {"layer": layer, side: fraction})
    assert fraction <= qk_settings.delta_budget, (
        f"{qk_module}: ‖Δ‖_F/‖W‖_F = {fraction:.3f} exceeds the budget "
        f"{qk_settings.delta_budget} (--delta-budget)"
    )


def test_residuals_are_within_budget_and_no_worse_than_the_baseline(
    qk, qk_layer, qk_settings, qk_record, qk_baseline
):
    stats = qk.layer_quality(qk_layer)
    sp = qk.specs[qk_layer]
    fractions = qk.delta_fractions()
    stats["delta_q"], stats["delta_k"] = fractions[sp.q_name], fractions[sp.k_name]
    qk_record("layer", {"layer": qk_layer, **stats})
    assert stats["r_frac_of_logit_scale"] <= qk_settings.residual_budget, (
        f"layer {qk_layer}: median |r| = {stats['median_abs_r']:.4g} is "
        f"{stats['r_frac_of_logit_scale']:.3f} of the target logits' std, above the budget "
        f"{qk_settings.residual_budget} (--residual-budget)"
    )
    qk_baseline.check(qk_layer, stats)
