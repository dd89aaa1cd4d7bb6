"""Client side of the audit trail: run context for ``RemoteLoss``, and reading the trail.

Recording::

    with lossd.client.audit_run("exp-42", tags={"commit": "abc123"}) as run:
        for batch in loader:
            loss = crit(model(x), y)       # recorded as run exp-42, steps 0, 1, 2, ...

Reading (needs the audit-read role once the server has authentication)::

    audit = AuditClient("127.0.0.1:50051")
    for record in audit.records("exp-42"):
        print(record["step"], record["value"])

Digests: ``tensor_digest`` (from ``lossd.client.wire.audit``, shared with the server) is the
exact SHA-256 the server records for each input, so a caller can prove which tensors it sent
without storing them.
"""

from __future__ import annotations

import contextvars
import csv
import json
import math
import os
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from ._proto import lossd_pb2 as pb
from ._proto import lossd_pb2_grpc as pb_grpc
from .connection import LossClient
from .errors import LossdError, from_rpc_error
from .wire.audit import check_audit_fields, tensor_digest
from .wire.codec import dtype_name

# --------------------------------------------------------------------------------------------
# Recording context


class StepCounter:
    """A step number that counts calls until someone assigns it, and is left alone after that.

    Auto mode (the default): each call takes the current number and advances it by one.
    Manual mode (after the first ``counter.value = n``): calls use the assigned number as is,
    so several losses or micro-batches of one training step share it.
    """

    def __init__(self, start: int = 0) -> None:
        self._value = int(start)
        self.manual = False
        self._lock = threading.Lock()  # data-parallel threads may share one module

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles of RemoteLoss carry the count
        return {"_value": self._value, "manual": self.manual}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int):
            step = int(step)
        self._value = step
        self.manual = True

    def take(self) -> int:
        with self._lock:
            step = self._value
            if not self.manual:
                self._value += 1
            return step


@dataclass
class AuditRun:
    """The run that ``audit_run`` makes current: its id, tags and shared step counter."""

    run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    rank: int | None = None
    counter: StepCounter = field(default_factory=StepCounter)

    @property
    def step(self) -> int:
        """The step the next call gets. Assign it to number steps yourself (manual mode)."""
        return self.counter.value

    @step.setter
    def step(self, value: int) -> None:
        self.counter.value = value


_CURRENT_RUN: contextvars.ContextVar[AuditRun | None] = contextvars.ContextVar(
    "lossd_audit_run", default=None
)


@contextmanager
def audit_run(
    run_id: str,
    tags: Mapping[str, str] | None = None,
    *,
    rank: int | None = None,
    step: int | None = None,
) -> Iterator[AuditRun]:
    """Make ``run_id`` the audit run of every ``RemoteLoss`` call in this context.

    Calls are numbered ``step``, ``step + 1``, ... (from 0 by default) across all ``RemoteLoss``
    modules used inside (a module's own ``run_id`` takes precedence). Assign ``run.step = i`` to
    number training steps yourself.
    """
    check_audit_fields(run_id, tags)
    run = AuditRun(run_id, dict(tags or {}), rank, StepCounter(step or 0))
    token = _CURRENT_RUN.set(run)
    try:
        yield run
    finally:
        _CURRENT_RUN.reset(token)


def current_run() -> AuditRun | None:
    return _CURRENT_RUN.get()


