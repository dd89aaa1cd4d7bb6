"""Hostile bytes for the property suite, where the framing itself is what is attacked.

``draw_raw_bytes``: a unary payload that is not (or not quite) a ComputeRequest: noise, a valid
request truncated, with flipped bytes or a tail, a length prefix claiming far more than follows.
``draw_chunked``: the frames of one ComputeChunked call, a (possibly mutated) request moved to
chunks as the client's chunked transport does, with one framing fault: chunk sequences cut short
or too long, chunks dropped, repeated or reordered, byte counts that disagree with the header or
the shapes, claims past the limit, bad paths, headers missing or repeated, garbage frames.

Nothing here talks to a server: the tests send what these return.
"""

from __future__ import annotations

from hypothesis import strategies as st

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import framing
from tests.reliability.hostile import (
    APPLIED,
    FLOAT_DTYPES,
    INT64_MAX,
    INT64_MIN,
    all_specs,
    seed_bytes,
    tensor_slots,
)
from tests.reliability.hostile_mutations import draw_request

RAW_KINDS = ("noise", "truncated", "flipped", "appended", "varint")


def draw_raw_bytes(data: st.DataObject) -> tuple[bytes, str]:
    """Bytes that are not (or not quite) a ComputeRequest: noise, truncations, flipped bytes."""
    choice = data.draw(st.sampled_from(RAW_KINDS), label="raw kind")
    APPLIED[f"raw:{choice}"] += 1
    if choice == "noise":
        return data.draw(st.binary(max_size=512), label="noise"), choice
    specs = all_specs()
    spec = specs[data.draw(st.integers(0, len(specs) - 1), label="loss")]
    valid = seed_bytes(spec.name, data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype"), True)
    if choice == "truncated":
        cut = data.draw(st.integers(0, len(valid) - 1), label="cut")
        return valid[:cut], f"{spec.name} truncated at {cut}/{len(valid)}"
    if choice == "flipped":
        raw = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1), label="at")] = data.draw(
                st.integers(0, 255), label="byte"
            )
        return bytes(raw), f"{spec.name} with flipped bytes"
    if choice == "appended":
        return valid + data.draw(
            st.binary(min_size=1, max_size=64), label="tail"
        ), f"{spec.name} with a tail"
    # A length prefix claiming far more than follows, on a random field number.
    field = data.draw(st.integers(1, 20), label="field")
    return bytes([(field << 3) | 2]) + _varint(
        data.draw(st.sampled_from((1 << 20, 1 << 31, (1 << 63) - 1)), label="len")
    ) + b"\x00" * 4, "huge length prefix"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --------------------------------------------------------------------------------------------
# ComputeChunked: hostile sequences of frames


def to_chunked(request: pb.ComputeRequest) -> tuple[pb.ChunkedRequestHeader, list[bytes]]:
    """As the client's chunked transport does: every non-empty tensor's bytes leave the message
    and are listed in the header, in order."""
    refs: list[pb.ChunkedTensor] = []
    blobs: list[bytes] = []
    for path, t in tensor_slots(request):
        if t.data:
            refs.append(pb.ChunkedTensor(path=path, size_bytes=len(t.data)))
            blobs.append(t.data)
            t.data = b""
    return pb.ChunkedRequestHeader(request=request, tensors=refs), blobs


CHUNK_FAULTS = (
    "valid", "truncated", "extra_bytes", "dropped_chunk", "duplicated_chunk", "reordered", "size_mismatch",
    "negative_size", "huge_size", "big_claim", "unknown_path", "duplicate_path", "inline_and_chunked",
    "no_header", "two_headers", "empty_stream", "garbage_frame",
)  # fmt: skip

REF_FAULTS = (
    "size_mismatch", "negative_size", "huge_size", "big_claim", "unknown_path", "duplicate_path",
    "inline_and_chunked",
)  # fmt: skip


