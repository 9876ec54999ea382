"""The validation suite needs a run (``--run-id``); everything else is the qkcheck plugin."""

from qkcheck.pytest_plugin import require_run_id


def pytest_configure(config):
    require_run_id(config)
