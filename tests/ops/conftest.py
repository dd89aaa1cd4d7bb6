"""The operations tests' fixtures live in tests/support/opskit.py (the tests import its helpers too)."""

from tests.support.opskit import pki, tokens_file  # noqa: F401
