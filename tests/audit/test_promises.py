"""What ``audited=true`` promises, kept against a hostile or careless caller (issue 12), on
SQLite and PostgreSQL: a reused request id, a request id the store cannot hold, a record too
large to read back, and verification bounded like any other computation."""

from __future__ import annotations

import threading
import time

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


def test_an_oversized_parameter_record_is_bounded_readable_and_verifiable(audit_db):
    from lossd.client import AuditClient
    from lossd.server.audit.records import MAX_FIELD_CHARS

    classes = 20_000  # class_weight: 20,000 floats, ~400 KB of JSON
    weight = torch.rand(classes, dtype=torch.float64).tolist()
    score = torch.randn(2, classes, dtype=torch.float64)
    label = torch.tensor([1, 7])
    request = build_request("CrossEntropyLoss", {"class_weight": weight}, (score, label), {})
    request.audit.run_id, request.audit.step = "big-params", 0
    after = _call("after-it", torch.ones(4), step=1)
    after.audit.run_id = "big-params"
    settings = dict(audit="runs", audit_db=audit_db, audit_capture="all", metrics_port=-1)
    with running(**settings) as server:
        target = f"127.0.0.1:{server.port}"
        client = LossClient(target, timeout=60, retries=0)
        try:
            assert client.compute(request).audited
            assert client.compute(after).audited
        finally:
            client.close()
        with AuditClient(target, timeout=60) as audit:
            records = list(audit.raw_records("big-params"))
            assert [r.request_id for r, _ in records] == [request.request_id, after.request_id]
            big = records[0][0]
            assert len(big.params_json) < MAX_FIELD_CHARS, "the record is not bounded"
            assert "oversized" in big.params_json and "sha256" in big.params_json
            assert big.ByteSize() < 4 * MAX_FIELD_CHARS
            results = list(audit.verify("big-params"))
        assert len(results) == 2
        assert "too large to store" in results[0].result.message, results[0]


def test_verify_run_recomputations_are_bounded_by_the_workers(audit_db, monkeypatch):
    from lossd.client import AuditClient
    from lossd.server.engine import Engine

    running_now, peak, lock = [0], [0], threading.Lock()
    evaluate = Engine.evaluate

    def counted(self, *args, **kwargs):
        with lock:
            running_now[0] += 1
            peak[0] = max(peak[0], running_now[0])
        try:
            time.sleep(0.05)  # long enough for concurrent verifies to overlap
            return evaluate(self, *args, **kwargs)
        finally:
            with lock:
                running_now[0] -= 1

    settings = dict(audit="runs", audit_db=audit_db, audit_capture="all", workers=1)
    with running(metrics_port=-1, **settings) as server:
        target = f"127.0.0.1:{server.port}"
        client = LossClient(target, timeout=60, retries=0)
        try:
            for step in range(3):
                assert client.compute(_call(f"v-{step}", torch.randn(16), step)).audited
        finally:
            client.close()
        monkeypatch.setattr(Engine, "evaluate", counted)
        errors: list = []

        def verify() -> None:
            try:
                with AuditClient(target, timeout=60) as audit:
                    assert len(list(audit.verify("promises"))) == 3
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=verify) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
    assert peak[0] == 1, f"{peak[0]} recomputations ran at once with --workers 1"
