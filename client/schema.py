"""Client-side checks derived from the server's declaration of a loss (``DescribeLoss``).

The server validates every request; these checks only move the most common mistakes (a
misspelled or missing constructor parameter, a value of the wrong kind) to before the first
tensor is sent, with the same wording as the server's errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import grpc

from ._proto import lossd_pb2 as pb
from .errors import LossdError

_KINDS: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "float_list": (list, tuple),
    "list": (list, tuple),
    "mapping": (Mapping,),
}


def _refuse(field: str, message: str) -> LossdError:
    return LossdError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field=field)


def check_params(info: pb.LossInfo, params: Mapping[str, Any]) -> None:
    """Raise ``LossdError(INVALID_ARGUMENT)`` for parameters the loss's declaration rejects."""
    declared = {p.name: p for p in info.params}
    for name, value in params.items():
        param = declared.get(name)
        field = f"params.{name}"
        if param is None:
            close = difflib.get_close_matches(name, list(declared), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            accepted = ", ".join(declared) or "none"
            raise _refuse(
                field,
                f"unknown parameter {name!r} for loss {info.name!r}{hint} (accepted: {accepted})",
            )
        if value is None:
            if not param.nullable:
                raise _refuse(field, f"expected {param.type} (None is not allowed), got None")
            continue
        kinds = _KINDS.get(param.type)
        if kinds and (
            not isinstance(value, kinds)
            or (isinstance(value, bool) and param.type in ("int", "float"))
        ):
            raise _refuse(field, f"expected {param.type}, got {type(value).__name__}")
    for param in info.params:
        if param.required and param.name not in params:
            raise _refuse(
                f"params.{param.name}",
                f"loss {info.name!r} requires parameter {param.name!r} ({param.type}: {param.doc})",
            )
