"""Hand framing of ``ComputeChunked``'s data messages (torch-free).

Data chunks of ``ComputeChunked`` are framed and parsed by hand, as valid protobuf (the
``data`` field, length-delimited): upb would otherwise copy every chunk into and out of a
message object. The field tags come from the proto descriptors, so a renumbered field cannot
silently desynchronise the two sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._proto import lossd_pb2 as pb

_SERVICE = pb.DESCRIPTOR.services_by_name["LossService"]
METHOD_CHUNKED = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['ComputeChunked'].name}"
DEFAULT_CHUNK_BYTES = 1 << 20  # measured best on loopback (bench/RESULTS.md)
ALIGN = 64  # tensors inside the assembled buffer start on cache-line boundaries
_LENGTH_DELIMITED = 2  # protobuf wire type of bytes and message fields


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """The aligned offsets of tensors of ``sizes`` bytes and the region's size (as Assembler)."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // ALIGN) * ALIGN
    return offsets, end


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, pos: int, end: int | None = None) -> tuple[int, int] | None:
    """(value, position after it) of the varint at ``pos``; None when it is cut short or runs
    past ten bytes. ``end``: where ``data`` stops counting (default its length)."""
    end = len(data) if end is None else end
    result = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    return None


def field_tag(message: Any, name: str) -> bytes:
    """The tag of a length-delimited field of ``message``, read from its descriptor."""
    return varint(message.DESCRIPTOR.fields_by_name[name].number << 3 | _LENGTH_DELIMITED)


DATA_TAG = field_tag(pb.ComputeChunkedRequest, "data")
if field_tag(pb.ComputeChunkedResponse, "data") != DATA_TAG:  # one parser serves both directions
    raise ImportError(
        "ComputeChunkedRequest.data and ComputeChunkedResponse.data must share a number"
    )


def frame_data(chunk: memoryview) -> bytes:
    """A serialized chunk message holding only ``data`` (one copy, no message object)."""
    return b"".join((DATA_TAG, varint(len(chunk)), chunk))


def frame_size(payload: int) -> int:
    """Bytes of the data message that carries ``payload`` bytes."""
    return len(DATA_TAG) + len(varint(payload)) + payload


def chunk_parser(full: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """Deserializer: a data-only chunk becomes a zero-copy memoryview, anything else ``full(data)``."""
    size = len(DATA_TAG)

    def parse(data: bytes) -> Any:
        if data[:size] == DATA_TAG:
            parsed = read_varint(data, size)
            if parsed is not None and parsed[0] + parsed[1] == len(data):
                return memoryview(data)[parsed[1] :]
        return full(data)

    return parse


def iter_frames(tensors: Sequence[tuple[str, Any]], chunk_bytes: int) -> Iterator[bytes]:
    """The data messages for ``tensors`` (flat CPU uint8), concatenated, ``chunk_bytes`` each."""
    for _, flat in tensors:
        view = memoryview(flat.numpy())
        for start in range(0, len(view), chunk_bytes):
            yield frame_data(view[start : start + chunk_bytes])


def refs(tensors: Sequence[tuple[str, Any]]) -> list[pb.ChunkedTensor]:
    return [pb.ChunkedTensor(path=path, size_bytes=flat.numel()) for path, flat in tensors]
