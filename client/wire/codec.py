"""The one tensor and value codec, shared by the client and the server.

Tensors travel as raw little-endian C-contiguous bytes with a dtype enum and a shape. Encoding
is ``tensor.numpy().tobytes()`` (16-bit types reinterpreted as int16, never converted element by
element); decoding validates everything against the declared shape *before* allocating
anything, so a message that claims a terabyte of elements with a few bytes of data is refused
without touching memory.

Values (``lossd.v1.Value``) mirror what an upstream ``forward`` takes: tensors, numbers,
strings, booleans, None, lists, tuples and string-keyed dicts, nested. Every tensor inside a
value has a *path* (``args[0].pred[1]``, ``kwargs.weight``) by which gradients are requested and
returned.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._proto import lossd_pb2 as pb
from .limits import DEFAULT_LIMITS, DecodeError, DecodeLimits, EncodeError, LimitError

if sys.byteorder != "little":  # the wire is little-endian and we reinterpret memory directly
    raise ImportError("lossd's tensor codec needs a little-endian host")


# torch dtype <-> wire enum, and the same-width type we reinterpret through numpy.
_DTYPES: dict[torch.dtype, tuple[int, torch.dtype]] = {
    torch.float16: (pb.DATA_TYPE_FLOAT16, torch.int16),
    torch.bfloat16: (pb.DATA_TYPE_BFLOAT16, torch.int16),
    torch.float32: (pb.DATA_TYPE_FLOAT32, torch.float32),
    torch.float64: (pb.DATA_TYPE_FLOAT64, torch.float64),
    torch.int8: (pb.DATA_TYPE_INT8, torch.int8),
    torch.uint8: (pb.DATA_TYPE_UINT8, torch.uint8),
    torch.int16: (pb.DATA_TYPE_INT16, torch.int16),
    torch.int32: (pb.DATA_TYPE_INT32, torch.int32),
    torch.int64: (pb.DATA_TYPE_INT64, torch.int64),
    torch.bool: (pb.DATA_TYPE_BOOL, torch.uint8),
}
_FROM_WIRE: dict[int, torch.dtype] = {wire: dtype for dtype, (wire, _) in _DTYPES.items()}


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _DTYPES[dtype][0]
    except KeyError:
        raise EncodeError(f"dtype {dtype} cannot travel (supported: {dtype_names()})") from None


def torch_dtype(wire: int) -> torch.dtype:
    return _FROM_WIRE[wire]


def dtype_names() -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)


def dtype_name(wire: int) -> str:
    return str(_FROM_WIRE[wire]).removeprefix("torch.") if wire in _FROM_WIRE else f"<enum {wire}>"


class Outboard:
    """Tensors that travel outside the message (the chunked transport).

    ``encode_*`` given an Outboard leaves the ``data`` of every tensor of at least ``min_bytes``
    empty and records ``(path, flat uint8 view)`` here instead: no bytes copy at encode time.
    """

    __slots__ = ("min_bytes", "tensors")

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self.tensors: list[tuple[str, Tensor]] = []

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() for _, t in self.tensors)


# --------------------------------------------------------------------------------------------
# Tensors


def encode_tensor(
    tensor: Tensor,
    out: pb.Tensor | None = None,
    *,
    outboard: Outboard | None = None,
    path: str = "tensor",
) -> pb.Tensor:
    """Encode a tensor (any device, any layout) as raw little-endian C-contiguous bytes.

    With ``outboard``, a tensor of at least ``outboard.min_bytes`` keeps its dtype and shape in
    the message and its bytes (a zero-copy view when the tensor is CPU and contiguous) go to
    ``outboard`` under ``path``.
    """
    if not isinstance(tensor, Tensor):
        raise EncodeError(f"expected a tensor, got {type(tensor).__name__}")
    wire, view_as = _DTYPES.get(tensor.dtype, (None, None))
    if wire is None:
        raise EncodeError(f"dtype {tensor.dtype} cannot travel (supported: {dtype_names()})")
    host = _host(tensor)
    msg = out if out is not None else pb.Tensor()
    msg.dtype = wire
    msg.shape[:] = tuple(host.shape)  # from a tuple: 1.3 us, from the torch.Size 2.2
    numel = host.numel()
    if outboard is not None and numel * host.element_size() >= outboard.min_bytes:
        outboard.tensors.append((path, host.reshape(-1).view(torch.uint8)))
        return msg
    if numel:
        msg.data = _wire_array(host, view_as).tobytes()
    return msg


def _host(tensor: Tensor) -> Tensor:
    """``tensor`` detached, on the CPU, C-contiguous, conjugation and negation resolved."""
    # Each step only where it does something: a small call's CPU is mostly such per-op overhead.
    host = tensor.detach() if tensor.requires_grad else tensor  # numpy() refuses only these
    if not host.is_cpu:  # not ``device.type``: that builds a torch.device per call
        host = host.cpu()
    if not host.is_contiguous():
        host = host.contiguous()
    if host.is_conj() or host.is_neg():
        host = host.resolve_conj().resolve_neg()
    return host


def _wire_array(host: Tensor, view_as: torch.dtype) -> np.ndarray:
    return (host.view(view_as) if view_as is not host.dtype else host).numpy()


def wire_array(tensor: Tensor) -> np.ndarray:
    """The bytes ``encode_tensor`` puts in ``data``, as a C-contiguous numpy array (a view, no
    copy, of a CPU contiguous tensor): what a prepared request splices in (client/prepared.py)."""
    return _wire_array(_host(tensor), _DTYPES[tensor.dtype][1])


def decode_tensor(
    msg: pb.Tensor,
    field: str = "tensor",
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    data: Tensor | None = None,
) -> Tensor:
    """Decode and validate a wire tensor into a fresh, writable CPU tensor (one copy).

    ``data``: the tensor's bytes when they travelled outside the message (chunked transport), a
    flat CPU uint8 tensor; the result is then a zero-copy view of it. Validation is the same.
    """
    dtype = _FROM_WIRE.get(msg.dtype)
    if dtype is None:
        raise DecodeError(
            f"{field}.dtype", f"expected one of {dtype_names()}, got {dtype_name(msg.dtype)}"
        )
    shape = list(msg.shape)
    if len(shape) > limits.max_rank:
        raise LimitError(
            f"{field}.shape",
            f"rank {len(shape)} exceeds the limit of {limits.max_rank}",
            "--max-rank",
        )
    if shape and min(shape) < 0:
        i, size = next((i, size) for i, size in enumerate(shape) if size < 0)
        raise DecodeError(f"{field}.shape[{i}]", f"expected a size >= 0, got {size}")
    numel = math.prod(shape)  # Python ints: no overflow however large the claim
    if numel > limits.max_elements:
        raise LimitError(
            f"{field}.shape",
            f"{numel} elements exceed the per-tensor limit of {limits.max_elements}",
            "--max-elements",
        )
    # An empty tensor still gets strides from its other dims: [0, 2**40, 2**40] would overflow them.
    spanned = math.prod(size for size in shape if size) if numel == 0 else 0
    if spanned > limits.max_elements:
        raise LimitError(
            f"{field}.shape",
            f"an empty tensor whose other dims span {spanned} elements, over the per-tensor limit of {limits.max_elements}",
            "--max-elements",
        )
    itemsize = _ITEMSIZE[dtype]
    if data is not None:
        if msg.data:
            raise DecodeError(
                f"{field}.data", "expected no inline bytes for a tensor sent in chunks"
            )
        size = data.numel()
    else:
        data = msg.data  # upb builds a new bytes object per access: read once
        size = len(data)
    if size != numel * itemsize:
        raise DecodeError(
            f"{field}.data",
            f"expected {numel * itemsize} bytes for shape {shape} of {dtype_name(msg.dtype)} ({itemsize} bytes each), got {size}",
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype is torch.bool:
        flat = data.view(torch.uint8) if isinstance(data, Tensor) else _fresh(data, torch.uint8)
        if bool((flat > 1).any()):
            raise DecodeError(f"{field}.data", "expected bool bytes of 0 or 1, got other values")
        return flat.view(torch.bool).view(shape)
    # A chunked tensor's bytes are a view of the transport's buffer, already ours: zero-copy.
    if isinstance(data, Tensor):
        return data.view(dtype).view(shape)
    if len(shape) == 1:
        return _fresh(data, dtype)
    as_numpy = NUMPY_DTYPES.get(dtype)
    if as_numpy is not None:  # numpy's reshape costs ~0.3 us, a torch view op 4-5 us
        return torch.from_numpy(np.frombuffer(bytearray(data), dtype=as_numpy).reshape(shape))
    return _fresh(data, dtype).view(shape)


def _fresh(data: bytes, dtype: torch.dtype) -> Tensor:
    """A flat, writable CPU tensor of ``dtype`` holding a copy of ``data`` (one copy, one op)."""
    return torch.frombuffer(bytearray(data), dtype=dtype)


# The dtypes numpy holds as they are (not bfloat16, nor bool), for decoding with a numpy reshape
# (and for client/prepared.py's answers, which read them in place).
NUMPY_DTYPES = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
}


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor as they travel, without copying."""
    if not tensor.numel():
        return memoryview(b"")
    view_as = _DTYPES.get(tensor.dtype, (None, tensor.dtype))[1]
    return memoryview(tensor.view(view_as).numpy()).cast("B")


