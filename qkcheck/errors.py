"""One exception family for everything a user can get wrong.

Every message names the thing (file, field, option), its value, and the rule it broke.
"""

from __future__ import annotations


class QKCheckError(Exception):
    """Base class: any error qkcheck raises on purpose.

    ``field`` names the config field (e.g. ``"sigmoid_type"``) or option the error is about,
    when there is one, as data: a caller that adds context reads it here, never back out of
    the message text. It survives pickling (pytest-xdist workers send errors across).
    """

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple:
        return (_rebuild, (type(self), str(self), self.field))


def _rebuild(cls: type[QKCheckError], message: str, field: str | None) -> QKCheckError:
    return cls(message, field=field)


class RunNotFoundError(QKCheckError):
    """A run reference could not be resolved to files on disk."""


class CheckpointError(QKCheckError):
    """A checkpoint file is missing, unreadable, or does not match its config."""


class ConfigError(QKCheckError):
    """A YAML config is malformed or lacks a needed field."""


class UnsupportedError(QKCheckError):
    """A model class, CI function type or option value qkcheck does not implement."""


class SamplesError(QKCheckError):
    """Samples are unreadable, too long for the model, or out of vocabulary."""
