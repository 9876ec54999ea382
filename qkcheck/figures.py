"""Assemble one item's figure data (:class:`~qkcheck.plots.ItemPlotData`, plain arrays)
from a :class:`~qkcheck.validate.Validator` and write its figures (qkcheck.plots).

Only what the figures need is computed: the item's pair factors, an exact chunked top-N
(never the full pair tensor), the curves of the selected pairs, per-component sums (each
query component over all key components and the reverse), and the bias and Δ terms.

QK-norm layers (Qwen3) are drawn with the per-(position, head) factors σ of the target
projections and the gains γ, as the decomposition uses them (docs/design.md §2), in
weighted mode; binary mode's weight-only terms are undefined there
(:class:`~qkcheck.errors.UnsupportedError`). Samples split into documents (``--doc-ids``,
``--doc-sep``) are not drawn yet (same error).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qkcheck.decompose import qk_norm_scales
from qkcheck.errors import UnsupportedError
from qkcheck.pairs import (
    DEFAULT_BUDGET,
    ItemFactors,
    binary_factors,
    component_sum,
    pair_curves,
    top_pairs,
    weighted_factors,
)
from qkcheck.plots import ItemPlotData, Verdict, draw_item
from qkcheck.rotary import rotate

BOUND_LABELS = {
    "weight": "B_weight, from each head's ‖Δ‖ ({norm} norm) and ‖x‖",
    "data": "B_data, from this sample's Δq and Δk",
    "budget": "B_weight with ‖Δ‖ = {budget}·‖W‖ ({norm} norm)",
}


def as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _check_supported(validator, layer: int) -> None:
    s, spec = validator.settings, validator.specs[layer]
    if validator.document_ids is not None:
        raise UnsupportedError(
            "figures of samples split into documents (--doc-ids/--doc-sep) are not drawn yet: "
            "their rotary positions restart per document"
        )
    if spec.qk_norm is not None and s.mode == "binary":
        raise UnsupportedError(
            f"layer {layer}: binary-mode figures of a QK-norm layer are undefined: its "
            f"weight-only terms depend on the data through the norm's σ (use --mode weighted)"
        )


def _factors(validator, layer: int, sample: int, i: int) -> tuple[ItemFactors, dict]:
    s = validator.settings
    cap, row = validator.capture(sample, layer)
    w, layout = validator.weights(layer), validator.layout(layer)
    spec = validator.specs[layer]
    extra: dict = {}
    if s.mode == "weighted":
        x = cap.attn_inputs[layer][row].to(dtype=s.torch_dtype, device=s.device)
        scales = qk_norm_scales(x[None, : i + 1], w, layout)
        norm = {}
        if scales is not None:
            norm = {
                "gamma_q": w.gamma_Q,
                "gamma_k": w.gamma_K,
                "sigma_q": scales[0][0, :, i],
                "sigma_k": scales[1][0],
            }
        f = weighted_factors(x[i], x[: i + 1], w.V_Q, w.U_Q, w.V_K, w.U_K, layout, i, **norm)
        extra["bias"] = _bias_terms(f, w, layout, i, norm)
    else:
        ci = validator.run.causal_importances(None, paths=[spec.q_path, spec.k_path], capture=cap)
        ci_q = ci[spec.q_path][row].to(dtype=s.torch_dtype, device=s.device)
        ci_k = ci[spec.k_path][row].to(dtype=s.torch_dtype, device=s.device)
        f = binary_factors(ci_q[i], ci_k[: i + 1], w.U_Q, w.U_K, layout, i, s.ci_threshold)
    return f, extra


def _bias_terms(f: ItemFactors, w, layout, i: int, norm: dict) -> Tensor | None:
    """``s (<R_i q_c, R_j b_K> + <R_i b_Q, R_j k̂_j>)`` per head and key, as decompose.py
    splits them, or None without biases."""
    if w.b_Q is None and w.b_K is None:
        return None
    J, dh = f.k.shape[2], layout.head_dim
    kp = torch.arange(J, device=f.k.device)

    def side(b, n, pos, gamma, sigma):
        if b is None:
            return None
        v = b.to(f.q.dtype).reshape(n, 1, dh).expand(n, pos.shape[0], dh)
        if gamma is not None:
            v = v * gamma.to(v.dtype)
        v = rotate(v, pos, layout.rotary)
        return v if sigma is None else v * sigma.reshape(n, -1, 1)

    bq = side(w.b_Q, layout.n_head, torch.tensor([i]), norm.get("gamma_q"), norm.get("sigma_q"))
    bk = side(w.b_K, layout.n_kv_heads, kp, norm.get("gamma_k"), norm.get("sigma_k"))
    g = f.group
    qs = f.q.sum(dim=1)  # (H, d)
    ks = f.k.sum(dim=1).repeat_interleave(g, dim=0)  # (H, J, d)
    out = torch.zeros(f.n_head, J, dtype=f.q.dtype, device=f.q.device)
    if bk is not None:
        bk_h = bk.repeat_interleave(g, dim=0)  # (H, J, d)
        out += torch.einsum("hd,hjd->hj", qs, bk_h)
        ks = ks + bk_h
    if bq is not None:
        out += torch.einsum("hd,hjd->hj", bq[:, 0], ks)
    return f.scale * out


def component_curves(f: ItemFactors) -> tuple[Tensor, Tensor]:
    """Per-component sums: ``Q[h, c, j] = Σ_d P[h,c,d,j]`` (a query component over every key
    component) and ``K[h, d, j] = Σ_c P[h,c,d,j]``; each sums over c (d) to the pair sum."""
    g = f.group
    ks = f.k.sum(dim=1).repeat_interleave(g, dim=0)  # (H, J, d)
    qsum = f.q.sum(dim=1)  # (H, d)
    Q = torch.einsum("hcd,hjd->hcj", f.q, ks)
    K = torch.einsum("hd,hcjd->hcj", qsum, f.k.repeat_interleave(g, dim=0))
    return f.scale * Q, f.scale * K


def _ranked(curves: Tensor, n: int) -> tuple[list[list[int]], list[int]]:
    """Top-``n`` rows of ``(head, C, J)`` by peak |value| per head and for the head mean."""
    n = min(n, curves.shape[1])
    per_head = curves.abs().amax(dim=-1).topk(n, dim=-1).indices.tolist()
    mean = curves.mean(dim=0).abs().amax(dim=-1).topk(n).indices.tolist()
    return per_head, mean


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def item_plot_data(validator, layer: int, sample: int, query_pos: int) -> ItemPlotData:
    """Pair curves and top-N per head and for the head mean, per-component sums, totals,
    bias and Δ terms, target and (weighted mode) the item's verdict."""
    _check_supported(validator, layer)
    s = validator.settings
    i = query_pos
    spec = validator.specs[layer]
    validator.capture(sample, layer)  # the target's forward pass (cached): every thread
    # the rest is many small blocks and memory-bound products: one thread (two contending
    # with the drawing workers, or with other jobs on the cores, ran it 3-10x slower)
    with torch.no_grad(), _torch_threads(1):
        f, extra = _factors(validator, layer, sample, i)
        n = s.top_n
        top = top_pairs(f, n, budget_bytes=DEFAULT_BUDGET)
        head_top = [[tuple(p) for p in top.head_pairs[h].tolist()] for h in range(f.n_head)]
        mean_top = [tuple(p) for p in top.mean_pairs.tolist()]
        pairs = list(dict.fromkeys([*mean_top, *(p for r in head_top for p in r)]))
        curves = pair_curves(f, torch.tensor(pairs, device=f.q.device))  # (head, m, J)
        total = component_sum(f)
        Q, K = component_curves(f)
        head_q, mean_q = _ranked(Q, n)
        head_k, mean_k = _ranked(K, n)
        q_ids = sorted({*mean_q, *(c for t in head_q for c in t)})
        k_ids = sorted({*mean_k, *(c for t in head_k for c in t)})
    data = ItemPlotData(
        run=validator.run.name,
        layer=layer,
        sample=sample,
        query_pos=i,
        mode=s.mode,
        tokens=validator.run.token_labels(validator.token_ids(sample)),
        pair_curves={p: as_numpy(curves[:, m]) for m, p in enumerate(pairs)},
        head_top=head_top,
        mean_top=mean_top,
        total=as_numpy(total),
        target=None,
        q_curves={c: as_numpy(Q[:, c]) for c in q_ids},
        k_curves={c: as_numpy(K[:, c]) for c in k_ids},
        head_q_top=head_q,
        head_k_top=head_k,
        mean_q_top=mean_q,
        mean_k_top=mean_k,
        q_label=spec.q_path,
        k_label=spec.k_path,
        show_attention=s.show_attention,
    )
    if s.mode == "weighted":
        res = validator.item(layer, sample, i)
        S, T, B = (as_numpy(t) for t in validator.query_row(layer, sample, i))
        bias = extra.get("bias")
        data.target = T
        data.bias = np.zeros_like(S) if bias is None else as_numpy(bias)
        data.delta = T - S  # r: target − (components + bias)
        label = BOUND_LABELS[res.bound_kind].format(norm=s.norm, budget=s.delta_budget)
        data.verdict = Verdict(
            passed=res.passed,
            closure_ok=res.closure_ok,
            bound_ok=res.bound_ok,
            closure_error=res.closure_error,
            closure_tol=res.closure_tol,
            ratio=res.ratio,
            head=res.head,
            key=res.key,
            r=res.r,
            bound_kind=res.bound_kind,
            bound_label=label,
            component_sum=S,
            target=T,
            bound=B,
        )
    return data