_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _DTYPES}


# --------------------------------------------------------------------------------------------
# Values


def encode_value(
    obj: Any, out: pb.Value | None = None, *, outboard: Outboard | None = None, path: str = "value"
) -> pb.Value:
    """Encode a Python value (tensors, numbers, str, bool, None, list, tuple, dict) as a Value.

    ``outboard`` and ``path`` (the value's path, as decode names it): see ``encode_tensor``.
    """
    msg = out if out is not None else pb.Value()
    if obj is None:
        msg.none_value.SetInParent()
    elif isinstance(obj, bool):
        msg.bool_value = obj
    elif isinstance(obj, int):
        if not -(1 << 63) <= obj < (1 << 63):
            raise EncodeError(f"integer {obj} does not fit in 64 bits")
        msg.int_value = obj
    elif isinstance(obj, float):
        msg.float_value = obj
    elif isinstance(obj, str):
        msg.string_value = obj
    elif isinstance(obj, Tensor):
        encode_tensor(obj, msg.tensor_value, outboard=outboard, path=path)
    elif isinstance(obj, (tuple, list)):
        items = msg.tuple_value if isinstance(obj, tuple) else msg.list_value
        items.SetInParent()  # an empty sequence is still a tuple or a list
        for i, item in enumerate(obj):
            encode_value(
                item,
                items.items.add(),
                outboard=outboard,
                path=f"{path}[{i}]" if outboard else path,
            )
    elif isinstance(obj, Mapping):
        msg.dict_value.SetInParent()  # an empty dict is still a dict
        encode_map(obj, msg.dict_value, outboard=outboard, path=path)
    elif isinstance(obj, (np.integer, np.floating, np.bool_)):
        encode_value(obj.item(), msg)
    else:
        raise EncodeError(f"values of type {type(obj).__name__} cannot travel")
    return msg


