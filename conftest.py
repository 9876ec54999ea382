"""Root pytest configuration: hypothesis profiles and the qkcheck plugin.

The qkcheck plugin (options, parametrization, artifacts) is registered as a ``pytest11``
entry point, so an installed qkcheck provides it everywhere; nothing else lives here.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "ci": deterministic examples, no deadline (shared 2-core machines are noisy).
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
