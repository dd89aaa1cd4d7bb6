"""Input capture: content-addressed (each distinct tensor once), capped, and retention."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lossd.client import AuditClient, LossClient
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.server.app import RunningServer, create_server
from lossd.server.config import ServerConfig
from tests.support.auditkit import sql


def call(client: LossClient, logits: torch.Tensor, target: torch.Tensor, step: int) -> None:
    request = build_request(
        "cross_entropy", {}, [logits, target], {}, audit=pb.AuditContext(run_id="cap", step=step)
    )
    assert client.compute(request).audited


@contextmanager
def capturing(db: str, **settings: Any) -> Iterator[tuple[RunningServer, LossClient, str]]:
    """A server capturing inputs into ``db``, and a client of it."""
    running = create_server(
        ServerConfig(port=0, device="cpu", audit_db=db, audit_capture="inputs", **settings)
    )
    endpoint = f"127.0.0.1:{running.port}"
    client = LossClient(endpoint, timeout=30)
    try:
        yield running, client, endpoint
    finally:
        client.close()
        running.stop(0)


def test_each_distinct_input_is_stored_once_and_retention_deletes_unused_ones(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "a.sqlite3")
    with capturing(db, audit_retention_days=1.0) as (running, client, endpoint):
        target = torch.tensor([0, 1, 2, 0])
        for step in range(3):  # the same target each step, new logits
            call(client, torch.randn(4, 3), target, step)
        assert sql(db, "SELECT COUNT(*) FROM audit_blobs")[0][0] == 4  # 3 logits + 1 target
        assert running.audit.apply_retention(now_ns=time.time_ns()) == 0  # all used today
        deleted = running.audit.apply_retention(now_ns=time.time_ns() + 2 * 86400 * 10**9)
        assert deleted == 4 and sql(db, "SELECT COUNT(*) FROM audit_blobs")[0][0] == 0
        with AuditClient(endpoint) as reader:
            outcomes = [m.result for m in reader.verify("cap")]
        assert {o.status for o in outcomes} == {pb.VERIFY_STATUS_INPUT_MISMATCH}
        assert all("missing from the store" in o.message for o in outcomes)
        # Records are never deleted by retention.
        assert sql(db, "SELECT COUNT(*) FROM audit_records")[0][0] == 3


def test_past_the_cap_inputs_are_recorded_by_digest_only(tmp_path: Path) -> None:
    db = str(tmp_path / "a.sqlite3")
    with capturing(db, audit_capture_max_mb=0) as (running, client, endpoint):
        call(client, torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 0)
        assert running.audit.stats()["capture_skipped"] == 2
        assert "lossd_audit_capture_skipped_total 2.0" in running.metrics.exposition().decode()
        with AuditClient(endpoint) as reader:
            (record,) = reader.records("cap")
            (result,) = [m.result for m in reader.verify("cap")]
        assert [i["captured"] for i in record["inputs"]] == [False, False] and all(
            len(i["sha256"]) == 64 for i in record["inputs"]
        )
        assert (
            result.status == pb.VERIFY_STATUS_NOT_CAPTURED
        )  # integrity checked, nothing to recompute


def test_an_input_whose_blob_vanished_is_recorded_as_not_captured_then_stored_again(
    tmp_path: Path,
) -> None:
    """Another replica's retention (or a failed write) removed a blob this server believes stored:
    the next record says the input is not captured (no claim without evidence), and the server
    stores it again on the following call."""
    db = str(tmp_path / "a.sqlite3")
    with capturing(db) as (running, client, endpoint):
        logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        call(client, logits, target, 0)
        sql(db, "DELETE FROM audit_blobs")
        call(client, logits, target, 1)
        with AuditClient(endpoint) as reader:
            assert [m.result.status for m in reader.verify("cap")] == [
                pb.VERIFY_STATUS_INPUT_MISMATCH,
                pb.VERIFY_STATUS_NOT_CAPTURED,
            ]
        call(client, logits, target, 2)
        with AuditClient(endpoint) as reader:
            records = list(reader.records("cap"))
            statuses = [m.result.status for m in reader.verify("cap")]
        assert [[i["captured"] for i in r["inputs"]] for r in records] == [
            [True, True],
            [False, False],
            [True, True],
        ]
        # Content addressing: storing the tensor again restores the evidence of steps 0 and 1
        # (step 1's record says not captured, but its input digests authenticate the tensors).
        assert statuses == [pb.VERIFY_STATUS_OK] * 3
