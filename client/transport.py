"""Transports besides unary ``Compute``: chunked transfers for large tensors.

Chunked (``ComputeChunked``): the request goes as a header (the ``ComputeRequest`` with the large
tensors' ``data`` left empty, plus their paths and byte counts) followed by ``data`` messages of
``chunk_bytes``; the answer comes back the same way. Each side assembles the bytes into ONE
preallocated buffer and decodes tensors as zero-copy views of it; 16-bit dtypes stay 16-bit.
The framing and the ``Assembler`` are shared with the server (``lossd.client.wire``).

(A ``ComputeStream`` session transport was removed: bench/RESULTS.md, "Stream sessions".)
"""

from __future__ import annotations

import threading
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
    chunk_parser,
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
    # Read to the end: the server ends the stream with its status right after the data. Ending
    # the call by cancelling it instead would race that status (a served call counted Canceled).
    if next(answers, None) is not None:
        answers.cancel()
        raise _ProtocolError(f"more messages after {assembler.total} bytes of gradient data")
    return first.header.response, assembler.tensors()


class _ProtocolError(Exception):
    """The server broke the chunked protocol (a version mismatch); surfaces as INTERNAL."""


# --------------------------------------------------------------------------------------------
# Choosing a transport per call

TRANSPORTS = ("auto", "unary", "chunked")
DEFAULT_CHUNK_THRESHOLD = 4 << 20  # bytes of tensors in one call; see bench/RESULTS.md
OUTBOARD_MIN_BYTES = 64 << 10  # smaller tensors ride inline in the chunked header


class Transport:
    """How one ``RemoteLoss``'s calls travel.

    ``mode``:
      - ``"auto"`` (default): chunked when the call's tensors add up to ``chunk_threshold``
        bytes or more, else unary;
      - ``"unary"``: one ``Compute`` RPC per call (the message limit applies);
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
        if outboard is None:
            return client.compute(request), None

        def attempt(remaining: float | None) -> tuple[pb.ComputeResponse, dict[str, Tensor]]:
            return chunked_compute(
                self._chunked_method(),
                request,
                outboard,
                timeout=remaining,
                chunk_bytes=self.chunk_bytes,
                max_bytes=1 << 62,  # the client asked for these gradients; the server bounds them
                metadata=client.metadata,
            )

        try:
            # A retry resends the whole call, maybe to another replica, with the same request id.
            return client.retrying(attempt)
        except grpc.RpcError as error:
            raise from_rpc_error(error, request.request_id) from None
        except (_ProtocolError, codec.DecodeError) as exc:
            raise LossdError(
                grpc.StatusCode.INTERNAL,
                f"malformed chunked answer: {exc}",
                request_id=request.request_id,
            ) from None

    def _chunked_method(self) -> Any:
        with self._lock:
            if self._chunked is None:
                self._chunked = chunked_method(self.client.channel)
            return self._chunked

    def close(self) -> None:
        with self._lock:
            self._chunked = None