def encode_map(
    obj: Mapping[str, Any],
    out: pb.ValueMap | None = None,
    *,
    outboard: Outboard | None = None,
    path: str = "value",
) -> pb.ValueMap:
    msg = out if out is not None else pb.ValueMap()
    for key, value in obj.items():
        if not isinstance(key, str):
            raise EncodeError(f"dict keys must be strings, got {type(key).__name__} {key!r}")
        entry = msg.entries.add()
        entry.key = key
        encode_value(
            value, entry.value, outboard=outboard, path=join_key(path, key) if outboard else path
        )
    return msg


class _Budget:
    """Counts values and elements across one whole request."""

    __slots__ = ("limits", "items", "elements")

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.items = 0
        self.elements = 0

    def take(self, field: str, elements: int = 0) -> None:
        self.items += 1
        self.elements += elements
        if self.items > self.limits.max_items:
            raise LimitError(
                field, f"more than {self.limits.max_items} values in one request", "--max-items"
            )
        if self.elements > self.limits.max_total_elements:
            raise LimitError(
                field,
                f"more than {self.limits.max_total_elements} tensor elements in one request",
                "--max-total-elements",
            )


def decode_value(
    msg: pb.Value,
    field: str = "value",
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    budget: _Budget | None = None,
    depth: int = 0,
    external: Mapping[str, Tensor] | None = None,
) -> Any:
    """Decode a Value into Python objects, validating types, sizes and nesting.

    ``external``: bytes of tensors sent outside the message, by path (see ``decode_tensor``).
    """
    budget = budget or _Budget(limits)
    if depth > limits.max_depth:
        raise LimitError(field, f"nesting deeper than {limits.max_depth} levels", "--max-depth")
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise DecodeError(
            field,
            "expected a value (none, bool, int, float, string, tensor, list, tuple or dict), got an empty Value",
        )
    if kind == "tensor_value":
        data = external.get(field) if external else None
        tensor = decode_tensor(
            msg.tensor_value, field, limits, data=data
        )  # per-tensor checks first: more precise
        budget.take(field, tensor.numel())
        return tensor
    budget.take(field)
    if kind == "none_value":
        return None
    if kind == "bool_value":
        return msg.bool_value
    if kind == "int_value":
        return msg.int_value
    if kind == "float_value":
        return msg.float_value
    if kind == "string_value":
        s = msg.string_value
        check_string_bytes(s, field, limits, "string")
        return s
    if kind in ("list_value", "tuple_value"):
        items = [
            decode_value(
                item, f"{field}[{i}]", limits, budget=budget, depth=depth + 1, external=external
            )
            for i, item in enumerate(getattr(msg, kind).items)
        ]
        return tuple(items) if kind == "tuple_value" else items
    return decode_map(
        msg.dict_value, field, limits, budget=budget, depth=depth + 1, external=external
    )


