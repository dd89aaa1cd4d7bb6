"""Fixtures and settings of the reliability suite: hostile input, sustained load, faults.

Hypothesis profiles (``HYPOTHESIS_PROFILE``; tests/support/budget.py):

- ``ci`` (default): a fixed, derandomized budget of about 2,800 generated requests (the
  suite asserts at least 2,000), under a minute on two cores;
- ``long``: 25x the examples, freshly random (about 65,000 requests; the suite asserts at
  least 50,000), with no per-test timeout; ``LOSSD_LONG=1`` selects it:
  ``LOSSD_LONG=1 .venv/bin/python -m pytest -p no:cacheprovider -s tests/reliability/test_hostile.py``.

The servers here are real ``lossd serve`` subprocesses (``tests/support/serverproc.py``), so a crash is
seen as a crash and the server's memory is measured on its own process.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.support.budget import LONG
from tests.support.opskit import tokens_file  # noqa: F401  (a fixture of test_hardening)
from tests.support.serverproc import ServerProcess


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hostile: the generated hostile-input suite (tests/reliability/test_hostile.py)"
    )
    config.addinivalue_line("markers", "faults: crash, restart, disconnect and disk-fault tests")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if LONG:  # tens of thousands of requests per test: the suite-wide 300 s timeout is for CI
        for item in items:
            if "reliability" in str(item.path):
                item.add_marker(pytest.mark.timeout(0))


@pytest.fixture(scope="module")
def lossd_process(
    device: torch.device, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A ``lossd serve`` subprocess on the device under test, auditing nothing (module-wide)."""
    data = tmp_path_factory.mktemp("lossd-data")
    proc = ServerProcess(
        "--device",
        str(device),
        "--workers",
        "4",
        "--data-dir",
        str(data),
        "--audit",
        "none",
        "--log-level",
        "WARNING",
    )
    with proc:
        yield proc
