"""``lossd.v1.AuditService``: list runs, stream records, re-verify. Read-only over the store.

A separate gRPC service from LossService so an interceptor can gate every method under
``/lossd.v1.AuditService/`` with the audit-read role (server/security.py). Errors go through
the one mapping in server/service.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import grpc
import torch

from lossd.client._proto import lossd_pb2 as pb
from lossd.client._proto import lossd_pb2_grpc as pb_grpc
from lossd.client.wire import codec

from ..errors import FailedPrecondition, InvalidArgument, Unavailable
from ..service import handles_errors, handles_stream_errors, unary_handler
from .chain import ChainWalk, Report, newest_signed
from .records import UNKNOWN, Row, value_scalar
from .signing import (
    Checkpoint,
    Signer,
    checkpoint_message,
    checkpoint_of,
    public_pem,
    raw_public,
    sign_and_store,
)
from .store import Selector, Store
from .verify import (
    CHAIN_BROKEN,
    DEVIATION,
    ERROR,
    INPUT_MISMATCH,
    NOT_CAPTURED,
    OK,
    RECORD_ALTERED,
    Outcome,
    Verifier,
)

AUDIT_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AuditService"].full_name

_STATUS = {
    OK: pb.VERIFY_STATUS_OK,
    DEVIATION: pb.VERIFY_STATUS_DEVIATION,
    INPUT_MISMATCH: pb.VERIFY_STATUS_INPUT_MISMATCH,
    RECORD_ALTERED: pb.VERIFY_STATUS_RECORD_ALTERED,
    NOT_CAPTURED: pb.VERIFY_STATUS_NOT_CAPTURED,
    ERROR: pb.VERIFY_STATUS_ERROR,
    CHAIN_BROKEN: pb.VERIFY_STATUS_CHAIN_BROKEN,
}


def selector(sel: pb.AuditSelector) -> Selector:
    """An empty run id selects the calls recorded under --audit all without a run."""
    return Selector(
        run_id=sel.run_id,
        step_min=sel.step_min if sel.HasField("step_min") else None,
        step_max=sel.step_max if sel.HasField("step_max") else None,
        loss=sel.loss,
    )


def to_message(row: Row) -> pb.AuditRecord:
    record = pb.AuditRecord(
        id=row.id,
        request_id=row.request_id,
        run_id=row.run_id,
        # None leaves an optional field unset: unknown stays unknown on the wire.
        step=None if row.step == UNKNOWN else row.step,
        rank=None if row.rank == UNKNOWN else row.rank,
        micro_batch=None if row.micro_batch == UNKNOWN else row.micro_batch,
        tags=json.loads(row.tags),
        time_unix_ns=row.recorded_at_ns,
        peer=row.peer,
        principal=row.principal,
        loss=row.loss,
        params_json=row.params,
        call_json=row.call,
        lossd_version=row.lossd_version,
        torch_version=row.torch_version,
        device=row.device,
        dtype=row.dtype,
        value_json=row.value,
        value=value_scalar(row.value),
        components={k: float(v) for k, v in json.loads(row.components).items()},
        grad_norms={k: float(v) for k, v in json.loads(row.grad_norms).items()},
        non_finite=row.non_finite,
        timings=pb.Timings(
            decode_ns=row.decode_ns, compute_ns=row.compute_ns, encode_ns=row.encode_ns
        ),
        record_sha256=row.record_sha256,
        session=row.session,
        seq=row.seq,
        prev_sha256=row.prev_sha256,
        capture=row.capture,
    )
    for i in json.loads(row.inputs):
        record.inputs.add(
            path=i["path"],
            dtype=codec.wire_dtype(getattr(torch, i["dtype"])),
            shape=i["shape"],
            sha256=i["sha256"],
            captured=i["captured"],
        )
    return record


def chain_message(report: Report) -> pb.AuditChainReport:
    return pb.AuditChainReport(
        records=report.records,
        head_sha256=report.head_sha256,
        broken_links=report.broken_links,
        problems=report.problems,
        signed_records=report.signed_records,
        checkpoint_extended=report.checkpoint_extended,
        unchained_records=report.unchained_records,
    )


def _extent(summary: Any) -> dict[str, int]:
    """The record count and the step and time ranges a run's summary and each of its sessions
    report alike (AuditRun, AuditSession)."""
    return {
        "records": summary.records,
        "first_step": summary.first_step,
        "last_step": summary.last_step,
        "first_time_unix_ns": summary.first_time_ns,
        "last_time_unix_ns": summary.last_time_ns,
    }


class AuditServicer(pb_grpc.AuditServiceServicer):
    def __init__(
        self, store: Store, signer: Signer | None = None, recorder: Any = None, bounded: Any = None
    ) -> None:
        self.store = store
        self.signer = signer
        self.recorder = recorder  # signs through it, so its checkpoint counter sees them
        self.verifier = Verifier(store, bounded)  # bounded: LossServicer.bounded (slots, budget)

    @handles_errors
    def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.ServicerContext
    ) -> pb.ListRunsResponse:
        if request.limit < 0:
            raise InvalidArgument.expected("limit", ">= 0", request.limit)
        response = pb.ListRunsResponse()
        for r in self.store.list_runs(request.limit):
            response.runs.add(
                run_id=r.run_id,
                losses=list(r.losses),
                sessions=[pb.AuditSession(session=s.session, **_extent(s)) for s in r.sessions],
                **_extent(r),
            )
        return response

    @handles_stream_errors
    def GetRecords(
        self, request: pb.GetRecordsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetRecordsResponse]:
        sel = selector(request.selector)
        with self.store.reader() as conn:
            total = self.store.count(sel, conn)
            for row in self.store.records(sel, conn):
                yield pb.GetRecordsResponse(record=to_message(row), total=total)

    @handles_stream_errors
    def VerifyRun(
        self, request: pb.VerifyRunRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.VerifyRunResponse]:
        if not (request.tolerance >= 0 and math.isfinite(request.tolerance)):
            raise InvalidArgument.expected("tolerance", "a finite number >= 0", request.tolerance)
        sel = selector(request.selector)
        given = checkpoint_of(request.checkpoint) if request.HasField("checkpoint") else None
        with self.store.reader() as conn:
            total = self.store.count(sel, conn)
            yield from self._verified(sel, request.tolerance, total, conn, given)

    def _verified(
        self, sel: Selector, tolerance: float, total: int, conn: Any, given: Checkpoint | None
    ) -> Iterator[pb.VerifyRunResponse]:
        done = 0
        for found in self.verifier.verify_run(sel, tolerance, conn, self.signer, given):
            if isinstance(found, Report):
                yield pb.VerifyRunResponse(chain=chain_message(found), done=done, total=total)
                return
            outcome: Outcome = found
            row = outcome.row
            done += sel.matches(row)
            yield pb.VerifyRunResponse(
                result=pb.VerifyResult(
                    record_id=row.id,
                    request_id=row.request_id,
                    step=row.step,
                    loss=row.loss,
                    status=_STATUS[outcome.status],
                    max_rel_dev_float64=outcome.dev_float64,
                    max_rel_dev_device=outcome.dev_device,
                    tolerance=outcome.tolerance,
                    message=outcome.message,
                    sampled=bool(row.capture),
                    seq=row.seq,
                    session=row.session,
                ),
                done=done,
                total=total,
            )

    @handles_errors
    def Checkpoint(
        self, request: pb.CheckpointRequest, context: grpc.ServicerContext
    ) -> pb.CheckpointResponse:
        """Walk the run's whole chain; sign its head only when every link holds and it extends
        the newest checkpoint this key signed (never legitimise a tampered store)."""
        if self.signer is None:
            raise Unavailable("this server holds no audit signing key")
        run_id = request.run_id
        with self.store.reader() as conn:
            walk = ChainWalk(
                run_id, newest_signed(self.store.checkpoints(run_id, conn), self.signer)
            )
            first = ""
            for row in self.store.chain(run_id, conn):
                problem = walk.link(row)
                if not first and (problem or row.digest() != row.record_sha256):
                    first = problem or f"record {row.id} (seq {row.seq}) was edited"
            report = walk.finish(self.store.chain_head(run_id, conn))
        if report.records == 0:
            raise FailedPrecondition(f"no chained records for run {run_id!r}: nothing to sign")
        if first or report.problems:
            raise FailedPrecondition(
                f"run {run_id!r}: the stored chain is broken, not signing it: "
                + "; ".join([first] if first else report.problems)
            )
        if self.recorder is not None:  # counts it among the checkpoints the server signed
            cp = self.recorder.store_checkpoint(run_id, report.records, report.head_sha256)
        else:  # a read-only replica (--audit none --audit-db ...) signs with its own key
            cp = sign_and_store(self.store, self.signer, run_id, report.records, report.head_sha256)
        return pb.CheckpointResponse(checkpoint=checkpoint_message(cp))

    @handles_errors
    def GetPublicKey(
        self, request: pb.GetPublicKeyRequest, context: grpc.ServicerContext
    ) -> pb.GetPublicKeyResponse:
        if self.signer is None:
            raise Unavailable("this server holds no audit signing key")
        return pb.GetPublicKeyResponse(
            key_id=self.signer.key_id,
            public_key=raw_public(self.signer.public),
            public_key_pem=public_pem(self.signer.public),
        )


def audit_method_handlers(servicer: AuditServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        AUDIT_SERVICE_NAME,
        {
            "ListRuns": unary_handler(servicer.ListRuns, pb.ListRunsRequest, pb.ListRunsResponse),
            "GetRecords": unary_handler(
                servicer.GetRecords, pb.GetRecordsRequest, pb.GetRecordsResponse, stream=True
            ),
            "VerifyRun": unary_handler(
                servicer.VerifyRun, pb.VerifyRunRequest, pb.VerifyRunResponse, stream=True
            ),
            "Checkpoint": unary_handler(
                servicer.Checkpoint, pb.CheckpointRequest, pb.CheckpointResponse
            ),
            "GetPublicKey": unary_handler(
                servicer.GetPublicKey, pb.GetPublicKeyRequest, pb.GetPublicKeyResponse
            ),
        },
    )
