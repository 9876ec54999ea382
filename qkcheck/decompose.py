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

Every output is ``(batch, head, query_pos, key_pos)`` over the full square; entries with
``key_pos > query_pos`` are computed but meaningless for a causal model (use
:func:`causal_mask`). The (head, C_q, C_k, key) pair tensor is never built here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from qkcheck.bounds import NormKind, data_bound, head_norms, weight_bound
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


def decompose_layer(
    x: Tensor,
    weights: LayerWeights,
    layout: HeadLayout,
    target: Tensor | None = None,
    positions: Tensor | None = None,
    norm: NormKind = "spectral",
) -> LayerDecomposition:
    """Decompose the logits of one layer for every sample and every query/key position.

    ``x``: attention input ``(batch, pos, d_model)`` (after the pre-attention norm);
    ``target``: the model's own logits ``(batch, head, query_pos, key_pos)``; without it
    the residual is taken against the closure (i.e. it equals ``delta_terms``);
    ``positions``: rotary position ids ``(pos,)``, default ``0..pos-1``.
    """
    w = weights.to(x.dtype, x.device)
    T = x.shape[1]
    if positions is None:
        positions = torch.arange(T, device=x.device)

    def heads(t: Tensor, n: int) -> Tensor:  # (batch, pos, n·d) -> (batch, n, pos, d)
        return t.unflatten(-1, (n, layout.head_dim)).transpose(1, 2)

    def rot(t: Tensor) -> Tensor:
        return rotate(t, positions, layout.rotary)

    H, KV = layout.n_head, layout.n_kv_heads
    q_comp = heads((x @ w.V_Q) @ w.U_Q, H)
    k_comp = heads((x @ w.V_K) @ w.U_K, KV)
    dq = heads(x @ w.delta_Q.T, H)
    dk = heads(x @ w.delta_K.T, KV)
    bq = _bias_heads(w.b_Q, H, layout.head_dim, x)
    bk = _bias_heads(w.b_K, KV, layout.head_dim, x)
    sigmas = _qk_norm_sigmas(q_comp, dq, bq, k_comp, dk, bk, w, layout)
    if sigmas is not None:  # every term of a side scaled alike: still bilinear, closure exact
        fq = sigmas[0][..., None] * w.gamma_Q
        fk = sigmas[1][..., None] * w.gamma_K
        q_comp, dq, k_comp, dk = q_comp * fq, dq * fq, k_comp * fk, dk * fk
        bq = None if bq is None else bq * fq
        bk = None if bk is None else bk * fk
    dq, dk = rot(dq), rot(dk)

    q_hat_r = rot(q_comp + bq) if bq is not None else rot(q_comp)
    k_hat_r = rot(k_comp + bk) if bk is not None else rot(k_comp)
    s = layout.scale
    scores = _grouped_scores

    if bq is None and bk is None:
        component_sum = s * scores(q_hat_r, k_hat_r)
        bias_terms = torch.zeros_like(component_sum)
    else:
        q_comp_r, k_comp_r = rot(q_comp), rot(k_comp)
        component_sum = s * scores(q_comp_r, k_comp_r)
        bias_terms = torch.zeros_like(component_sum)
        if bk is not None:
            bias_terms += s * scores(q_comp_r, rot(bk.expand_as(k_comp)))
        if bq is not None:
            bias_terms += s * scores(rot(bq.expand_as(q_comp)), k_hat_r)

    delta_terms = s * (scores(q_hat_r, dk) + scores(dq, k_hat_r + dk))
    resid = (target if target is not None else component_sum + bias_terms + delta_terms) - (
        component_sum + bias_terms
    )

    group = layout.group
    k_hat_h = k_hat_r.repeat_interleave(group, dim=1)
    dk_h = dk.repeat_interleave(group, dim=1)
    b_data = data_bound(q_hat_r, k_hat_h, dq, dk_h, s)
    q_size = q_hat_r.norm(dim=-1) + dq.norm(dim=-1)
    k_size = k_hat_h.norm(dim=-1) + dk_h.norm(dim=-1)
    magnitude = abs(s) * q_size[..., :, None] * k_size[..., None, :]

    b_weight = _weight_bound(x, w, layout, norm, sigmas=sigmas)
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


