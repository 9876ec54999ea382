"""Component stacks → decomposed modules (sites), rebuilt from ``decomposition.sites``.

param-decomp stores the components of every site of one kind (e.g. all ``q_proj``) in one
stack: ``components.stacks.<kind>.0`` is ``V`` ``[stack, d_in, C]`` and ``.1`` is ``U``
``[stack, C, d_out]``, with ``W[d_out, d_in] ≈ (V[s] @ U[s])ᵀ``. Which layer a slice belongs
to is not stored: slice ``s`` is the layer of rank ``s`` among the decomposed layers
(ascending). A stack may end in padding slices (``stack`` > number of sites), which are
ignored; a stack shorter than the number of sites is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from qkcheck.errors import CheckpointError
from qkcheck.runs.param_decomp.launch_config import LaunchConfig

#: module path template of every site kind, per ``sites.kind`` (``{i}``: layer)
SITE_PATHS: dict[str, dict[str, str]] = {
    "simple_mlp": {
        "q_proj": "h.{i}.attn.q_proj",
        "k_proj": "h.{i}.attn.k_proj",
        "v_proj": "h.{i}.attn.v_proj",
        "o_proj": "h.{i}.attn.o_proj",
        "c_fc": "h.{i}.mlp.c_fc",
        "down_proj": "h.{i}.mlp.down_proj",
    },
    "glu_transformer": {
        kind: f"layers.{{i}}.{'self_attn' if kind in 'qkvo' else 'mlp'}.{kind}_proj"
        for kind in ("q", "k", "v", "o", "gate", "up", "down")
    },
}


@dataclass(frozen=True)
class Site:
    """One decomposed module: where its components sit in the checkpoint."""

    path: str  # module path, e.g. "h.1.attn.q_proj"
    kind: str  # the stack, e.g. "q_proj"
    layer: int
    index: int  # slice of the stack
    C: int

    @property
    def V_key(self) -> str:
        return f"components.stacks.{self.kind}.0"

    @property
    def U_key(self) -> str:
        return f"components.stacks.{self.kind}.1"


#: module-path prefix of the sites of an HF target: param-decomp names a Llama/Qwen3 site
#: ``layers.{i}.self_attn.q_proj``, the transformers module is ``model.layers.{i}…``
HF_PREFIX = "model."


def build_sites(config: LaunchConfig, n_layer: int) -> dict[str, Site]:
    """Every decomposed module path (the target model's own) -> its :class:`Site`, kinds in
    ``cs`` order."""
    sites = config.decomposition.sites
    prefix = HF_PREFIX if config.target.spec.kind == "hf" else ""
    paths = SITE_PATHS[sites.kind]
    unknown = [k for k in sites.cs if k not in paths]
    if unknown:
        raise CheckpointError(
            f"{config.path}: field 'decomposition.sites.cs': unknown site kind(s) {unknown} for "
            f"sites.kind {sites.kind!r}; known: {', '.join(paths)}"
        )
    layers = config.layer_indices(n_layer)
    out: dict[str, Site] = {}
    for kind, C in sites.cs.items():
        for rank, layer in enumerate(layers):
            path = prefix + paths[kind].format(i=layer)
            out[path] = Site(path, kind, layer, rank, C)
    return out


def check_stack(
    site: Site, n_sites: int, V_shape: tuple[int, ...], U_shape: tuple[int, ...], where: str
) -> None:
    """The stack of ``site``'s kind holds ``n_sites`` slices (or more: padding) of ``C``."""
    for key, shape, c_axis in ((site.V_key, V_shape, 2), (site.U_key, U_shape, 1)):
        if len(shape) != 3:
            raise CheckpointError(
                f"{where}: array {key!r} has shape {shape}, expected 3 axes "
                f"[stack, {'d_in, C' if c_axis == 2 else 'C, d_out'}]"
            )
        if shape[0] < n_sites:
            raise CheckpointError(
                f"{where}: array {key!r} has {shape[0]} stack slices but the launch config "
                f"decomposes {n_sites} {site.kind} sites (decomposition.sites.layers)"
            )
        if shape[c_axis] != site.C:
            raise CheckpointError(
                f"{where}: array {key!r} has shape {shape}, but the launch config's "
                f"decomposition.sites.cs.{site.kind} is {site.C}"
            )
