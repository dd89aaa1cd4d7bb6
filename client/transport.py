"""Transports besides unary ``Compute``: chunked transfers for large tensors, and stream sessions.

Chunked (``ComputeChunked``): the request goes as a header (the ``ComputeRequest`` with the large
tensors' ``data`` left empty, plus their paths and byte counts) followed by ``data`` messages of
``chunk_bytes``; the answer comes back the same way. Each side assembles the bytes into ONE
preallocated buffer and decodes tensors as zero-copy views of it; 16-bit dtypes stay 16-bit.
The framing and the ``Assembler`` are shared with the server (``lossd.client.wire``).

Stream session (``ComputeStream``): one long-lived bidi stream per ``RemoteLoss``; requests go
one at a time, in order, each answered before the next is sent. A failed call ends the stream
with the same status unary ``Compute`` would return; the next call opens a new stream.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from torch import Tensor

from ._proto import lossd_pb2 as pb
from .errors import LossdError, from_rpc_error
from .wire import codec
from .wire.assembler import Assembler
from .wire.framing import (
    DEFAULT_CHUNK_BYTES,
    METHOD_CHUNKED,
    METHOD_STREAM,
    STREAM_REQUEST_TAG,
    chunk_parser,
    frame,
    iter_frames,
    refs,
)

# --------------------------------------------------------------------------------------------
# Client side


def _parse_chunked_response(data: bytes) -> Any:
    return pb.ComputeChunkedResponse.FromString(data)


def chunked_method(channel: grpc.Channel):
    return channel.stream_stream(
        METHOD_CHUNKED,
        request_serializer=None,
        response_deserializer=chunk_parser(_parse_chunked_response),
    )


def chunked_compute(
    method: Any,
    request: pb.ComputeRequest,
    outboard: codec.Outboard,
    *,
    timeout: float | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_bytes: int,
    metadata: Any = None,
) -> tuple[pb.ComputeResponse, dict[str, Tensor]]:
    """One evaluation over ComputeChunked. Raises grpc.RpcError like a unary call would."""
    header = pb.ComputeChunkedRequest(
        header=pb.ChunkedRequestHeader(request=request, tensors=refs(outboard.tensors))
    )

    def messages() -> Iterator[bytes]:
        yield header.SerializeToString()
        yield from iter_frames(outboard.tensors, chunk_bytes)

    answers = method(messages(), timeout=timeout, metadata=metadata)
    first = next(answers, None)
    if not isinstance(first, pb.ComputeChunkedResponse) or first.WhichOneof("part") != "header":
        answers.cancel()
        raise _ProtocolError("expected a response header first")
    assembler = Assembler(first.header.tensors, max_bytes, "response.tensors")
    while not assembler.complete:
        chunk = next(answers, None)
        if not isinstance(chunk, memoryview):
            answers.cancel()
            raise _ProtocolError(
                f"response ended after {assembler.received} of {assembler.total} bytes"
            )
        assembler.feed(chunk)
    answers.cancel()  # the server ends the stream after the data; nothing else is expected
    return first.header.response, assembler.tensors()


class _ProtocolError(Exception):
    """The server broke the chunked protocol (a version mismatch); surfaces as INTERNAL."""


class StreamSession:
    """One long-lived ComputeStream: calls in order, one at a time, same errors as unary.

    Opened on first use; after a failed call (the server ends the stream with the error's
    status) the next call opens a new stream. ``timeout`` is per call: a call that overruns it
    cancels the stream and fails with DEADLINE_EXCEEDED, as a unary call would.
    """

    def __init__(
        self, channel: grpc.Channel, timeout: float | None = None, metadata: Any = None
    ) -> None:
        self._method = channel.stream_stream(
            METHOD_STREAM,
            request_serializer=None,
            response_deserializer=pb.ComputeStreamResponse.FromString,
        )
        self.timeout = timeout
        self.metadata = metadata
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self._answers: Any = None
        self._timer_lock = threading.Condition()
        self._deadline: float | None = None
        self._expired = False
        self._watchdog: threading.Thread | None = None
        self._closed = False

    def compute(
        self, request: pb.ComputeRequest, timeout: float | None = None
    ) -> pb.ComputeResponse:
        """``timeout``: this call's seconds, when less than the session's (a retry's remainder)."""
        # ComputeStreamRequest{request}: frame the serialized request by hand (no message copy).
        framed = frame(STREAM_REQUEST_TAG, request.SerializeToString())
        seconds = self.timeout if timeout is None else timeout
        with self._lock:
            if self._answers is None:
                self._open()
            self._queue.put(framed)
            try:
                if seconds is None:
                    answer = next(self._answers)
                else:
                    self._arm(seconds)
                    try:
                        answer = next(self._answers)
                    finally:
                        self._disarm()
            except StopIteration:
                self._reset()
                raise _ProtocolError("the server ended the stream without an answer") from None
            except grpc.RpcError as error:
                self._reset()
                if self._expired:
                    raise _Expired(error) from None
                raise
            return answer.response

    def _open(self) -> None:
        self._queue = queue.SimpleQueue()
        self._answers = self._method(iter(self._queue.get, None), metadata=self.metadata)

    def _reset(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
        if self._answers is not None:
            self._answers.cancel()
        self._queue = self._answers = None

    # One watchdog thread per session enforces per-call deadlines (a stream has no per-message
    # deadline in gRPC); it sleeps on a condition, so an armed call costs two notifications.
    def _arm(self, seconds: float) -> None:
        with self._timer_lock:
            self._expired = False
            self._deadline = time.monotonic() + seconds
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="lossd-stream-deadline", daemon=True
                )
                self._watchdog.start()
            self._timer_lock.notify()

    def _disarm(self) -> None:
        with self._timer_lock:
            self._deadline = None

    def _watch(self) -> None:
        with self._timer_lock:
            while not self._closed:
                if self._deadline is None:
                    self._timer_lock.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._timer_lock.wait(left)
                    continue
                self._deadline = None
                self._expired = True
                answers = self._answers
                if answers is not None:
                    answers.cancel()

    def close(self) -> None:
        with self._lock:
            self._reset()
        with self._timer_lock:
            self._closed = True
            self._timer_lock.notify()


class _Expired(Exception):
    """A stream call overran its deadline; surfaces as DEADLINE_EXCEEDED."""

    def __init__(self, error: grpc.RpcError) -> None:
        super().__init__("deadline exceeded")
        self.error = error


# --------------------------------------------------------------------------------------------
# Choosing a transport per call

TRANSPORTS = ("auto", "unary", "stream", "chunked")
DEFAULT_CHUNK_THRESHOLD = 4 << 20  # bytes of tensors in one call; see bench/RESULTS.md
OUTBOARD_MIN_BYTES = 64 << 10  # smaller tensors ride inline in the chunked header


class Transport:
    """How one ``RemoteLoss``'s calls travel.

    ``mode``:
      - ``"auto"`` (default): chunked when the call's tensors add up to ``chunk_threshold``
        bytes or more, else the stream session;
      - ``"unary"``: one ``Compute`` RPC per call (the message limit applies);
      - ``"stream"``: the long-lived ``ComputeStream`` session (the message limit applies);
      - ``"chunked"``: always ``ComputeChunked``.
    """

    def __init__(
        self,
        client: Any,
        mode: str = "auto",
        *,
        chunk_threshold: int = DEFAULT_CHUNK_THRESHOLD,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if mode not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {mode!r}")
        if chunk_bytes <= 0 or chunk_threshold < 0:
            raise ValueError("chunk_bytes must be > 0 and chunk_threshold >= 0")
        self.client = client
        self.mode = mode
        self.chunk_threshold = chunk_threshold
        self.chunk_bytes = chunk_bytes
        self._session: StreamSession | None = None
        self._chunked: Any = None
        self._lock = threading.Lock()

    def wants_chunks(self, tensors: Sequence[tuple[str, Tensor]]) -> bool:
        if self.mode == "chunked":
            return True
        if self.mode != "auto":
            return False
        return sum(t.numel() * t.element_size() for _, t in tensors) >= self.chunk_threshold

    def outboard(self, tensors: Sequence[tuple[str, Tensor]]) -> codec.Outboard | None:
        """An Outboard when this call goes chunked, else None (inline bytes)."""
        if not self.wants_chunks(tensors):
            return None
        return codec.Outboard(
            min(OUTBOARD_MIN_BYTES, self.chunk_threshold) if self.mode == "auto" else 0
        )

    def send(
        self, request: pb.ComputeRequest, outboard: codec.Outboard | None
    ) -> tuple[pb.ComputeResponse, dict[str, Tensor] | None]:
        """Run one evaluation; failures are raised as ``LossdError`` exactly as unary raises them."""
        client = self.client
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if outboard is None and self.mode in ("unary", "chunked"):
            return client.compute(request), None
        if outboard is None:
            client.check_size(request, request.request_id)

        def attempt(remaining: float | None) -> tuple[pb.ComputeResponse, dict[str, Tensor] | None]:
            if outboard is not None:
                return chunked_compute(
                    self._chunked_method(),
                    request,
                    outboard,
                    timeout=remaining,
                    chunk_bytes=self.chunk_bytes,
                    max_bytes=1
                    << 62,  # the client asked for these gradients; the server bounds them
                    metadata=client.metadata,
                )
            return self.session().compute(request, timeout=remaining), None

        try:
            # A failed session is reset by StreamSession; the retry opens a new stream, maybe to
            # another replica, with the same request id.
            return client.retrying(attempt)
        except grpc.RpcError as error:
            raise from_rpc_error(error, request.request_id) from None
        except _Expired:
            raise LossdError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "Deadline Exceeded",
                request_id=request.request_id,
            ) from None
        except (_ProtocolError, codec.DecodeError) as exc:
            raise LossdError(
                grpc.StatusCode.INTERNAL,
                f"malformed chunked answer: {exc}",
                request_id=request.request_id,
            ) from None

    def session(self) -> StreamSession:
        with self._lock:
            if self._session is None:
                self._session = StreamSession(
                    self.client.channel, self.client.timeout, self.client.metadata
                )
            return self._session

    def _chunked_method(self) -> Any:
        with self._lock:
            if self._chunked is None:
                self._chunked = chunked_method(self.client.channel)
            return self._chunked

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
            self._session = self._chunked = None
