"""The loss registry: each loss is declared exactly once, as a ``LossSpec``.

A spec pairs a plain, typed torch function with the schema of its forward arguments
(``Input``) and constructor parameters (``Param``). Everything else derives from it: request
validation, the ListLosses/DescribeLoss RPCs, the client's checks, the README loss table and the
contract tests.

The function's signature mirrors upstream: forward arguments are positional-or-keyword, in
upstream order; constructor parameters are keyword-only, with upstream defaults::

    def focal_loss(pred, target, weight=None, avg_factor=None, reduction_override=None, *,
                   use_sigmoid=True, gamma=2.0, alpha=0.25, reduction="mean",
                   loss_weight=1.0, activated=False) -> Tensor

The registry itself is a dict and ``register`` (no scopes, no lazy locations, no builders).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidArgument, LossNotFound


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INDEX_DTYPES = ("int64",)
INT_DTYPES = ("uint8", "int8", "int16", "int32", "int64")
ANY_DTYPES = (*FLOAT_DTYPES, *INT_DTYPES, "bool")

PARAM_TYPES = ("bool", "int", "float", "str", "float_list", "tensor", "mapping", "list", "any")
INPUT_KINDS = ("tensor", "structure", "number", "int", "str", "bool", "any")


@dataclass(frozen=True)
class Param:
    """A constructor parameter, with its type, default and allowed range or choices."""

    name: str
    type: str
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    minimum_exclusive: bool = False
    maximum_exclusive: bool = False
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"Param {self.name}: type {self.type!r} not in {PARAM_TYPES}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, field_name: str | None = None) -> Any:
        """Check ``value`` against this parameter and return it in canonical form."""
        where = field_name or f"params.{self.name}"
        if value is None:
            if self.nullable or self.default is None:
                return None
            raise InvalidArgument.expected(where, f"{self.type} (None is not allowed)", "None")
        value = _coerce_type(self.type, value, where)
        if self.choices and value not in self.choices:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise InvalidArgument.expected(where, f"one of {allowed}", repr(value))
        _check_range(self, value, where)
        return value


def _type_name(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor(dtype={str(value.dtype).removeprefix('torch.')}, shape={list(value.shape)})"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce_type(kind: str, value: Any, where: str) -> Any:
    if kind == "any":
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if _is_number(value):
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "float_list":
        # Integer lists are accepted as floats (fat's YAML `weight: [1, 2, 1]` would otherwise
        # crash upstream with "expected scalar type Float but found Long").
        if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
            return [float(v) for v in value]
        if isinstance(value, Tensor) and value.dim() == 1 and value.is_floating_point():
            return [float(v) for v in value.tolist()]
    elif kind == "tensor":
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
            return torch.tensor([float(v) for v in value])
    elif kind == "mapping":
        if isinstance(value, Mapping):
            return value
    elif kind == "list" and isinstance(value, (list, tuple)):
        return list(value)
    raise InvalidArgument.expected(where, kind, _type_name(value))


def _check_range(spec: Param | Input, value: Any, where: str) -> None:
    if not _is_number(value):
        return
    if isinstance(value, float) and math.isnan(value):
        raise InvalidArgument.expected(where, "a number", "NaN")
    lo, hi = spec.minimum, spec.maximum
    if lo is not None and (value < lo or (spec.minimum_exclusive and value == lo)):
        raise InvalidArgument.expected(
            where, f"a value {'>' if spec.minimum_exclusive else '>='} {lo}", value
        )
    if hi is not None and (value > hi or (spec.maximum_exclusive and value == hi)):
        raise InvalidArgument.expected(
            where, f"a value {'<' if spec.maximum_exclusive else '<='} {hi}", value
        )


@dataclass(frozen=True)
class Input:
    """A forward argument.

    ``shape`` is symbolic: names such as ``"N"`` bind to the same length in every input of one
    call, integers must match exactly, and ``"*"`` matches any number of dimensions.
    """

    name: str
    kind: str = "tensor"
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    shape: tuple[str | int, ...] = ("*",)
    differentiable: bool = False
    optional: bool = False
    default: Any = None
    doc: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    minimum_exclusive: bool = False
    maximum_exclusive: bool = False
    # The keyword callers use, when the function cannot use it: upstream forwards may reuse a
    # constructor parameter's name (mmdet CrossEntropyLoss's call-time ``ignore_index``).
    keyword: str | None = None

    @property
    def call_name(self) -> str:
        return self.keyword or self.name

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"Input {self.name}: kind {self.kind!r} not in {INPUT_KINDS}")


@dataclass
class LossOutput:
    """What a loss function may return instead of a bare tensor.

    ``value`` is exactly what the upstream forward returns. ``components`` are terms upstream
    computes and drops (returned to the caller, detached, never added to ``value``). ``notes``
    explain surprising results, such as an upstream NaN.
    """

    value: Any
    components: dict[str, Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LossSpec:
    """One served loss: the function and everything needed to call and document it."""

    name: str
    fn: Callable[..., Any]
    families: tuple[str, ...]
    summary: str
    inputs: tuple[Input, ...]
    params: tuple[Param, ...] = ()
    reference: str = ""
    example: str = ""
    # Builds a valid call for tests, benchmarks and docs: (args, kwargs, params).
    make_example: Callable[[torch.dtype], tuple[tuple, dict, dict]] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def canonical_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate constructor parameters and fill in defaults (the audit trail's canonical form)."""
        unknown = [k for k in given if self.param(k) is None]
        if unknown:
            known = [p.name for p in self.params]
            close = difflib.get_close_matches(unknown[0], known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            allowed = ", ".join(known) if known else "none"
            raise InvalidArgument(
                f"unknown parameter {unknown[0]!r} for loss {self.name!r}{hint} (accepted: {allowed})",
                field=f"params.{unknown[0]}",
            )
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in given:
                out[p.name] = p.coerce(given[p.name])
            elif p.required:
                raise InvalidArgument(
                    f"loss {self.name!r} requires parameter {p.name!r} ({p.type}: {p.doc})",
                    field=f"params.{p.name}",
                )
            else:
                out[p.name] = p.default
        return out


_REGISTRY: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"loss {spec.name!r} is already registered")
    _check_signature(spec)
    _REGISTRY[spec.name] = spec
    return spec


