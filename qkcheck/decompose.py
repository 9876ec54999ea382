"""Decomposition of one attention layer's pre-softmax logits into SPD components.

Notation (docs/design.md §2): query head ``h`` uses key head ``g(h) = h // (n_head / n_kv_heads)``;
``s`` is the logit scale; ``R_t`` the rotary map at position ``t``. With component
projections ``q_c = x V_Q U_Q`` (per head), ``k_c`` likewise, biases ``b``, and the weight
delta ``Δ = W − (V U)ᵀ``, the target logit splits exactly as::

    ℓ[h,i,j] = S + bias_terms + delta_terms
    S           = s <R_i q_c,i , R_j k_c,j>                       (component pairs)
    bias_terms  = s (<R_i q_c, R_j b_K> + <R_i b_Q, R_j k̂_j>)      (pairs with a bias, no Δ)
    delta_terms = s (<R_i q̂_i, R_j Δk_j> + <R_i Δq_i, R_j (k̂_j + Δk_j)>)

where ``q̂ = q_c + b_Q`` and ``k̂ = k_c + b_K``. The residual against the target model's
own logits is ``r = ℓ_target − (S + bias_terms)``; it equals ``delta_terms`` up to rounding
(the closure identity the suite checks), and ``|r| ≤ B_data ≤ B_weight`` (see bounds.py).

Every output is ``(batch, head, query_pos, key_pos)`` over the full square, or over a block
of query rows ``i0 ≤ i < i1`` against keys ``j < i1`` (``rows``: all a causal row needs, so
a long sample is walked in row chunks of bounded memory; the projections, ``O(pos · d)``,
are made once per layer and sample by :func:`project_layer`). Entries with
``key_pos > query_pos`` are computed but meaningless for a causal model (use
:func:`causal_mask`). The (head, C_q, C_k, key) pair tensor is never built here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from qkcheck.bounds import NormKind, data_bound_norms, head_norms, weight_bound
from qkcheck.rotary import RotaryConfig, rotate


@dataclass(frozen=True)
class HeadLayout:
    """How an attention layer splits its projections into heads."""

    n_head: int
    n_kv_heads: int
    head_dim: int
    scale: float
    rotary: RotaryConfig | None = None
    #: QK-norm (Qwen3): each head vector is RMS-normalised with this eps and scaled by the
    #: weights' ``gamma_Q``/``gamma_K`` before rotation (see :func:`qk_norm_scales`); None: off
    qk_norm_eps: float | None = None

    def __post_init__(self) -> None:
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_head ({self.n_head})")

    @property
    def group(self) -> int:
        """Query heads per key head (1 without grouped-query attention)."""
        return self.n_head // self.n_kv_heads


@dataclass(frozen=True)
class LayerWeights:
    """SPD factors of one layer's q/k projections and their weight deltas.

    ``V_Q`` (d_model × C_q), ``U_Q`` (C_q × n_head·d_head), ``V_K``/``U_K`` likewise with
    n_kv_heads; ``delta_Q``/``delta_K`` are ``W − (V U)ᵀ`` in nn.Linear's (d_out × d_in)
    orientation; biases are ``(d_out,)`` or None.
    """

    V_Q: Tensor
    U_Q: Tensor
    V_K: Tensor
    U_K: Tensor
    delta_Q: Tensor
    delta_K: Tensor
    b_Q: Tensor | None = None
    b_K: Tensor | None = None
    #: QK-norm gains ``(head_dim,)`` (shared by the heads of a side), or None
    gamma_Q: Tensor | None = None
    gamma_K: Tensor | None = None
    #: :meth:`head_norms` computed so far, by (matrix, heads, norm): a layer's norms are
    #: computed once however many samples it decomposes (spectral norms need an SVD each);
    #: not an init field, so ``dataclasses.replace`` starts an empty one
    norm_cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def from_target(
        cls,
        V_Q: Tensor,
        U_Q: Tensor,
        V_K: Tensor,
        U_K: Tensor,
        W_Q: Tensor,
        W_K: Tensor,
        b_Q: Tensor | None = None,
        b_K: Tensor | None = None,
        gamma_Q: Tensor | None = None,
        gamma_K: Tensor | None = None,
    ) -> LayerWeights:
        """Derive the deltas from the target weights, computed and kept in float64.

        ``Δ`` is never rounded to the weights' own dtype: for bf16/fp16 target weights that
        rounding is as large as ``Δ``'s own small entries and would break closure.
        :meth:`to` casts it to the decomposition's precision.
        """

        def delta(W: Tensor, V: Tensor, U: Tensor) -> Tensor:
            return W.double() - (V.double() @ U.double()).T

        return cls(
            V_Q,
            U_Q,
            V_K,
            U_K,
            delta(W_Q, V_Q, U_Q),
            delta(W_K, V_K, U_K),
            b_Q,
            b_K,
            gamma_Q,
            gamma_K,
        )

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> LayerWeights:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype=dtype, device=device)

        cast_fields = {f: cast(getattr(self, f)) for f in _TENSOR_FIELDS}
        if all(cast_fields[f] is getattr(self, f) for f in _TENSOR_FIELDS):
            return self  # nothing to cast: keeps the norm cache
        return replace(self, **cast_fields)

    def head_norms(self, matrix: str, n_heads: int, kind: NormKind) -> Tensor:
        """:func:`~qkcheck.bounds.head_norms` of ``matrix`` — ``"W_hat_Q"``, ``"W_hat_K"``,
        ``"delta_Q"``, ``"delta_K"``, ``"W_Q"`` or ``"W_K"`` (the target, ``Ŵ + Δ``) — cached.
        With QK-norm gains the norms are of ``diag(γ) W_h``, the map the logit sees."""
        key = (matrix, n_heads, kind)
        if key not in self.norm_cache:
            side = matrix[-1]
            if matrix in ("W_Q", "W_K"):
                weight = getattr(self, f"W_hat_{side}") + getattr(self, f"delta_{side}")
            else:
                weight = getattr(self, matrix)
            gamma = getattr(self, f"gamma_{side}")
            if gamma is not None:
                weight = weight * gamma.to(weight.dtype).repeat(n_heads)[:, None]
            self.norm_cache[key] = head_norms(weight, n_heads, kind)
        return self.norm_cache[key]

    @property
    def W_hat_Q(self) -> Tensor:
        """Summed component weight ``(V_Q U_Q)ᵀ`` (d_out × d_in)."""
        return (self.V_Q @ self.U_Q).T

    @property
    def W_hat_K(self) -> Tensor:
        return (self.V_K @ self.U_K).T


_TENSOR_FIELDS = (
    "V_Q",
    "U_Q",
    "V_K",
    "U_K",
    "delta_Q",
    "delta_K",
    "b_Q",
    "b_K",
    "gamma_Q",
    "gamma_K",
)


@dataclass
class LayerDecomposition:
    """Per ``(batch, head, query_pos, key_pos)`` terms of one layer (see module docstring)."""

    component_sum: Tensor
    bias_terms: Tensor
    delta_terms: Tensor
    residual: Tensor  # target − (component_sum + bias_terms)
    data_bound: Tensor
    weight_bound: Tensor
    #: |s|·(|q̂_i|+|Δq_i|)·(|k̂_j|+|Δk_j|): bounds every term's size; rounding is measured
    #: against it (the logit itself can cancel to ~0 while its terms do not)
    magnitude: Tensor
    target: Tensor | None = None

    @property
    def closure(self) -> Tensor:
        """Sum over all pairs of components ∪ {Δ, bias}: the decomposition's own logit."""
        return self.component_sum + self.bias_terms + self.delta_terms

    @property
    def closure_error(self) -> Tensor:
        """``|closure − target| / magnitude`` (needs the target)."""
        if self.target is None:
            raise ValueError("closure_error needs the target logits")
        return (self.closure - self.target).abs() / self.magnitude.clamp_min(_TINY)


