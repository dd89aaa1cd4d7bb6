"""The full-queue policy: block up to --audit-queue-timeout-s, then UNAVAILABLE; counted."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.server.app import create_server
from lossd.server.audit.store import Selector
from lossd.server.config import ServerConfig


def request(step: int) -> pb.ComputeRequest:
    return build_request(
        "cross_entropy",
        {},
        [torch.randn(2, 3), torch.tensor([0, 2])],
        {},
        audit=pb.AuditContext(run_id="queue", step=step),
    )


def test_a_full_queue_blocks_then_refuses_unavailable_and_counts_it(tmp_path: Path) -> None:
    running = create_server(
        ServerConfig(
            port=0,
            device="cpu",
            workers=4,
            audit_db=str(tmp_path / "a.sqlite3"),
            audit_queue_size=1,
            audit_queue_timeout_s=0.3,
        )
    )
    store = running.audit.store
    release, writing = threading.Event(), threading.Event()
    original = store.write

    def stalled(batch):  # a store that has stopped answering (a locked or slow database)
        writing.set()
        release.wait(60)
        return original(batch)

    store.write = stalled
    endpoint = f"127.0.0.1:{running.port}"
    results: dict[int, object] = {}

    def call(step: int) -> None:
        client = LossClient(endpoint, timeout=60, retries=0)
        try:
            results[step] = client.compute(request(step)).audited
        except LossdError as exc:
            results[step] = exc
        finally:
            client.close()

    try:
        first = threading.Thread(target=call, args=(0,))
        first.start()
        assert writing.wait(30)  # the writer holds record 0
        second = threading.Thread(target=call, args=(1,))
        second.start()
        while running.audit.queue.qsize() < 1:  # record 1 waits in the queue (capacity 1)
            second.join(0.01)
        call(2)  # finds the queue full: waits 0.3 s, then is refused
        refused = results[2]
        assert isinstance(refused, LossdError) and refused.code == grpc.StatusCode.UNAVAILABLE
        assert (
            "queue of 1 records stayed full" in refused.details and "a.sqlite3" in refused.details
        )
        stats = running.audit.stats()
        assert (
            stats["queue_blocked"] == 1
            and stats["records_refused"] == 1
            and stats["queue_depth"] == 1
        )
        exposition = running.metrics.exposition().decode()
        assert (
            "lossd_audit_queue_blocked_total 1.0" in exposition
            and "lossd_audit_records_refused_total 1.0" in exposition
        )
        release.set()
        first.join(30)
        second.join(30)
        assert results[0] is True and results[1] is True  # nothing waiting was dropped
    finally:
        release.set()
        running.stop(0)


@pytest.mark.parametrize("mode", ["none", "runs", "all"])
def test_which_calls_are_audited(tmp_path: Path, mode: str) -> None:
    running = create_server(
        ServerConfig(port=0, device="cpu", audit=mode, audit_db=str(tmp_path / "a.sqlite3"))
    )
    client = LossClient(f"127.0.0.1:{running.port}", timeout=30)
    try:
        with_run = client.compute(request(0)).audited
        without = client.compute(
            build_request("cross_entropy", {}, [torch.randn(2, 3), torch.tensor([0, 2])], {})
        ).audited
    finally:
        client.close()
        running.stop(0)
    assert (with_run, without) == {
        "none": (False, False),
        "runs": (True, False),
        "all": (True, True),
    }[mode]


def test_a_retried_request_id_is_one_record_and_one_count(audit_db: str) -> None:
    running = create_server(ServerConfig(port=0, device="cpu", audit_db=audit_db))
    client = LossClient(f"127.0.0.1:{running.port}", timeout=30)
    try:
        req = request(3)
        assert client.compute(req).audited and client.compute(req).audited
        stats = running.audit.stats()
        assert (stats["records_written"], stats["records_duplicate"]) == (1, 1)
    finally:
        client.close()
        running.stop(0)


def test_a_bad_audit_context_is_refused_before_anything_is_computed_or_recorded(
    tmp_path: Path,
) -> None:
    running = create_server(
        ServerConfig(port=0, device="cpu", workers=2, audit_db=str(tmp_path / "a.sqlite3"))
    )
    evaluated: list[str] = []
    original = running.engine.evaluate

    def counted(name, *args, **kwargs):
        evaluated.append(name)
        return original(name, *args, **kwargs)

    running.engine.evaluate = counted
    try:
        with LossClient(f"127.0.0.1:{running.port}", timeout=30) as client:
            bad = request(0)
            bad.audit.tags.update({f"t{i}": "v" for i in range(65)})
            with pytest.raises(LossdError) as refused:
                client.compute(bad)
            assert (
                refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
                and refused.value.field == "audit.tags"
            )
            assert evaluated == []  # refused while decoding, not after the loss ran
            assert client.compute(request(1)).audited
            assert evaluated == ["cross_entropy"]
        assert [row.step for row in running.audit.store.records(Selector("queue"))] == [1]
    finally:
        running.stop(0)
