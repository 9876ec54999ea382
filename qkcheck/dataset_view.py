"""Dataset-level view: which components carry each head's logits over the selected data.

Per layer and query head, over every selected sample and every attended (query, key)
position (``j ≤ i``, same document with ``--doc-ids``; query rows limited to
``--query-pos``), in weighted mode (docs/design.md §9):

* **pair mass** ``M[h,c,d] = Σ_{samples} Σ_{i,j} |P[h,i,j,c,d]|`` for every
  (query-component, key-component) pair, the bias as one more component per side;
* **component mass** ``M^Q[h,c] = Σ Σ_{i,j} |Σ_d P[h,i,j,c,d]|`` (a query component with
  all its key partners, bias included; cancellation between partners counts) and likewise
  ``M^K[h,d]`` for key components.

Exact without the dense ``(C_q, C_k, T, T)`` tensor: with ``δ = i − j`` and rotations
composing, ``<R_i u, R_j v> = <R_δ u, v>``, so ``P = s · a^Q_c(i) a^K_d(j) · G[h,c,d,δ]``
with ``G[h,c,d,δ] = <R_δ u^Q_{c,h}, u^K_{d,g(h)}>`` and, as ``|xy| = |x||y|``::

    M[h,c,d] = |s| Σ_δ |G[h,c,d,δ]| · A[c,d,δ]
    A[c,d,δ] = Σ_samples Σ_j |a^Q_c(j+δ)| |a^K_d(j)| m(j+δ, j)

``A`` (``C_q × C_k × T``, float64) is accumulated per (layer, sample) group — its size does
not grow with the samples — and ``G`` is walked in chunks of ``δ`` sized from a memory
budget. The component masses are computed per group in chunks of components. Nothing
here imports pytest; the heat map needs matplotlib (imported when drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkcheck.decompose import HeadLayout, LayerWeights
from qkcheck.errors import QKCheckError
from qkcheck.rotary import rotate

#: default working-memory budget per chunk (bytes)
DEFAULT_BUDGET = 64 * 2**20
#: heat maps show at most this many rows / columns (the largest by marginal mass)
MAX_HEATMAP = 48


class DatasetViewError(QKCheckError):
    """The dataset-level view cannot be computed exactly for this layer."""


def _extended(V: Tensor, U: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(V, U)`` with the bias appended as a component of activation 1 (if any)."""
    if b is None:
        return V, U
    return V, torch.cat((U, b.to(U.dtype)[None]), dim=0)


def _activations(x: Tensor, V: Tensor, n_rows: int) -> Tensor:
    """``(T, n_rows)``: ``x V`` and a column of ones for the bias row when present."""
    a = x @ V
    if n_rows > a.shape[1]:
        a = torch.cat((a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)), dim=1)
    return a