_TINY = 1e-30


def closure_tolerance(
    dtype: torch.dtype, d_model: int, c_max: int, head_dim: int, max_pos: int = 0
) -> float:
    """Tolerance on :attr:`LayerDecomposition.closure_error` for this precision.

    Both the target and the decomposition are sums of dot products whose longest
    accumulation chain is ``d_model + C + d_head`` terms; the classical worst-case bound
    on such a sum's rounding error, relative to the sum of |terms| (which ``magnitude``
    bounds from above), is ``n · eps``. Rotary angles ``t / freq`` are rounded in the
    table's precision, an absolute angle error of about ``t · eps`` that rotates a vector
    by as much: ``2 · max_pos · eps`` more. Twice the whole covers both sides.
    (float32, d_model 192, C 250, d_head 32, 512 positions: 3.6e-4; float64: 6.6e-13.)
    """
    eps = torch.finfo(dtype).eps
    return 2.0 * (d_model + c_max + head_dim + 2 * max_pos) * eps


#: query rows ``(i0, i1)``: queries ``i0 ≤ i < i1`` against keys ``0 ≤ j < i1`` — all a causal
#: row needs. None: every row (``(0, pos)``).
Rows = tuple[int, int]


@dataclass(frozen=True)
class SideVectors:
    """One side's head vectors at its positions, rotated: ``(batch, heads, pos, d_head)``.

    ``comp = R_t v_c`` (the components' sum), ``hat = R_t (v_c + b)``, ``bias = R_t b`` (None
    without a bias), ``delta = R_t Δv`` — with QK-norm each already scaled by ``σ · γ``
    (``sigma`` ``(batch, heads, pos)``, else None); ``x_norm`` ``(batch, pos)`` is ``|x_t|``.
    """

    comp: Tensor
    hat: Tensor
    bias: Tensor | None
    delta: Tensor
    x_norm: Tensor
    sigma: Tensor | None
    #: ``hat + delta`` (the target's vector) and the norms ``|hat|``, ``|delta|``
    #: ``(batch, heads, pos)``, made once: every block of rows reads them
    full: Tensor
    hat_norm: Tensor
    delta_norm: Tensor
    #: with QK-norm, ``(batch, heads, pos)``: how much the unnormalised projection cancels,
    #: ``‖|x||V||U| + |x||Δ|ᵀ + |b|‖ / ‖x V U + x Δᵀ + b‖`` per head (≥ 1), the factor by
    #: which σ's relative rounding exceeds eps (docs/design.md §11); else None
    kappa: Tensor | None = None

    @classmethod
    def of(cls, comp, hat, bias, delta, x_norm, sigma, kappa=None) -> SideVectors:
        return cls(
            comp,
            hat,
            bias,
            delta,
            x_norm,
            sigma,
            hat + delta,
            hat.norm(dim=-1),
            delta.norm(dim=-1),
            kappa,
        )

    def positions(self, lo: int, hi: int) -> SideVectors:
        """The vectors at positions ``lo ≤ t < hi`` (views, no copy)."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[..., lo:hi, :]

        def cut_norm(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[..., lo:hi]

        return SideVectors(
            cut(self.comp),
            cut(self.hat),
            cut(self.bias),
            cut(self.delta),
            self.x_norm[:, lo:hi],
            cut_norm(self.sigma),
            cut(self.full),
            cut_norm(self.hat_norm),
            cut_norm(self.delta_norm),
            cut_norm(self.kappa),
        )


@dataclass(frozen=True)
class LayerProjections:
    """Both sides of one layer projected once: queries at rows ``q_start … q_start + n_q``,
    keys at ``0 … n_k`` — ``O(pos · heads · d_head)`` memory, no ``(pos, pos)`` square.
    :meth:`rows` selects a block of query rows, :meth:`decompose` builds its squares."""

    q: SideVectors
    k: SideVectors
    weights: LayerWeights
    layout: HeadLayout
    q_start: int = 0

    def rows(self, i0: int, i1: int) -> LayerProjections:
        """Query rows ``i0 ≤ i < i1`` against keys ``j < i1`` (views, no copy)."""
        lo = i0 - self.q_start
        if lo < 0 or i1 - self.q_start > self.q.comp.shape[-2] or i1 > self.k.comp.shape[-2]:
            raise ValueError(f"rows {i0}:{i1} are not all projected here")
        return replace(
            self, q=self.q.positions(lo, i1 - self.q_start), k=self.k.positions(0, i1), q_start=i0
        )

    def decompose(self, target: Tensor | None = None, norm: NormKind = "spectral"):
        """:class:`LayerDecomposition` of these rows and keys, ``(batch, head, rows, keys)``;
        ``target`` the model's logits there (see :func:`decompose_layer`)."""
        q, k, layout = self.q, self.k, self.layout
        s = layout.scale
        scores = _grouped_scores
        if q.bias is None and k.bias is None:
            component_sum = s * scores(q.hat, k.hat)
            bias_terms = torch.zeros_like(component_sum)
        else:
            component_sum = s * scores(q.comp, k.comp)
            bias_terms = torch.zeros_like(component_sum)
            if k.bias is not None:
                bias_terms += s * scores(q.comp, k.bias)
            if q.bias is not None:
                bias_terms += s * scores(q.bias, k.hat)
        delta_terms = s * (scores(q.hat, k.delta) + scores(q.delta, k.full))
        resid = (target if target is not None else component_sum + bias_terms + delta_terms) - (
            component_sum + bias_terms
        )
        group = layout.group
        nk = k.hat_norm.repeat_interleave(group, dim=1)  # key norms per query head
        ndk = k.delta_norm.repeat_interleave(group, dim=1)
        b_data = data_bound_norms(q.hat_norm, nk, q.delta_norm, ndk, s)
        q_size = q.hat_norm + q.delta_norm
        magnitude = abs(s) * q_size[..., :, None] * (nk + ndk)[..., None, :]
        if q.kappa is not None:  # QK-norm: σ's rounding scales the whole logit
            kf = k.full.norm(dim=-1).repeat_interleave(group, dim=1)
            kk = k.kappa.repeat_interleave(group, dim=1)
            qf = q.full.norm(dim=-1)
            magnitude = magnitude + abs(s) * (qf[..., :, None] * kf[..., None, :]) * (
                q.kappa[..., :, None] + kk[..., None, :]
            )
        sigmas = None if q.sigma is None else (q.sigma, k.sigma)
        b_weight = _weight_bound(q.x_norm, k.x_norm, self.weights, layout, norm, sigmas=sigmas)
        return LayerDecomposition(
            component_sum=component_sum,
            bias_terms=bias_terms,
            delta_terms=delta_terms,
            residual=resid,
            data_bound=b_data,
            weight_bound=b_weight,
            magnitude=magnitude,
            target=target,
        )