def budget_bound(
    x: Tensor,
    weights: LayerWeights,
    layout: HeadLayout,
    fraction: float,
    norm: NormKind = "spectral",
) -> Tensor:
    """``B_weight`` with each head's ‖Δ‖ replaced by ``fraction · ‖W‖`` of the target head
    slice: the residual a run may have if its delta were that large. ``(batch, head, i, j)``."""
    w = weights.to(x.dtype, x.device)
    H, KV = layout.n_head, layout.n_kv_heads
    return _weight_bound(
        x,
        w,
        layout,
        norm,
        delta_q=fraction * w.head_norms("W_Q", H, norm),
        delta_k=fraction * w.head_norms("W_K", KV, norm),
        sigmas=qk_norm_scales(x, w, layout),
    )


def qk_norm_scales(
    x: Tensor, weights: LayerWeights, layout: HeadLayout
) -> tuple[Tensor, Tensor] | None:
    """QK-norm's per-(position, head) factors ``σ = 1 / sqrt(mean_e(q_h,e²) + eps)`` of the
    TARGET projections ``q = x Wᵀ + b`` (components and Δ together, as the model computes
    them): ``(batch, head, pos)`` for q and ``(batch, kv_head, pos)`` for k; None without
    QK-norm. The logit is ``s σ^Q_i σ^K_j <R_i(γ_Q ⊙ q_i), R_j(γ_K ⊙ k_j)>``: bilinear in the
    projections with these factors fixed, so it splits over components exactly."""
    if layout.qk_norm_eps is None:
        return None
    w = weights.to(x.dtype, x.device)

    def sigma(W: Tensor, b: Tensor | None, n: int) -> Tensor:
        t = x @ W.T
        if b is not None:
            t = t + b.to(x.dtype)
        t = t.unflatten(-1, (n, layout.head_dim)).transpose(1, 2)
        return torch.rsqrt(t.pow(2).mean(-1) + layout.qk_norm_eps)

    return (
        sigma(w.W_hat_Q + w.delta_Q, w.b_Q, layout.n_head),
        sigma(w.W_hat_K + w.delta_K, w.b_K, layout.n_kv_heads),
    )


def _qk_norm_sigmas(q_comp, dq, bq, k_comp, dk, bk, w: LayerWeights, layout: HeadLayout):
    """:func:`qk_norm_scales` from the unrotated head vectors (their sum is the target
    projection), ``(batch, head, pos)`` per side, or None without QK-norm."""
    if layout.qk_norm_eps is None:
        return None
    if w.gamma_Q is None or w.gamma_K is None:
        raise ValueError("a QK-norm layout needs the weights' gamma_Q and gamma_K")
    eps = layout.qk_norm_eps

    def sigma(comp: Tensor, delta: Tensor, bias: Tensor | None) -> Tensor:
        full = comp + delta if bias is None else comp + delta + bias
        return torch.rsqrt(full.pow(2).mean(-1) + eps)

    return sigma(q_comp, dq, bq), sigma(k_comp, dk, bk)


def _weight_bound(
    x: Tensor,
    w: LayerWeights,
    layout: HeadLayout,
    norm: NormKind,
    delta_q: Tensor | None = None,
    delta_k: Tensor | None = None,
    sigmas: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``B_weight`` for every (batch, head, i, j); ‖Δ‖ per head measured unless given.
    With QK-norm (``sigmas`` per side) each side's vectors are ``σ · diag(γ) (W x + b)``: the
    bound takes ``diag(γ)``'s norms (:meth:`LayerWeights.head_norms`) and is scaled by
    ``σ^Q_i σ^K_j``."""
    H, KV = layout.n_head, layout.n_kv_heads
    key_of = torch.arange(H, device=x.device) // layout.group
    zeros = torch.zeros(H, dtype=x.dtype, device=x.device)

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
        x.norm(dim=-1),
        w.head_norms("W_hat_Q", H, norm),
        w.head_norms("W_hat_K", KV, norm)[key_of],
        delta_q,
        delta_k[key_of],
        bias_norm(w.b_Q, w.gamma_Q, H),
        bias_norm(w.b_K, w.gamma_K, KV)[key_of],
        layout.scale,
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