class LayerMasses:
    """Streams one layer's masses over (layer, sample) groups; see the module docstring.

    ``add(x, allowed, positions)``: ``x`` ``(T, d_model)`` the attention input of one
    sample, ``allowed`` ``(T, T)`` bool the (query, key) entries that count, ``positions``
    ``(T,)`` rotary positions (default ``0..T-1``).
    """

    def __init__(
        self, weights: LayerWeights, layout: HeadLayout, budget_bytes: int = DEFAULT_BUDGET
    ) -> None:
        self.layout = layout
        self.budget = budget_bytes
        self.V_Q, self.U_Q = _extended(weights.V_Q, weights.U_Q, weights.b_Q)
        self.V_K, self.U_K = _extended(weights.V_K, weights.U_K, weights.b_K)
        self.bias_q = weights.b_Q is not None
        self.bias_k = weights.b_K is not None
        self.C_q, self.C_k = weights.V_Q.shape[1], weights.V_K.shape[1]
        self.A: Tensor | None = None  # (Cq', Ck', T) float64
        H = layout.n_head
        opts = {"dtype": torch.float64, "device": weights.V_Q.device}
        self.comp_q = torch.zeros(H, self.U_Q.shape[0], **opts)
        self.comp_k = torch.zeros(H, self.U_K.shape[0], **opts)
        self.n_samples = 0
        self.n_entries = 0  # (sample, i, j) entries counted

    # --- per (layer, sample) -------------------------------------------------------------

    def add(self, x: Tensor, allowed: Tensor, positions: Tensor | None = None) -> None:
        T = x.shape[0]
        dev = x.device
        if positions is None:
            positions = torch.arange(T, device=dev)
        rot = self.layout.rotary
        if rot is not None and rot.n_ctx is not None and int(positions.max()) >= rot.n_ctx:
            raise DatasetViewError(
                f"positions up to {int(positions.max())} reach the rotary clamp n_ctx "
                f"{rot.n_ctx}: relative-position factoring is not exact"
            )
        allowed = allowed.to(dev)
        # entries the δ-factoring may use: a key j attended from i has p_i − p_j = i − j
        # (same document, positions restart together), checked rather than assumed
        ii, jj = allowed.nonzero(as_tuple=True)
        if bool(((positions[ii] - positions[jj]) != (ii - jj)).any()):
            raise DatasetViewError("attended keys whose position offset differs from i − j")
        a_q = _activations(x, self.V_Q, self.U_Q.shape[0])  # (T, Cq')
        a_k = _activations(x, self.V_K, self.U_K.shape[0])  # (T, Ck')
        self._add_cross(a_q, a_k, allowed)
        self._add_components(a_q, a_k, allowed, positions)
        self.n_samples += 1
        self.n_entries += int(allowed.sum())

    def _add_cross(self, a_q: Tensor, a_k: Tensor, allowed: Tensor) -> None:
        """``A[c,d,δ] += Σ_j |a_q(j+δ, c)| |a_k(j, d)| allowed(j+δ, j)``."""
        T = a_q.shape[0]
        if self.A is None:
            self.A = torch.zeros(
                a_q.shape[1], a_k.shape[1], T, dtype=torch.float64, device=a_q.device
            )
        elif self.A.shape[2] < T:
            pad = torch.zeros(*self.A.shape[:2], T - self.A.shape[2], dtype=torch.float64)
            self.A = torch.cat((self.A, pad.to(self.A.device)), dim=2)
        q, k = a_q.abs().double(), a_k.abs().double()
        m = allowed.double()
        for d in range(T):
            w = torch.diagonal(m, offset=-d)  # allowed[j + d, j], length T − d
            if not bool(w.any()):
                continue
            self.A[:, :, d] += q[d:].T @ (k[: T - d] * w[:, None])

    def _add_components(self, a_q: Tensor, a_k: Tensor, allowed: Tensor, positions: Tensor) -> None:
        """Component masses of one sample, in chunks of components."""
        L = self.layout
        T, dh = a_q.shape[0], L.head_dim
        s = abs(L.scale)
        # per-head write vectors (n, C', d)
        uq = self.U_Q.reshape(-1, L.n_head, dh).transpose(0, 1)
        uk = self.U_K.reshape(-1, L.n_kv_heads, dh).transpose(0, 1)
        q_all = torch.einsum("tc,hcd->htd", a_q, uq)  # (H, T, d): q̂ incl. bias
        k_all = torch.einsum("tc,hcd->htd", a_k, uk)  # (KV, T, d)
        q_rot = rotate(q_all, positions, L.rotary)
        k_rot = rotate(k_all, positions, L.rotary).repeat_interleave(L.group, dim=0)  # (H,T,d)
        mask = allowed.to(a_q.dtype)
        per = L.n_head * T * (T + dh) * a_q.element_size()
        step = max(1, self.budget // max(per, 1))
        for c0 in range(0, uq.shape[1], step):
            u = uq[:, c0 : c0 + step]  # (H, cc, d)
            u = rotate(u[:, :, None, :].expand(-1, -1, T, -1), positions, L.rotary)
            u = u * a_q[None, :, c0 : c0 + step].transpose(1, 2)[..., None]  # (H, cc, T, d)
            contrib = u @ k_rot[:, None].transpose(-1, -2)  # (H, cc, T_i, T_j)
            self.comp_q[:, c0 : c0 + step] += s * (contrib.abs_() * mask).sum(dim=(2, 3)).double()
        for d0 in range(0, uk.shape[1], step):
            u = uk[:, d0 : d0 + step]  # (KV, dd, d)
            u = rotate(u[:, :, None, :].expand(-1, -1, T, -1), positions, L.rotary)
            u = u * a_k[None, :, d0 : d0 + step].transpose(1, 2)[..., None]  # (KV, dd, T, d)
            u = u.repeat_interleave(L.group, dim=0)  # (H, dd, T_j, d)
            contrib = q_rot[:, None] @ u.transpose(-1, -2)  # (H, dd, T_i, T_j)
            self.comp_k[:, d0 : d0 + step] += s * (contrib.abs_() * mask).sum(dim=(2, 3)).double()

    # --- results -------------------------------------------------------------------------

    def pair_mass(self) -> Tensor:
        """``(head, C_q', C_k')`` float64 pair masses (bias last on a side that has one)."""
        L = self.layout
        H, dh = L.n_head, L.head_dim
        Cq, Ck = self.U_Q.shape[0], self.U_K.shape[0]
        out = torch.zeros(H, Cq, Ck, dtype=torch.float64, device=self.U_Q.device)
        if self.A is None:
            return out
        T = self.A.shape[2]
        uq = self.U_Q.reshape(Cq, H, dh).transpose(0, 1)  # (H, Cq, d)
        uk = self.U_K.reshape(Ck, L.n_kv_heads, dh).transpose(0, 1)
        uk = uk.repeat_interleave(L.group, dim=0)  # (H, Ck, d)
        per = H * Cq * (Ck + dh) * 8
        step = max(1, self.budget // max(per, 1))
        for d0 in range(0, T, step):
            deltas = torch.arange(d0, min(T, d0 + step), device=uq.device)
            n = deltas.shape[0]
            r = rotate(uq[:, :, None, :].expand(-1, -1, n, -1), deltas, L.rotary)  # (H,Cq,n,d)
            G = torch.einsum("hcnd,hkd->hckn", r.double(), uk.double())  # (H, Cq, Ck, n)
            out += (G.abs_() * self.A[None, :, :, d0 : d0 + n]).sum(dim=3)
        return out * abs(L.scale)


@dataclass
class LayerView:
    """The dataset view of one layer, ready to write."""

    layer: int
    q_module: str
    k_module: str
    samples: list[int]
    n_entries: int
    C_q: int
    C_k: int
    bias_q: bool
    bias_k: bool
    pair_mass: Tensor  # (H, Cq', Ck') float64
    comp_q: Tensor  # (H, Cq')
    comp_k: Tensor  # (H, Ck')
    group: int

    def q_label(self, c: int) -> str:
        return f"{self.q_module}:{'bias' if c == self.C_q else c}"

    def k_label(self, d: int) -> str:
        return f"{self.k_module}:{'bias' if d == self.C_k else d}"

    def as_dict(self, top_k: int, run: str, heatmap: str | None = None) -> dict[str, Any]:
        heads = []
        H, Cq, Ck = self.pair_mass.shape
        k = min(top_k, Cq * Ck)
        for h in range(H):
            m = self.pair_mass[h]
            total = float(m.sum())
            vals, idx = m.flatten().topk(k)
            pairs = [
                {
                    "q": int(i // Ck),
                    "k": int(i % Ck),
                    "q_label": self.q_label(int(i // Ck)),
                    "k_label": self.k_label(int(i % Ck)),
                    "mass": float(v),
                    "share": float(v) / total if total > 0 else 0.0,
                }
                for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
            ]
            heads.append(
                {
                    "head": h,
                    "kv_head": h // self.group,
                    "pair_mass_total": total,
                    "top_k_share": sum(p["share"] for p in pairs),
                    "pairs": pairs,
                    "query_components": _ranked(self.comp_q[h], top_k, self.q_label),
                    "key_components": _ranked(self.comp_k[h], top_k, self.k_label),
                }
            )
        return {
            "run": run,
            "layer": self.layer,
            "mode": "weighted",
            "q_module": self.q_module,
            "k_module": self.k_module,
            "C_q": self.C_q,
            "C_k": self.C_k,
            "bias_q": self.bias_q,
            "bias_k": self.bias_k,
            "samples": self.samples,
            "entries": self.n_entries,
            "top_k": top_k,
            "heatmap": heatmap,
            "heads": heads,
        }


def _ranked(mass: Tensor, k: int, label) -> list[dict[str, Any]]:
    total = float(mass.sum())
    vals, idx = mass.topk(min(k, mass.shape[0]))
    return [
        {
            "component": int(i),
            "label": label(int(i)),
            "mass": float(v),
            "share": float(v) / total if total > 0 else 0.0,
        }
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
    ]


#: why a QK-norm layer (Qwen3) has no dataset-level view
QK_NORM_REASON = (
    "QK-norm layer: its per-(position, head) normalisation breaks the offset-only "
    "factorisation this view streams"
)


def unsupported_layers(validator) -> dict[int, str]:
    """``{layer: why}`` for the selected layers this view cannot be computed for."""
    return {i: QK_NORM_REASON for i in validator.layers if validator.specs[i].qk_norm is not None}


def layer_view(validator, layer: int, budget_bytes: int = DEFAULT_BUDGET) -> LayerView:
    """Stream every selected sample of ``layer`` through :class:`LayerMasses`."""
    from qkcheck.decompose import causal_mask
    from qkcheck.documents import document_mask, document_positions

    if validator.specs[layer].qk_norm is not None:
        raise DatasetViewError(f"layer {layer}: {QK_NORM_REASON}")
    s = validator.settings
    w, layout = validator.weights(layer), validator.layout(layer)
    acc = LayerMasses(w, layout, budget_bytes)
    spec = validator.specs[layer]
    validator.expect_layer_major()  # one layer's samples: captures of that layer only
    with torch.no_grad():
        for sample in validator.sample_ids:
            cap, row = validator.capture(sample, layer)
            x = cap.attn_inputs[layer][row].to(dtype=s.torch_dtype, device=s.device)
            T = x.shape[0]
            positions, allowed = None, causal_mask(T, device=x.device)
            if validator.document_ids is not None:
                ids = validator.document_ids[validator.sample_ids.index(sample)][None].to(x.device)
                positions, allowed = document_positions(ids)[0], document_mask(ids)[0]
            rows = torch.zeros(T, dtype=torch.bool, device=x.device)
            rows[validator.query_positions] = True
            acc.add(x, allowed & rows[:, None], positions)
    return LayerView(
        layer=layer,
        q_module=spec.q_path,
        k_module=spec.k_path,
        samples=list(validator.sample_ids),
        n_entries=acc.n_entries,
        C_q=acc.C_q,
        C_k=acc.C_k,
        bias_q=acc.bias_q,
        bias_k=acc.bias_k,
        pair_mass=acc.pair_mass().cpu(),
        comp_q=acc.comp_q.cpu(),
        comp_k=acc.comp_k.cpu(),
        group=layout.group,
    )


def heatmap_figure(view: LayerView, run: str, max_side: int = MAX_HEATMAP):
    """One panel per head: pair mass share (C_q × C_k, or the ``max_side`` rows and columns
    of largest marginal mass over all heads when larger)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    M = view.pair_mass
    H, Cq, Ck = M.shape
    share = M / M.sum(dim=(1, 2), keepdim=True).clamp_min(1e-300)
    rows = share.sum(dim=(0, 2)).argsort(descending=True)[: min(Cq, max_side)]
    cols = share.sum(dim=(0, 1)).argsort(descending=True)[: min(Ck, max_side)]
    trimmed = len(rows) < Cq or len(cols) < Ck
    if not trimmed:  # full matrix in index order
        rows, cols = torch.arange(Cq), torch.arange(Ck)
    ncol = min(H, 4)
    nrow = -(-H // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(3.6 * ncol + 0.8, 3.6 * nrow + 0.9), squeeze=False
    )
    vmax = float(share[:, rows][:, :, cols].max())
    norm = PowerNorm(0.5, vmin=0.0, vmax=max(vmax, 1e-12))
    im = None
    for h in range(nrow * ncol):
        ax = axes[h // ncol][h % ncol]
        if h >= H:
            ax.axis("off")
            continue
        sub = share[h][rows][:, cols].numpy()
        im = ax.imshow(sub, cmap="magma", norm=norm, aspect="auto", interpolation="nearest")
        top = share[h].flatten().argmax()
        c, d = int(top // Ck), int(top % Ck)
        ax.set_title(
            f"head {h}: top {view.q_label(c).rsplit(':', 1)[1]}×"
            f"{view.k_label(d).rsplit(':', 1)[1]} {float(share[h].flatten().max()):.1%}",
            fontsize=9,
        )
        _ticks(ax, rows, cols, view)
        ax.set_xlabel(f"key component ({view.k_module})", fontsize=8)
        ax.set_ylabel(f"query component ({view.q_module})", fontsize=8)
    what = f"top {len(rows)}×{len(cols)} rows/cols by mass" if trimmed else "all pairs"
    fig.suptitle(
        f"{run} layer {view.layer}: share of |contribution| mass per pair, "
        f"{len(view.samples)} samples, {view.n_entries} (i, j≤i) entries per head ({what})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    cax = fig.add_axes((0.93, 0.12, 0.015, 0.74))
    fig.colorbar(im, cax=cax, label="share of head's pair mass (sqrt scale)")
    return fig


def _ticks(ax, rows: Tensor, cols: Tensor, view: LayerView) -> None:
    def lab(i: int, n: int) -> str:
        return "b" if i == n else str(i)

    step_r = max(1, -(-len(rows) // 16))
    step_c = max(1, -(-len(cols) // 16))
    ax.set_yticks(range(0, len(rows), step_r))
    ax.set_yticklabels([lab(int(r), view.C_q) for r in rows[::step_r]], fontsize=6)
    ax.set_xticks(range(0, len(cols), step_c))
    ax.set_xticklabels([lab(int(c), view.C_k) for c in cols[::step_c]], fontsize=6, rotation=90)


def write_dataset_view(validator, out_dir: Path, top_k: int) -> list[Path]:
    """Write ``pairs_L<l>.json`` and ``pairs_L<l>.png`` per selected layer (but those of
    :func:`unsupported_layers`); returns paths."""
    from qkcheck.report import write_json
    from qkcheck.util import atomic_path

    run = validator.run.name
    paths: list[Path] = []
    skip = unsupported_layers(validator)
    for layer in validator.layers:
        if layer in skip:
            continue
        view = layer_view(validator, layer)
        png = out_dir / f"pairs_L{layer}.png"
        fig = heatmap_figure(view, run)
        import matplotlib.pyplot as plt

        with atomic_path(png) as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        data = view.as_dict(top_k, run, heatmap=png.name)
        paths += [write_json(data, out_dir / f"pairs_L{layer}.json"), png]
    return paths