def project_layer(
    x: Tensor,
    weights: LayerWeights,
    layout: HeadLayout,
    positions: Tensor | None = None,
    rows: Rows | None = None,
) -> LayerProjections:
    """Project ``x`` ``(batch, pos, d_model)`` on both sides: queries at ``rows`` only, keys
    below ``rows[1]`` (default every position). ``positions``: rotary position ids
    ``(pos,)``, default ``0..pos-1``. Cost ``O(pos · d_model · C)``, memory ``O(pos · d)``."""
    w = weights.to(x.dtype, x.device)
    T = x.shape[1]
    i0, i1 = (0, T) if rows is None else rows
    if positions is None:
        positions = torch.arange(T, device=x.device)
    H, KV = layout.n_head, layout.n_kv_heads
    q = _side(x[:, i0:i1], positions[i0:i1], w.V_Q, w.U_Q, w.delta_Q, w.b_Q, w.gamma_Q, H, layout)
    k = _side(x[:, :i1], positions[:i1], w.V_K, w.U_K, w.delta_K, w.b_K, w.gamma_K, KV, layout)
    return LayerProjections(q, k, w, layout, q_start=i0)


def _side(
    x: Tensor,
    positions: Tensor,
    V: Tensor,
    U: Tensor,
    delta: Tensor,
    b: Tensor | None,
    gamma: Tensor | None,
    n: int,
    layout: HeadLayout,
) -> SideVectors:
    """:class:`SideVectors` of one side: ``v_c = x V U``, ``Δv = x Δᵀ`` per head, the bias;
    with QK-norm all scaled by ``σ · γ``, ``σ`` of their (unrotated) sum, the target's
    projection (docs/design.md §11); then rotated."""

    def heads(t: Tensor) -> Tensor:  # (batch, pos, n·d) -> (batch, n, pos, d)
        return t.unflatten(-1, (n, layout.head_dim)).transpose(1, 2)

    def rot(t: Tensor) -> Tensor:
        return rotate(t, positions, layout.rotary)

    comp = heads((x @ V) @ U)
    dv = heads(x @ delta.T)
    bias = _bias_heads(b, n, layout.head_dim, x)
    sigma = kappa = None
    if layout.qk_norm_eps is not None:  # every term scaled alike: still bilinear, closure exact
        if gamma is None:
            raise ValueError("a QK-norm layout needs the weights' gamma_Q and gamma_K")
        full = comp + dv if bias is None else comp + dv + bias
        sigma = torch.rsqrt(full.pow(2).mean(-1) + layout.qk_norm_eps)
        ax = x.abs()
        size = heads((ax @ V.abs()) @ U.abs() + ax @ delta.abs().T)
        if bias is not None:
            size = size + bias.abs()
        kappa = size.norm(dim=-1) / full.norm(dim=-1).clamp_min(_TINY)
        f = sigma[..., None] * gamma
        comp, dv = comp * f, dv * f
        bias = None if bias is None else bias * f
    hat = rot(comp + bias) if bias is not None else rot(comp)
    comp_r = hat if bias is None else rot(comp)
    bias_r = None if bias is None else rot(bias.expand_as(comp))
    return SideVectors.of(comp_r, hat, bias_r, rot(dv), x.norm(dim=-1), sigma, kappa)


