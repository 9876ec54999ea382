"""Run-level quality gate: is this decomposition good enough, and no worse than before?

Separate from faithfulness (test_items.py): a decomposition that does not belong to its
target still closes exactly — its Δ is simply large. Gated here:

* ‖Δ‖_F/‖W‖_F per q/k module within ``--delta-budget``;
* per layer, median |r| within ``--residual-budget`` of the target logits' std, and the
  residual statistics no worse than the stored baseline (``validation/baselines/<run>/``,
  or ``--baseline NAME``) by more than ``--gate-tolerance``. Record or update a baseline
  with ``--force-regen``.
"""

from pathlib import Path

import pytest
from pytest_regressions.common import perform_regression_check

from qkcheck import baseline

BASELINES = Path(__file__).parent / "baselines"


def test_weight_delta_is_within_budget(qk, qk_module, qk_settings, qk_record):
    fraction = qk.delta_fractions()[qk_module]
    layer = next(i for i, sp in qk.specs.items() if qk_module in (sp.q_path, sp.k_path))
    side = "delta_q" if qk.specs[layer].q_path == qk_module else "delta_k"
    qk_record("layer", {"layer": layer, side: fraction})
    assert fraction <= qk_settings.delta_budget, (
        f"{qk_module}: ‖Δ‖_F/‖W‖_F = {fraction:.3f} exceeds the budget "
        f"{qk_settings.delta_budget} (--delta-budget)"
    )


def test_residuals_are_within_budget_and_no_worse_than_the_baseline(
    qk, qk_layer, qk_settings, qk_record, request, datadir, original_datadir
):
    stats = qk.layer_quality(qk_layer)
    sp = qk.specs[qk_layer]
    fractions = qk.delta_fractions()
    stats["delta_q"], stats["delta_k"] = fractions[sp.q_path], fractions[sp.k_path]
    qk_record("layer", {"layer": qk_layer, **stats})
    assert stats["r_frac_of_logit_scale"] <= qk_settings.residual_budget, (
        f"layer {qk_layer}: median |r| = {stats['median_abs_r']:.4g} is "
        f"{stats['r_frac_of_logit_scale']:.3f} of the target logits' std, above the budget "
        f"{qk_settings.residual_budget} (--residual-budget)"
    )

    name = qk_settings.baseline or qk.run.name
    path = baseline.baseline_path(BASELINES, name, qk_layer)
    config = request.config
    recording = config.getoption("force_regen") or config.getoption("regen_all")
    if qk_settings.baseline and not path.is_file():
        pytest.fail(f"--baseline {name}: no baseline for layer {qk_layer} at {path}")
    if not path.is_file() and not recording:
        pytest.skip(
            f"no baseline for run {name} layer {qk_layer} ({path}); gated by budgets only — "
            f"record one with --force-regen"
        )

    def check(obtained: Path, expected: Path) -> None:
        __tracebackhide__ = True
        new, old = baseline.load(obtained), baseline.load(expected)
        if recording and not qk_settings.baseline:
            assert not baseline.differs(new, old), "baseline changed"
            return
        worse = baseline.regressions(new, old, qk_settings.gate_tolerance)
        assert not worse, f"layer {qk_layer} is worse than baseline {name}:\n" + "\n".join(worse)

    perform_regression_check(
        datadir=datadir,
        original_datadir=original_datadir,
        request=request,
        check_fn=check,
        dump_fn=lambda p: baseline.dump(stats, p),
        extension=".yml",
        fullpath=path,
        force_regen=bool(recording) and not qk_settings.baseline,
    )
