"""Server side of ``ComputeChunked``: assemble the request's chunks, evaluate, answer in chunks.

The request's large tensors arrive after a header as ``data`` chunks; they are copied once into
one buffer allocated up front (its size checked against ``--max-message-mb`` first) and decoded
as zero-copy views. The evaluation then goes through ``LossServicer.compute`` like any other
call, so validation, errors, audit and metrics hooks are the same as for unary ``Compute``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import codec, framing
from lossd.client.wire.assembler import Assembler

from .errors import InvalidArgument


def receive(
    requests: Iterator[Any],
    max_bytes: int,
    reserve: Callable[[pb.ChunkedRequestHeader, int], None] | None = None,
    shared: Callable[[pb.ChunkedRequestHeader], dict[str, Any]] | None = None,
    fill: Callable[[Assembler], None] | None = None,
) -> tuple[pb.ComputeRequest, dict[str, Any]]:
    """Read the header and every data chunk; return the request and its tensors' bytes by path.
    ``reserve(header, listed bytes)`` runs after the header, before any data is allocated or read.
    ``shared(header)``: the tensors' bytes from the caller's shared memory (server/shm.py), when
    it handed some over: then no data chunks follow the header. ``fill(assembler)``: the bytes
    come on the call's bulk data connection (server/bulk.py) instead of in data chunks."""
    first = next(requests, None)
    if first is None:
        raise InvalidArgument(
            "empty ComputeChunked stream: expected a header first", field="header"
        )
    if (
        isinstance(first, memoryview)
        or getattr(first, "WhichOneof", None) is None
        or first.WhichOneof("part") != "header"
    ):
        _check_parsed(first)
        raise InvalidArgument(
            "expected the header as the first message of ComputeChunked", field="header"
        )
    header = first.header
    if reserve is not None:
        listed = sum(max(ref.size_bytes, 0) for ref in header.tensors)
        if listed > max_bytes:
            Assembler(header.tensors, max_bytes)  # refuses it, naming --max-message-mb
        reserve(header, listed)
    if shared is not None:
        tensors = shared(header)  # checks the listed sizes as Assembler does
        _check_ended(requests, "its data is in shared memory")
        return header.request, tensors
    assembler = Assembler(header.tensors, max_bytes)
    if fill is not None:
        fill(assembler)
        _check_ended(requests, "its data came on the bulk data connection")
        return header.request, assembler.tensors()
    while not assembler.complete:
        message = next(requests, None)
        if message is None:
            raise InvalidArgument(
                f"the stream ended after {assembler.received} of {assembler.total} bytes of tensor data",
                field="data",
            )
        if not isinstance(message, memoryview):
            _check_parsed(message)
            if message.WhichOneof("part") != "data":
                raise InvalidArgument("expected tensor data, got a second header", field="header")
            message = message.data
        assembler.feed(message)
    # The client half-closes right after the data; anything more is a broken (or hostile) stream.
    if next(requests, None) is not None:
        raise InvalidArgument(
            f"expected the stream to end after {assembler.total} bytes of tensor data, got more messages",
            field="data",
        )
    return header.request, assembler.tensors()


def _check_ended(requests: Iterator[Any], why: str) -> None:
    if next(requests, None) is not None:
        raise InvalidArgument(f"expected the stream to end after the header: {why}", field="data")


def _check_parsed(message: Any) -> None:
    if getattr(message, "error", None) is not None:  # refused by the pre-scan
        raise message.error
    reason = getattr(message, "reason", None)
    if reason is not None:  # service.Malformed
        raise InvalidArgument(f"request is not a valid {message.type_name}: {reason}")


def answer(
    response: pb.ComputeResponse, outboard: codec.Outboard, chunk_bytes: int, frames: bool = True
) -> Iterator[bytes]:
    """The serialized response stream: the header, then the outboard tensors' bytes in chunks
    (``frames=False``: the header alone, the bytes having gone into the caller's shared memory)."""
    header = pb.ComputeChunkedResponse(
        header=pb.ChunkedResponseHeader(response=response, tensors=framing.refs(outboard.tensors))
    )
    yield header.SerializeToString()
    if frames:
        yield from framing.iter_frames(outboard.tensors, chunk_bytes)


def method_handler(servicer: Any, parse_header: Any) -> grpc.RpcMethodHandler:
    # Data chunks are parsed by hand into zero-copy memoryviews; the header (and anything
    # unusual) goes through the ordinary never-failing protobuf parser.
    return grpc.stream_stream_rpc_method_handler(
        servicer.ComputeChunked,
        request_deserializer=framing.chunk_parser(parse_header),
        response_serializer=None,  # the handler yields serialized bytes
    )