def decompose_layer(
    x: Tensor,
    weights: LayerWeights,
    layout: HeadLayout,
    target: Tensor | None = None,
    positions: Tensor | None = None,
    norm: NormKind = "spectral",
    rows: Rows | None = None,
) -> LayerDecomposition:
    """Decompose the logits of one layer for every sample, at query ``rows`` (default all).

    ``x``: attention input ``(batch, pos, d_model)`` (after the pre-attention norm);
    ``target``: the model's own logits ``(batch, head, query_pos, key_pos)`` of those rows
    and keys (``[..., i0:i1, :i1]``); without it the residual is taken against the closure
    (i.e. it equals ``delta_terms``); ``positions``: rotary position ids ``(pos,)``, default
    ``0..pos-1``; ``rows`` ``(i0, i1)``: only queries ``i0 ≤ i < i1`` are projected and only
    keys ``j < i1`` (all a causal row needs); outputs are ``(batch, head, i1 − i0, i1)``.
    """
    return project_layer(x, weights, layout, positions, rows).decompose(target, norm)


def budget_bound(
    x: Tensor,
    weights: LayerWeights,
    layout: HeadLayout,
    fraction: float,
    norm: NormKind = "spectral",
    rows: Rows | None = None,
) -> Tensor:
    """``B_weight`` with each head's ‖Δ‖ replaced by ``fraction · ‖W‖`` of the target head
    slice: the residual a run may have if its delta were that large. ``(batch, head, i, j)``
    over query ``rows`` ``(i0, i1)`` and keys ``j < i1`` (default all)."""
    w = weights.to(x.dtype, x.device)
    H, KV = layout.n_head, layout.n_kv_heads
    i0, i1 = (0, x.shape[1]) if rows is None else rows
    return _weight_bound(
        x[:, i0:i1].norm(dim=-1),
        x[:, :i1].norm(dim=-1),
        w,
        layout,
        norm,
        delta_q=fraction * w.head_norms("W_Q", H, norm),
        delta_k=fraction * w.head_norms("W_K", KV, norm),
        sigmas=qk_norm_scales(x, w, layout, rows),
    )


