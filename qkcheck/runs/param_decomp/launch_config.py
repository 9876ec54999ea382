"""param-decomp's ``launch_config.yaml``: the fields qkcheck reads, checked with pydantic.

Every model ignores fields it does not name (``extra="ignore"``), so configs of newer
param-decomp versions still load as long as these fields keep their meaning:

* ``target.spec``: ``{kind: pretrained, model_class, run_path}`` (a LlamaSimpleMLP pretrain
  run) or ``{kind: hf, model_class: transformers.X, model_name}``;
* ``target.weights_dtype``: the dtype the target's weights were cast to for the run;
* ``decomposition.sites``: ``{kind: simple_mlp | glu_transformer, layers: {kind: all} |
  {kind: list, indices: [...]}, cs: {<site kind>: C}}``;
* ``decomposition.ci.type``: the CI function (not needed in weighted mode);
* ``data.train`` / ``data.eval``: named pre-tokenized data sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from qkcheck.errors import ConfigError
from qkcheck.runs.config import read_yaml, validated


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PretrainedSpec(_Model):
    kind: Literal["pretrained"]
    model_class: str
    run_path: str


class HFSpec(_Model):
    kind: Literal["hf"]
    model_class: str
    model_name: str


class Target(_Model):
    spec: Annotated[PretrainedSpec | HFSpec, Field(discriminator="kind")]
    weights_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class AllLayers(_Model):
    kind: Literal["all"]


class ListedLayers(_Model):
    kind: Literal["list"]
    indices: list[Annotated[int, Field(ge=0)]]


class Sites(_Model):
    kind: Literal["simple_mlp", "glu_transformer"]
    layers: Annotated[AllLayers | ListedLayers, Field(discriminator="kind")]
    cs: dict[str, Annotated[int, Field(ge=1)]]


class CI(_Model):
    type: str


class Decomposition(_Model):
    sites: Sites
    ci: CI | None = None


class NamedData(_Model):
    kind: Literal["name"] = "name"
    name: str


class Data(_Model):
    train: NamedData | None = None
    eval: NamedData | None = None


class Wandb(_Model):
    project: str | None = None


class LaunchConfig(_Model):
    target: Target
    decomposition: Decomposition
    data: Data | None = None
    wandb: Wandb | None = None
    run_name: str | None = None
    path: Path = Path()

    def layer_indices(self, n_layer: int) -> list[int]:
        """The decomposed layers, ascending (``layers: all`` means every one of ``n_layer``)."""
        layers = self.decomposition.sites.layers
        if isinstance(layers, AllLayers):
            return list(range(n_layer))
        bad = [i for i in layers.indices if i >= n_layer]
        if bad:
            raise ConfigError(
                f"{self.path}: field 'decomposition.sites.layers.indices': layers {bad} do not "
                f"exist in the target model ({n_layer} layers)"
            )
        return sorted(set(layers.indices))

    def c_of(self, stack: str) -> int | None:
        """``C`` of a stack (``cs[stack]``), None when that kind is not decomposed."""
        return self.decomposition.sites.cs.get(stack)


def read_launch_config(path: Path) -> LaunchConfig:
    """Read and check ``launch_config.yaml``; any problem is one ConfigError naming the
    file and the field."""
    return validated(LaunchConfig, read_yaml(path), path)
