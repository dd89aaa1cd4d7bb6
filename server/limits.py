"""Admission and per-call deadlines on the server side.

``AdmissionInterceptor`` enforces ``--max-concurrent-rpcs`` for the lossd services only: health
checks and reflection stay outside the limit (with a few slots of their own), so a saturated
replica still answers its probes SERVING instead of being restarted for being busy.

gRPC cancels a call whose deadline has passed, but a Python handler keeps running and its result
would still flow through the after_compute hooks (the audit trail) before being thrown away by the
transport. Two guards stop that:

- ``DeadlineInterceptor``: a call that waited in the queue past its deadline (or whose caller
  hung up) is refused before any decoding or computing starts;
- ``deadline_guard``: the first ``after_compute`` hook; a result that is ready only after the
  caller's deadline is discarded with DEADLINE_EXCEEDED, so it is neither sent nor audited.

A computation that is already running on the device is not interrupted (torch offers no safe
way to); the guards bound the wasted work to one evaluation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from ._handlers import Rewrapped, rewrap
from .errors import (
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    abort,
)

if TYPE_CHECKING:  # annotations only: the servicer imports this module
    from .service import ComputeEvent

# Probes never count against --max-concurrent-rpcs; gRPC's own limit is raised by this many
# slots (and threads) so that they always find one.
PROBE_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
PROBE_RESERVE = 8
# Long-lived probe streams (health Watch, reflection sessions) at once; more are refused at once,
# so open probe streams can never fill gRPC's own limit or the thread pool (they need no token).
PROBE_STREAMS = 8
# The metrics interceptor reads this attribute of the context to tell why a call was refused.
REFUSAL_ATTRIBUTE = "lossd_refusal"
CONCURRENCY_LIMIT = "concurrency_limit"


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Refuses a lossd RPC at once (RESOURCE_EXHAUSTED) when ``limit`` are already running, and
    every new one (UNAVAILABLE, which clients retry elsewhere) once the server drains."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.unanswered = 0  # admitted RPCs gRPC has not ended yet: their answers may be on the way
        self.draining = False
        self.probe_streams = 0
        self._lock = threading.Condition()
        self._wrapped = Rewrapped()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        service = details.method.lstrip("/").partition("/")[0]
        if handler is None:
            return handler
        if service in PROBE_SERVICES:
            if not handler.response_streaming:
                return handler  # Check: answered at once, outside every limit
            return rewrap(handler, self._probe_stream)
        return self._wrapped.get(
            handler,
            lambda: rewrap(
                handler, lambda behavior: self._admitted(behavior, handler.response_streaming)
            ),
        )

    def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait up to ``timeout`` for the running ones. True when none was
        left running."""
        with self._lock:
            self.draining = True
            return self._lock.wait_for(lambda: self.active <= 0, timeout=max(timeout, 0.0))

    def wait_answered(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until gRPC has ended every admitted RPC (sent its answer, or
        cancelled it): a handler that returned has not yet delivered its answer."""
        with self._lock:
            return self._lock.wait_for(lambda: self.unanswered <= 0, timeout=max(timeout, 0.0))

    def _answered(self) -> None:
        with self._lock:
            self.unanswered -= 1
            self._lock.notify_all()

    def _enter(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            admitted = not self.draining and self.active < self.limit
            if admitted:
                self.active += 1
                self.unanswered += 1
            draining = self.draining
        if admitted:
            if not context.add_callback(self._answered):  # False: the RPC has ended already
                self._answered()
            return
        if draining:
            # Accepted by gRPC after SIGTERM: the caller retries it on another replica (or this
            # one once restarted) with the same request id; nothing was computed or audited.
            abort(
                context,
                Unavailable("this server is shutting down; retry the call on another replica"),
            )
        setattr(context, REFUSAL_ATTRIBUTE, CONCURRENCY_LIMIT)
        abort(
            context,
            ResourceExhausted(
                f"{self.limit} calls are already running on this server (raise it with --max-concurrent-rpcs, "
                "or add replicas)"
            ),
        )

    def _probe_stream(self, behavior: Callable) -> Callable:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._lock:
                admitted = self.probe_streams < PROBE_STREAMS
                self.probe_streams += admitted
            if not admitted:
                abort(
                    context,
                    ResourceExhausted(
                        f"{PROBE_STREAMS} health-watch or reflection streams are already open on this "
                        "server; use the unary health Check"
                    ),
                )
            try:
                yield from behavior(request, context)
            finally:
                with self._lock:
                    self.probe_streams -= 1

        return stream

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1
            self._lock.notify_all()

    def _admitted(self, behavior: Callable, response_streaming: bool) -> Callable:
        if response_streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._enter(context)
                try:
                    yield from behavior(request, context)
                finally:
                    self._leave()

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter(context)
            try:
                return behavior(request, context)
            finally:
                self._leave()

        return unary


def caller_gone(context: grpc.ServicerContext | None, what: str) -> ServiceError | None:
    """Why the caller no longer wants this call's result, or None while it still does."""
    if context is None:
        return None
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return DeadlineExceeded(
            f"the caller's deadline passed before {what}; nothing was sent or audited"
        )
    if not context.is_active():
        return Cancelled(f"the caller cancelled before {what}; nothing was sent or audited")
    return None


def deadline_guard(event: ComputeEvent) -> None:
    """``after_compute`` hook, registered first: discard a result nobody is waiting for."""
    error = caller_gone(event.context, f"{event.call.loss} finished computing")
    if error is not None:
        raise error


class DeadlineInterceptor(grpc.ServerInterceptor):
    """Refuses unary-request calls whose caller is gone by the time a worker thread picks them up."""

    def __init__(self) -> None:
        self._wrapped = Rewrapped()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        return self._wrapped.get(handler, lambda: rewrap(handler, _guarded))


def _guarded(behavior: Callable) -> Callable:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        error = caller_gone(context, "the call was started")
        if error is not None:
            abort(context, error)
        return behavior(request, context)

    return guarded
