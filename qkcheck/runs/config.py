"""SPD and pretrain YAML configs → typed settings, leniently, with pydantic.

spd dumps its whole pydantic ``Config`` to ``final_config.yaml``. qkcheck reads only the
fields it needs, validates those (name, type, allowed values) and ignores everything
else (``extra="ignore"``), so configs from newer spd versions still load. Older configs are
migrated the way spd migrates them, in a ``mode="before"`` validator: ``C`` +
``target_module_patterns`` → ``module_info``; top-level ``ci_fn_type`` /
``ci_fn_hidden_dims`` / ``use_global_ci`` → ``ci_config``; ``pretrained_model_name_hf`` →
``pretrained_model_name``; ``simple_stories_train.models.*`` → ``spd.pretrain.models.*``.

:func:`validated` is the one way qkcheck turns a YAML mapping into a config model (also for
param-decomp's ``launch_config.yaml``): any problem is one :class:`ConfigError` naming the
file, the field (also as ``ConfigError.field``) and the value.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qkcheck.errors import ConfigError

IDENTITY_SUFFIX = ".pre_identity"  # spd inserts identity modules under this name

M = TypeVar("M", bound=BaseModel)
PositiveInt = Annotated[int, Field(gt=0)]


class Lenient(BaseModel):
    """A config section: unknown fields ignored, values type-checked without coercion
    (``"64"`` is not an int, ``true`` is not 1), immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class ModulePattern(Lenient):
    """One ``module_info`` entry: an fnmatch pattern (``*`` also matches dots) and its C."""

    pattern: str = Field(alias="module_pattern")
    C: PositiveInt
    identity: bool = False  # from identity_module_info: decomposes an inserted identity map


class CIConfig(BaseModel):
    """``ci_config``: ``mode`` layerwise|global, ``fn_type``, ``hidden_dims``; every other
    field is kept (the global CI functions read theirs, qkcheck.ci)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    mode: str = "layerwise"
    fn_type: str
    hidden_dims: tuple[Annotated[int, Field(ge=0)], ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field, as the CI-function builder takes them."""
        dims = list(self.hidden_dims) if self.hidden_dims is not None else None
        extra = dict(self.model_extra or {})
        return {**extra, "mode": self.mode, "fn_type": self.fn_type, "hidden_dims": dims}


class TaskConfig(Lenient):
    """The LM ``task_config`` (defaults as in spd's ``LMTaskConfig``)."""

    task_name: str = "lm"
    dataset_name: str | None = None
    column_name: str = "story"
    max_seq_len: PositiveInt = 512
    is_tokenized: bool = False
    train_data_split: str = "train"
    eval_data_split: str = "test"
    streaming: bool = False