def qk_norm_scales(
    x: Tensor, weights: LayerWeights, layout: HeadLayout, rows: Rows | None = None
) -> tuple[Tensor, Tensor] | None:
    """QK-norm's per-(position, head) factors ``σ = 1 / sqrt(mean_e(q_h,e²) + eps)`` of the
    TARGET projections ``q = x Wᵀ + b`` (components and Δ together, as the model computes
    them): ``(batch, head, pos)`` for q and ``(batch, kv_head, pos)`` for k; None without
    QK-norm. The logit is ``s σ^Q_i σ^K_j <R_i(γ_Q ⊙ q_i), R_j(γ_K ⊙ k_j)>``: bilinear in the
    projections with these factors fixed, so it splits over components exactly. With
    ``rows`` ``(i0, i1)``: q at rows ``i0:i1``, k at positions ``:i1``."""
    if layout.qk_norm_eps is None:
        return None
    w = weights.to(x.dtype, x.device)
    i0, i1 = (0, x.shape[1]) if rows is None else rows

    def sigma(xs: Tensor, W: Tensor, b: Tensor | None, n: int) -> Tensor:
        t = xs @ W.T
        if b is not None:
            t = t + b.to(xs.dtype)
        t = t.unflatten(-1, (n, layout.head_dim)).transpose(1, 2)
        return torch.rsqrt(t.pow(2).mean(-1) + layout.qk_norm_eps)

    return (
        sigma(x[:, i0:i1], w.W_hat_Q + w.delta_Q, w.b_Q, layout.n_head),
        sigma(x[:, :i1], w.W_hat_K + w.delta_K, w.b_K, layout.n_kv_heads),
    )


