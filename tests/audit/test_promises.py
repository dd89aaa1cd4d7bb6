"""What ``audited=true`` promises, kept against a hostile or careless caller (issue 12), on
SQLite and PostgreSQL: a reused request id, a request id the store cannot hold, a record too
large to read back, and verification bounded like any other computation."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from tests.support.auditkit import sql
from tests.support.opskit import running


def _call(request_id: str, x: torch.Tensor, step: int = 0) -> pb.ComputeRequest:
    request = build_request("mse", {}, (x, torch.zeros_like(x)), {}, ["args[0]"])
    request.request_id = request_id
    request.audit.run_id = "promises"
    request.audit.step = step
    return request


def test_a_reused_request_id_never_gives_a_false_audited(audit_db):
    with running(audit="runs", audit_db=audit_db, metrics_port=-1) as server:
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30, retries=0)
        try:
            first = _call("rid-shared", torch.ones(4))
            assert client.compute(first).audited
            # A retry (same id, same call) is the same record: audited, not stored twice.
            assert client.compute(_call("rid-shared", torch.ones(4))).audited
            # Another call under the same id is refused, naming the id: it was not recorded.
            with pytest.raises(LossdError) as caught:
                client.compute(_call("rid-shared", torch.full((4,), 2.0)))
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "rid-shared" in caught.value.details and caught.value.field == "request_id"
            # Two different calls racing with one new id: one is audited, the other refused.
            outcomes: list = []

            def send(value: float) -> None:
                try:
                    outcomes.append(
                        client.compute(_call("rid-race", torch.full((4,), value))).audited
                    )
                except LossdError as error:
                    outcomes.append(error.code)

            threads = [threading.Thread(target=send, args=(v,)) for v in (3.0, 4.0)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(map(str, outcomes)) == sorted(
                map(str, [True, grpc.StatusCode.FAILED_PRECONDITION])
            ), outcomes
        finally:
            client.close()
        rows = sql(audit_db, "SELECT request_id FROM audit_records ORDER BY request_id")
        assert [r[0] for r in rows] == ["rid-race", "rid-shared"]


def test_a_nul_in_the_request_id_is_invalid_argument(audit_db):
    with running(audit="runs", audit_db=audit_db, metrics_port=-1) as server:
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30, retries=0)
        try:
            with pytest.raises(LossdError) as caught:
                client.compute(_call("bad\x00id", torch.ones(4)))
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert caught.value.field == "request_id"
            assert client.compute(_call("good-id", torch.ones(4))).audited  # still recording
        finally:
            client.close()
