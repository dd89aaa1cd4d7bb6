"""LossClient's unary retry policy (client/connection.py): UNAVAILABLE and server-CANCELLED are
tried again with backoff, within the deadline and the retry count, with the same request; any
other failure is raised at once. The clock is a fake one: nothing here depends on timing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from lossd.client import connection
from lossd.client.connection import MAX_BACKOFF_S, LossClient
from lossd.client.errors import LossdError


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"failed {self._code.name}"


class _Rpc:
    """Fails with ``codes`` in turn, then answers; records what each try was given."""

    def __init__(self, codes: list[grpc.StatusCode], clock: list[float]) -> None:
        self.codes = list(codes)
        self.tries: list[tuple[Any, float | None, Any, float]] = []
        self.clock = clock

    def __call__(self, request: Any, *, timeout: float | None, metadata: Any) -> bytes:
        self.tries.append((request, timeout, metadata, self.clock[0]))
        if self.codes:
            raise _Failure(self.codes.pop(0))
        return b"answer"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake monotonic clock that only ``sleep`` moves."""
    now = [100.0]

    def sleep(seconds: float) -> None:
        assert 0 < seconds <= MAX_BACKOFF_S * 1.5
        now[0] += seconds

    monkeypatch.setattr(connection, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=sleep))
    return now


def _client(**options: Any) -> LossClient:
    return LossClient("127.0.0.1:1", token="t", **options)  # never reached: rpc is ours


def test_unavailable_and_cancelled_are_retried_with_the_same_request_until_an_answer(clock):
    client = _client(timeout=60.0)
    rpc = _Rpc([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED], clock)
    assert client._invoke(rpc, b"request", "rid") == b"answer"
    assert [request for request, *_ in rpc.tries] == [b"request"] * 3
    assert {metadata for _, _, metadata, _ in rpc.tries} == {(("authorization", "Bearer t"),)}
    # Each try gets what is left of one deadline, set when the call began.
    for _, timeout, _, at in rpc.tries:
        assert timeout == pytest.approx(60.0 - (at - 100.0))
    assert rpc.tries[1][3] > rpc.tries[0][3] and rpc.tries[2][3] > rpc.tries[1][3]


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN]
)
def test_any_other_failure_is_raised_at_once_as_a_lossd_error_with_the_request_id(clock, code):
    client = _client(timeout=60.0)
    rpc = _Rpc([code], clock)
    with pytest.raises(LossdError) as raised:
        client._invoke(rpc, b"request", "rid")
    assert raised.value.code == code and raised.value.request_id == "rid"
    assert len(rpc.tries) == 1 and clock[0] == 100.0


@pytest.mark.parametrize(
    ("retries", "timeout", "tries"), [(0, 60.0, 1), (2, 60.0, 3), (None, None, 5)]
)
def test_retries_stop_at_the_count_given_or_four_without_a_deadline(clock, retries, timeout, tries):
    client = _client(timeout=timeout, retries=retries)
    rpc = _Rpc([grpc.StatusCode.UNAVAILABLE] * 10, clock)
    with pytest.raises(LossdError) as raised:
        client._invoke(rpc, b"request", "rid")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and raised.value.request_id == "rid"
    assert len(rpc.tries) == tries
    if timeout is None:
        assert {timeout for _, timeout, _, _ in rpc.tries} == {None}


def test_retries_never_outlast_the_deadline(clock):
    client = _client(timeout=5.0)
    rpc = _Rpc([grpc.StatusCode.UNAVAILABLE] * 100, clock)
    with pytest.raises(LossdError) as raised:
        client._invoke(rpc, b"request", "rid")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert 3 < len(rpc.tries) < 100
    assert all(0 < timeout <= 5.0 for _, timeout, _, _ in rpc.tries)
    assert clock[0] < 105.0  # no sleep past the deadline