def _weight_bound(
    x_norm_q: Tensor,
    x_norm_k: Tensor,
    w: LayerWeights,
    layout: HeadLayout,
    norm: NormKind,
    delta_q: Tensor | None = None,
    delta_k: Tensor | None = None,
    sigmas: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``B_weight`` for every (batch, head, i, j) from ``|x_i|`` ``(batch, rows)`` and
    ``|x_j|`` ``(batch, keys)``; ‖Δ‖ per head measured unless given.
    With QK-norm (``sigmas`` per side) each side's vectors are ``σ · diag(γ) (W x + b)``: the
    bound takes ``diag(γ)``'s norms (:meth:`LayerWeights.head_norms`) and is scaled by
    ``σ^Q_i σ^K_j``."""
    H, KV = layout.n_head, layout.n_kv_heads
    dev, dtype = x_norm_q.device, x_norm_q.dtype
    key_of = torch.arange(H, device=dev) // layout.group
    zeros = torch.zeros(H, dtype=dtype, device=dev)

    def bias_norm(b: Tensor | None, gamma: Tensor | None, n: int) -> Tensor:
        if b is None:
            return zeros[:n]
        heads = b.reshape(n, -1)
        return (heads if gamma is None else heads * gamma.to(heads.dtype)).norm(dim=-1)

    if delta_q is None:
        delta_q = w.head_norms("delta_Q", H, norm)
    if delta_k is None:
        delta_k = w.head_norms("delta_K", KV, norm)
    bound = weight_bound(
        x_norm_q,
        w.head_norms("W_hat_Q", H, norm),
        w.head_norms("W_hat_K", KV, norm)[key_of],
        delta_q,
        delta_k[key_of],
        bias_norm(w.b_Q, w.gamma_Q, H),
        bias_norm(w.b_K, w.gamma_K, KV)[key_of],
        layout.scale,
        x_norm_k=x_norm_k,
    )
    if sigmas is None:
        return bound
    sq, sk = sigmas
    return bound * sq[..., :, None] * sk[:, key_of, None, :]


def causal_mask(n_pos: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean ``(query_pos, key_pos)`` mask, True where ``key_pos ≤ query_pos``."""
    return torch.ones(n_pos, n_pos, dtype=torch.bool, device=device).tril()


def _bias_heads(b: Tensor | None, n: int, d: int, like: Tensor) -> Tensor | None:
    """Bias as a ``(1, n, 1, d)`` head vector, or None."""
    if b is None:
        return None
    return b.to(like.dtype).reshape(1, n, 1, d)


def _grouped_scores(q: Tensor, k: Tensor) -> Tensor:
    """``<q_i, k_j>`` per query head with GQA: q ``(b, H, i, d)``, k ``(b, KV, j, d)`` →
    ``(b, H, i, j)``, query head h reading key head ``h // (H / KV)``, without copying k."""
    b, H, T, d = q.shape
    KV = k.shape[1]
    qg = q.reshape(b, KV, H // KV, T, d)
    return (qg @ k.unsqueeze(2).transpose(-1, -2)).reshape(b, H, T, k.shape[2])
