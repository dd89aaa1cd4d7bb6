"""The memory budget (``--memory-budget-mb``) and what is reserved against it, before it is used.

Every request reserves, before anything sized by it is allocated:

- its decoded bytes, before decoding: ``DECODE_FACTOR`` times the message (unary ``Compute``:
  the received bytes, the parsed message and the decoded tensors), or, for ``ComputeChunked``,
  the bytes its header lists plus the header itself, before the buffer that assembles them;
- its evaluation's working set, before the loss runs: an estimate from the decoded shapes and
  counts. Element-wise losses need a few times their inputs (``WORK_FACTOR``); the detection and
  segmentation losses whose intermediates grow with a product of counts have their own estimate
  (``ESTIMATORS``: YOLOX's GT x anchor x class cost, RetinaNet's GT x anchor IoU and its anchor
  x class focal terms, PIDNet's logits resized to the label size).

A request whose reservation exceeds the whole budget is refused RESOURCE_EXHAUSTED naming the
budget and the estimate; one that would fit once others finish waits, within its deadline.
The budget covers what requests allocate, on top of the idle server's own footprint (torch and
the registry, a few hundred MiB). What gRPC itself holds cannot be reserved before it arrives:
the bytes of a unary request already received (at most ``--max-concurrent-rpcs`` of them, each
at most ``--max-message-mb``) are counted from the moment the handler sees them.

``prescan`` bounds the protobuf parse itself: it walks the wire format, skipping tensor bytes
unread, and refuses a message holding more values or deeper nesting than the limits allow, so
a "protobuf bomb" (millions of empty values in one message) is refused before it is parsed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from torch import Tensor

from lossd.client.wire import codec, framing

from .errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

_MB = 1 << 20
DECODE_FACTOR = 3  # received bytes + parsed message + decoded tensors
WORK_FACTOR = 6  # inputs' copies on the device, intermediates, gradients
DEFAULT_SHARE = 0.5  # of the machine's (or the cgroup's) memory
_WAIT_SLICE_S = 0.25  # a waiting call checks this often whether its caller is still there


def machine_memory_bytes() -> int:
    """The memory this process may use: the cgroup's limit when there is one, else physical."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def default_budget_mb() -> int:
    return max(256, int(machine_memory_bytes() * DEFAULT_SHARE) >> 20)


def _mib(n: int) -> str:
    return f"{n / _MB:,.1f} MiB"