class SPDConfig(Lenient):
    """The fields of an SPD run's ``final_config.yaml`` that qkcheck uses."""

    path: Path = Field(default=Path(), strict=False)
    pretrained_model_class: str
    pretrained_model_name: str | None = None
    pretrained_model_path: str | None = None
    module_info: tuple[ModulePattern, ...] = Field(min_length=1)
    ci_config: CIConfig
    sigmoid_type: str = "leaky_hard"
    tokenizer_name: str | None = None
    task_config: TaskConfig | None = None

    @property
    def pretrained_reference(self) -> str | None:
        """Where the target model comes from: ``pretrained_model_name``, else ``_path``."""
        return self.pretrained_model_name or self.pretrained_model_path

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        """spd's deprecated-field migrations (``Config.handle_deprecated_config_keys``)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "C" in data or "target_module_patterns" in data:
            c, patterns = data.get("C"), data.get("target_module_patterns")
            if patterns is None:
                raise ValueError("field 'target_module_patterns' is required with the old 'C'")
            if not isinstance(patterns, list):
                patterns = [patterns]  # reported as a bad module_info[0].module_pattern
            data.setdefault("module_info", [{"module_pattern": p, "C": c} for p in patterns])
            identity = data.pop("identity_module_patterns", None)
            if identity is not None:
                data["identity_module_info"] = [{"module_pattern": p, "C": c} for p in identity]
        if any(k in data for k in ("ci_fn_type", "ci_fn_hidden_dims", "use_global_ci")):
            fn_type = data.pop("ci_fn_type", "vector_mlp")
            hidden = data.pop("ci_fn_hidden_dims", [8])
            is_global = bool(data.pop("use_global_ci", False)) or str(fn_type).startswith("global_")
            if is_global and not str(fn_type).startswith("global_"):
                fn_type = "global_shared_mlp"
            mode = "global" if is_global else "layerwise"
            data.setdefault("ci_config", {"mode": mode, "fn_type": fn_type, "hidden_dims": hidden})
        if "pretrained_model_name_hf" in data:
            data.setdefault("pretrained_model_name", data.pop("pretrained_model_name_hf"))
        model_class = data.get("pretrained_model_class")
        old = "simple_stories_train.models."
        if isinstance(model_class, str) and model_class.startswith(old):
            data["pretrained_model_class"] = "spd.pretrain.models." + model_class[len(old) :]
        # strict models take tuples, YAML gives lists
        ci = data.get("ci_config")
        if isinstance(ci, dict) and isinstance(ci.get("hidden_dims"), list):
            data["ci_config"] = {**ci, "hidden_dims": tuple(ci["hidden_dims"])}
        if not isinstance(data.get("task_config"), dict):
            data["task_config"] = None  # not an LM run (or no task): nothing to read
        # identity patterns join module_info, marked (their entries are checked alike)
        modules, extra = data.get("module_info"), data.pop("identity_module_info", None)
        if isinstance(modules, list) and isinstance(extra, list):
            marked = [{**e, "identity": True} if isinstance(e, dict) else e for e in extra]
            data["module_info"] = [*modules, *marked]
        if isinstance(data.get("module_info"), list):
            data["module_info"] = tuple(data["module_info"])
        return data


def validated(model: type[M], data: Mapping[str, Any], path: Path) -> M:
    """``model`` from ``data`` (read from ``path``); a ValidationError becomes one
    ConfigError: ``<path>: field 'a.b[0].c' <what was wrong>, got <value>``."""
    try:
        return model.model_validate({**data, "path": path})
    except ValidationError as e:
        raise _config_error(e, path) from None


#: what a field must be, by pydantic error type
_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
    "float_type": "a number",
    "literal_error": None,  # pydantic's own message lists the allowed values
    "union_tag_invalid": None,
    "union_tag_not_found": None,
}


def _config_error(e: ValidationError, path: Path) -> ConfigError:
    err = e.errors()[0]
    loc = [p for p in err["loc"] if not str(p).startswith("function-")]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if field.endswith("module_pattern") or field.endswith(".pattern"):
        field = field.rsplit(".", 1)[0] + ".module_pattern"
    kind, value = err["type"], err.get("input")
    if not field:  # a model-level check (the migrations)
        return ConfigError(f"{path}: {err['msg'].removeprefix('Value error, ')}")
    if kind == "missing":
        return ConfigError(f"{path}: required field '{field}' is missing", field=field)
    ctx = err.get("ctx") or {}
    if kind == "greater_than" and ctx.get("gt") == 0:
        what = "must be a positive integer"
    elif kind == "greater_than_equal" and ctx.get("ge") == 0:
        what = "must be a non-negative integer"
    elif kind == "greater_than_equal":
        what = f"must be ≥ {ctx.get('ge')}"
    elif kind == "too_short":
        what = "must be a non-empty list"
    elif _EXPECTED.get(kind):
        what = f"must be {_EXPECTED[kind]}"
    else:
        what = f"is invalid: {err['msg']}"
    shown = "" if isinstance(value, dict) else f", got {value!r}"
    return ConfigError(f"{path}: field '{field}' {what}{shown}", field=field)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping; ConfigError naming the file, line and column otherwise."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of fields, got {type(data).__name__}")
    return data


def read_spd_config(path: Path) -> SPDConfig:
    """Read and validate ``final_config.yaml`` (see :func:`parse_spd_config`)."""
    return parse_spd_config(read_yaml(path), path)


def parse_spd_config(raw: Mapping[str, Any], path: Path) -> SPDConfig:
    """Migrate old field names, then validate the fields qkcheck needs."""
    return validated(SPDConfig, raw, path)


def parse_model_config(
    raw: Mapping[str, Any], path: Path, model_class: str, nested: bool = False
) -> dict[str, Any]:
    """The target architecture (``model_config.yaml``, or ``model:`` inside a pretrain config).

    As spd does for old pretrain runs, a missing ``model_type`` is taken from the class name.
    """
    if nested:
        model = raw.get("model")
        if not isinstance(model, Mapping):
            raise ConfigError(
                f"{path}: field 'model' must hold the architecture (n_layer, n_head, ...), "
                f"got {model!r}; the pretrain run has no model_config.yaml either"
            )
        raw = model
    config = dict(raw)
    config.setdefault("model_type", model_class.rsplit(".", 1)[-1])
    return config


def expand_module_info(
    patterns: Iterable[ModulePattern], module_names: Iterable[str], path: Path
) -> dict[str, ModulePattern]:
    """Module path → its pattern, as spd expands ``module_info`` (fnmatch, ``*`` spans dots).

    ``module_names``: the target model's decomposable modules, in model order. Identity
    patterns name the module an identity map is inserted before (``<path>.pre_identity``).
    """
    names = list(module_names)
    expanded: dict[str, ModulePattern] = {}
    for info in patterns:
        matches = [n for n in names if fnmatch.fnmatchcase(n, info.pattern)]
        if not matches:
            field_name = "identity_module_info" if info.identity else "module_info"
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(
                f"{path}: {field_name} pattern {info.pattern!r} (C={info.C}) matches no module "
                f"of the target model; its weight modules are: {shown}"
            )
        for name in matches:
            key = name + IDENTITY_SUFFIX if info.identity else name
            if key in expanded:
                raise ConfigError(
                    f"{path}: module {key!r} matches two module_info patterns, "
                    f"{expanded[key].pattern!r} and {info.pattern!r}; each module may match one"
                )
            expanded[key] = info
    return expanded
