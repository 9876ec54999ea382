"""The validation engine behind ``pytest validation/``: cached per (layer, sample) work.

One target forward pass per batch of samples serves every layer (on ``--device``, the
model moved there once by the run). For a (layer, sample) group the layer is projected
once (:func:`~qkcheck.decompose.project_layer`) and its query positions are walked in
chunks of rows (:mod:`qkcheck.chunks`, under ``--chunk-mib``): each chunk's terms are
decomposed and reduced at once to per-item verdicts (closure, bound) and run-level
statistics, so a group keeps no ``(head, pos, pos)`` tensor and a test item only indexes
cached results. :meth:`Validator.query_row` recomputes one query row for the figures.
Nothing here imports pytest.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qkcheck.chunks import group_chunks
from qkcheck.coverage import LayerCoverage, layer_coverage
from qkcheck.decompose import (
    HeadLayout,
    LayerDecomposition,
    LayerProjections,
    LayerWeights,
    budget_bound,
    causal_mask,
    closure_tolerance,
    project_layer,
)
from qkcheck.documents import PADDING, document_mask, document_positions
from qkcheck.errors import UnsupportedError
from qkcheck.models.base import AttentionSpec, Capture
from qkcheck.settings import OptionError, Settings
from qkcheck.sketch import QuantileSketch, residual_statistics
from qkcheck.util import item_id

Item = tuple[int, int, int]  # (layer, sample, query_pos)


@dataclass(frozen=True)
class ItemResult:
    """Verdict and numbers for one (layer, sample, query_pos).

    ``ratio`` is the worst ``|r| / B`` over heads and keys ``j ≤ i`` for the asserted bound
    (at ``head``, ``key``); ``r``, ``bound``, ``data_bound``, ``weight_bound`` are taken
    there. ``closure_error`` is the worst ``|closure − target| / magnitude``.
    """

    layer: int
    sample: int
    query_pos: int
    closure_error: float
    closure_tol: float
    ratio: float
    excess: float  # max(|r| − B − rounding slack); > 0 means the bound is broken
    head: int
    key: int
    r: float
    bound: float
    data_bound: float
    weight_bound: float
    bound_kind: str

    @property
    def closure_ok(self) -> bool:
        return self.closure_error <= self.closure_tol

    @property
    def bound_ok(self) -> bool:
        return self.excess <= 0

    @property
    def passed(self) -> bool:
        return self.closure_ok and self.bound_ok

    @property
    def id(self) -> str:
        return item_id(self.layer, self.sample, self.query_pos)

    def explain(self) -> str:
        """Numbers a failure message reports."""
        lines = []
        if not self.closure_ok:
            lines.append(
                f"closure broken: worst |closure − target| / magnitude = "
                f"{self.closure_error:.3g} > tolerance {self.closure_tol:.3g}"
            )
        if not self.bound_ok:
            lines.append(
                f"|r| > B_{self.bound_kind}: head {self.head}, key_pos {self.key}: "
                f"r = {self.r:.4g}, B = {self.bound:.4g}, |r|/B = {self.ratio:.3g}"
            )
        lines.append(
            f"{self.id}: worst head {self.head} key_pos {self.key}: r = {self.r:.4g}, "
            f"B_data = {self.data_bound:.4g}, B_weight = {self.weight_bound:.4g}, "
            f"|r|/B_{self.bound_kind} = {self.ratio:.3g}, closure error = "
            f"{self.closure_error:.3g} (tol {self.closure_tol:.3g})"
        )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "sample": self.sample,
            "query_pos": self.query_pos,
            "passed": self.passed,
            "closure_ok": self.closure_ok,
            "bound_ok": self.bound_ok,
            "closure_error": self.closure_error,
            "ratio": self.ratio,
            "head": self.head,
            "key": self.key,
            "r": self.r,
            "bound": self.bound,
        }


@dataclass
class GroupResult:
    """Everything computed once for a (layer, sample) and indexed by its items: per query
    position and compact statistics only (a query row's terms: :meth:`Validator.query_row`)."""

    layer: int
    sample: int
    closure_tol: float
    #: per query position (query_pos,)
    closure_error: Tensor
    excess: Tensor
    ratio: Tensor
    head: Tensor
    key: Tensor
    r: Tensor
    bound: Tensor
    data_bound: Tensor
    weight_bound: Tensor
    #: compact statistics for the run-level gate
    abs_r: QuantileSketch  # |r| over heads and causal (i, j), within ALPHA relative
    target_sum: float
    target_sumsq: float
    target_count: int

    def rows(self) -> dict[str, list]:
        """The per-query tensors as Python lists (read by :meth:`item`)."""
        return {f: getattr(self, f).tolist() for f in _PER_QUERY}

    def item(
        self, query_pos: int, bound_kind: str, rows: dict[str, list] | None = None
    ) -> ItemResult:
        """One item's verdict; ``rows``: :meth:`rows`, built once for many items."""
        rows = self.rows() if rows is None else rows
        return ItemResult(
            layer=self.layer,
            sample=self.sample,
            query_pos=query_pos,
            closure_tol=self.closure_tol,
            bound_kind=bound_kind,
            **{f: rows[f][query_pos] for f in _PER_QUERY},
        )


#: GroupResult's per-query fields, named as ItemResult's
_PER_QUERY = (
    "closure_error",
    "ratio",
    "excess",
    "head",
    "key",
    "r",
    "bound",
    "data_bound",
    "weight_bound",
)


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

    def hit(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


class Validator:
    """Validation of one run on chosen samples, layers and query positions.

    ``tokens`` ``(n_samples, pos)`` are the selected samples, ``sample_ids`` their indices
    in the source. Read-only after construction apart from its caches. The run's target
    model is moved to ``settings.device`` (``run.to``): forward passes and decompositions
    run there, results come back to the CPU.
    """

    def __init__(
        self,
        run,
        tokens: Tensor,
        sample_ids: list[int],
        settings: Settings,
        document_ids: Tensor | None = None,
    ) -> None:
        self.run = run.to(settings.device)
        self.settings = settings
        self.tokens = tokens
        #: (n_samples, pos) document ids aligned with ``tokens`` (qkcheck.documents), or None
        self.document_ids = document_ids
        self.sample_ids = sample_ids
        self._row = {s: r for r, s in enumerate(sample_ids)}
        specs = run.layers
        layer_ids = settings.layers.resolve(len(specs), "layers", "--layers")
        coverage = layer_coverage(specs, set(run.module_paths))
        #: ``{layer: why}``: layers of the run not validated (q or k not decomposed)
        self.skipped_layers: dict[int, str] = coverage.skipped
        layer_ids = _decomposed_only(layer_ids, coverage, settings, run.name)
        self.specs: dict[int, AttentionSpec] = {i: specs[i] for i in layer_ids}
        T = tokens.shape[1]
        self.query_positions = settings.query_pos.resolve(T, "query positions", "--query-pos")
        self._captures = _LRU(1)  # items come sample-major
        #: (batch, layers asked of its capture, layers asked of the batch before): what
        #: the next capture records (:meth:`capture`); at first every validated layer
        self._asked: tuple[int | None, set[int], set[int]] = (None, set(), set(layer_ids))
        #: every group computed so far (compact: per query position and statistics)
        self._groups: dict[tuple[int, int], GroupResult] = {}
        #: the group whose per-query lists :meth:`item` reads (GroupResult.rows): kept for
        #: one group only, since the lists (Python numbers) cost ~30× its tensors
        self._listed: tuple[GroupResult | None, dict[str, list]] = (None, {})
        self._weights: dict[int, LayerWeights] = {}
        self._delta_fractions: dict[str, float] | None = None
        self.n_forward = 0

    # --- metadata ------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return list(self.specs)

    def items(self) -> list[Item]:
        """Every item, sample-major so one forward batch serves consecutive items."""
        return [
            (layer, s, q)
            for s in self.sample_ids
            for layer in self.specs
            for q in self.query_positions
            if self.document_ids is None or int(self.document_ids[self._row[s], q]) != PADDING
        ]

    def layout(self, layer: int) -> HeadLayout:
        sp = self.specs[layer]
        eps = sp.qk_norm.eps if sp.qk_norm is not None else None
        return HeadLayout(sp.n_head, sp.n_kv_heads, sp.head_dim, sp.scale, sp.rotary, eps)

    def weights(self, layer: int) -> LayerWeights:
        if layer not in self._weights:
            sp = self.specs[layer]
            V_Q, U_Q, W_Q, b_Q = self._side(sp.q_path, sp.q_cols)
            V_K, U_K, W_K, b_K = self._side(sp.k_path, sp.k_cols)
            norm = sp.qk_norm
            self._weights[layer] = LayerWeights.from_target(
                V_Q,
                U_Q,
                V_K,
                U_K,
                W_Q,
                W_K,
                b_Q,
                b_K,
                gamma_Q=None if norm is None else norm.gamma_q,
                gamma_K=None if norm is None else norm.gamma_k,
            ).to(self.settings.torch_dtype, self.settings.device)
        return self._weights[layer]

    def _side(self, path: str, cols: tuple[int, int] | None) -> tuple[Tensor, ...]:
        """``V, U, W, b`` of one side; a fused module's (``cols``) U columns, W rows and bias
        entries are that side's slice, V (and so the component activations) shared."""
        V, U = self.run.components(path)
        W, b = self.run.target_weight(path)
        if cols is None:
            return V, U, W, b
        lo, hi = cols
        return V, U[:, lo:hi], W[lo:hi], None if b is None else b[lo:hi]

    def delta_fractions(self) -> dict[str, float]:
        """``‖Δ‖_F / ‖W‖_F`` per q/k side (:attr:`AttentionSpec.q_name`) of the selected
        layers, computed once; a fused module's sides are measured on their own slices."""
        if self._delta_fractions is None:
            out = {}
            for layer, sp in self.specs.items():
                w = self.weights(layer)
                for name, path, cols, delta in (
                    (sp.q_name, sp.q_path, sp.q_cols, w.delta_Q),
                    (sp.k_name, sp.k_path, sp.k_cols, w.delta_K),
                ):
                    W = self._side(path, cols)[2].double()
                    out[name] = float(delta.double().norm() / W.norm().clamp_min(1e-300))
            self._delta_fractions = out
        return self._delta_fractions

    def token_ids(self, sample: int) -> list[int]:
        """Token ids of a selected sample (by its index in the source)."""
        return self.tokens[self._row[sample]].tolist()

    # --- forward passes ------------------------------------------------------------------

    def capture(self, sample: int, layer: int | None = None) -> tuple[Capture, int]:
        """The forward capture holding ``sample`` (with ``layer``'s attention input and
        logits; every validated layer's when None) and its row in the batch.

        The logits are a capture's bulk (``heads × pos²`` per layer), so a capture records
        the layers asked of this batch so far and of the batch before (at first: every
        validated layer, as a session walking samples over every layer needs). After
        :meth:`expect_layer_major` — a process walking one layer's samples at a time: an
        xdist worker, which gets whole layers, or the dataset view — that is the layer at
        hand (two where one layer ends and the next begins)."""
        row = self._row[sample]
        bs = self.settings.batch_size
        b = row // bs
        want = self._want(b, layer)
        need = want if layer is None else [layer]
        cap = self._captures.hit(b)
        if cap is None or not all(cap.records(i) for i in need):
            ids = self.document_ids
            # weighted mode reads only attention inputs and logits; binary mode's CI
            # functions read the decomposed modules' inputs too
            modules = () if self.settings.mode == "weighted" else None
            with torch.no_grad():
                cap = self.run.capture(
                    self.tokens[b * bs : (b + 1) * bs],
                    modules,
                    document_ids=None if ids is None else ids[b * bs : (b + 1) * bs],
                    layers=want,
                )
            self.n_forward += 1
            self._captures.put(b, cap)
        return cap, row - b * bs

    def expect_layer_major(self) -> None:
        """Captures from now on start with the layer asked only (see :meth:`capture`)."""
        self._asked = (None, set(), set())

    def _want(self, batch: int, layer: int | None) -> list[int]:
        """The layers a capture of ``batch`` records, ``layer`` among them (see capture)."""
        if layer is None:
            return self.layers
        current, asked, before = self._asked
        if batch != current:
            current, asked, before = batch, set(), asked or before
        asked.add(layer)
        self._asked = (current, asked, before)
        return sorted(asked | before)

    # --- per (layer, sample) -------------------------------------------------------------

    def group(self, layer: int, sample: int) -> GroupResult:
        """The (layer, sample) group's results, computed once (they are compact)."""
        key = (layer, sample)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = self._compute_group(layer, sample)
        return g

    def item(self, layer: int, sample: int, query_pos: int) -> ItemResult:
        g = self.group(layer, sample)
        if self._listed[0] is not g:  # items come group by group: lists for one at a time
            self._listed = (g, g.rows())
        return g.item(query_pos, self.settings.bound, self._listed[1])

    def query_row(self, layer: int, sample: int, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Query position ``i``'s component sum (components and bias), the target model's
        logits and the asserted bound B (``--bound``), each ``(head, i + 1)`` over keys
        ``0..i`` — what the validation figure draws — computed as the group computes that row
        (a chunk of one row; only row ``i`` and keys ``≤ i`` are projected)."""
        inp = self._group_inputs(layer, sample)
        w, layout = self.weights(layer), self.layout(layer)
        with torch.no_grad():
            proj = project_layer(inp.x, w, layout, inp.positions, rows=(i, i + 1))
            dec, chosen = self._block(inp, proj, i, i + 1)
        S = dec.component_sum + dec.bias_terms
        return S[0, :, 0].cpu(), dec.target[0, :, 0].cpu(), chosen[0, :, 0].cpu()

    def _group_inputs(self, layer: int, sample: int) -> _GroupInputs:
        cap, row = self.capture(sample, layer)
        dtype, dev = self.settings.torch_dtype, self.settings.device
        x = cap.attn_inputs[layer][row : row + 1].to(dtype=dtype, device=dev)
        T = x.shape[1]
        positions, allowed = None, causal_mask(T, device=dev)
        if self.document_ids is not None:  # restarted positions, same-document keys only
            ids = self.document_ids[self._row[sample]][None].to(dev)
            positions, allowed = document_positions(ids)[0], document_mask(ids)[0]
        return _GroupInputs(x, cap.logits[layer][row : row + 1], positions, allowed)

    def _block(
        self, inp: _GroupInputs, proj: LayerProjections, i0: int, i1: int
    ) -> tuple[LayerDecomposition, Tensor]:
        """Decomposition and asserted bound of query rows ``i0:i1`` against keys ``:i1``,
        ``(1, head, i1 − i0, i1)``; the target block cast to the decomposition's precision."""
        s = self.settings
        target = inp.target[:, :, i0:i1, :i1].to(dtype=s.torch_dtype, device=s.device)
        dec = proj.rows(i0, i1).decompose(target, s.norm)
        if s.bound == "budget":
            chosen = budget_bound(
                inp.x, proj.weights, proj.layout, s.delta_budget, s.norm, rows=(i0, i1)
            )
        elif s.bound == "data":
            chosen = dec.data_bound
        else:
            chosen = dec.weight_bound
        return dec, chosen

    def _compute_group(self, layer: int, sample: int) -> GroupResult:
        inp = self._group_inputs(layer, sample)
        dtype, dev = self.settings.torch_dtype, self.settings.device
        w, layout = self.weights(layer), self.layout(layer)
        T = inp.x.shape[1]
        # rounding of the target model (float32 at best) and of this computation
        model_dtype = inp.target.dtype
        worst_dtype = (
            model_dtype if torch.finfo(model_dtype).eps > torch.finfo(dtype).eps else dtype
        )
        tol = closure_tolerance(
            worst_dtype,
            inp.x.shape[-1],
            max(w.V_Q.shape[1], w.V_K.shape[1]),
            layout.head_dim,
            T,
        )
        rows = _GroupRows(T, dev)
        itemsize = torch.finfo(dtype).bits // 8
        with torch.no_grad():
            proj = project_layer(inp.x, w, layout, inp.positions)  # O(T·d), once
            for i0, i1 in group_chunks(T, layout.n_head, itemsize, self.settings.chunk_mib):
                dec, chosen = self._block(inp, proj, i0, i1)
                allowed = inp.allowed[i0:i1, :i1]
                attended = (
                    _causal_block_index(i0, i1, str(dev))
                    if self.document_ids is None
                    else allowed.flatten().nonzero()[:, 0]
                )
                rows.reduce(dec, chosen, allowed, attended, tol)
        return GroupResult(layer=layer, sample=sample, closure_tol=tol, **rows.results())

    # --- run-level quality ---------------------------------------------------------------

    def layer_quality(self, layer: int) -> dict[str, float]:
        """Residual statistics of a layer over the selected samples (all query positions).

        ``median_abs_r``/``p99_abs_r``: of |r| over heads and causal (i, j), from the
        groups' merged :class:`~qkcheck.sketch.QuantileSketch` (within its ``alpha``, 0.5 %,
        of the exact order statistic); ``worst_ratio``: max |r|/B (exact);
        ``r_frac_of_logit_scale``: median |r| over the standard deviation of the target
        logits; ``max_closure_error`` (exact). For merging shards split by samples:
        ``abs_r_sketch`` (the sketch as a dict) and ``logit_moments`` (sum, sum of squares
        and count of the target logits).
        """
        groups = [self.group(layer, s) for s in self.sample_ids]
        sketch = QuantileSketch()
        for g in groups:
            sketch.merge(g.abs_r)
        moments = {
            "sum": sum(g.target_sum for g in groups),
            "sumsq": sum(g.target_sumsq for g in groups),
            "count": sum(g.target_count for g in groups),
        }
        return {
            **residual_statistics(sketch, moments),
            "worst_ratio": float(max(float(g.ratio.max()) for g in groups)),
            "max_closure_error": float(max(float(g.closure_error.max()) for g in groups)),
            "abs_r_sketch": sketch.to_dict(),
            "logit_moments": moments,
        }


def _decomposed_only(
    layer_ids: list[int], coverage: LayerCoverage, settings: Settings, run_name: str
) -> list[int]:
    """The selected layers that are decomposed; naming one that is not is an OptionError."""
    if not coverage.decomposed:
        why = "; ".join(f"layer {i}: {r}" for i, r in coverage.skipped.items())
        raise UnsupportedError(f"run {run_name} has no attention layer to validate ({why})")
    if settings.layers.indices is not None:
        bad = [i for i in layer_ids if i in coverage.skipped]
        if bad:
            why = "; ".join(f"layer {i}: {coverage.skipped[i]}" for i in bad)
            raise OptionError(
                f"--layers: run {run_name} cannot be validated on layers {bad} ({why}); "
                f"layers with q and k decomposed: {coverage.decomposed}"
            )
    return [i for i in layer_ids if i not in coverage.skipped]


@functools.lru_cache(maxsize=256)
def _causal_block_index(i0: int, i1: int, device: str) -> Tensor:
    """Flat indices of ``j ≤ i`` in the ``(i1 − i0, i1)`` block of query rows ``i0:i1``
    against keys ``0:i1``, row-major — what the causal mask selects, made once per chunk
    shape instead of a ``nonzero`` per chunk."""
    i = torch.arange(i0, i1, device=device)[:, None]
    j = torch.arange(i1, device=device)[None, :]
    return (j <= i).flatten().nonzero()[:, 0]


@dataclass
class _GroupInputs:
    """A (layer, sample)'s inputs: attention input ``x`` ``(1, pos, d_model)`` (in the
    decomposition's precision, on its device), the target's logits ``(1, head, pos, pos)``
    as captured, rotary ``positions`` (None: ``0..pos-1``) and the ``(pos, pos)`` mask of
    the keys each query attends to."""

    x: Tensor
    target: Tensor
    positions: Tensor | None
    allowed: Tensor


class _GroupRows:
    """Per-row verdicts and run-level statistics of a group, reduced chunk by chunk.

    For a chunk of query rows ``i0:i1`` against keys ``:i1``, entries the query does not
    attend to are excluded from every reduction; per row: the worst closure error, the
    largest ``|r| − B − slack`` (slack: the closure tolerance times the terms' magnitude),
    the largest ``|r|/B`` and its (head, key), with ``r`` and the bounds there; over the
    attended entries: ``|r|`` into the quantile sketch and the target's sum, sum of squares
    and count. Each is a reduction over its own row, or a sum, so chunks change nothing.
    """

    def __init__(self, T: int, device: torch.device | str) -> None:
        self.T, self.device = T, device
        self.per_row: dict[str, list[Tensor]] = {}
        self.sketch = QuantileSketch()
        self.sum = self.sumsq = 0.0
        self.count = 0

    def reduce(
        self, dec: LayerDecomposition, chosen: Tensor, allowed: Tensor, attended: Tensor, tol: float
    ) -> None:
        """One chunk: ``allowed`` ``(rows, keys)``, ``attended`` its True entries' flat
        indices (what the boolean mask selects, gathered without it)."""
        above = ~allowed  # (rows, keys): keys the query does not attend to
        n_rows, n_keys = allowed.shape
        cerr = dec.closure_error[0].masked_fill(above, 0).amax(dim=(0, 2))
        r_abs = dec.residual[0].abs()
        slack = tol * dec.magnitude[0]
        excess = (r_abs - chosen[0] - slack).masked_fill(above, -torch.inf).amax(dim=(0, 2))
        ratio = torch.where(
            chosen[0] > 0, r_abs / chosen[0].clamp_min(1e-300), (r_abs > slack) * torch.inf
        )
        del slack
        ratio = torch.nan_to_num(ratio.masked_fill(above, -1.0), nan=0.0, posinf=torch.inf)
        H = ratio.shape[0]
        flat = ratio.permute(1, 0, 2).reshape(n_rows, H * n_keys)  # (i, head·j)
        del ratio
        best, where = flat.max(dim=1)
        head, key = where // n_keys, where % n_keys
        idx = torch.arange(n_rows, device=allowed.device)

        def at(t: Tensor) -> Tensor:
            return t[0][head, idx, key]

        for name, t in (
            ("closure_error", cerr),
            ("excess", excess),
            ("ratio", best.clamp_min(0)),
            ("head", head),
            ("key", key),
            ("r", at(dec.residual)),
            ("bound", at(chosen)),
            ("data_bound", at(dec.data_bound)),
            ("weight_bound", at(dec.weight_bound)),
        ):
            self.per_row.setdefault(name, []).append(t.cpu())
        self.sketch.add(r_abs.reshape(H, -1).index_select(1, attended).float())  # on the device
        tgt = dec.target[0].reshape(H, -1).index_select(1, attended).double()
        self.sum += float(tgt.sum())
        self.sumsq += float((tgt**2).sum())
        self.count += int(tgt.numel())

    def results(self) -> dict[str, Any]:
        """The :class:`GroupResult` fields reduced so far (every row, in order)."""
        rows = {name: torch.cat(parts) for name, parts in self.per_row.items()}
        n = rows["ratio"].shape[0]
        if n != self.T:
            raise RuntimeError(f"reduced {n} query rows of {self.T}")
        return {
            **rows,
            "abs_r": self.sketch,
            "target_sum": self.sum,
            "target_sumsq": self.sumsq,
            "target_count": self.count,
        }
