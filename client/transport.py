"""Transports besides unary ``Compute``: chunked transfers for large tensors.

Chunked (``ComputeChunked``): the request goes as a header (the ``ComputeRequest`` with the large
tensors' ``data`` left empty, plus their paths and byte counts) followed by ``data`` messages of
``chunk_bytes``; the answer comes back the same way. Each side assembles the bytes into ONE
preallocated buffer and decodes tensors as zero-copy views of it; 16-bit dtypes stay 16-bit.
The framing and the ``Assembler`` are shared with the server (``lossd.client.wire``).

(A ``ComputeStream`` session transport was removed: bench/RESULTS.md, "Stream sessions".)
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from torch import Tensor

from . import bulk, shm
from ._proto import lossd_pb2 as pb
from .connection import new_request_id
from .errors import LossdError, from_rpc_error
from .prepared import PreparedRequests
from .wire import codec
from .wire.assembler import Assembler
from .wire.framing import (
    ALIGN,
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
    regions: shm.Regions | None = None,
    plane: bulk.Plane | None = None,
) -> tuple[pb.ComputeResponse, dict[str, Tensor]]:
    """One evaluation over ComputeChunked. Raises grpc.RpcError like a unary call would.
    ``regions``: the inputs are in shared memory (client/shm.py), so no data frames are sent.
    ``plane``: the server's bulk data port (client/bulk.py), used once it announced one."""
    header = pb.ComputeChunkedRequest(
        header=pb.ChunkedRequestHeader(request=request, tensors=refs(outboard.tensors))
    )
    sock = None
    if regions is not None:
        metadata = (
            *(metadata or ()),
            (shm.METADATA_KEY, regions.handle),
            (shm.IDENTITY_KEY, shm.identity()),
        )
    elif plane is not None and plane.usable and outboard.tensors:
        try:
            sock, named = plane.open(timeout)
            metadata = (*(metadata or ()), (bulk.METADATA_KEY, named))
        except ConnectionError:  # refused or reset (a restart, a busy server): frames until it
            plane.forget()  # names the port again
        except OSError:  # not reachable from here (a firewall, another host): data frames
            plane.off()

    def messages() -> Iterator[bytes]:
        yield header.SerializeToString()
        if regions is None and sock is None:
            yield from iter_frames(outboard.tensors, chunk_bytes)

    answers = method(messages(), timeout=timeout, metadata=metadata)
    if sock is not None:
        return _bulk_answer(answers, sock, outboard, max_bytes)
    first = _header_of(answers)
    if plane is not None:
        plane.learn(answers.initial_metadata())
    if regions is not None and (shm.ACCEPTED_KEY, "in,out") in (answers.initial_metadata() or ()):
        answers.cancel()  # the answer's large tensors are in OUT; no data frames follow
        try:
            return first.header.response, regions.answer(first.header.tensors)
        except ValueError as exc:
            raise _ProtocolError(str(exc)) from None
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


def _header_of(answers: Any) -> Any:
    first = next(answers, None)
    if not isinstance(first, pb.ComputeChunkedResponse) or first.WhichOneof("part") != "header":
        answers.cancel()
        raise _ProtocolError("expected a response header first")
    return first


def _bulk_answer(
    answers: Any, sock: socket.socket, outboard: codec.Outboard, max_bytes: int
) -> tuple[pb.ComputeResponse, dict[str, Tensor]]:
    """The rest of a call whose bytes go on ``sock``: ours are sent while the answer is awaited
    (a refusal ends the call before the server read them), the answer's are read from it."""
    sender = bulk.Sender(sock, outboard.tensors, answers.cancel)
    try:
        try:
            first = _header_of(answers)
        except grpc.RpcError:
            if sender.error is None or answers.code() != grpc.StatusCode.CANCELLED:
                raise
            # The server closed the connection before taking the bytes (too many waiting, a
            # reset on the way): data frames instead.
            raise _BulkRefused(str(sender.error)) from None
        if (bulk.ACCEPTED_KEY, "1") not in (answers.initial_metadata() or ()):
            answers.cancel()
            raise _ProtocolError("the server answered without taking the bulk data connection")
        sender.join()
        assembler = Assembler(first.header.tensors, max_bytes, "response.tensors")
        try:
            if sender.error is not None:
                raise sender.error
            assembler.read_from(sock.recv_into)
        except (OSError, codec.DecodeError) as exc:
            next(answers, None)  # the server's status says why, when it failed
            raise _ProtocolError(f"bulk data connection: {exc}") from None
        if next(answers, None) is not None:
            answers.cancel()
            raise _ProtocolError("more messages after the answer's header")
        return first.header.response, assembler.tensors()
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # ends the sender too, if the call failed
        sock.close()
        sender.join()


