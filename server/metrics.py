"""Prometheus metrics: the standard gRPC server series plus lossd's own, in base units.

- ``MetricsInterceptor`` emits the go-grpc-prometheus names (``grpc_server_started_total``,
  ``grpc_server_handled_total``, ``grpc_server_handling_seconds``, ``grpc_server_msg_*``) for
  every RPC, plus in-flight calls, refusals by reason and per-loss request counts.
- ``Metrics.after_compute`` (an ``after_compute`` hook) records per-loss phase latencies
  (decode, compute, encode), bytes received and sent, and non-finite results.
- Collectors read the audit writer's queue depth and write latency (``AuditRecorder.stats()``)
  and the CUDA allocator at scrape time.

Label values are bounded: method names come from the registered handlers, loss names from the
registry (anything else is ``unregistered``); never a request or run id.

Each server process has its own registry. lossd serves with threads in one process, so
prometheus-client's multiprocess mode is not needed; several replicas are several scrape
targets, which Prometheus aggregates.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from lossd.client._proto import lossd_pb2 as pb

from . import registry as loss_registry
from ._handlers import rewrap
from .limits import CONCURRENCY_LIMIT, REFUSAL_ATTRIBUTE
from .version import __version__

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
        r = self.registry
        grpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", grpc_labels, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, regardless of success or failure.",
            (*grpc_labels, "grpc_code"),
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server, in seconds.",
            grpc_labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total",
            "Stream messages received by the server.",
            grpc_labels,
            registry=r,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Stream messages sent by the server.",
            grpc_labels,
            registry=r,
        )
        self.inflight = Gauge(
            "lossd_inflight_requests", "RPCs being handled right now.", registry=r
        )
        self.rejected = Counter(
            "lossd_rejected_requests_total",
            "Calls refused because of the request or the caller, by reason.",
            ("reason",),
            registry=r,
        )
        self.requests = Counter(
            "lossd_requests_total",
            "Loss evaluations asked for (Compute and ComputeChunked calls), by loss and status code.",
            ("loss", "grpc_code"),
            registry=r,
        )
        self.phase = Histogram(
            "lossd_phase_seconds",
            "Server-side duration of each phase of a successful evaluation, in seconds.",
            ("loss", "phase"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.received = Counter(
            "lossd_received_bytes_total", "Request bytes of evaluated calls.", ("loss",), registry=r
        )
        self.sent = Counter(
            "lossd_sent_bytes_total", "Response bytes of evaluated calls.", ("loss",), registry=r
        )
        self.non_finite = Counter(
            "lossd_non_finite_results_total",
            "Evaluations whose value or gradients hold NaN or Inf.",
            ("loss",),
            registry=r,
        )
        info = Gauge(
            "lossd_build_info",
            "Always 1; the labels say what is serving.",
            ("version", "torch_version", "device"),
            registry=r,
        )
        info.labels(__version__, _torch_version(), device).set(1)
        if audit_stats is not None:
            r.register(AuditCollector(audit_stats))
        if memory_probe is None and device.startswith("cuda"):
            memory_probe = cuda_memory_probe(device)
        if memory_probe is not None:
            r.register(DeviceMemoryCollector(device, memory_probe))
        self._loss_names = frozenset(s.name for s in loss_registry.all_specs())
        self._server_state: Any = None

    # -- wiring ---------------------------------------------------------------------------

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)

    def bind_server(self, server: grpc.Server) -> None:
        """Let the interceptor see gRPC's concurrency count, to count calls gRPC refuses for it."""
        state = getattr(
            server, "_state", None
        )  # private, read-only; absent → those refusals go uncounted
        if (
            state is not None
            and hasattr(state, "active_rpc_count")
            and hasattr(state, "maximum_concurrent_rpcs")
        ):
            self._server_state = state

    def serve_http(self, host: str, port: int) -> tuple[Any, int]:
        """Serve ``/metrics`` over HTTP on a daemon thread; returns (server, bound port)."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        return httpd, httpd.server_port

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def loss_label(self, name: str) -> str:
        return name if name in self._loss_names else UNREGISTERED

    # -- the after_compute hook -----------------------------------------------------------

    def after_compute(self, event: Any) -> None:
        loss = self.loss_label(event.result.spec.name)
        timings = event.response.timings
        for phase, ns in zip(
            PHASES, (timings.decode_ns, timings.compute_ns, timings.encode_ns), strict=True
        ):
            self.phase.labels(loss, phase).observe(ns / 1e9)
        self.received.labels(loss).inc(event.request_bytes)
        self.sent.labels(loss).inc(event.response.ByteSize())
        if event.result.non_finite:
            self.non_finite.labels(loss).inc()

    def _concurrency_exceeded(self) -> bool:
        # Read under the same server lock, just after gRPC computed the same condition.
        state = self._server_state
        return (
            state is not None
            and state.maximum_concurrent_rpcs is not None
            and state.active_rpc_count >= state.maximum_concurrent_rpcs
        )

    def _finish(
        self,
        labels: tuple[str, str, str],
        code: grpc.StatusCode,
        seconds: float,
        reason: str | None = None,
    ) -> None:
        self.handled.labels(*labels, CODE_NAMES.get(code, "Unknown")).inc()
        self.handling.labels(*labels).observe(seconds)
        reason = reason or REFUSALS.get(code)
        if reason is not None:
            self.rejected.labels(reason).inc()


def catalogue() -> list[tuple[str, str, tuple[str, ...], str]]:
    """Every series a server can export: (name, type, label names, help), for the README.

    Read from the declarations themselves (a Metrics with every optional source attached), so
    the documentation cannot drift from what is served.
    """
    audit = AuditCollector(dict)
    list(audit.collect())  # learns the keys it reads
    metrics = Metrics(
        device="cuda:0",
        audit_stats=lambda: dict.fromkeys(audit.keys, 1),
        memory_probe=lambda: {"allocated": 1, "reserved": 1, "total": 1},
    )
    rows = []
    for family in metrics.registry.collect():
        labels: list[str] = []
        for sample in family.samples:
            labels += [k for k in sample.labels if k not in labels and k not in ("le", "quantile")]
        suffix = "_total" if family.type == "counter" else ""
        rows.append((family.name + suffix, family.type, tuple(labels), family.documentation))
    # Labelled series have no samples until first used: take their label names from the declarations.
    declared = {
        m._name + ("_total" if m._type == "counter" else ""): tuple(m._labelnames)
        for m in vars(metrics).values()
        if isinstance(m, (Counter, Gauge, Histogram))
    }
    return sorted(
        (name, kind, declared.get(name) or labels, doc) for name, kind, labels, doc in rows
    )


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
    """The loss a LossService message asks for (Compute and chunked-header messages)."""
    if isinstance(message, pb.ComputeRequest):
        return message.loss
    if type(message).__name__ == "RawRequest":  # budget.RawRequest: Compute parses it later
        return message.loss
    if getattr(message, "header", None) is not None and message.WhichOneof("part") == "header":
        return message.header.request.loss  # ComputeChunkedRequest
    return None


class MetricsInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: sees every call that reaches a registered handler."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, and no label from a client-chosen name
        service, _, method = details.method.lstrip("/").partition("/")
        labels = (grpc_type(handler), service, method)
        m = self.m
        if m._concurrency_exceeded():
            # gRPC refuses this call with RESOURCE_EXHAUSTED without running any handler.
            m.started.labels(*labels).inc()
            m._finish(labels, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0, CONCURRENCY_LIMIT)
            return handler
        counts_losses = service == "lossd.v1.LossService"
        return rewrap(
            handler, lambda behavior: self._observe(behavior, handler, labels, counts_losses)
        )

    def _observe(
        self, behavior: Callable, handler: Any, labels: tuple[str, str, str], counts_losses: bool
    ) -> Callable:
        m = self.m
        pending: collections.deque[str] = collections.deque()  # losses asked for, not yet answered

        def asked(message: Any) -> Any:
            if counts_losses:
                loss = _loss_of(message)
                if loss is not None:
                    pending.append(m.loss_label(loss))
            return message

        def answered(code: grpc.StatusCode) -> None:
            if pending:
                m.requests.labels(pending.popleft(), CODE_NAMES.get(code, "Unknown")).inc()

        def requests_of(request: Any) -> Any:
            if not handler.request_streaming:
                return asked(request)

            def counted() -> Iterator[Any]:
                for message in request:
                    m.msg_received.labels(*labels).inc()
                    yield asked(message)

            return counted()

        def begin() -> float:
            m.started.labels(*labels).inc()
            m.inflight.inc()
            return time.perf_counter()

        def end(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            code = _status(context, failed)
            m.inflight.dec()
            if code is not grpc.StatusCode.OK or not handler.response_streaming:
                answered(code)
            pending.clear()
            m._finish(
                labels, code, time.perf_counter() - start, getattr(context, REFUSAL_ATTRIBUTE, None)
            )

        if handler.response_streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = begin()
                failed = True
                try:
                    for response in behavior(requests_of(request), context):
                        m.msg_sent.labels(*labels).inc()
                        answered(grpc.StatusCode.OK)
                        yield response
                    failed = False
                finally:
                    end(context, start, failed)

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            start = begin()
            failed = True
            try:
                response = behavior(requests_of(request), context)
                failed = False
                return response
            finally:
                end(context, start, failed)

        return unary


# ------------------------------------------------------------------------------------------
# Scrape-time collectors


class AuditCollector(Collector):
    """Reads the audit writer's ``stats()`` at scrape time.

    Known keys (others are ignored, missing ones are not exported): ``queue_depth``,
    ``queue_capacity``, ``records_written``, ``records_dropped``, ``records_refused``,
    ``queue_blocked``, ``capture_skipped``, ``checkpoints_signed``, ``write_seconds_sum``,
    ``write_seconds_count``, ``last_write_seconds``.
    """

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self.stats = stats
        self.keys: set[str] = set()  # the stats keys it knows, filled in by each collect()

    def describe(self) -> list:
        return []  # values are read at scrape time only

    def collect(self) -> Iterator[Any]:
        try:
            stats = dict(self.stats() or {})
        except Exception:  # noqa: BLE001 - a failing probe must not break the whole scrape
            stats = {}
        gauges = {
            "queue_depth": ("lossd_audit_queue_depth", "Audit records waiting to be written."),
            "queue_capacity": (
                "lossd_audit_queue_capacity",
                "Audit records the queue holds before calls block.",
            ),
            "last_write_seconds": (
                "lossd_audit_last_write_seconds",
                "Duration of the latest audit write, in seconds.",
            ),
        }
        self.keys = {*gauges}  # what catalogue() feeds to list every series
        for key, (name, doc) in gauges.items():
            if _number(stats.get(key)):
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        counters = {
            "records_written": ("lossd_audit_records_written", "Audit records committed."),
            "records_dropped": (
                "lossd_audit_records_dropped",
                "Audit records that could not be written.",
            ),
            "records_refused": (
                "lossd_audit_records_refused",
                "Audited calls failed UNAVAILABLE because the queue stayed full or the commit timed out.",
            ),
            "queue_blocked": (
                "lossd_audit_queue_blocked",
                "Audited calls that found the queue full and had to wait for room.",
            ),
            "capture_skipped": (
                "lossd_audit_capture_skipped",
                "Inputs of audited calls recorded by digest only because --audit-capture-max-mb was reached.",
            ),
            "checkpoints_signed": (
                "lossd_audit_checkpoints_signed",
                "Chain heads this server signed and stored (periodic, at shutdown, on request).",
            ),
        }
        self.keys |= {*counters, "write_seconds_count", "write_seconds_sum"}
        for key, (name, doc) in counters.items():
            if _number(stats.get(key)):
                yield CounterMetricFamily(name, doc, value=float(stats[key]))
        if _number(stats.get("write_seconds_count")) and _number(stats.get("write_seconds_sum")):
            yield SummaryMetricFamily(
                "lossd_audit_write_seconds",
                "Audit write latency (per committed batch), in seconds.",
                count_value=float(stats["write_seconds_count"]),
                sum_value=float(stats["write_seconds_sum"]),
            )


class DeviceMemoryCollector(Collector):
    """Device memory in use, read from the allocator at scrape time."""

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
        docs = {
            "allocated": (
                "lossd_device_memory_allocated_bytes",
                "Device memory held by tensors, in bytes.",
            ),
            "reserved": (
                "lossd_device_memory_reserved_bytes",
                "Device memory reserved by the caching allocator, in bytes.",
            ),
            "total": ("lossd_device_memory_total_bytes", "Device memory in total, in bytes."),
        }
        for key, (name, doc) in docs.items():
            if _number(values.get(key)):
                family = GaugeMetricFamily(name, doc, labels=["device"])
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
