"""Prepared plans: a unary ComputeRequest whose layout was met before skips the parse and the
structural part of its decode.

The mirror image of client/prepared.py. Everything in a request but its tensors' bytes and the
per-call fields (request id, audit context, autocast: fields 7-9, serialized last) is fixed by
its layout: the loss name, the parameters, the tree of inputs, each tensor's dtype, shape and
byte count, the grad paths, and every tag and length prefix on the way. A request that went the
plain way and fully succeeded, met a second time, gets a plan: its constant segments and where
each tensor's bytes lie between them, found as the client finds them (client/wire/layout.py)
and checked to reproduce the request byte for byte; a request that would not (not canonically
serialized, gradient products, too large) never gets one.

A later request whose bytes hold the plan's segments at their places, and after them only fields
7-9, is decoded from its data slices: a fresh writable tensor each, as ``decode_tensor`` makes,
in the trees the plain decode built. What depends on the values runs every call: bool bytes
(else the plain path, which says why), the per-call fields' checks here, and all of the engine's
value checks. Anything else takes the plain path, with its answer or its error.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError as ProtobufDecodeError
from torch import Tensor

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import codec
from lossd.client.wire.layout import constant_runs

from .messages import ComputeCall, checked_call, decode_compute

MAX_PLANS = 256  # layouts remembered, all callers together; the oldest goes first
MAX_TENSORS = 255  # each tensor's index + 1 marks its bytes (one byte)
# Of a layout's constant bytes (a key, and a plan's segments again): the plans' memory is bounded
# by MAX_PLANS x this, a few MiB, outside the memory budget. A usual request's are a few
# hundred bytes; a layout of more (long lists of numbers) goes the plain way.
MAX_LAYOUT_BYTES = 8 << 10
# Noting a layout costs 15-85 us (half a plain decode): once this many calls of a loss in a row
# brought layouts never met before (shapes that change every call), only 1 call in QUIET_EVERY
# is noted, until one of its layouts comes again.
QUIET_AFTER = 32
QUIET_EVERY = 16
_PER_CALL = ("request_id", "audit", "autocast")  # fields 7-9, the last a plain request sends
_PER_CALL_NUMBERS = frozenset(
    pb.ComputeRequest.DESCRIPTOR.fields_by_name[n].number for n in _PER_CALL
)
_REQUEST_ID_TAG = 0x3A  # field 7, length-delimited
_SEEN_ONCE = object()  # a layout met once: it may never come again
_UNPLANNED = object()  # a layout that has no plan (not canonical, its decode not reproduced)
_PLACE = torch.empty(0)  # where a tensor goes in a plan's trees (a tensor, so map_tensors finds it)


class Planned:
    """A request decoded by its plan: the call, its size in bytes and how long the decode took."""

    __slots__ = ("call", "size", "decode_ns")

    def __init__(self, call: ComputeCall, size: int, decode_ns: int) -> None:
        self.call = call
        self.size = size  # what ByteSize() says of the parsed message: its bytes are canonical
        self.decode_ns = decode_ns


class Slot:
    """Where one tensor's bytes lie in a request, and what they decode to."""

    __slots__ = ("offset", "count", "numpy", "view", "shape", "dtype", "check_bool")

    def __init__(self, offset: int, tensor: Tensor) -> None:
        self.offset = offset
        self.count = tensor.numel()
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.check_bool = tensor.dtype is torch.bool
        # numpy holds neither bfloat16 nor bool: their bytes are read as the same-width type
        held = codec.NUMPY_DTYPES.get(tensor.dtype)
        self.view = held is None
        self.numpy = (
            np.dtype(held)
            if held is not None
            else np.dtype(np.int16 if tensor.element_size() == 2 else np.uint8)
        )

    def read(self, data: bytes) -> Tensor | None:
        """The tensor (fresh and writable), or None for bool bytes other than 0 and 1."""
        if not self.count:
            return torch.empty(self.shape, dtype=self.dtype)
        array = np.frombuffer(data, self.numpy, self.count, self.offset).copy()
        if self.check_bool and bool((array > 1).any()):
            return None  # refused: the plain decode names the field
        tensor = torch.from_numpy(array.reshape(self.shape))
        return tensor.view(self.dtype) if self.view else tensor


