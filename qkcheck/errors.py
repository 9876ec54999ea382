"""One exception family for everything a user can get wrong.

Every message names the thing (file, field, option), its value, and the rule it broke.
"""

from __future__ import annotations


class QKCheckError(Exception):
    """Base class: any error qkcheck raises on purpose."""


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
