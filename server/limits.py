"""Per-call deadlines on the server side.

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

from collections.abc import Callable
from typing import Any

import grpc

from .errors import Cancelled, DeadlineExceeded, ServiceError
from .service import ComputeEvent, abort


def caller_gone(context: grpc.ServicerContext | None, what: str) -> ServiceError | None:
    """Why the caller no longer wants this call's result, or None while it still does."""
    if context is None:
        return None
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return DeadlineExceeded(f"the caller's deadline passed before {what}; nothing was sent or audited")
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

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            error = caller_gone(context, "the call was started")
            if error is not None:
                abort(context, error)
            return behavior(request, context)

        make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        return make(guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
