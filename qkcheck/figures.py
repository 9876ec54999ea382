"""Assemble one item's figure data from a :class:`~qkcheck.validate.Validator` and write
the combined and validation figures (qkcheck.plots) under an artifacts directory.

Only what the figures need is computed: the item's pair factors, an exact chunked top-N
(never the full pair tensor), and the curves of the selected pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qkcheck.pairs import (
    DEFAULT_BUDGET,
    binary_factors,
    component_sum,
    pair_curves,
    top_pairs,
    weighted_factors,
)
from qkcheck.plots import (
    ItemPlotData,
    as_numpy,
    combined_figure,
    save_figure,
    validation_figure,
)

#: pairs drawn faint per coloured pair: the next strongest after the top-N
FAINT_PER_TOP = 3


def item_plot_data(validator, layer: int, sample: int, query_pos: int) -> ItemPlotData:
    """Pair curves, top-N per head and for the head mean, envelope, totals and target."""
    s = validator.settings
    i = query_pos
    cap, row = validator.capture(sample)
    w, layout = validator.weights(layer), validator.layout(layer)
    spec = validator.specs[layer]
    with torch.no_grad():
        if s.mode == "weighted":
            x = cap.attn_inputs[layer][row].to(dtype=s.torch_dtype, device=s.device)
            f = weighted_factors(x[i], x[: i + 1], w.V_Q, w.U_Q, w.V_K, w.U_K, layout, i)
        else:
            ci = validator.run.causal_importances(
                None, paths=[spec.q_path, spec.k_path], capture=cap
            )
            ci_q = ci[spec.q_path][row].to(dtype=s.torch_dtype, device=s.device)
            ci_k = ci[spec.k_path][row].to(dtype=s.torch_dtype, device=s.device)
            f = binary_factors(ci_q[i], ci_k[: i + 1], w.U_Q, w.U_K, layout, i, s.ci_threshold)
        n = s.top_n
        top = top_pairs(f, n * (1 + FAINT_PER_TOP), budget_bytes=DEFAULT_BUDGET)
        ranked = [[tuple(p) for p in top.head_pairs[h].tolist()] for h in range(f.n_head)]
        mean_ranked = [tuple(p) for p in top.mean_pairs.tolist()]
        head_top, mean_top = [r[:n] for r in ranked], mean_ranked[:n]
        pairs = list(dict.fromkeys([*mean_ranked, *(p for r in ranked for p in r)]))
        curves = pair_curves(f, torch.tensor(pairs, device=f.q.device))  # (head, m, J)
        total = component_sum(f)
    group = validator.group(layer, sample)
    return ItemPlotData(
        run=validator.run.name,
        layer=layer,
        sample=sample,
        query_pos=i,
        mode=s.mode,
        tokens=validator.run.token_labels(validator.token_ids(sample)),
        pair_curves={p: as_numpy(curves[:, m]) for m, p in enumerate(pairs)},
        head_top=head_top,
        mean_top=mean_top,
        head_faint=[r[n:] for r in ranked],
        mean_faint=mean_ranked[n:],
        total=as_numpy(total),
        target=as_numpy(group.target[:, i, : i + 1]) if s.mode == "weighted" else None,
    )


def write_item_figures(
    validator, layer: int, sample: int, query_pos: int, out_dir: Path
) -> list[Path]:
    """Write ``<run>_L<l>_S<s>_Q<q>_combined.png`` (and ``_validation.png`` in weighted
    mode) under ``out_dir``; returns their paths."""
    data = item_plot_data(validator, layer, sample, query_pos)
    paths = [save_figure(combined_figure(data), out_dir / f"{data.stem()}_combined.png")]
    if data.mode == "weighted":
        group = validator.group(layer, sample)
        i = query_pos
        fig = validation_figure(
            data,
            as_numpy(group.component_sum[:, i, : i + 1]),
            as_numpy(group.target[:, i, : i + 1]),
        )
        paths.append(save_figure(fig, out_dir / f"{data.stem()}_validation.png"))
    return paths
