"""The transport floor: a trivial gRPC servicer with the same server settings as lossd.

``python -m bench.floor --port 0 --workers 4`` prints ``floor listening on HOST:PORT``.

- ``/bench.Floor/Echo`` (unary): takes a ``google.protobuf.BytesValue`` (the request's bytes, a
  naive protobuf bytes field) and answers a prebuilt ``BytesValue`` of ``x-response-bytes`` bytes
  (the gradient's size). The handler does no work: what is left is gRPC + protobuf.
- ``/bench.Floor/PingPong`` (bidi): the same, one answer per message, on one long-lived stream.

The server is a sync ``grpc.server`` with the same thread count and message limits as lossd, so a
ratio lossd/floor isolates what lossd adds.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from google.protobuf.wrappers_pb2 import BytesValue

SERVICE = "bench.Floor"
ECHO = f"/{SERVICE}/Echo"
PING_PONG = f"/{SERVICE}/PingPong"

_responses: dict[int, bytes] = {}
_lock = threading.Lock()


def _response(context: grpc.ServicerContext) -> bytes:
    size = 0
    for key, value in context.invocation_metadata():
        if key == "x-response-bytes":
            size = int(value)
    cached = _responses.get(size)
    if cached is None:
        with _lock:
            cached = _responses.setdefault(
                size, BytesValue(value=b"\x01" * size).SerializeToString()
            )
    return cached


def _echo(request: BytesValue, context: grpc.ServicerContext) -> bytes:
    return _response(context)


def _ping_pong(requests: Iterator[BytesValue], context: grpc.ServicerContext) -> Iterator[bytes]:
    answer = _response(context)
    for _ in requests:
        yield answer


def handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            # Requests are parsed as protobuf (what any protobuf server must do); responses are
            # prebuilt serialized bytes, so the handler itself costs nothing.
            "Echo": grpc.unary_unary_rpc_method_handler(
                _echo, request_deserializer=BytesValue.FromString
            ),
            "PingPong": grpc.stream_stream_rpc_method_handler(
                _ping_pong, request_deserializer=BytesValue.FromString
            ),
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-message-mb", type=int, default=256)
    parser.add_argument("--max-concurrent-rpcs", type=int, default=64)
    parser.add_argument("--unix", default="", help="also listen on this Unix-domain socket")
    args = parser.parse_args()
    limit = args.max_message_mb << 20
    server = grpc.server(
        # The same pool lossd's server builds (one thread per admitted RPC; lossd additionally
        # bounds concurrent evaluations by --workers, which a handler that does nothing needs not).
        futures.ThreadPoolExecutor(max_workers=max(args.workers, args.max_concurrent_rpcs)),
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ],
        maximum_concurrent_rpcs=args.max_concurrent_rpcs,
    )
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if args.unix:
        server.add_insecure_port(f"unix:{args.unix}")
    server.start()
    print(f"floor listening on {args.host}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(0).wait()
    return 0


class FloorClient:
    """The bench side of the floor: naive protobuf bytes, the way a plain gRPC client sends them."""

    def __init__(self, target: str, max_message_mb: int = 1024) -> None:
        limit = max_message_mb << 20
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        self._echo = self.channel.unary_unary(
            ECHO,
            request_serializer=BytesValue.SerializeToString,
            response_deserializer=BytesValue.FromString,
        )
        self._ping_pong = self.channel.stream_stream(
            PING_PONG,
            request_serializer=BytesValue.SerializeToString,
            response_deserializer=BytesValue.FromString,
        )

    def echo(self, payload: bytes, response_bytes: int) -> int:
        """One round trip; returns the answer's size (reading the bytes field once, as a client must)."""
        answer = self._echo(
            BytesValue(value=payload), metadata=(("x-response-bytes", str(response_bytes)),)
        )
        return len(answer.value)

    def ping_pong(self, payload: bytes, response_bytes: int) -> PingPong:
        return PingPong(self._ping_pong, payload, response_bytes)

    def close(self) -> None:
        self.channel.close()


class PingPong:
    """One open bidi stream; ``round_trip()`` sends one message and waits for its answer."""

    def __init__(self, method, payload: bytes, response_bytes: int) -> None:
        import queue

        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._payload = payload
        self._responses = method(
            iter(self._queue.get, None), metadata=(("x-response-bytes", str(response_bytes)),)
        )

    def round_trip(self) -> int:
        self._queue.put(BytesValue(value=self._payload))
        return len(next(self._responses).value)

    def close(self) -> None:
        self._queue.put(None)
        for _ in self._responses:
            pass


if __name__ == "__main__":
    raise SystemExit(main())