def write_item_figures(
    validator, layer: int, sample: int, query_pos: int, out_dir: Path
) -> list[Path]:
    """Write ``<run>_L<l>_S<s>_Q<q>_<mode>_{combined,components,validation}.png`` under
    ``out_dir`` (validation in weighted mode only); returns their paths."""
    data = item_plot_data(validator, layer, sample, query_pos)
    return [Path(p) for p in draw_item(data, out_dir)]


def _write_here(validator, items, out_dir: Path) -> list[list[Path] | BaseException]:
    """Every item's figures drawn in this process; per item its paths or its exception."""
    out: list[list[Path] | BaseException] = []
    for it in items:
        try:
            out.append(write_item_figures(validator, *it, out_dir))
        except Exception as e:  # reported per item, never lost
            out.append(e)
    return out


def write_figures(
    validator, items: Sequence[tuple[int, int, int]], out_dir: Path, workers: int | None = None
) -> list[list[Path] | BaseException]:
    """Figures of several items, pipelined: each item's data is assembled here (torch) and
    its figures handed at once to worker processes (plain numpy data; qkcheck.workers), so
    ranking the next item overlaps drawing the previous ones. One item is drawn in this
    process, and so is every item whose workers could not start or died (the figures are
    due either way). Per item its paths, or the exception raised."""
    if len(items) <= 1 or (workers is not None and workers <= 1):
        return _write_here(validator, items, out_dir)
    from concurrent.futures.process import BrokenProcessPool

    try:
        results = _write_pooled(validator, items, out_dir, workers)
    except (OSError, BrokenProcessPool):  # no worker could start: draw here
        return _write_here(validator, items, out_dir)
    redo = [k for k, r in enumerate(results) if isinstance(r, (OSError, BrokenProcessPool))]
    for k, r in zip(redo, _write_here(validator, [items[k] for k in redo], out_dir), strict=True):
        results[k] = r
    return results


def _write_pooled(validator, items, out_dir: Path, workers: int | None):
    import os
    from concurrent.futures import ProcessPoolExecutor

    from qkcheck import workers as drawing
    from qkcheck.plots import draw_job, figure_jobs

    drawing.start()  # the fork server imports matplotlib while the first item is ranked
    n = workers or os.cpu_count() or 1
    pending: list[list | BaseException] = []
    # the workers draw on the cores: torch here gets what they leave, at least one thread
    # (two threads contending with them made the ranking 3x slower)
    threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - n))
    ctx = drawing.context()
    with _torch_threads(threads), ProcessPoolExecutor(n, mp_context=ctx) as pool:
        for it in items:
            try:
                data = item_plot_data(validator, *it)
            except Exception as e:
                pending.append(e)
                continue
            pending.append([pool.submit(draw_job, job) for job in figure_jobs(data, out_dir)])
        results: list[list[Path] | BaseException] = []
        for p in pending:
            if isinstance(p, BaseException):
                results.append(p)
                continue
            try:
                results.append([Path(f.result()) for f in p])
            except Exception as e:
                results.append(e)
    return results
