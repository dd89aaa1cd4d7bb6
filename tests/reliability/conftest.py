"""Fixtures and settings of the reliability suite: hostile input, sustained load, faults.

Hypothesis profiles (``HYPOTHESIS_PROFILE``):

- ``ci`` (default): a fixed, derandomized budget of about 2,800 generated requests (the
  suite asserts at least 2,000), under a minute on two cores;
- ``long``: 25x the examples, freshly random (about 65,000 requests; the suite asserts at
  least 50,000), with no per-test timeout; ``LOSSD_LONG=1`` selects it:
  ``LOSSD_LONG=1 .venv/bin/python -m pytest -p no:cacheprovider -s tests/reliability/test_hostile.py``.

The servers here are real ``lossd serve`` subprocesses (``tests/serverproc.py``), so a crash is
seen as a crash and the server's memory is measured on its own process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/serverproc.py

from serverproc import ServerProcess  # noqa: E402

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


def examples(weight: float) -> int:
    """A test's share of the current profile's budget."""
    return max(1, int(settings.default.max_examples * weight))


def health_status(address: str, timeout: float = 10.0) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(
            health_pb2.HealthCheckRequest(service="lossd.v1.LossService"), timeout=timeout
        ).status


def serving(address: str) -> bool:
    try:
        return health_status(address) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


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
