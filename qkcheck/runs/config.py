"""SPD and pretrain YAML configs → typed settings, leniently.

spd dumps its whole pydantic ``Config`` to ``final_config.yaml``. qkcheck reads only the
fields it needs, validates those (name, type, allowed values) and ignores everything
else, so configs from newer spd versions still load. Older configs are migrated the way
spd migrates them: ``C`` + ``target_module_patterns`` → ``module_info``; top-level
``ci_fn_type`` / ``ci_fn_hidden_dims`` / ``use_global_ci`` → ``ci_config``;
``pretrained_model_name_hf`` → ``pretrained_model_name``; ``simple_stories_train.models.*``
→ ``spd.pretrain.models.*``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkcheck.errors import ConfigError

IDENTITY_SUFFIX = ".pre_identity"  # spd inserts identity modules under this name

_MISSING = object()


@dataclass(frozen=True)
class ModulePattern:
    """One ``module_info`` entry: an fnmatch pattern (``*`` also matches dots) and its C."""

    pattern: str
    C: int
    identity: bool = False  # from identity_module_info: decomposes an inserted identity map


@dataclass(frozen=True)
class CIConfig:
    """``ci_config``: ``mode`` layerwise|global, ``fn_type``, ``hidden_dims``, the rest raw."""

    mode: str
    fn_type: str
    hidden_dims: tuple[int, ...] | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Every field, as the CI-function builder takes them."""
        dims = list(self.hidden_dims) if self.hidden_dims is not None else None
        return {**self.raw, "mode": self.mode, "fn_type": self.fn_type, "hidden_dims": dims}


@dataclass(frozen=True)
class TaskConfig:
    """The LM ``task_config`` (defaults as in spd's ``LMTaskConfig``)."""

    task_name: str = "lm"
    dataset_name: str | None = None
    column_name: str = "story"
    max_seq_len: int = 512
    is_tokenized: bool = False
    train_data_split: str = "train"
    eval_data_split: str = "test"
    streaming: bool = False


@dataclass(frozen=True)
class SPDConfig:
    """The fields of an SPD run's ``final_config.yaml`` that qkcheck uses."""

    path: Path
    pretrained_model_class: str
    pretrained_model_name: str | None
    pretrained_model_path: str | None
    module_info: tuple[ModulePattern, ...]
    ci_config: CIConfig
    sigmoid_type: str
    tokenizer_name: str | None
    task_config: TaskConfig | None
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def pretrained_reference(self) -> str | None:
        """Where the target model comes from: ``pretrained_model_name``, else ``_path``."""
        return self.pretrained_model_name or self.pretrained_model_path


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
    data = _migrate(dict(raw), path)
    f = _Fields(data, path)
    model_class = f.string("pretrained_model_class")
    if model_class.startswith("simple_stories_train.models."):
        model_class = model_class.replace("simple_stories_train.models.", "spd.pretrain.models.", 1)
    modules = f.module_info("module_info", identity=False)
    if data.get("identity_module_info") is not None:
        modules += f.module_info("identity_module_info", identity=True)
    task = data.get("task_config")
    return SPDConfig(
        path=path,
        pretrained_model_class=model_class,
        pretrained_model_name=f.string("pretrained_model_name", None),
        pretrained_model_path=f.string("pretrained_model_path", None),
        module_info=modules,
        ci_config=_parse_ci_config(f.mapping("ci_config"), path),
        sigmoid_type=f.string("sigmoid_type", "leaky_hard"),
        tokenizer_name=f.string("tokenizer_name", None),
        task_config=_parse_task(task, path) if isinstance(task, Mapping) else None,
        raw=raw,
    )


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


# --- helpers --------------------------------------------------------------------------------


def _migrate(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """spd's deprecated-field migrations (``Config.handle_deprecated_config_keys``)."""
    if "C" in data or "target_module_patterns" in data:
        f = _Fields(data, path)
        c = f.positive_int("C")
        patterns = f.str_list("target_module_patterns")
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
    return data


def _parse_ci_config(raw: Mapping[str, Any], path: Path) -> CIConfig:
    # Types only: which fn_type and sigmoid qkcheck can evaluate is decided where CI is
    # computed (qkcheck.ci), so a run whose CI qkcheck lacks still loads for weighted mode.
    f = _Fields(raw, path, "ci_config.")
    dims = f.int_list("hidden_dims", None)
    extra = {k: v for k, v in raw.items() if k not in ("mode", "fn_type", "hidden_dims")}
    return CIConfig(
        f.string("mode", "layerwise"),
        f.string("fn_type"),
        tuple(dims) if dims is not None else None,
        extra,
    )


def _parse_task(raw: Mapping[str, Any], path: Path) -> TaskConfig:
    f = _Fields(raw, path, "task_config.")
    d = TaskConfig()
    return TaskConfig(
        task_name=f.string("task_name", d.task_name),
        dataset_name=f.string("dataset_name", d.dataset_name),
        column_name=f.string("column_name", d.column_name),
        max_seq_len=f.positive_int("max_seq_len", d.max_seq_len),
        is_tokenized=f.boolean("is_tokenized", d.is_tokenized),
        train_data_split=f.string("train_data_split", d.train_data_split),
        eval_data_split=f.string("eval_data_split", d.eval_data_split),
        streaming=f.boolean("streaming", d.streaming),
    )


class _Fields:
    """Typed access to a config mapping; errors name the file, the field and the value."""

    def __init__(self, data: Mapping[str, Any], path: Path, prefix: str = "") -> None:
        self.data, self.path, self.prefix = data, path, prefix

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key, default)
        if value is _MISSING:
            raise ConfigError(f"{self.path}: required field '{self.prefix}{key}' is missing")
        return value

    def _bad(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(
            f"{self.path}: field '{self.prefix}{key}' must be {expected}, got {value!r}"
        )

    def string(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        required = default is _MISSING
        if (value is not None or required) and not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def positive_int(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._bad(key, "a positive integer", value)
        return value

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self._get(key, _MISSING)
        if not isinstance(value, Mapping):
            raise self._bad(key, "a mapping", value)
        return value

    def str_list(self, key: str) -> list[str]:
        value = self._get(key, _MISSING)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings", value)
        return value

    def int_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is None:
            return None
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        )
        if not ok:
            raise self._bad(key, "a list of non-negative integers", value)
        return value

    def module_info(self, key: str, identity: bool) -> tuple[ModulePattern, ...]:
        value = self._get(key, _MISSING)
        if not isinstance(value, list) or not value:
            raise self._bad(key, "a non-empty list of {module_pattern, C} entries", value)
        entries = []
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping):
                raise self._bad(f"{key}[{i}]", "a mapping {module_pattern, C}", entry)
            f = _Fields(entry, self.path, f"{self.prefix}{key}[{i}].")
            entries.append(ModulePattern(f.string("module_pattern"), f.positive_int("C"), identity))
        return tuple(entries)
