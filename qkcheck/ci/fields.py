"""Typed reads of ``ci_config`` fields; errors name the file and the field, as the config
reader's do (``<file>: field 'ci_config.<path>' must be …, got …``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qkcheck.errors import ConfigError

_MISSING = object()


class CIFields:
    """Fields of one mapping inside ``ci_config``; ``prefix`` is its path (``"ci_config."``)."""

    def __init__(self, data: Mapping[str, Any], where: str, prefix: str = "ci_config.") -> None:
        self.data, self.where, self.prefix = data, where, prefix

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise ConfigError(f"{self.where}: required field '{self.prefix}{key}' is missing")
            return default
        return value

    def bad(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(
            f"{self.where}: field '{self.prefix}{key}' must be {expected}, got {value!r}"
        )

    def positive_int(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.bad(key, "a positive integer", value)
        return value

    def number(self, key: str, default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.bad(key, "a positive number", value)
        return float(value)

    def int_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        )
        if not ok:
            raise self.bad(key, "a list of non-negative integers", value)
        return list(value)

    def string(self, key: str) -> str:
        value = self._get(key, _MISSING)
        if not isinstance(value, str):
            raise self.bad(key, "a string", value)
        return value

    def str_list(self, key: str) -> list[str]:
        value = self._get(key, _MISSING)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.bad(key, "a non-empty list of strings", value)
        return value

    def optional_mapping(self, key: str) -> CIFields | None:
        """The nested mapping at ``key``, or None when it is absent or null."""
        if self.data.get(key) is None:
            return None
        return self.mapping(key)

    def mapping(self, key: str) -> CIFields:
        """The required nested mapping at ``key``."""
        value = self._get(key, _MISSING)
        if not isinstance(value, Mapping):
            raise self.bad(key, "a mapping", value)
        return CIFields(value, self.where, f"{self.prefix}{key}.")

    def items(self, key: str) -> list[CIFields]:
        """The non-empty list of mappings at ``key``."""
        value = self._get(key, _MISSING)
        if not isinstance(value, list) or not value:
            raise self.bad(key, "a non-empty list of mappings", value)
        out = []
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping):
                raise self.bad(f"{key}[{i}]", "a mapping", entry)
            out.append(CIFields(entry, self.where, f"{self.prefix}{key}[{i}]."))
        return out