def draw_chunked(data: st.DataObject, max_bytes: int) -> tuple[list[bytes], list[str]]:
    """The serialized messages of one ComputeChunked call: a (possibly mutated) request moved to
    chunks, then one framing fault: chunk sequences cut short or too long, chunks dropped,
    repeated or reordered (bytes landing at the wrong offsets), byte counts that disagree with
    the header or the shapes, claims of more than ``max_bytes``, bad paths, headers missing or
    repeated, garbage frames."""
    request, done = draw_request(data, max_mutations=1, shallow=True)
    header, blobs = to_chunked(request)
    stream = b"".join(blobs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="cuts"))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    refs = header.tensors
    # A fault on a listed tensor is drawn only when the header lists one, so that no fault's
    # coverage depends on how often the request happens to carry tensors.
    faults = CHUNK_FAULTS if refs else tuple(f for f in CHUNK_FAULTS if f not in REF_FAULTS)
    fault = data.draw(st.sampled_from(faults), label="chunk fault")
    first = [pb.ComputeChunkedRequest(header=header).SerializeToString()]
    if fault == "truncated" and stream:
        # Cut the byte stream short, keeping the chunk boundaries before the cut (some chunks
        # may be empty, so cutting by chunk count alone could cut nothing).
        cut, kept, sent = data.draw(st.integers(0, len(stream) - 1), label="cut"), [], 0
        for chunk in chunks:
            if sent + len(chunk) > cut:
                kept.append(chunk[: cut - sent])
                break
            kept.append(chunk)
            sent += len(chunk)
        chunks = kept
    elif fault == "extra_bytes":
        chunks.append(data.draw(st.binary(min_size=1, max_size=64), label="extra"))
    elif fault in ("dropped_chunk", "duplicated_chunk") and chunks:
        i = data.draw(st.integers(0, len(chunks) - 1), label="chunk")
        chunks[i : i + 1] = [] if fault == "dropped_chunk" else [chunks[i], chunks[i]]
    elif fault == "reordered" and len(stream) > 1:
        pieces = [c for c in chunks if c]  # reversing around empty chunks would move nothing
        if len(pieces) < 2:
            pieces = [stream[: len(stream) // 2], stream[len(stream) // 2 :]]
        chunks = pieces[::-1]
    elif fault in REF_FAULTS and refs:
        i = data.draw(st.integers(0, len(refs) - 1), label="ref")
        ref = refs[i]
        if (
            fault == "size_mismatch"
        ):  # the header disagrees with the shape; the bytes agree with the header
            delta = data.draw(
                st.integers(-ref.size_bytes, 64).filter(lambda d: d != 0), label="delta"
            )
            ref.size_bytes += delta
            chunks = [
                b"".join(blobs[:i])
                + blobs[i][: len(blobs[i]) + delta]
                + bytes(max(delta, 0))
                + b"".join(blobs[i + 1 :])
            ]
        elif fault == "negative_size":
            ref.size_bytes = data.draw(
                st.sampled_from((-1, -(1 << 20), INT64_MIN)), label="negative size"
            )
        elif fault == "huge_size":
            ref.size_bytes = data.draw(
                st.sampled_from((max_bytes + 1, 1 << 40, INT64_MAX)), label="huge size"
            )
        elif fault == "big_claim":  # just under the limit, with a few bytes behind it
            ref.size_bytes = max_bytes - sum(r.size_bytes for j, r in enumerate(refs) if j != i)
        elif fault == "unknown_path":
            ref.path = data.draw(
                st.sampled_from(
                    ("args[9]", "params.nothing", "grad_output", "", "loss", "args[0][0]")
                ),
                label="path",
            )
        elif fault == "duplicate_path":
            refs.add().CopyFrom(ref)
            chunks.append(blobs[i])
        else:  # the bytes both inline and listed
            _, tensor = [s for s in tensor_slots(header.request) if s[0] == ref.path][0]
            tensor.data = blobs[i]
        first = [pb.ComputeChunkedRequest(header=header).SerializeToString()]
    elif fault == "no_header":
        first = []
    elif fault == "two_headers":
        first = first * 2
    elif fault == "empty_stream":
        first, chunks = [], []
    elif fault == "garbage_frame":
        at = data.draw(st.integers(0, len(chunks)), label="at")
        garbage = data.draw(
            st.one_of(st.binary(max_size=64), st.just(b"\x12\xff\xff\xff\xff\x0f")), label="garbage"
        )
        APPLIED[f"chunked:{fault}"] += 1
        return first + [framing.frame_data(memoryview(c)) for c in chunks[:at]] + [garbage] + [
            framing.frame_data(memoryview(c)) for c in chunks[at:]
        ], [*done, f"chunked {fault} at {at}"]
    else:
        fault = "valid" if fault != "valid" else fault  # nothing to act on: a valid framing
    APPLIED[f"chunked:{fault}"] += 1
    return first + [framing.frame_data(memoryview(c)) for c in chunks], [
        *done,
        f"chunked {fault}, {len(chunks)} chunks of {[len(c) for c in chunks]}",
    ]
