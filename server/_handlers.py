"""Rebuilding a gRPC method handler around a wrapped behaviour: what every interceptor here does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def rewrap(handler: Any, wrap: Callable[[Callable], Callable]) -> Any:
    """The same RPC method handler with its behaviour wrapped by ``wrap``."""
    if handler.request_streaming and handler.response_streaming:
        make, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        make, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        make, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        make, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    return make(
        wrap(behavior),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class Rewrapped:
    """Rewrapped handlers by key, built once: an interceptor wraps the same registered handler in
    the same way on every call of a method, so the wrapper (stateless: per-call state lives in
    the call) is reused instead of rebuilt per call. At most ``limit`` are kept."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._built: dict[Any, Any] = {}

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        wrapped = self._built.get(key)
        if wrapped is None:
            wrapped = build()
            if len(self._built) < self.limit:
                self._built[key] = wrapped
        return wrapped
