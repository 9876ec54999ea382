"""Global CI functions: one network reads every decomposed module's input at once.

Inputs: ``x_m`` ``(batch pos d_m)`` for each decomposed module ``m`` — its input, or for an
embedding its component activations ``V[token]`` (``d_m = C_m``). Outputs: pre-sigmoid CI
``(batch pos C_m)`` per module. Layouts, as spd's ``spd/models/components.py`` builds them
(state-dict keys under ``_global_ci_fn.``; :mod:`qkcheck.ci.layers` has the blocks):

* ``global_shared_mlp`` — ``layers.{0,2,…}``: an MLP (``ci_config.hidden_dims``) of
  ``concat_m x_m`` over the modules in **sorted path order**; the output is split into
  ``C_m`` pieces in the same order.
* ``global_shared_transformer`` — ``h = concat_m rms_norm(x_m) W_in + b_in`` (sorted path
  order, ``rms_norm`` without weight; ``_input_projector``), then ``n_blocks`` pre-norm
  blocks ``_blocks.<i>``: ``h += attn(rms_norm(h)); h += mlp(rms_norm(h))`` with
  bidirectional RoPE self-attention over the sample's positions (CI at ``t`` sees later
  tokens too) and a GELU MLP ``mlp.{0,2,…}`` (``mlp_hidden_dim``); then
  ``_output_head``, split as above. Config: ``ci_config.simple_transformer_ci_cfg``
  ``{d_model, n_blocks, mlp_hidden_dim, attn_config: {n_heads, max_len, rope_base}}``.
* ``global_reverse_residual`` — a residual stream ``r = 0`` ``(batch pos d_resid_ci_fn)``
  visits the ``ci_config.block_groups`` in their listed order. Block ``b`` holds the modules
  its ``patterns`` match (pattern order, then ``module_info`` order), and does
  ``r += concat_{m∈b} x_m W_b + c_b`` (``_inp_projectors.<b>``, inputs not normed); unless
  it is the last block, ``r += attn(rms_norm_γ(r))`` (``_attn_transitions``/``_attn_norms``,
  only with ``transition_attn_config``) and then ``r += T_b(rms_norm_γ(r))``
  (``_transitions``/``_transition_norms``; ``T_b`` is ``Linear, GELU, Linear`` through
  ``transition_hidden_dim``, else one ``Linear``); then — *after* the transition — the
  block's CI is ``reader_b(rms_norm_γ(r))`` (``_readers``/``_reader_norms``, an MLP through
  ``reader_hidden_dims``), split into the block's modules. ``rms_norm_γ`` are
  ``nn.RMSNorm`` with a learned ``weight``; ``<b>`` is the block name with ``.`` → ``-``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qkcheck.ci.fields import CIFields
from qkcheck.ci.layers import SelfAttention, Stack, StateReader, rms_norm
from qkcheck.errors import ConfigError

GLOBAL_FN_TYPES = ("global_shared_mlp", "global_shared_transformer", "global_reverse_residual")
PREFIX = "_global_ci_fn."


def _split(out: Tensor, paths: Sequence[str], sizes: Sequence[int]) -> dict[str, Tensor]:
    return dict(zip(paths, torch.split(out, list(sizes), dim=-1), strict=True))


@dataclass(frozen=True)
class GlobalSharedMLP:
    paths: tuple[str, ...]  # sorted
    sizes: tuple[int, ...]  # C per path
    mlp: Stack

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        x = torch.cat([inputs[p].to(inputs[self.paths[0]].dtype) for p in self.paths], dim=-1)
        return _split(self.mlp(x), self.paths, self.sizes)


@dataclass(frozen=True)
class TransformerBlock:
    attn: SelfAttention
    mlp: Stack

    def __call__(self, h: Tensor) -> Tensor:
        h = h + self.attn(rms_norm(h))
        return h + self.mlp(rms_norm(h))


@dataclass(frozen=True)
class GlobalSharedTransformer:
    paths: tuple[str, ...]  # sorted
    sizes: tuple[int, ...]
    projector: Stack
    blocks: tuple[TransformerBlock, ...]
    head: Stack

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        dtype = self.projector.weights[0].dtype
        x = torch.cat([rms_norm(inputs[p].to(dtype)) for p in self.paths], dim=-1)
        h = self.projector(x)
        for block in self.blocks:
            h = block(h)
        return _split(self.head(h), self.paths, self.sizes)


@dataclass(frozen=True)
class ResidualBlock:
    name: str
    paths: tuple[str, ...]  # pattern order, then module_info order
    sizes: tuple[int, ...]
    projector: Stack
    reader_norm: Tensor
    reader: Stack
    attn: tuple[Tensor, SelfAttention] | None = None  # (norm weight, attention)
    transition: tuple[Tensor, Stack] | None = None  # (norm weight, MLP); None for the last


@dataclass(frozen=True)
class GlobalReverseResidual:
    blocks: tuple[ResidualBlock, ...]
    d_resid: int

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        first = inputs[self.blocks[0].paths[0]]
        dtype = self.blocks[0].projector.weights[0].dtype
        r = torch.zeros(*first.shape[:-1], self.d_resid, dtype=dtype, device=first.device)
        out: dict[str, Tensor] = {}
        for block in self.blocks:
            r = r + block.projector(torch.cat([inputs[p].to(dtype) for p in block.paths], -1))
            if block.attn is not None:
                gamma, attn = block.attn
                r = r + attn(rms_norm(r, gamma))
            if block.transition is not None:
                gamma, mlp = block.transition
                r = r + mlp(rms_norm(r, gamma))
            ci = block.reader(rms_norm(r, block.reader_norm))
            out.update(_split(ci, block.paths, block.sizes))
        return out


GlobalFunction = GlobalSharedMLP | GlobalSharedTransformer | GlobalReverseResidual


def read_global(
    fn_type: str,
    fields: CIFields,
    reader: StateReader,
    modules: Mapping[str, tuple[int, int]],
) -> GlobalFunction:
    """Build the global CI function ``fn_type`` from the config and the CI state.

    ``modules``: path → (input width, C) for every decomposed module, in ``module_info``
    order. Raises ConfigError (a config field) or CheckpointError (a CI weight); keys under
    ``_global_ci_fn.`` that the config does not account for are a CheckpointError.
    """
    paths = tuple(sorted(modules))
    d_in = sum(modules[p][0] for p in paths)
    sizes = tuple(modules[p][1] for p in paths)
    fn: GlobalFunction
    if fn_type == "global_shared_mlp":
        hidden = fields.int_list("hidden_dims", None)
        mlp = reader.stack(f"{PREFIX}layers.", d_in=d_in, d_out=sum(sizes), hidden_dims=hidden)
        fn = GlobalSharedMLP(paths, sizes, mlp)
    elif fn_type == "global_shared_transformer":
        fn = _read_transformer(fields, reader, paths, d_in, sizes)
    elif fn_type == "global_reverse_residual":
        fn = _read_reverse_residual(fields, reader, modules)
    else:
        raise ValueError(fn_type)
    reader.check_all_used(PREFIX)
    return fn


def _attn_settings(f: CIFields, d_model: int, d_field: str) -> tuple[int, int, float, str]:
    n_heads = f.positive_int("n_heads")
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise f.bad(
            "n_heads",
            f"a divisor of {d_field} = {d_model} leaving an even head width (RoPE)",
            n_heads,
        )
    return (
        n_heads,
        f.positive_int("max_len", 2048),
        f.number("rope_base", 10000.0),
        (f"{f.prefix}max_len"),
    )


def _read_transformer(
    fields: CIFields,
    reader: StateReader,
    paths: tuple[str, ...],
    d_in: int,
    sizes: tuple[int, ...],
) -> GlobalSharedTransformer:
    cfg = fields.mapping("simple_transformer_ci_cfg")
    d_model = cfg.positive_int("d_model")
    n_blocks = cfg.positive_int("n_blocks")
    mlp_hidden = cfg.int_list("mlp_hidden_dim", None)
    if mlp_hidden is None:
        mlp_hidden = [4 * d_model]  # spd's default
    attn_cfg = cfg.mapping("attn_config")
    n_heads, max_len, base, max_len_field = _attn_settings(
        attn_cfg, d_model, f"{cfg.prefix}d_model"
    )
    blocks = []
    for i in range(n_blocks):
        p = f"{PREFIX}_blocks.{i}."
        attn = reader.attention(f"{p}attn.", d_model, n_heads, max_len, base, max_len_field)
        mlp = reader.stack(
            f"{p}mlp.",
            d_in=d_model,
            d_out=d_model,
            hidden_dims=mlp_hidden,
            hidden_field=f"{cfg.prefix}mlp_hidden_dim",
        )
        blocks.append(TransformerBlock(attn, mlp))
    return GlobalSharedTransformer(
        paths,
        sizes,
        reader.affine(f"{PREFIX}_input_projector.", d_in, d_model),
        tuple(blocks),
        reader.affine(f"{PREFIX}_output_head.", d_model, sum(sizes)),
    )


def block_modules(fields: CIFields, modules: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``block_groups`` → ``[(name, module paths)]``, matched as spd does: each pattern in
    order (fnmatch, ``*`` spans dots) over the modules in ``module_info`` order; every module
    in exactly one block."""
    blocks: list[tuple[str, list[str]]] = []
    owner: dict[str, str] = {}
    for group in fields.items("block_groups"):
        name = group.string("name")
        matched: list[str] = []
        for j, pattern in enumerate(group.str_list("patterns")):
            hits = [m for m in modules if fnmatch.fnmatchcase(m, pattern)]
            if not hits:
                raise ConfigError(
                    f"{fields.where}: field '{group.prefix}patterns[{j}]' ({pattern!r}, block "
                    f"{name!r}) matches no decomposed module; decomposed: {', '.join(modules)}"
                )
            for m in hits:
                if m in owner or m in matched:
                    other = owner.get(m, name)
                    raise ConfigError(
                        f"{fields.where}: field '{fields.prefix}block_groups': module {m!r} is "
                        f"matched in block {other!r} and again in block {name!r}; each module "
                        "belongs to one block"
                    )
            matched.extend(hits)
        owner.update(dict.fromkeys(matched, name))
        blocks.append((name, matched))
    left = [m for m in modules if m not in owner]
    if left:
        raise ConfigError(
            f"{fields.where}: field '{fields.prefix}block_groups' puts no block over module(s) "
            f"{', '.join(map(repr, left))}; every decomposed module needs one"
        )
    return blocks