def decode_map(
    msg: pb.ValueMap,
    field: str,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    budget: _Budget | None = None,
    depth: int = 0,
    external: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    budget = budget or _Budget(limits)
    out: dict[str, Any] = {}
    for entry in msg.entries:
        key = entry.key
        if key in out:
            raise DecodeError(join_key(field, key), f"duplicate key {key!r}")
        check_string_bytes(key, field, limits, "key")
        out[key] = decode_value(
            entry.value, join_key(field, key), limits, budget=budget, depth=depth, external=external
        )
    return out


def check_string_bytes(text: str, field: str, limits: DecodeLimits, what: str) -> None:
    """The limit counts UTF-8 bytes (what travels), not characters: 2,000 '€' are 6,000 bytes."""
    if len(text) * 4 <= limits.max_string_bytes:
        return  # no string of this many characters can reach the limit: skip the encode
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_string_bytes:
        raise LimitError(
            field,
            f"{what} of {size} bytes exceeds the limit of {limits.max_string_bytes} bytes",
            "--max-string-bytes",
        )


def new_budget(limits: DecodeLimits = DEFAULT_LIMITS) -> _Budget:
    """One budget shared by every part of one request (params, args, kwargs)."""
    return _Budget(limits)


# --------------------------------------------------------------------------------------------
# Paths

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def join_key(path: str, key: str) -> str:
    """``path.key`` for identifier keys, ``path['key']`` otherwise (keys may hold dots)."""
    return f"{path}.{key}" if _IDENT.match(key) else f"{path}[{key!r}]"


# The exact types of values that hold no tensor: no walk, no ABC check (server walks use it too).
LEAF_TYPES = frozenset((bool, int, float, str, type(None)))


def iter_tensors(obj: Any, path: str) -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside a nested value, with its path, in a stable order."""
    if type(obj) in LEAF_TYPES:
        return
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from iter_tensors(item, f"{path}[{i}]")
    elif isinstance(obj, Mapping):
        for key, item in obj.items():
            yield from iter_tensors(item, join_key(path, key))


def call_tensors(args: Any, kwargs: Mapping[str, Any]) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a call ``f(*args, **kwargs)``, with its path (``args[0].pred[1]``)."""
    yield from iter_tensors(list(args), "args")
    for key, value in kwargs.items():
        yield from iter_tensors(value, join_key("kwargs", key))


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Rebuild a nested value with every tensor replaced by ``fn(tensor)``."""
    if type(obj) in LEAF_TYPES:
        return obj
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(item, fn) for item in obj)
    if isinstance(obj, list):
        return [map_tensors(item, fn) for item in obj]
    if isinstance(obj, Mapping):
        return {key: map_tensors(item, fn) for key, item in obj.items()}
    return obj
