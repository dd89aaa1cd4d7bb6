"""Prepared requests: a call signature's ``ComputeRequest`` bytes laid out once, per call only
the tensors' bytes and the per-call fields spliced in.

What a unary request holds besides tensor data (the loss name, parameters, the tree of inputs,
each tensor's dtype, shape and byte count, the grad paths) is fixed by the call's signature
(client/signature.py, parameters by value) and its grad paths, and so are the places of the data
between them: every length prefix on the way is fixed too. A signature seen a second time gets
its layout (the constant segments and which tensor's bytes go between them), found by
serializing the request with each tensor's bytes replaced by a fill of its index and by zeros,
and checked to reproduce that call's plain serialization byte for byte; a layout that would not
is never used. The per-call fields (request id, audit context, autocast) are fields 7-9, after
all the others: they are serialized on their own and appended, as protobuf orders them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._proto import lossd_pb2 as pb
from .wire import codec

MAX_SIGNATURES = 64  # per RemoteLoss; a training loop has a handful, the oldest goes first
MAX_BYTES = 1 << 20  # of tensor data: larger calls spend their time on the bytes, not on this
_SEEN_ONCE = object()  # a signature met once: built plainly (shapes that change every call)
_PLAIN = object()  # a signature whose layout could not be found or checked: always built plainly

Build = Callable[[Sequence[Any], dict[str, Any]], pb.ComputeRequest]


class Layout:
    """The constant segments of a request and, between each two, which tensor's bytes go."""

    __slots__ = ("segments", "order")

    def __init__(self, segments: list[bytes], order: list[int]) -> None:
        self.segments = segments
        self.order = order

    def fill(self, tensors: Sequence[Tensor], tail: bytes) -> bytes:
        segments = self.segments
        parts = [segments[0]]
        for index, segment in zip(self.order, segments[1:]):
            parts.append(codec.wire_array(tensors[index]))
            parts.append(segment)
        parts.append(tail)
        return b"".join(parts)


def tail(request_id: str, audit: pb.AuditContext | None, autocast: pb.Autocast | None) -> bytes:
    """The per-call fields of a request, serialized: what follows a layout's segments."""
    if audit is None and autocast is None:
        # The usual call: field 7 (a string) alone, 0.4 us instead of a message's 1.9 us.
        data = request_id.encode()
        if 0 < len(data) < 128:  # its length prefix is one byte
            return b"\x3a" + bytes((len(data),)) + data
    return pb.ComputeRequest(
        request_id=request_id, audit=audit, autocast=autocast
    ).SerializeToString()


class Serialized:
    """A request as the bytes a layout filled in; ``loss`` and ``request_id`` as in the message."""

    __slots__ = ("data", "request_id", "loss")

    def __init__(self, data: bytes, request_id: str, loss: str) -> None:
        self.data = data
        self.request_id = request_id
        self.loss = loss


class PreparedRequests:
    """The layouts of one caller's call signatures (bounded: ``MAX_SIGNATURES``)."""

    def __init__(self, limit: int = MAX_SIGNATURES) -> None:
        self.limit = limit
        self._layouts: dict[Any, Any] = {}

    def __len__(self) -> int:
        return len(self._layouts)

    def layout(self, key: Any) -> Layout | None:
        """The layout of a call whose key (signature and grad paths) is ``key``, if prepared."""
        found = self._layouts.get(key)
        return found if isinstance(found, Layout) else None

    def learn(
        self,
        key: Any,
        tensors: Sequence[Tensor],
        body: Build,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        request: pb.ComputeRequest,
    ) -> None:
        """After a call built plainly (``request``): remember its key, and from its second
        sighting on, its layout. ``body`` builds the request without its per-call fields."""
        found = self._layouts.get(key)
        if found is _PLAIN or isinstance(found, Layout):
            return
        if found is None:
            self._remember(key, _SEEN_ONCE)
            return
        per_call = tail(
            request.request_id,
            request.audit if request.HasField("audit") else None,
            request.autocast if request.HasField("autocast") else None,
        )
        layout = _prepare(tensors, body, args, kwargs, request.SerializeToString(), per_call)
        self._layouts[key] = layout or _PLAIN

    def _remember(self, key: Any, value: Any) -> None:
        if len(self._layouts) >= self.limit:
            del self._layouts[next(iter(self._layouts))]  # the oldest signature
        self._layouts[key] = value


def _filled(tensor: Tensor, value: int) -> Tensor:
    """A CPU tensor of ``tensor``'s dtype and shape whose every byte is ``value``."""
    size = tensor.numel() * tensor.element_size()
    return torch.full((size,), value, dtype=torch.uint8).view(tensor.dtype).view(tensor.shape)


def _prepare(
    tensors: Sequence[Tensor], build: Build, args, kwargs, plain: bytes, tail_bytes: bytes
) -> Layout | None:
    sizes = [t.numel() * t.element_size() for t in tensors]
    if len(tensors) > 255 or sum(sizes) > MAX_BYTES:
        return None

    def serialized(fill: Callable[[int], int]) -> np.ndarray:
        count = iter(range(len(tensors)))
        swap = lambda t: _filled(t, fill(next(count)))  # noqa: E731 - in call_tensors' order
        request = build(codec.map_tensors(list(args), swap), codec.map_tensors(kwargs, swap))
        return np.frombuffer(request.SerializeToString(), dtype=np.uint8)

    zeros, marked = serialized(lambda i: 0), serialized(lambda i: i + 1)
    if len(zeros) != len(marked):
        return None
    where = np.flatnonzero(zeros != marked)  # exactly the data bytes: headers are the same
    starts = where[np.r_[True, np.diff(where) != 1]] if len(where) else where
    segments, order, at = [], [], 0
    for start in starts.tolist():
        index = int(marked[start]) - 1
        end = start + sizes[index]
        segments.append(zeros[at:start].tobytes())
        order.append(index)
        at = end
    segments.append(zeros[at:].tobytes())
    layout = Layout(segments, order)
    nonempty = sorted(i for i, size in enumerate(sizes) if size)
    if sorted(order) != nonempty or layout.fill(tensors, tail_bytes) != plain:
        return None
    return layout