def _read_reverse_residual(
    fields: CIFields, reader: StateReader, modules: Mapping[str, tuple[int, int]]
) -> GlobalReverseResidual:
    d = fields.positive_int("d_resid_ci_fn")
    reader_hidden = fields.int_list("reader_hidden_dims")
    transition_hidden = fields.positive_int("transition_hidden_dim", None)
    attn_cfg = fields.optional_mapping("transition_attn_config")
    attn = None
    if attn_cfg is not None:
        attn = _attn_settings(attn_cfg, d, f"{fields.prefix}d_resid_ci_fn")
    groups = block_modules(fields, list(modules))
    blocks = []
    for n, (name, paths) in enumerate(groups):
        b = name.replace(".", "-")
        sizes = tuple(modules[p][1] for p in paths)

        def norm(kind: str, b: str = b) -> Tensor:
            return reader.norm_weight(f"{PREFIX}_{kind}.{b}.weight", d)

        attn_part = transition = None
        if n < len(groups) - 1:
            if attn is not None:
                n_heads, max_len, base, field = attn
                attn_part = (
                    norm("attn_norms"),
                    reader.attention(
                        f"{PREFIX}_attn_transitions.{b}.", d, n_heads, max_len, base, field
                    ),
                )
            t = f"{PREFIX}_transitions.{b}."
            if transition_hidden is None:
                mlp = reader.affine(t, d, d)
            else:
                mlp = reader.stack(
                    t,
                    d_in=d,
                    d_out=d,
                    hidden_dims=[transition_hidden],
                    hidden_field=f"{fields.prefix}transition_hidden_dim",
                )
            transition = (norm("transition_norms"), mlp)
        blocks.append(
            ResidualBlock(
                name=name,
                paths=tuple(paths),
                sizes=sizes,
                projector=reader.affine(
                    f"{PREFIX}_inp_projectors.{b}.", sum(modules[p][0] for p in paths), d
                ),
                reader_norm=norm("reader_norms"),
                reader=reader.stack(
                    f"{PREFIX}_readers.{b}.",
                    d_in=d,
                    d_out=sum(sizes),
                    hidden_dims=reader_hidden,
                    hidden_field=f"{fields.prefix}reader_hidden_dims",
                ),
                attn=attn_part,
                transition=transition,
            )
        )
    return GlobalReverseResidual(tuple(blocks), d)
