"""The error family carries the field it is about as data, across processes too."""

from __future__ import annotations

import pickle

import pytest

from qkcheck.errors import ConfigError, QKCheckError, UnsupportedError
from qkcheck.merge import MergeError
from qkcheck.settings import OptionError


@pytest.mark.parametrize(
    "cls", [QKCheckError, ConfigError, UnsupportedError, MergeError, OptionError]
)
def test_an_error_keeps_its_message_and_field_through_pickling(cls: type[QKCheckError]) -> None:
    error = cls("sigmoid_type 'x' is not supported", field="sigmoid_type")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert (str(back), back.field) == ("sigmoid_type 'x' is not supported", "sigmoid_type")
    assert pickle.loads(pickle.dumps(cls("plain"))).field is None
