"""Prometheus metrics: the standard gRPC server series plus lossd's own, in base units.

- ``MetricsInterceptor`` emits the go-grpc-prometheus names (``grpc_server_started_total``,
  ``grpc_server_handled_total``, ``grpc_server_handling_seconds``, ``grpc_server_msg_*``) for
  every RPC, plus in-flight calls, refusals by reason, per-loss request counts and the bytes
  each answered evaluation moved, chunks included, counted from the messages as they travel.
- ``Metrics.after_compute`` (an ``after_compute`` hook) records per-loss phase latencies
  (decode, compute, encode) and non-finite results.
- Every series is declared once (``SERIES``, ``AUDIT_SERIES``, ``DEVICE_SERIES``): the metrics
  are built from the declarations and the README's table is generated from them.
- Collectors read the audit writer's queue depth and write latency (``AuditRecorder.stats()``)
  and the CUDA allocator at scrape time.

Label values are bounded: method names come from the registered handlers, loss names from the
registry (anything else is ``unregistered``); never a request or run id.

The interceptor is lossd's own: py-grpc-prometheus reads ``servicer_context._state`` and counts
no started or handled streaming RPC, and grpcio-observability exports OpenTelemetry names
(``grpc.server.call.*``) and pins grpcio to one exact release.

Each server process has its own registry. lossd serves with threads in one process, so
prometheus-client's multiprocess mode is not needed; several replicas are several scrape
targets, which Prometheus aggregates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import framing

from . import registry as loss_registry
from ._handlers import Rewrapped, rewrap
from .budget import RawRequest
from .bulk import MOVED_ATTRIBUTE
from .limits import REFUSAL_ATTRIBUTE
from .version import __version__

log = logging.getLogger("lossd.metrics")

# gRPC status codes as go-grpc-prometheus spells them (Go's codes.Code.String()).
CODE_NAMES: dict[grpc.StatusCode, str] = {
    code: "".join(part.capitalize() for part in code.name.split("_")) for code in grpc.StatusCode
}
CODE_NAMES[grpc.StatusCode.OK] = "OK"
CODE_NAMES[grpc.StatusCode.CANCELLED] = "Canceled"

# Refusals caused by the request or the caller (as opposed to server faults), by reason.
REFUSALS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "resource_exhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "failed_precondition",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
PHASES = ("decode", "compute", "encode")
UNREGISTERED = "unregistered"
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


@dataclass(frozen=True)
class Series:
    """One exported series, declared once: the metric is built from it and the README lists it."""

    name: str  # as exported: counters end in _total
    kind: str  # counter, gauge, histogram or summary
    labels: tuple[str, ...]
    help: str


# The series Metrics registers itself, by attribute name.
SERIES: dict[str, Series] = {
    "started": Series(
        "grpc_server_started_total", "counter", GRPC_LABELS, "RPCs started on the server."
    ),
    "handled": Series(
        "grpc_server_handled_total",
        "counter",
        (*GRPC_LABELS, "grpc_code"),
        "RPCs completed on the server, regardless of success or failure.",
    ),
    "handling": Series(
        "grpc_server_handling_seconds",
        "histogram",
        GRPC_LABELS,
        "Response latency of RPCs handled by the server, in seconds.",
    ),
    "msg_received": Series(
        "grpc_server_msg_received_total",
        "counter",
        GRPC_LABELS,
        "Stream messages received by the server.",
    ),
    "msg_sent": Series(
        "grpc_server_msg_sent_total", "counter", GRPC_LABELS, "Stream messages sent by the server."
    ),
    "inflight": Series("lossd_inflight_requests", "gauge", (), "RPCs being handled right now."),
    "rejected": Series(
        "lossd_rejected_requests_total",
        "counter",
        ("reason",),
        "Calls refused because of the request or the caller, by reason.",
    ),
    "requests": Series(
        "lossd_requests_total",
        "counter",
        ("loss", "grpc_code"),
        "Loss evaluations asked for (Compute and ComputeChunked calls), by loss and status code.",
    ),
    "phase": Series(
        "lossd_phase_seconds",
        "histogram",
        ("loss", "phase"),
        "Server-side duration of each phase of a successful evaluation, in seconds.",
    ),
    "received": Series(
        "lossd_received_bytes_total",
        "counter",
        ("loss",),
        "Request bytes of answered evaluations, as they travelled (chunks and --bulk-port data included).",
    ),
    "sent": Series(
        "lossd_sent_bytes_total",
        "counter",
        ("loss",),
        "Response bytes of answered evaluations, as they travelled (chunks and --bulk-port data included).",
    ),
    "non_finite": Series(
        "lossd_non_finite_results_total",
        "counter",
        ("loss",),
        "Evaluations whose value or gradients hold NaN or Inf.",
    ),
    "build_info": Series(
        "lossd_build_info",
        "gauge",
        ("version", "torch_version", "device"),
        "Always 1; the labels say what is serving.",
    ),
}

# Read from AuditRecorder.stats() at scrape time, by stats key (the summary takes two keys).
AUDIT_SERIES: dict[str, Series] = {
    "queue_depth": Series(
        "lossd_audit_queue_depth", "gauge", (), "Audit records waiting to be written."
    ),
    "queue_capacity": Series(
        "lossd_audit_queue_capacity",
        "gauge",
        (),
        "Audit records the queue holds before calls block.",
    ),
    "last_write_seconds": Series(
        "lossd_audit_last_write_seconds",
        "gauge",
        (),
        "Duration of the latest audit write, in seconds.",
    ),
    "records_written": Series(
        "lossd_audit_records_written_total", "counter", (), "Audit records committed."
    ),
    "records_dropped": Series(
        "lossd_audit_records_dropped_total",
        "counter",
        (),
        "Audit records that could not be written.",
    ),
    "records_refused": Series(
        "lossd_audit_records_refused_total",
        "counter",
        (),
        "Audited calls failed UNAVAILABLE because the queue stayed full or the commit timed out.",
    ),
    "queue_blocked": Series(
        "lossd_audit_queue_blocked_total",
        "counter",
        (),
        "Audited calls that found the queue full and had to wait for room.",
    ),
    "capture_skipped": Series(
        "lossd_audit_capture_skipped_total",
        "counter",
        (),
        "Inputs of audited calls recorded by digest only because --audit-capture-max-mb was reached.",
    ),
    "checkpoints_signed": Series(
        "lossd_audit_checkpoints_signed_total",
        "counter",
        (),
        "Chain heads this server signed and stored (periodic, at shutdown, on request).",
    ),
    "write_seconds": Series(
        "lossd_audit_write_seconds",
        "summary",
        (),
        "Audit write latency (per committed batch), in seconds.",
    ),
}

# Read from the CUDA allocator at scrape time, by probe key.
DEVICE_SERIES: dict[str, Series] = {
    "allocated": Series(
        "lossd_device_memory_allocated_bytes",
        "gauge",
        ("device",),
        "Device memory held by tensors, in bytes.",
    ),
    "reserved": Series(
        "lossd_device_memory_reserved_bytes",
        "gauge",
        ("device",),
        "Device memory reserved by the caching allocator, in bytes.",
    ),
    "total": Series(
        "lossd_device_memory_total_bytes", "gauge", ("device",), "Device memory in total, in bytes."
    ),
}


def _declare(series: Series, registry: CollectorRegistry) -> Any:
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    extra = {"buckets": LATENCY_BUCKETS} if series.kind == "histogram" else {}
    return kinds[series.kind](series.name, series.help, series.labels, registry=registry, **extra)


class Metrics:
    """Every lossd series, in one registry per server."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        device: str = "cpu",
        audit_stats: Callable[[], Mapping[str, Any]] | None = None,
        memory_probe: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        # Each call's updates are queued (one append as it starts, one as it ends, one for its
        # phases) and applied in a batch, summed per series, before the series are read or by the
        # call that fills the queue to PENDING_LIMIT: prometheus-client runs ~55 Python calls and
        # takes ~15 locks for the ~12 updates of one call, each on cold caches in a ping-pong.
        self._pending: deque[tuple[Any, ...]] = deque()
        # Reentrant: a collected call's last update may be queued from a finalizer while this
        # thread applies a batch (the garbage collector can run inside apply_pending).
        self._applying = threading.RLock()
        self.registry.register(PendingUpdates(self))  # first: collected before any series
        for key, series in SERIES.items():  # self.started, self.handled, ... as SERIES names them
            setattr(self, key, _declare(series, self.registry))
        self.build_info.labels(__version__, _torch_version(), device).set(1)
        if audit_stats is not None:
            self.registry.register(AuditCollector(audit_stats))
        if memory_probe is None and device.startswith("cuda"):
            memory_probe = cuda_memory_probe(device)
        if memory_probe is not None:
            self.registry.register(DeviceMemoryCollector(device, memory_probe))
        self._loss_names = frozenset(s.name for s in loss_registry.all_specs())
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    # -- wiring ---------------------------------------------------------------------------

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)

    def serve_http(self, host: str, port: int) -> tuple[Any, int]:
        """Serve ``/metrics`` over HTTP on a daemon thread; returns (server, bound port).

        Each connection has ``HTTP_TIMEOUT_S`` to send its request and take the answer, and at
        most ``HTTP_MAX_CONNECTIONS`` are served at once (more wait in the listen backlog), so
        idle or slow connections cannot pile up threads."""
        from prometheus_client.exposition import (
            ThreadingWSGIServer,
            _get_best_family,
            _SilentHandler,
            make_wsgi_app,
        )

        slots = threading.BoundedSemaphore(HTTP_MAX_CONNECTIONS)

        class Server(ThreadingWSGIServer):
            def process_request(self, request: Any, client_address: Any) -> None:
                slots.acquire()
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        class Handler(_SilentHandler):
            timeout = HTTP_TIMEOUT_S  # socket timeout for reading the request and writing

        Server.address_family, addr = _get_best_family(host, port)
        served = make_wsgi_app(self.registry)

        def app(environ: Any, start_response: Any) -> Any:
            self.apply_pending()  # also for a scrape of some names only (?name[]=...)
            return served(environ, start_response)

        httpd = make_server(addr, port, app, Server, handler_class=Handler)
        threading.Thread(target=httpd.serve_forever, name="lossd-metrics", daemon=True).start()
        return httpd, httpd.server_port

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def defer(self, *update: Any) -> None:
        """Queue one call's update (``_STARTED``, ``_ENDED`` or ``_COMPUTED`` and its values)."""
        self._pending.append(update)
        if len(self._pending) >= PENDING_LIMIT:
            self.apply_pending()

    def apply_pending(self) -> None:
        """Apply the queued updates, summed by series first: the counters and the in-flight
        gauge once per label set, then every histogram observation, in order."""
        with self._applying:
            started: dict[tuple[str, ...], int] = {}  # labels -> calls
            ended: dict[
                tuple, list
            ] = {}  # (labels, loss, code, reason) -> [calls, in, out, seconds]
            computed: dict[str, list] = {}  # loss -> [non-finite results, phase durations]
            pending = self._pending
            while pending:
                update = pending.popleft()
                if update[0] is _STARTED:
                    started[update[1]] = started.get(update[1], 0) + 1
                elif update[0] is _ENDED:
                    _, labels, loss, code, seconds, moved, reason = update
                    entry = ended.get((labels, loss, code, reason))
                    if entry is None:
                        entry = ended[labels, loss, code, reason] = [0, 0, 0, []]
                    entry[0] += 1
                    entry[1] += moved[0]
                    entry[2] += moved[1]
                    entry[3].append(seconds)
                else:
                    _, loss, phase_ns, non_finite = update
                    entry = computed.get(loss)
                    if entry is None:
                        entry = computed[loss] = [0, []]
                    entry[0] += non_finite
                    entry[1].append(phase_ns)
            try:
                self._apply(started, ended, computed)
            except Exception:  # lossd's own bug: never the caller's call, nor a scrape, fails
                log.exception("metrics: the updates of a batch of calls could not be applied")

    def _apply(self, started: dict, ended: dict, computed: dict) -> None:
        inflight = sum(started.values()) - sum(entry[0] for entry in ended.values())
        if inflight:
            self.inflight.inc(inflight)
        for labels, calls in started.items():
            self.labelled(self.started, *labels).inc(calls)
        for (labels, loss, code, reason), (calls, received, sent, seconds) in ended.items():
            code_name = CODE_NAMES.get(code, "Unknown")
            if loss is not None:
                self.labelled(self.requests, loss, code_name).inc(calls)
                if code is grpc.StatusCode.OK:
                    self.labelled(self.received, loss).inc(received)
                    self.labelled(self.sent, loss).inc(sent)
            self.labelled(self.handled, *labels, code_name).inc(calls)
            handling = self.labelled(self.handling, *labels)
            for value in seconds:
                handling.observe(value)
            reason = reason or REFUSALS.get(code)
            if reason is not None:
                self.labelled(self.rejected, reason).inc(calls)
        for loss, (non_finite, durations) in computed.items():
            phases = [self.labelled(self.phase, loss, phase) for phase in PHASES]
            for phase_ns in durations:
                for histogram, ns in zip(phases, phase_ns, strict=True):
                    histogram.observe(ns / 1e9)
            if non_finite:
                self.labelled(self.non_finite, loss).inc(non_finite)

    def labelled(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: prometheus-client validates the values and
        takes a lock on every ``labels()``, a dozen times per call. Label values are bounded."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def loss_label(self, name: str) -> str:
        return name if name in self._loss_names else UNREGISTERED

    # -- the after_compute hook -----------------------------------------------------------

    def after_compute(self, event: Any) -> None:
        timings = event.response.timings
        self.defer(
            _COMPUTED,
            self.loss_label(event.result.spec.name),
            (timings.decode_ns, timings.compute_ns, timings.encode_ns),
            event.result.non_finite,
        )


# What a queued update is (Metrics.defer), as Metrics.apply_pending reads it.
_STARTED, _ENDED, _COMPUTED = object(), object(), object()
# Queued updates before the call that queues the last one applies them: about 21 calls' worth,
# ~0.12 ms on that call's thread (256 took 0.5-0.9 ms, a stall a small call's p99 would show).
PENDING_LIMIT = 64


def catalogue() -> list[tuple[str, str, tuple[str, ...], str]]:
    """Every series a server can export: (name, type, label names, help), for the README.

    Read from the same declarations the metrics are built from, so the documentation cannot
    drift from what is served.
    """
    every = [*SERIES.values(), *AUDIT_SERIES.values(), *DEVICE_SERIES.values()]
    return sorted((s.name, s.kind, s.labels, s.help) for s in every)


def grpc_type(handler: Any) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _status(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    """The status the call ends with, as far as the handler can tell."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if not context.is_active():
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _loss_of(message: Any) -> str | None:
    """The loss a LossService message asks for (a Compute request or a chunked header)."""
    if isinstance(message, pb.ComputeRequest):
        return message.loss
    if isinstance(message, RawRequest):  # unary Compute, parsed once its memory is reserved
        return message.loss
    if isinstance(message, pb.ComputeChunkedRequest) and message.WhichOneof("part") == "header":
        return message.header.request.loss
    return None


def wire_size(message: Any) -> int:
    """Bytes of one message as it travelled: serialized bytes, a hand-parsed data chunk (its
    payload plus the tag and length framing.py stripped), or a parsed protobuf message."""
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, RawRequest):
        return len(message.data)
    if isinstance(message, memoryview):
        return framing.frame_size(len(message))
    size = getattr(message, "ByteSize", None)  # never a malformed request: those fail first
    return size() if size is not None else 0


@dataclass
class _Call:
    """What one LossService call asked for and how many bytes it moved."""

    loss: str | None = None
    received: int = 0
    sent: int = 0


HTTP_TIMEOUT_S = 10.0
HTTP_MAX_CONNECTIONS = 8


class MetricsInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: sees every call that reaches a registered handler.

    Calls that gRPC itself refuses before any handler runs (past ``maximum_concurrent_rpcs``,
    which lossd sets --max-concurrent-rpcs plus the probes' reserve above its own limit) are not
    seen here; lossd's own refusals at --max-concurrent-rpcs are.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._wrapped = Rewrapped()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, and no label from a client-chosen name
        return self._wrapped.get((handler, details.method), lambda: self._wrap(handler, details))

    def _wrap(self, handler: Any, details: grpc.HandlerCallDetails) -> Any:
        service, _, method = details.method.lstrip("/").partition("/")
        labels = (grpc_type(handler), service, method)
        counts_losses = service == "lossd.v1.LossService"
        return rewrap(
            handler, lambda behavior: self._observe(behavior, handler, labels, counts_losses)
        )

    def _observe(
        self, behavior: Callable, handler: Any, labels: tuple[str, str, str], counts_losses: bool
    ) -> Callable:
        m = self.m

        def asked(call: _Call, message: Any) -> Any:
            if counts_losses:
                call.received += wire_size(message)
                loss = _loss_of(message)
                if loss is not None:
                    call.loss = m.loss_label(loss)
            return message

        def requests_of(call: _Call, request: Any) -> Any:
            if not handler.request_streaming:
                return asked(call, request)

            def counted() -> Iterator[Any]:
                for message in request:
                    m.labelled(m.msg_received, *labels).inc()
                    yield asked(call, message)

            return counted()

        def begin() -> tuple[_Call, float]:
            m.defer(_STARTED, labels)
            return _Call(), time.perf_counter()

        def end(call: _Call, context: grpc.ServicerContext, start: float, failed: bool) -> None:
            seconds = time.perf_counter() - start
            code = _status(context, failed)
            on_data_connection = getattr(context, MOVED_ATTRIBUTE, (0, 0))
            moved = (call.received + on_data_connection[0], call.sent + on_data_connection[1])
            reason = getattr(context, REFUSAL_ATTRIBUTE, None)
            m.defer(_ENDED, labels, call.loss, code, seconds, moved, reason)

        if handler.response_streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                call, start = begin()
                failed = True
                try:
                    for response in behavior(requests_of(call, request), context):
                        m.labelled(m.msg_sent, *labels).inc()
                        call.sent += wire_size(response) if counts_losses else 0
                        yield response
                    failed = False
                finally:
                    end(call, context, start, failed)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            call, start = begin()
            failed = True
            try:
                response = behavior(requests_of(call, request), context)
                call.sent += wire_size(response) if counts_losses else 0
                failed = False
                return response
            finally:
                end(call, context, start, failed)

        return unary


# ------------------------------------------------------------------------------------------
# Scrape-time collectors


class PendingUpdates(Collector):
    """Applies the queued per-call updates whenever the registry is read (registered first)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        self.metrics.apply_pending()
        return iter(())


class AuditCollector(Collector):
    """Reads the audit writer's ``stats()`` at scrape time (``AUDIT_SERIES``, by key; the
    summary reads ``write_seconds_sum`` and ``write_seconds_count``). Unknown keys are ignored,
    missing ones are not exported."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self.stats = stats

    def describe(self) -> list:
        return []  # values are read at scrape time only

    def collect(self) -> Iterator[Any]:
        try:
            stats = dict(self.stats() or {})
        except Exception:  # noqa: BLE001 - a failing probe must not break the whole scrape
            stats = {}
        for key, series in AUDIT_SERIES.items():
            if series.kind == "summary":
                count, total = stats.get(f"{key}_count"), stats.get(f"{key}_sum")
                if _number(count) and _number(total):
                    yield SummaryMetricFamily(
                        series.name, series.help, count_value=float(count), sum_value=float(total)
                    )
            elif _number(stats.get(key)):
                family = GaugeMetricFamily if series.kind == "gauge" else CounterMetricFamily
                yield family(series.name, series.help, value=float(stats[key]))


class DeviceMemoryCollector(Collector):
    """Device memory in use, read from the allocator at scrape time (``DEVICE_SERIES``)."""

    def __init__(self, device: str, probe: Callable[[], Mapping[str, float]]) -> None:
        self.device = device
        self.probe = probe

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        try:
            values = dict(self.probe())
        except Exception:  # noqa: BLE001
            return
        for key, series in DEVICE_SERIES.items():
            if _number(values.get(key)):
                family = GaugeMetricFamily(series.name, series.help, labels=list(series.labels))
                family.add_metric([self.device], float(values[key]))
                yield family


def cuda_memory_probe(device: str) -> Callable[[], Mapping[str, float]]:
    import torch

    dev = torch.device(device)

    def probe() -> Mapping[str, float]:
        return {
            "allocated": torch.cuda.memory_allocated(dev),
            "reserved": torch.cuda.memory_reserved(dev),
            "total": torch.cuda.get_device_properties(dev).total_memory,
        }

    return probe


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _torch_version() -> str:
    import torch

    return torch.__version__