def default_rank() -> int:
    """torch.distributed's rank when a process group is up, else -1 (unknown)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # noqa: BLE001 - the rank is a label; never fail a loss over it
        pass
    return -1


_SESSION: str | None = None


def session_id() -> str:
    """This process's attempt id, sent with every audited call: ``$LOSSD_AUDIT_SESSION`` when set
    (give every rank of one distributed job the same value), else random, once per process. The
    server records it, so a run id reused by a new process is told apart (``lossd audit runs``)."""
    global _SESSION
    if _SESSION is None or os.environ.get("LOSSD_AUDIT_SESSION"):
        _SESSION = os.environ.get("LOSSD_AUDIT_SESSION") or uuid.uuid4().hex[:16]
    return _SESSION


def make_context(
    run_id: str, step: int, rank: int | None, micro_batch: int | None, tags: Mapping[str, str]
) -> pb.AuditContext:
    rank = default_rank() if rank is None else rank
    # Unknown is left unset (proto3 presence), never sent as -1 or 0.
    return pb.AuditContext(
        run_id=run_id,
        step=step,
        rank=rank if rank >= 0 else None,
        micro_batch=micro_batch,
        tags=dict(tags),
        session=session_id() if run_id else "",
    )


# --------------------------------------------------------------------------------------------
# Reading the trail


def record_to_dict(record: pb.AuditRecord) -> dict[str, Any]:
    """A plain, JSON-ready view of one record (non-finite floats as "nan", "inf", "-inf")."""
    return {
        "id": record.id,
        "request_id": record.request_id,
        "run_id": record.run_id,
        "step": record.step if record.HasField("step") else None,
        "rank": record.rank if record.HasField("rank") else None,
        "micro_batch": record.micro_batch if record.HasField("micro_batch") else None,
        "tags": dict(sorted(record.tags.items())),
        "time_unix_ns": record.time_unix_ns,
        "peer": record.peer,
        "principal": record.principal,
        "loss": record.loss,
        "params": json.loads(record.params_json or "{}"),
        "call": json.loads(record.call_json or "{}"),
        "lossd_version": record.lossd_version,
        "torch_version": record.torch_version,
        "device": record.device,
        "dtype": record.dtype,
        "inputs": [
            {
                "path": i.path,
                "dtype": dtype_name(i.dtype),
                "shape": list(i.shape),
                "sha256": i.sha256,
                "captured": i.captured,
            }
            for i in record.inputs
        ],
        "value": _finite_or_str(record.value),
        "value_json": json.loads(record.value_json) if record.value_json else None,
        "components": {k: _finite_or_str(v) for k, v in sorted(record.components.items())},
        "grad_norms": {k: _finite_or_str(v) for k, v in sorted(record.grad_norms.items())},
        "non_finite": record.non_finite,
        "timings_ns": {
            "decode": record.timings.decode_ns,
            "compute": record.timings.compute_ns,
            "encode": record.timings.encode_ns,
        },
        "record_sha256": record.record_sha256,
        "session": record.session,
        "seq": record.seq,
        "prev_sha256": record.prev_sha256,
        "capture": record.capture,
    }


def _finite_or_str(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, float):
        return _finite_or_str(obj)
    if isinstance(obj, list):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    return obj


def selector(
    run_id: str, steps: str | tuple[int | None, int | None] | None = None, loss: str | None = None
) -> pb.AuditSelector:
    """``steps`` is ``"A:B"`` (inclusive, either side may be empty), ``"A"``, or a pair."""
    sel = pb.AuditSelector(run_id=run_id, loss=loss or "")
    lo, hi = parse_steps(steps)
    if lo is not None:
        sel.step_min = lo
    if hi is not None:
        sel.step_max = hi
    return sel


def parse_steps(steps: str | tuple[int | None, int | None] | None) -> tuple[int | None, int | None]:
    if steps is None:
        return None, None
    if isinstance(steps, tuple):
        return steps
    text = steps.strip()
    try:
        if ":" not in text:
            return int(text), int(text)
        lo, hi = text.split(":", 1)
        return (int(lo) if lo.strip() else None), (int(hi) if hi.strip() else None)
    except ValueError:
        raise ValueError(f"--step expects A:B, A: , :B or A (integers), got {steps!r}") from None


class AuditClient:
    """Reads and verifies the audit trail over gRPC (``lossd.v1.AuditService``).

    Takes the connection options of ``LossClient`` (``ConnectionOptions``: endpoint, token, TLS
    files; the same ``$LOSSD_*`` defaults). With ``--auth-tokens`` the token needs the ``audit-read`` role.
    """

    def __init__(self, endpoint: str | None = None, **options: Any) -> None:
        self._conn = LossClient(endpoint, **options)
        self.target = self._conn.target
        self.timeout = self._conn.timeout
        self._metadata = self._conn.metadata
        self._stub = pb_grpc.AuditServiceStub(self._conn.channel)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AuditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_runs(self, limit: int = 0) -> list[pb.AuditRunSummary]:
        try:
            return list(
                self._stub.ListRuns(
                    pb.ListRunsRequest(limit=limit), timeout=self.timeout, metadata=self._metadata
                ).runs
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def raw_records(
        self, run_id: str, steps: Any = None, loss: str | None = None
    ) -> Iterator[tuple[pb.AuditRecord, int]]:
        """(record, total) pairs in step order, streamed."""
        request = pb.GetRecordsRequest(selector=selector(run_id, steps, loss))
        try:
            for message in self._stub.GetRecords(
                request, timeout=self.timeout, metadata=self._metadata
            ):
                yield message.record, message.total
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def records(
        self, run_id: str, steps: Any = None, loss: str | None = None
    ) -> Iterator[dict[str, Any]]:
        for record, _ in self.raw_records(run_id, steps, loss):
            yield record_to_dict(record)

    def verify(
        self, run_id: str, steps: Any = None, loss: str | None = None, tolerance: float = 0.0
    ) -> Iterator[pb.VerifyRunResponse]:
        """One message per record (``verify_chain`` adds the run's chain report)."""
        for message in self.verify_chain(run_id, steps, loss, tolerance):
            if message.HasField("result"):
                yield message

    def verify_chain(
        self,
        run_id: str,
        steps: Any = None,
        loss: str | None = None,
        tolerance: float = 0.0,
        checkpoint: pb.AuditCheckpoint | None = None,
    ) -> Iterator[pb.VerifyRunResponse]:
        """The records' results, then one message whose ``chain`` reports the run's hash chain
        (against ``checkpoint`` too, when given: check its signature yourself first)."""
        request = pb.VerifyRunRequest(
            selector=selector(run_id, steps, loss), tolerance=tolerance, checkpoint=checkpoint
        )
        try:
            yield from self._stub.VerifyRun(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def checkpoint(self, run_id: str) -> pb.AuditCheckpoint:
        """Have the server check the run's chain and sign its head now."""
        try:
            return self._stub.Checkpoint(
                pb.CheckpointRequest(run_id=run_id), timeout=self.timeout, metadata=self._metadata
            ).checkpoint
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def public_key(self) -> pb.GetPublicKeyResponse:
        """The server's checkpoint signing key."""
        try:
            return self._stub.GetPublicKey(
                pb.GetPublicKeyRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None


# --------------------------------------------------------------------------------------------
# Export and plot

CSV_COLUMNS = (
    "id", "request_id", "run_id", "step", "rank", "micro_batch", "time_unix_ns", "loss", "value",
    "non_finite", "device", "dtype", "lossd_version", "torch_version", "peer", "principal",
    "compute_ns", "components", "grad_norms", "tags", "params", "inputs", "record_sha256",
    "session", "seq", "prev_sha256", "capture",
)  # fmt: skip


class Progress:
    """Progress on stderr for long exports and verifications: a live line on a terminal,
    a line every ``every`` items otherwise (so CI logs show it without flooding)."""

    def __init__(self, label: str, stream: IO[str] | None = None, every: int = 1000) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every
        self.done = 0

    def update(self, done: int, total: int) -> None:
        self.done = done
        if self.tty:
            print(f"\r{self.label} {done}/{total}", end="", file=self.stream, flush=True)
        elif done % self.every == 0 or done == total:
            print(f"{self.label} {done}/{total}", file=self.stream, flush=True)

    def finish(self) -> None:
        if self.tty and self.done:
            print(file=self.stream)


def export(
    client: AuditClient,
    run_id: str,
    out: IO[str],
    fmt: str = "jsonl",
    *,
    steps: Any = None,
    loss: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Write the selected records to ``out`` as JSON lines or CSV; returns the count."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"format must be jsonl or csv, got {fmt!r}")
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
    count = 0
    for record, total in client.raw_records(run_id, steps, loss):
        row = _sanitize(record_to_dict(record))
        if writer is None:
            out.write(json.dumps(row, allow_nan=False) + "\n")
        else:
            row["compute_ns"] = row["timings_ns"]["compute"]
            for key in ("components", "grad_norms", "tags", "params", "inputs"):
                row[key] = json.dumps(row[key], allow_nan=False)
            writer.writerow(row)
        count += 1
        if progress is not None:
            progress.update(count, total)
    if progress is not None:
        progress.finish()
    return count


def plot(records: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Plot loss (and component) curves per step to an image file; needs matplotlib (extra ``plot``).

    Several records of one step and loss (ranks, micro-batches) are averaged.
    """
    fig = figure(records, title)  # first: it says when matplotlib is missing
    import matplotlib.pyplot as plt

    path = Path(path)
    run_ids = sorted({r["run_id"] for r in records})
    all_steps = sorted({r["step"] for r in records})
    # Machine-readable PNG text chunks: which run and steps the image shows.
    meta = {
        "lossd-run": ",".join(run_ids),
        "lossd-steps": ",".join(map(str, all_steps)),
        "lossd-records": str(len(records)),
    }
    fig.savefig(path, dpi=110, metadata=meta if path.suffix.lower() == ".png" else None)
    plt.close(fig)
    return path


def figure(records: list[dict[str, Any]], title: str | None = None) -> Any:
    """The matplotlib figure ``plot`` saves: loss curves, and component curves below them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'lossd[plot]'") from None
    values: dict[str, dict[int, list[float]]] = {}
    components: dict[str, dict[int, list[float]]] = {}
    records = [r for r in records if r["step"] is not None]  # no place on a step axis
    for r in records:
        value = r["value"]
        if isinstance(value, (int, float)):
            values.setdefault(r["loss"], {}).setdefault(r["step"], []).append(float(value))
        for name, v in r["components"].items():
            if isinstance(v, (int, float)):
                components.setdefault(f"{r['loss']}.{name}", {}).setdefault(r["step"], []).append(
                    float(v)
                )
    panels = 2 if components else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels), sharex=True, squeeze=False)
    for ax, series, ylabel in zip(axes[:, 0], (values, components), ("loss", "component")):
        for name, by_step in sorted(series.items()):
            steps = sorted(by_step)
            ax.plot(
                steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=name, linewidth=1.5
            )
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    run_ids = sorted({r["run_id"] for r in records})
    axes[0, 0].set_title(
        title or f"lossd audit: run {', '.join(run_ids) or '(none)'} ({len(records)} records)"
    )
    fig.tight_layout()
    return fig


__all__ = [
    "AuditClient",
    "AuditRun",
    "LossdError",
    "StepCounter",
    "audit_run",
    "current_run",
    "export",
    "plot",
    "record_to_dict",
    "tensor_digest",
]
