"""Hypothesis profiles of the reliability suite, and each test's share of the budget.

``ci`` (default): a fixed, derandomized budget; ``long`` (``LOSSD_LONG=1`` or
``HYPOTHESIS_PROFILE=long``): 25x the examples, freshly random. Importing this module loads the
profile, so a test module's ``@settings(max_examples=examples(w))`` sees it at import time.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # the time is the server's, not hypothesis's to judge
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    database=None,  # no state left behind in the checkout
    print_blob=True,  # a failing case is reproducible with @reproduce_failure
)
settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=2500, **_COMMON)
LONG = os.environ.get("LOSSD_LONG") == "1"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "long" if LONG else "ci"))


def examples(weight: float) -> int:
    """A test's share of the current profile's budget."""
    return max(1, int(settings.default.max_examples * weight))
