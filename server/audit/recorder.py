"""The audit recorder: an ``after_compute`` hook, a bounded queue and one writer thread.

What ``audited=true`` means: the Compute call returns only after the writer has committed the
call's record (group commit: the writer takes everything queued and commits it in one
transaction), so a response that says ``audited`` names a durable record.

Queue-full policy: a call that finds the queue full waits up to ``--audit-queue-timeout-s``
for room (counted in ``lossd_audit_queue_blocked_total``), then fails with UNAVAILABLE (counted
in ``lossd_audit_records_refused_total`` and ``lossd_audit_records_dropped_total``). Nothing is
dropped silently: the caller learns that its call was not recorded, and ``LossClient`` retries
UNAVAILABLE with the same request id, which the store records at most once. The same holds when
the commit does not happen within ``--audit-write-timeout-s`` (the record may still land; a
retry will not duplicate it).

Store failures (a read-only or full database, PostgreSQL down): every call waiting on the failed
commit fails UNAVAILABLE with a message naming the audit store and the database's error; the
server keeps serving and the next write opens a fresh connection, so it recovers on its own once
the store is writable again. A batch that fails is retried one record at a time, so one record
the database refuses cannot take the other callers' records down with it.

Capture (``--audit-capture``): ``all``; ``none``; or ``sample:N`` (the default, N = 100): the
inputs of each attempt's first call (the first call of a run id and session this process sees)
and of 1 in N calls, chosen by HMAC-SHA256 of the request id under a secret derived from the
signing key, so a client, which picks its request ids, can neither predict nor steer which of
its calls are recomputable. Each record says why it was captured (``capture``). The last call of
each run is covered too: a server cannot know a call is the last when it records it, so the
writer holds the uncaptured inputs of each run's latest call in memory (up to TAIL_MAX_BYTES in
all) and stores them once the run has been idle for ``--audit-checkpoint-s``, or at shutdown.
Their record says not captured (it was committed first), but the inputs are content-addressed
and authenticated by the record's digests, so verify recomputes it. Best effort: a SIGKILL loses
the held inputs, never a record.

Checkpoints: after a commit the writer knows the head it left each run at; every
``--audit-checkpoint-s`` (when the writer is idle too, so a run that ended is signed within that
time) and when the recorder closes, it signs the heads that moved and stores the checkpoints.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..config import AUDIT_MODES as MODES
from ..config import SettingError
from ..errors import FailedPrecondition, InvalidArgument, Unavailable
from ..security import current_principal
from .capture import Capture
from .records import Pending, build
from .signing import Checkpoint, Signer, sign_and_store
from .store import PermanentRecordError, RequestIdConflict, Store

log = logging.getLogger("lossd.audit")

DEFAULT_SAMPLE = 100
MAX_BATCH = 512
TAIL_MAX_BYTES = 256 << 20  # inputs of runs' latest calls held until the run is idle
RETENTION_EVERY_S = 3600.0


def parse_capture(text: str) -> int:
    """``--audit-capture`` as 1 in how many calls is sampled: 1 ``all`` (``inputs``, its old
    name), 0 ``none``, N ``sample:N`` (``sample``: 1 in 100)."""
    text = text.strip()
    if text in ("all", "inputs"):
        return 1
    if text == "none":
        return 0
    if text == "sample":
        return DEFAULT_SAMPLE
    if text.startswith("sample:"):
        try:
            n = int(text.removeprefix("sample:"))
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise SettingError(
        f"--audit-capture must be all, none or sample:N (N >= 1; sample alone means sample:{DEFAULT_SAMPLE}), got {text!r}"
    )


@dataclass
class _Item:
    pending: Pending
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


_STOP = object()


class AuditRecorder:
    """Records audited evaluations into ``store``; thread-safe; ``close()`` flushes."""

    def __init__(
        self,
        store: Store,
        *,
        mode: str = "runs",
        capture: str = "none",
        capture_max_mb: int = 1024,
        retention_days: float = 0.0,
        queue_size: int = 4096,
        queue_timeout_s: float = 5.0,
        write_timeout_s: float = 30.0,
        signer: Signer | None = None,
        checkpoint_s: float = 10.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"--audit must be one of {', '.join(MODES)}, got {mode!r}")
        if queue_size < 1:
            raise ValueError(f"--audit-queue-size must be at least 1, got {queue_size}")
        if not checkpoint_s > 0:
            raise SettingError(f"--audit-checkpoint-s must be > 0, got {checkpoint_s}")
        self.store = store
        self.mode = mode
        self.sample_every = parse_capture(capture)
        self.capture = (
            Capture(capture_max_mb << 20, store.stored_blob_bytes()) if self.sample_every else None
        )
        self.signer = signer or Signer.generate()
        self._sample_key = hashlib.sha256(b"lossd-sample-v1\0" + self.signer.secret()).digest()
        self._attempts: OrderedDict[tuple[str, str], None] = OrderedDict()  # seen (run, session)
        self._attempts_lock = threading.Lock()
        self.checkpoint_s = checkpoint_s
        self._moved: dict[str, tuple[int, str]] = {}  # run -> head not yet signed (writer only)
        self._next_checkpoint = time.monotonic() + checkpoint_s
        self._tails: dict[str, tuple[float, int, list]] = {}  # run -> (written, bytes, inputs)
        self._signed = 0
        self.retention_ns = int(retention_days * 86400e9)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.write_timeout_s = write_timeout_s
        self._closed = False
        self._stats_lock = threading.Lock()
        self._written = 0
        self._rejected = 0
        self._blocked = 0
        self._duplicates = 0
        self._failed = 0
        self._batches = 0
        self._write_s_sum = 0.0
        self._last_write_s = 0.0
        self._next_retention = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="lossd-audit-writer", daemon=True)
        self._thread.start()

    # -- request path --------------------------------------------------------------------

    def wants(self, run_id: str) -> bool:
        return self.mode == "all" or (self.mode == "runs" and bool(run_id))

    def capture_reason(self, request_id: str, run_id: str, session: str) -> str:
        """Why this call's inputs are captured: "all", "first", "sample"; "" when they are not."""
        if self.capture is None:
            return ""
        if self.sample_every == 1:
            return "all"
        with self._attempts_lock:
            first = (run_id, session) not in self._attempts
            self._attempts[(run_id, session)] = None
            self._attempts.move_to_end((run_id, session))
            if len(self._attempts) > 100_000:
                self._attempts.popitem(last=False)
        if first:
            return "first"
        mac = hmac.new(self._sample_key, request_id.encode(), hashlib.sha256).digest()
        return "sample" if int.from_bytes(mac[:8], "big") % self.sample_every == 0 else ""

    def after_compute(self, event: Any) -> None:
        """``after_compute`` hook: record the evaluation, wait for its commit, mark the response."""
        call = event.call
        if not self.wants(call.audit.run_id):
            return
        if self._closed:
            raise Unavailable("the server is shutting down; the audit trail takes no more records")
        principal = current_principal()
        result = event.result
        reason = self.capture_reason(call.request_id, call.audit.run_id, call.audit.session)
        pending = build(
            request_id=call.request_id,
            audit=call.audit,
            loss=call.loss,
            params=result.params,
            args=call.args,
            kwargs=call.kwargs,
            value=result.value,
            components=result.components,
            grads=result.grads,
            non_finite=result.non_finite,
            device=result.device,
            timings=event.response.timings,
            peer=_peer(event.context),
            principal=principal.name if principal is not None else "",
            capture=self.capture if reason else None,
            capture_reason=reason,
            keep=self.capture is not None and not reason,
        )
        item = _Item(pending)
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            with self._stats_lock:
                self._blocked += 1
            try:
                self.queue.put(item, timeout=self.queue_timeout_s)
            except queue.Full:
                self._forget(pending)
                with self._stats_lock:
                    self._rejected += 1
                log.warning(
                    "audit queue full (%d records) for %.1f s: refusing %s",
                    self.queue_size,
                    self.queue_timeout_s,
                    call.request_id,
                )
                raise Unavailable(
                    f"the audit trail ({self.store.name}) is behind: its queue of {self.queue_size} records stayed full "
                    f"for {self.queue_timeout_s:g} s (--audit-queue-timeout-s); the call was not recorded, retry it"
                ) from None
        if not item.done.wait(self.write_timeout_s):
            with self._stats_lock:
                self._rejected += 1
            raise Unavailable(
                f"the audit record was not committed to {self.store.name} within {self.write_timeout_s:g} s "
                "(--audit-write-timeout-s); retry the call (same request id)"
            )
        if isinstance(item.error, RequestIdConflict):
            raise FailedPrecondition(str(item.error), field="request_id")
        if item.error is not None and _permanent(item.error):
            raise InvalidArgument(
                f"the audit store {self.store.name} refuses this record for good "
                f"({type(item.error).__name__}: {str(item.error).strip()[:300]}); retrying will not help"
            )
        if item.error is not None:
            raise Unavailable(
                f"the audit store {self.store.name} could not write the record "
                f"({type(item.error).__name__}: {item.error}); the call was not recorded, retry it"
            )
        event.response.audited = True

    def _forget(self, pending: Pending) -> None:
        if pending.blobs:
            self._forget_blobs(pending.blobs)

    # -- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self.queue.get(timeout=max(0.01, self._next_checkpoint - time.monotonic()))
            except queue.Empty:
                self._maybe_checkpoint()
                continue
            batch: list[_Item] = []
            if first is _STOP:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < MAX_BATCH:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                batch.append(item)
            if batch:
                self._write(batch)
            self._maybe_retain()
            self._maybe_checkpoint(force=stopping)

    def _maybe_checkpoint(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._next_checkpoint:
            return
        self._next_checkpoint = time.monotonic() + self.checkpoint_s
        self._store_tails(force)
        moved, self._moved = self._moved, {}
        for run_id, (records, head) in sorted(moved.items()):
            try:
                self.store_checkpoint(run_id, records, head)
            except Exception:  # noqa: BLE001 - signed again at the next interval
                log.exception("audit checkpoint of run %r failed", run_id)
                self._moved.setdefault(run_id, (records, head))

    def _hold_tails(self, batch: list[_Item]) -> None:
        """Keep the uncaptured inputs of each run's latest call (writer thread)."""
        now = time.monotonic()
        for item in batch:
            run_id, kept = item.pending.row.run_id, item.pending.kept
            self._tails.pop(run_id, None)
            size = sum(t.numel() * t.element_size() for _, t in kept)
            held = sum(s for _, s, _ in self._tails.values())
            if kept and held + size <= TAIL_MAX_BYTES:
                self._tails[run_id] = (now, size, kept)

    def _store_tails(self, force: bool) -> None:
        """Store the held inputs of runs idle for --audit-checkpoint-s (all of them at close)."""
        if self.capture is None:
            return
        idle_since = time.monotonic() - self.checkpoint_s
        for run_id, (written, _, kept) in list(self._tails.items()):
            if not (force or written <= idle_since):
                continue
            del self._tails[run_id]
            blobs = [b for b in (self.capture(d, t)[1] for d, t in kept) if b is not None]
            if not blobs:
                continue
            try:
                self.store.add_blobs(blobs)
            except Exception:  # noqa: BLE001 - best effort: the record itself is committed
                log.exception("audit: storing the last inputs of run %r failed", run_id)
                self._forget_blobs(blobs)

    def _forget_blobs(self, blobs: list[Any]) -> None:
        if self.capture is not None:
            self.capture.forget([b.digest for b in blobs], sum(len(b.data) for b in blobs))

    def store_checkpoint(self, run_id: str, records: int, head: str) -> Checkpoint:
        """Sign (run, records, head) now and store the checkpoint; returns it."""
        cp = sign_and_store(self.store, self.signer, run_id, records, head)
        with self._stats_lock:
            self._signed += 1
        return cp

    def _write(self, batch: list[_Item]) -> None:
        try:
            self._commit(batch)
        except Exception as exc:  # noqa: BLE001 - every waiting call learns of the failure
            if len(batch) == 1:
                self._fail(batch, exc)
            else:
                # One record the database refuses must not fail the others: retry one by one.
                log.warning(
                    "audit write of %d records failed (%s: %s); retrying them one by one",
                    len(batch),
                    type(exc).__name__,
                    exc,
                )
                for item in batch:
                    try:
                        self._commit([item])
                    except Exception as one:  # noqa: BLE001
                        self._fail([item], one)
        for item in batch:
            item.done.set()

    def _commit(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        missing = self.store.write([i.pending for i in batch])
        elapsed = time.perf_counter() - start
        if missing and self.capture is not None:
            self.capture.forget(sorted(missing))  # the next call sending them stores them again
        self._moved.update(self.store.last_heads)
        self._hold_tails(batch)
        with self._stats_lock:
            self._written += self.store.last_inserted
            self._duplicates += len(batch) - self.store.last_inserted
            self._batches += 1
            self._write_s_sum += elapsed
            self._last_write_s = elapsed

    def _fail(self, batch: list[_Item], exc: BaseException) -> None:
        log.error(
            "audit store %s could not write %d record(s): %s: %s",
            self.store.name,
            len(batch),
            type(exc).__name__,
            exc,
        )
        for item in batch:
            self._forget(item.pending)
            item.error = exc
        with self._stats_lock:
            self._failed += len(batch)

    def _maybe_retain(self) -> None:
        if not self.retention_ns or self.capture is None or time.monotonic() < self._next_retention:
            return
        self._next_retention = time.monotonic() + RETENTION_EVERY_S
        self.apply_retention()

    def apply_retention(self, now_ns: int | None = None) -> int:
        """Delete captured inputs no audited call used within the retention window; returns how many."""
        if not self.retention_ns or self.capture is None:
            return 0
        try:
            digests, freed = self.store.delete_unused_blobs(
                (now_ns or time.time_ns()) - self.retention_ns
            )
        except Exception:  # noqa: BLE001 - retention is retried at the next interval
            log.exception("audit retention failed")
            return 0
        self.capture.forget(digests, freed)
        if digests:
            log.info("audit retention: deleted %d captured inputs (%d bytes)", len(digests), freed)
        return len(digests)

    # -- lifecycle and metrics -------------------------------------------------------------

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush: write everything queued, then stop the writer (graceful shutdown)."""
        if self._closed:
            return
        self._closed = True
        self.queue.put(_STOP)
        self._thread.join(timeout)
        # A call that slipped in after the stop marker is answered, not left to its timeout.
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.error = RuntimeError("the server stopped before the record was written")
                item.done.set()
        self.store.close()

    def stats(self) -> dict[str, Any]:
        """Read by the metrics collector at scrape time."""
        with self._stats_lock:
            return {
                "queue_depth": self.queue.qsize(),
                "queue_capacity": self.queue_size,
                "records_written": self._written,
                "records_duplicate": self._duplicates,
                "records_dropped": self._rejected + self._failed,
                "records_refused": self._rejected,
                "queue_blocked": self._blocked,
                "write_seconds_sum": self._write_s_sum,
                "write_seconds_count": self._batches,
                "last_write_seconds": self._last_write_s,
                "capture_skipped": self.capture.skipped if self.capture is not None else 0,
                "checkpoints_signed": self._signed,
            }


def _permanent(exc: BaseException) -> bool:
    """A database error about the data itself (a NUL in a text column, a value out of range),
    which no retry fixes, as opposed to the store being unreachable, full or read-only. DB-API
    names these classes alike (sqlite3 and psycopg): DataError, IntegrityError."""
    if isinstance(exc, PermanentRecordError):
        return True
    return any(cls.__name__ in ("DataError", "IntegrityError") for cls in type(exc).__mro__)


def _peer(context: Any) -> str:
    try:
        return context.peer() if context is not None else ""
    except Exception:  # noqa: BLE001 - the peer is a label; never fail a call over it
        return ""
