"""Cheap input checks shared by the loss functions.

They run before any kernel sees the data: an out-of-range class index must never reach a
CUDA kernel, where it becomes a device-side assert that poisons the whole context.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lossd.client.schema import SchemaError, check_indices

from ..errors import InvalidArgument


def check_class_indices(target: Tensor, num_classes: int, field: str, **rules: Any) -> None:
    """:func:`lossd.client.schema.check_indices` (the rule a declared ``index_of`` applies, with
    its ``ignore_index``, ``allow_background`` and ``upstream`` keywords), raising
    InvalidArgument: for indices a declaration cannot reach (nested under a condition, or
    counted from another value)."""
    try:
        check_indices(target, num_classes, field, **rules)
    except SchemaError as exc:
        raise InvalidArgument(exc.message, field=exc.field, upstream=exc.upstream or None) from None


def require_key(mapping: Any, key: str, field: str) -> Any:
    """Fetch ``mapping[key]`` from an upstream dict argument, with a clear error when absent."""
    if not isinstance(mapping, Mapping):
        raise InvalidArgument.expected(field, f"a dict with key {key!r}", type(mapping).__name__)
    if key not in mapping:
        keys = ", ".join(repr(k) for k in mapping) or "none"
        raise InvalidArgument(f"missing key {key!r} (keys given: {keys})", field=f"{field}.{key}")
    return mapping[key]


def require_tensor(
    value: Any, field: str, *, floating: bool | None = None, dim: int | None = None
) -> Tensor:
    """A tensor, optionally floating (True) or integral (False), optionally of a given rank."""
    if not isinstance(value, Tensor):
        raise InvalidArgument.expected(field, "a tensor", type(value).__name__)
    if floating is True and not value.is_floating_point():
        raise InvalidArgument.expected(
            field, "a floating-point tensor", str(value.dtype).removeprefix("torch.")
        )
    if floating is False and (value.is_floating_point() or value.dtype.is_complex):
        raise InvalidArgument.expected(
            field, "an integer tensor", str(value.dtype).removeprefix("torch.")
        )
    if dim is not None and value.dim() != dim:
        raise InvalidArgument.expected(field, f"a {dim}-d tensor", f"shape {list(value.shape)}")
    return value
