"""Fixtures of the operations tests live in opskit.py (importable by the tests as well)."""

from opskit import pki, tokens_file  # noqa: F401
