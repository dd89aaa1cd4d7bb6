"""Call signatures: what the client-side structural checks of a call read, as a hashable key.

``schema.check_call`` (kinds, dtypes, shapes, relations; never tensor data) gives the same answer
for two calls with the same parameters and the same layout, dtypes and shapes of inputs, so a
loss remembers the signatures that passed and checks each new one once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

_SCALARS = (bool, int, float, str, type(None))
_EXACT_SCALARS = frozenset(_SCALARS)
MAX_REMEMBERED = 256  # signatures kept per loss; a training loop has a handful


class _Unsignable(Exception):
    """A value whose check may depend on more than its signature (a tensor parameter, an object)."""


def _sign(value: Any, tensors: bool) -> Any:
    kind = type(value)
    if kind is float:  # 0.0 == -0.0, but they are other values (and other bytes on the wire)
        return (kind, value, math.copysign(1.0, value))
    if kind in _EXACT_SCALARS:  # the usual parameter: no isinstance chain (a Mapping check is ABC)
        return (kind, value)
    if isinstance(value, Tensor):
        if not tensors:
            raise _Unsignable
        return (Tensor, value.dtype, tuple(value.shape))
    if (
        kind is dict
    ):  # the parameters (often none): what the Mapping branch gives, without its ABC check
        return (dict, *[(key, _sign(item, tensors)) for key, item in value.items()])
    if isinstance(value, _SCALARS):
        return (kind, value, math.copysign(1.0, value) if isinstance(value, float) else 0)
    if kind is list or kind is tuple or (kind is not dict and isinstance(value, (list, tuple))):
        return (kind, *[_sign(item, tensors) for item in value])
    if isinstance(value, Mapping):
        return (dict, *[(key, _sign(item, tensors)) for key, item in value.items()])
    raise _Unsignable


def call_signature(params: Mapping[str, Any], args: Any, kwargs: Mapping[str, Any]) -> Any:
    """The key of a call for the structural checks, or None when it has none (then check it)."""
    try:
        # Parameters are compared by value (``when``), so a tensor parameter is never summarized.
        return (_sign(params, False), _sign(tuple(args), True), _sign(kwargs, True))
    except (_Unsignable, TypeError):  # TypeError: an unhashable key or value inside
        return None


def remember(passed: set, key: Any) -> Any:
    """Add ``key`` (None: nothing) to ``passed``, kept under ``MAX_REMEMBERED``; returns it."""
    if key is None:
        return None
    if len(passed) >= MAX_REMEMBERED:
        passed.clear()
    passed.add(key)
    return key