def _check_signature(spec: LossSpec) -> None:
    """The spec must describe the function exactly: a drifting declaration is a bug."""
    sig = inspect.signature(spec.fn)
    positional = [
        p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    keyword = {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    if positional != [i.name for i in spec.inputs]:
        raise ValueError(
            f"{spec.name}: inputs {[i.name for i in spec.inputs]} != signature {positional}"
        )
    if list(keyword) != [p.name for p in spec.params]:
        raise ValueError(
            f"{spec.name}: params {[p.name for p in spec.params]} != signature {list(keyword)}"
        )
    for p in spec.params:
        sig_default = keyword[p.name]
        expected = inspect.Parameter.empty if p.required else p.default
        if sig_default != expected and sig_default is not expected:
            raise ValueError(
                f"{spec.name}: default of {p.name} is {p.default!r} in the spec, {sig_default!r} in the function"
            )


def get(name: str) -> LossSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        if not close:  # case-insensitive matches help e.g. "focalloss" -> "FocalLoss"
            close = [n for n in _REGISTRY if n.lower() == name.lower()]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise LossNotFound(
            f"unknown loss {name!r}{hint} (ListLosses lists all {len(_REGISTRY)})", field="loss"
        ) from None


def all_specs(family: str | None = None) -> list[LossSpec]:
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.families[0], s.name.lower()))
    return [s for s in specs if family is None or family in s.families]


def check_input(spec: Input, value: Any, where: str, symbols: dict[str, int]) -> Any:
    """Check one forward argument against its declaration; returns it in canonical form."""
    if value is None:
        if spec.optional:
            return None
        raise InvalidArgument.expected(where, f"{spec.kind} (argument is required)", "None")
    if spec.kind == "tensor":
        if not isinstance(value, Tensor):
            raise InvalidArgument.expected(where, "a tensor", _type_name(value))
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in spec.dtypes:
            raise InvalidArgument.expected(where, f"dtype in {{{', '.join(spec.dtypes)}}}", dtype)
        _bind_shape(spec.shape, tuple(value.shape), where, symbols)
        return value
    if spec.kind == "number":
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
            value = value.item()
        if not _is_number(value):
            raise InvalidArgument.expected(where, "a number", _type_name(value))
        _check_range(spec, value, where)
        return value
    if spec.kind in ("int", "str", "bool"):
        value = _coerce_type(spec.kind, value, where)
        if spec.choices and value not in spec.choices:
            allowed = ", ".join(repr(c) for c in spec.choices)
            raise InvalidArgument.expected(where, f"one of {allowed}", repr(value))
        _check_range(spec, value, where)
        return value
    return value  # "structure" and "any": the loss validates its own layout


def _bind_shape(
    pattern: Sequence[str | int], shape: tuple[int, ...], where: str, symbols: dict[str, int]
) -> None:
    if "*" not in pattern:
        if len(pattern) != len(shape):
            raise InvalidArgument.expected(
                where, f"shape ({', '.join(map(str, pattern))})", list(shape)
            )
        pairs = zip(pattern, shape)
    else:
        star = list(pattern).index("*")
        head, tail = pattern[:star], pattern[star + 1 :]
        if len(shape) < len(head) + len(tail):
            raise InvalidArgument.expected(
                where, f"shape ({', '.join(map(str, pattern))})", list(shape)
            )
        pairs = list(zip(head, shape[: len(head)])) + list(
            zip(tail, shape[len(shape) - len(tail) :])
        )
    for sym, size in pairs:
        if isinstance(sym, int):
            if size != sym:
                raise InvalidArgument.expected(
                    where, f"shape ({', '.join(map(str, pattern))}) with {sym} there", list(shape)
                )
        elif sym in symbols and symbols[sym] != size:
            raise InvalidArgument.expected(
                where,
                f"{sym}={symbols[sym]} (as in an earlier input)",
                f"{sym}={size} in shape {list(shape)}",
            )
        else:
            symbols[sym] = size