class Plan:
    """One learned layout: its segments by place, its tensors' slots in the plain decode's
    order, and the call it decodes to with each tensor a place to fill."""

    __slots__ = ("head", "checks", "body", "slots", "call", "flat", "grad_output", "memo")

    def __init__(
        self, segments: list[bytes], order: list[int], tensors: list[Tensor], call: ComputeCall
    ):
        self.head = segments[0]
        self.checks: list[tuple[int, bytes]] = []
        offsets: dict[int, int] = {}
        at = len(segments[0])
        for index, segment in zip(order, segments[1:]):
            offsets[index] = at
            at += tensors[index].numel() * tensors[index].element_size()
            self.checks.append((at, segment))
            at += len(segment)
        self.body = at  # where the per-call fields begin
        self.slots = [Slot(offsets.get(i, 0), t) for i, t in enumerate(tensors)]
        places = lambda value: codec.map_tensors(value, lambda _: _PLACE)  # noqa: E731
        self.call = ComputeCall(
            loss=call.loss,
            params=places(call.params),
            args=places(call.args),
            kwargs=places(call.kwargs),
            grad_paths=list(call.grad_paths),
            grad_output=None,
            request_id="",
            audit=pb.AuditContext(),
            grad_output_batched=call.grad_output_batched,
        )
        # The usual call: positional tensors, parameters and keywords without any: no walk.
        self.flat = (
            all(type(a) is Tensor for a in call.args)
            and all(type(v) in codec.LEAF_TYPES for v in call.params.values())
            and all(type(v) in codec.LEAF_TYPES for v in call.kwargs.values())
        )
        self.grad_output = call.grad_output is not None
        # What the engine's input checks found for this layout's signature (all its calls share it).
        self.memo: dict[str, Any] = {}

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` (which starts with ``head``) holds every segment at its place."""
        if len(data) < self.body:
            return False
        return all(data.startswith(segment, at) for at, segment in self.checks)

    def decode(self, data: bytes) -> ComputeCall | None:
        """The call ``data`` holds, as decode_compute decodes it; None where the plain path must
        say it (a tail with other fields or that protobuf refuses, bool bytes it refuses)."""
        per_call = _per_call(data, self.body)
        if per_call is None:
            return None
        tensors = []
        for slot in self.slots:
            tensor = slot.read(data)
            if tensor is None:
                return None
            tensors.append(tensor)
        template = self.call
        if self.flat:
            params, kwargs = dict(template.params), dict(template.kwargs)
            args = tensors[: len(template.args)]
        else:
            fill = iter(tensors).__next__
            take = lambda _: fill()  # noqa: E731 - in the plain decode's order
            params = codec.map_tensors(template.params, take)
            args = codec.map_tensors(template.args, take)
            kwargs = codec.map_tensors(template.kwargs, take)
        call = checked_call(
            template.loss,
            params,
            args,
            kwargs,
            list(template.grad_paths),
            tensors[-1] if self.grad_output else None,
            *per_call,
            template.grad_output_batched,
        )
        call.memo = self.memo
        return call


def _per_call(
    data: bytes, at: int
) -> tuple[str, pb.AuditContext | None, pb.Autocast | None] | None:
    """Fields 7-9 from ``at`` to the end of ``data``, as (request id, audit, autocast); None where
    anything else is there, or protobuf would refuse them."""
    size = len(data) - at
    if size == 0:
        return "", None, None
    if data[at] == _REQUEST_ID_TAG and 2 < size < 130 and data[at + 1] == size - 2:
        try:  # the usual tail: the request id alone, one byte of length
            return data[at + 2 :].decode("utf-8"), None, None
        except UnicodeDecodeError:
            return None
    try:
        tail = pb.ComputeRequest.FromString(data[at:])
    except (ProtobufDecodeError, RuntimeError, ValueError):
        return None
    if any(f.number not in _PER_CALL_NUMBERS for f, _ in tail.ListFields()):
        return None
    tail.DiscardUnknownFields()
    if tail.ByteSize() != size:  # unknown fields, or fields repeated and merged
        return None
    return (
        tail.request_id,
        tail.audit if tail.HasField("audit") else None,
        tail.autocast if tail.HasField("autocast") else None,
    )


def _tensor_messages(request: pb.ComputeRequest) -> list[pb.Tensor]:
    """The request's tensor messages in the order decode_compute decodes them."""
    found: list[pb.Tensor] = []

    def walk(value: pb.Value) -> None:
        kind = value.WhichOneof("kind")
        if kind == "tensor_value":
            found.append(value.tensor_value)
        elif kind in ("list_value", "tuple_value"):
            for item in getattr(value, kind).items:
                walk(item)
        elif kind == "dict_value":
            for entry in value.dict_value.entries:
                walk(entry.value)

    for entry in request.params.entries:
        walk(entry.value)
    for value in request.args:
        walk(value)
    for entry in request.kwargs.entries:
        walk(entry.value)
    if request.HasField("grad_output"):
        found.append(request.grad_output)
    return found


class RequestPlans:
    """The plans of the layouts this server met twice (bounded: ``limit``; thread-safe: they
    are learned under a lock and replaced whole, so a lookup reads without it)."""

    def __init__(self, limits: codec.DecodeLimits, max_bytes: int, limit: int = MAX_PLANS) -> None:
        self.limits = limits
        self.max_bytes = max_bytes  # larger requests go the plain way (their parse pre-scans)
        self.limit = limit
        self._lock = threading.Lock()
        self._known: dict[bytes, Any] = {}  # a layout's key -> _SEEN_ONCE or its Plan, oldest first
        self._index: tuple[tuple[int, ...], dict[bytes, tuple[Plan, ...]]] = ((), {})
        self._new_in_a_row: dict[str, int] = {}  # by loss (only served losses succeed)

    def __len__(self) -> int:
        return sum(len(plans) for plans in self._index[1].values())

    def decode(self, data: bytes) -> Planned | None:
        """The call of a request whose layout has a plan, decoded from its bytes; else None."""
        start = time.perf_counter_ns()
        if len(data) > self.max_bytes:
            return None
        lengths, by_head = self._index
        for length in lengths:
            for plan in by_head.get(data[:length], ()):
                if plan.matches(data):
                    call = plan.decode(data)
                    if call is None:
                        return None
                    return Planned(call, len(data), time.perf_counter_ns() - start)
        return None

    def learn(self, data: bytes, request: pb.ComputeRequest) -> None:
        """After ``request`` (its bytes ``data``) went the plain way and fully succeeded: note
        its layout, and from its second sighting, plan it."""
        if len(data) > self.max_bytes or request.grad_grads:
            return
        loss = request.loss
        new = self._new_in_a_row.get(loss, 0)
        if new >= QUIET_AFTER and new % QUIET_EVERY:
            self._new_in_a_row[loss] = new + 1  # (a count lost to a race only shifts the sample)
            return
        body = pb.ComputeRequest()
        body.CopyFrom(request)
        for name in _PER_CALL:
            body.ClearField(name)
        messages = _tensor_messages(body)
        if len(messages) > MAX_TENSORS:
            return
        datas = [m.data for m in messages]
        for message in messages:
            message.data = b""
        key = body.SerializeToString()
        if len(key) > MAX_LAYOUT_BYTES:
            return
        with self._lock:
            found = self._known.get(key)
            self._new_in_a_row[loss] = new + 1 if found is None else 0
            if found is None:
                self._remember(key, _SEEN_ONCE)
                return
            if found is not _SEEN_ONCE:
                return  # planned already (this request missed it: its tail, its bool bytes)
        plan = self._plan(data, body, messages, datas)
        with self._lock:
            if self._known.get(key) is _SEEN_ONCE:
                self._known[key] = plan or _UNPLANNED
                self._reindex()

    def _plan(
        self, data: bytes, body: pb.ComputeRequest, messages: list[pb.Tensor], datas: list[bytes]
    ) -> Plan | None:
        sizes = [len(d) for d in datas]

        def serialized(fill) -> np.ndarray:
            for i, message in enumerate(messages):
                message.data = bytes((fill(i),)) * sizes[i]
            return np.frombuffer(body.SerializeToString(), dtype=np.uint8)

        found = constant_runs(serialized(lambda i: 0), serialized(lambda i: i + 1), sizes)
        if found is None:
            return None
        for message, raw in zip(messages, datas):
            message.data = raw
        call = decode_compute(body, self.limits)  # the trees and tensors the plain decode builds
        tensors = [t for _, t in call.tensors()]
        if len(tensors) != len(messages):
            return None
        plan = Plan(*found, tensors, call)
        if not data.startswith(plan.head) or not plan.matches(data):
            return None
        decoded = plan.decode(data)  # and it decodes to what the plain decode made, bit for bit
        if decoded is None or not _same_call(decoded, call):
            return None
        return plan

    def _remember(self, key: bytes, value: Any) -> None:
        if len(self._known) >= self.limit:
            del self._known[next(iter(self._known))]  # the oldest layout
            self._reindex()
        self._known[key] = value

    def _reindex(self) -> None:
        by_head: dict[bytes, tuple[Plan, ...]] = {}
        for plan in self._known.values():
            if isinstance(plan, Plan):
                by_head[plan.head] = (*by_head.get(plan.head, ()), plan)
        self._index = (tuple(sorted({len(h) for h in by_head})), by_head)


def _same_call(a: ComputeCall, b: ComputeCall) -> bool:
    """The same trees, and tensors of the same dtypes, shapes, strides and bits."""

    left, right = a.tensors(), b.tensors()
    if [p for p, _ in left] != [p for p, _ in right]:
        return False
    for (_, x), (_, y) in zip(left, right):
        if (x.dtype, x.shape, x.stride()) != (y.dtype, y.shape, y.stride()):
            return False
        if x.numel() and not torch.equal(
            x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
        ):
            return False
    strip = lambda call: repr(codec.map_tensors([call.params, call.args, call.kwargs], type))  # noqa: E731
    return strip(a) == strip(b) and a.loss == b.loss and a.grad_paths == b.grad_paths