class _BulkRefused(Exception):
    """The bulk data connection broke before the server read the call's bytes."""


class _ProtocolError(Exception):
    """The server broke the chunked protocol (a version mismatch); surfaces as INTERNAL."""


def _declined(error: grpc.RpcError, what: str) -> bool:
    """The server declined a fast path (``what``: its message prefix); the data frames remain."""
    code = error.code() if hasattr(error, "code") else None
    return code == grpc.StatusCode.FAILED_PRECONDITION and (error.details() or "").startswith(what)


def _unaware_of_shm(error: grpc.RpcError) -> bool:
    """A server from before shared memory (or a proxy that dropped the call's metadata) ignored
    the regions and waited for data frames that never came: the data frames remain."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() or ""
    # "data: the stream ended after 0 of N bytes of tensor data", from server/chunked.py
    return code == grpc.StatusCode.INVALID_ARGUMENT and "the stream ended after 0 of" in details


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
        # Shared memory for chunked calls to a unix: or loopback endpoint unless the caller
        # turned it off (ConnectionOptions.shm=False); False once the server declined.
        opted = getattr(getattr(client, "options", None), "shm", None)
        self.shm = (
            opted is not False
            and shm.available()
            and shm.local_target(getattr(client, "target", ""))
        )
        options = getattr(client, "options", None)
        tls = any(getattr(options, name, None) for name in ("tls", "tls_ca", "tls_cert", "tls_key"))
        self.plane = bulk.Plane(getattr(client, "target", ""), tls)
        self._pool = shm.Pool()  # the answer regions, reused between this transport's calls
        self.prepared = PreparedRequests()  # unary requests laid out per call signature

    def _regions(self, outboard: codec.Outboard) -> shm.Regions | None:
        """The shared-memory regions for this call, or None to send the data."""
        if not self.shm:
            return None
        try:
            room = sum(-(-flat.numel() // ALIGN) * ALIGN for _, flat in outboard.tensors)
            return shm.Regions(outboard.tensors, room, self._pool)
        except OSError:  # no memfds here (a sandbox, a seccomp filter): send the data
            self.shm = False
            return None

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
            request.request_id = new_request_id()
        if outboard is None:
            return client.compute(request), None

        def chunked(remaining: float | None, regions: shm.Regions | None) -> Any:
            return chunked_compute(
                self._chunked_method(),
                request,
                outboard,
                timeout=remaining,
                chunk_bytes=self.chunk_bytes,
                max_bytes=1 << 62,  # the client asked for these gradients; the server bounds them
                metadata=client.metadata,
                regions=regions,
                plane=self.plane,
            )

        def attempt(remaining: float | None) -> tuple[pb.ComputeResponse, dict[str, Tensor]]:
            regions = self._regions(outboard)
            if regions is None:
                try:
                    return chunked(remaining, None)
                except grpc.RpcError as error:
                    if not _declined(error, "bulk:"):
                        raise
                    self.plane.off()  # the server declined the data connection: frames
                except _BulkRefused:
                    self.plane.forget()  # closed unread (a busy server): frames for now
                return chunked(remaining, None)
            try:
                return chunked(remaining, regions)
            except grpc.RpcError as error:
                # Not accepted (turned off, another pid namespace, over --shm-max-mb) or not
                # known (an older lossd): from now on this transport sends the data.
                if not (_declined(error, "shared memory:") or _unaware_of_shm(error)):
                    raise
                self.shm = False
                self._pool.close()
            finally:
                regions.close()
            return chunked(remaining, None)

        try:
            # A retry resends the whole call, maybe to another replica, with the same request id.
            return client.retrying(attempt)
        except grpc.RpcError as error:
            raise from_rpc_error(error, request.request_id, client.target) from None
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
        self._pool.close()