class Reservation:
    """Bytes held against a ``MemoryBudget``; released by ``release()`` (or leaving ``hold``)."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes

    def release(self) -> None:
        self.budget._give_back(self.nbytes)
        self.nbytes = 0


class MemoryBudget:
    """A byte budget shared by every request; thread-safe. ``total`` 0: unlimited."""

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.used = 0
        self.peak = 0
        self.waiting = 0
        self._blocked = 0  # reservations waiting on _cond for room: only they need a notify
        self._cond = threading.Condition()

    def _refusal(self, nbytes: int, what: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"{what} needs an estimated {_mib(nbytes)}, more than the server's whole memory budget of "
            f"{_mib(self.total)} (--memory-budget-mb): send a smaller call, or raise the budget"
        )

    def reserve(self, nbytes: int, context: grpc.ServicerContext | None, what: str) -> Reservation:
        """Wait until ``nbytes`` fit (within the caller's deadline), then hold them."""
        nbytes = max(int(nbytes), 0)
        if not self.total:
            return Reservation(self, 0)
        if nbytes > self.total:
            raise self._refusal(nbytes, what)
        with self._cond:
            self.waiting += 1
            try:
                while self.used + nbytes > self.total:
                    left = _time_left(context)
                    if left is not None and left <= 0:
                        raise DeadlineExceeded(
                            f"the caller's deadline passed while {what} waited for "
                            f"{_mib(nbytes)} of the server's memory budget ({_mib(self.used)} of "
                            f"{_mib(self.total)} in use, --memory-budget-mb); nothing was computed"
                        )
                    if context is not None and not context.is_active():
                        from .errors import Cancelled

                        raise Cancelled(f"the caller went away while {what} waited for memory")
                    self._blocked += 1
                    try:
                        self._cond.wait(_WAIT_SLICE_S if left is None else min(left, _WAIT_SLICE_S))
                    finally:
                        self._blocked -= 1
                self.used += nbytes
                self.peak = max(self.peak, self.used)
            finally:
                self.waiting -= 1
        return Reservation(self, nbytes)

    def try_grow(self, reservation: Reservation, extra: int, what: str) -> bool:
        """Add ``extra`` to ``reservation`` if it fits now (never waits: a call holding memory
        must not wait for more, or callers holding memory could wait for each other forever)."""
        extra = max(int(extra), 0)
        if not self.total:
            return True
        if reservation.nbytes + extra > self.total:
            raise self._refusal(reservation.nbytes + extra, what)
        with self._cond:
            if self.used + extra > self.total:
                return False
            self.used += extra
            self.peak = max(self.peak, self.used)
        reservation.nbytes += extra
        return True

    def regrow(
        self, reservation: Reservation, nbytes: int, context: grpc.ServicerContext | None, what: str
    ) -> None:
        """Make ``reservation`` ``nbytes``, waiting with nothing held (see ``try_grow``)."""
        reservation.release()
        reservation.nbytes = self.reserve(nbytes, context, what).nbytes

    def _give_back(self, nbytes: int) -> None:
        if nbytes:
            with self._cond:
                self.used -= nbytes
                if self._blocked:
                    self._cond.notify_all()

    @contextmanager
    def held(
        self, nbytes: int, context: grpc.ServicerContext | None, what: str
    ) -> Iterator[Reservation]:
        reservation = self.reserve(nbytes, context, what)
        try:
            yield reservation
        finally:
            reservation.release()

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {
                "total": self.total,
                "used": self.used,
                "peak": self.peak,
                "waiting": self.waiting,
            }


def _time_left(context: grpc.ServicerContext | None) -> float | None:
    if context is None:
        return None
    try:
        return context.time_remaining()
    except Exception:  # noqa: BLE001 - a context without a deadline
        return None


# --------------------------------------------------------------------------------------------
# Working-set estimates


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor inside a nested value (what ``codec.iter_tensors`` walks, without
    building the paths it names them by)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if type(value) in codec.LEAF_TYPES:
        return 0
    if isinstance(value, (list, tuple)):
        return sum(map(tensor_bytes, value))
    if type(value) is dict or isinstance(value, Mapping):  # no ABC check for the usual mapping
        return sum(map(tensor_bytes, value.values()))
    return 0


def _arg(args: list[Any], kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, Tensor) else 0


def _gt_counts(target: Any) -> list[int]:
    gt = target.get("gt") if isinstance(target, Mapping) else None
    counts = []
    for image in gt if isinstance(gt, (list, tuple)) else ():
        labels = image.get("labels") if isinstance(image, Mapping) else None
        counts.append(_numel(labels))
    return counts


def _yolox(args: list[Any], kwargs: Mapping[str, Any]) -> int:
    out, target = _arg(args, kwargs, 0, "out"), _arg(args, kwargs, 1, "target")
    levels = out.get("pred") if isinstance(out, Mapping) else None
    anchors, classes = 0, 0
    for level in levels if isinstance(levels, (list, tuple)) else ():
        if isinstance(level, Tensor) and level.dim() == 4:
            anchors += level.shape[2] * level.shape[3]
            classes = max(classes, level.shape[1] - 5)
    gts = max(_gt_counts(target), default=0)
    # Per image (one at a time): centre tests and IoU (G x anchors, ~12 float32 temporaries),
    # the class cost over candidates (G x anchors x C float32: scores, BCE, sum) in float32.
    return gts * anchors * (48 + 12 * max(classes, 1))


def _retinanet(args: list[Any], kwargs: Mapping[str, Any]) -> int:
    out, target = _arg(args, kwargs, 0, "out"), _arg(args, kwargs, 1, "target")
    anchors_t = out.get("anchors") if isinstance(out, Mapping) else None
    anchors = anchors_t.shape[0] if isinstance(anchors_t, Tensor) and anchors_t.dim() == 2 else 0
    logits = out.get("cls_logits") if isinstance(out, Mapping) else None
    cls_elements = sum(_numel(t) for t in logits) if isinstance(logits, (list, tuple)) else 0
    gts = max(_gt_counts(target), default=0)
    # box_iou: ~10 float32/bool (M, A) temporaries per image; focal terms: ~10 copies of the logits.
    return gts * anchors * 48 + cls_elements * 4 * 10


def _pidnet(args: list[Any], kwargs: Mapping[str, Any]) -> int:
    out, target = _arg(args, kwargs, 0, "out"), _arg(args, kwargs, 1, "target")
    labels = target.get("target") if isinstance(target, Mapping) else None
    if not isinstance(labels, Tensor) or labels.dim() != 3 or not isinstance(out, Mapping):
        return 0
    pixels = labels.numel()  # B x H x W at the label size
    channels = sum(
        t.shape[1]
        for t in (out.get("pred"), out.get("extra_p"), out.get("extra_d"))
        if isinstance(t, Tensor) and t.dim() == 4
    )
    # Each map resized to the label size, its log-softmax, and both again as gradients; float32.
    return pixels * (channels * 4 * 6 + 64)


def _detr(args: list[Any], kwargs: Mapping[str, Any]) -> int:
    out, target = _arg(args, kwargs, 0, "out"), _arg(args, kwargs, 1, "target")
    pred = out.get("pred") if isinstance(out, Mapping) else None
    if not isinstance(pred, Tensor) or pred.dim() != 3:
        return 0
    queries = pred.shape[1]
    aux = out.get("aux_pred")
    for layer in aux if isinstance(aux, (list, tuple)) else ():
        logits = layer.get("pred_logits") if isinstance(layer, Mapping) else None
        if isinstance(logits, Tensor) and logits.dim() == 3:
            queries = max(queries, logits.shape[1])
    gts = sum(_gt_counts(target))
    # One layer's matching at a time: (B * Q, total GT) cost matrices (class, L1, pairwise GIoU,
    # their sum; ~25 temporaries in the outputs' dtype) and the float64 copy scipy reads.
    return pred.shape[0] * queries * gts * (25 * pred.element_size() + 8)


def _yolov9(args: list[Any], kwargs: Mapping[str, Any]) -> int:
    out, target = _arg(args, kwargs, 0, "out"), _arg(args, kwargs, 1, "target")
    levels = out.get("pred") if isinstance(out, Mapping) else None
    if isinstance(levels, Mapping):
        levels = levels.get("outputs")
    anchors, batch, size = 0, 0, 4
    for level in levels if isinstance(levels, (list, tuple)) else ():
        if isinstance(level, Tensor) and level.dim() == 4:
            anchors += level.shape[2] * level.shape[3]
            batch, size = level.shape[0], max(4, level.element_size())
    gts = max(_gt_counts(target), default=0)
    # The assigner's (B, max GT, anchors) CIoU, inside, class-probability, metric and top-k
    # matrices: ~40 temporaries, float32 (float64 for a float64 call).
    return batch * gts * anchors * 40 * size


ESTIMATORS: dict[str, Callable[[list[Any], Mapping[str, Any]], int]] = {
    "yolox_loss": _yolox,
    "retinanet_loss": _retinanet,
    "pidnet_loss": _pidnet,
    "detr_loss": _detr,
    "yolov9_loss": _yolov9,
}


def working_set(loss: str, args: list[Any], kwargs: Mapping[str, Any], params: Any) -> int:
    """Estimated bytes one evaluation allocates beyond its decoded inputs."""
    base = WORK_FACTOR * (tensor_bytes(args) + tensor_bytes(kwargs) + tensor_bytes(params))
    estimator = ESTIMATORS.get(loss)
    if estimator is None:
        return base
    try:
        return base + int(estimator(args, kwargs))
    except Exception:  # noqa: BLE001 - malformed inputs are refused by the loss's own checks
        return base


# --------------------------------------------------------------------------------------------
# Protobuf pre-scan

_LENGTH, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5
# Wire fields per value a request may hold: a tensor value is a Value, its Tensor and three fields.
FIELDS_PER_ITEM = 6
_SCAN_SLACK = 1024
PARSER_MAX_DEPTH = 100
_plans: dict[str, dict[int, Any]] = {}


def _plan(descriptor: Any) -> dict[int, Any]:
    """Field number -> the nested message's descriptor (recursed into) or None (skipped)."""
    plan = _plans.get(descriptor.full_name)
    if plan is None:
        plan = {
            f.number: f.message_type if f.type == FieldDescriptor.TYPE_MESSAGE else None
            for f in descriptor.fields
        }
        _plans[descriptor.full_name] = plan
    return plan


def scan_budget(limits: codec.DecodeLimits) -> int:
    """The most values (fields, at every depth) the pre-scan lets a message hold."""
    return limits.max_items * FIELDS_PER_ITEM + _SCAN_SLACK


def prescan(data: bytes, descriptor: Any, limits: codec.DecodeLimits) -> None:
    """Refuse, before parsing, a message with more fields or deeper nesting than ``limits``
    could accept; tensor bytes are skipped by their length, never read."""
    budget = [scan_budget(limits)]
    # Nesting itself is checked by the decoder, which names the field; the scan only stops where
    # protobuf's own parser would refuse anyway (its recursion limit, 100 messages deep).
    _scan(data, 0, len(data), descriptor, 0, PARSER_MAX_DEPTH, budget, limits)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    parsed = framing.read_varint(data, pos, end)
    if parsed is None:
        raise InvalidArgument("a truncated varint")
    return parsed


def _scan(
    data: bytes, pos: int, end: int, descriptor: Any, depth: int, max_depth: int,
    budget: list[int], limits: codec.DecodeLimits,
) -> None:  # fmt: skip
    if depth > max_depth:
        raise InvalidArgument(f"nested more than {max_depth} messages deep")
    plan = _plan(descriptor)
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise codec.LimitError(
                "request",
                f"more than {limits.max_items} values (refused before parsing the message)",
                "--max-items",
            )
        key = data[pos]  # one-byte varints (tags below 16, lengths below 128) read inline
        key, pos = (key, pos + 1) if key < 0x80 else _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(data, pos, end)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH:
            length = data[pos] if pos < end else 0x80
            length, pos = (length, pos + 1) if length < 0x80 else _varint(data, pos, end)
            if pos + length > end:
                raise InvalidArgument("a field runs past its end")
            nested = plan.get(number)
            if nested is not None:
                _scan(data, pos, pos + length, nested, depth + 1, max_depth, budget, limits)
            pos += length
        else:  # lossd's messages have no groups; skipping one unscanned would skip the rest
            raise InvalidArgument(
                f"field {number} has wire type {wire} (a group, or no protobuf wire type): "
                "lossd's messages have none"
            )
    if pos > end:
        raise InvalidArgument("a field runs past its end")


def decoded_estimate(message_bytes: int) -> int:
    return DECODE_FACTOR * message_bytes


class RawRequest:
    """A unary request's bytes, parsed only once its memory is reserved. ``loss`` is peeked
    from the first fields (for the per-loss metrics) without parsing the message."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def loss(self) -> str | None:
        data = self.data
        if len(data) > 1 and data[0] == 0x0A and data[1] < 0x80:  # the usual first field
            return bytes(data[2 : 2 + min(data[1], 256)]).decode(errors="replace")
        pos, end = 0, len(self.data)
        try:
            for _ in range(16):
                if pos >= end:
                    return None
                key, pos = _varint(self.data, pos, end)
                if key & 7 == _LENGTH:
                    length, pos = _varint(self.data, pos, end)
                    if key >> 3 == 1:  # ComputeRequest.loss
                        return bytes(self.data[pos : pos + min(length, 256)]).decode(
                            errors="replace"
                        )
                    pos += length
                elif key & 7 == _VARINT:
                    _, pos = _varint(self.data, pos, end)
                else:
                    return None
        except InvalidArgument:
            return None
        return None
