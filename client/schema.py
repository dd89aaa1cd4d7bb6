"""Declared input layouts, and the one checker both sides of the wire run against them.

A loss declares each forward argument as one or more :class:`Form` s (alternatives: an index
or a one-hot target, QFL's ``(labels, scores)`` pair or a dense tensor). A form says the kind of
value, the dtypes, the symbolic shape and the relations to the values checked before it in the
same call:

- ``shape=("N", "C")``: names bind to the same length in every input of one call, integers
  must match exactly (a name starting with ``_`` binds within one element of a list only:
  ``("_n", 4)`` boxes and ``("_n",)`` labels of the same image), ``"?"`` is any one dimension, ``"*"`` matches any number of dimensions
  and ``"*d"`` does too, but binds them, so that ``("N", "C", "*d")`` and ``("N", "*d")`` share
  their trailing dimensions;
- ``same_shape``, ``broadcast_to`` (broadcasts to that shape without growing it),
  ``broadcasts_with`` and ``same_dtype`` name an earlier value by its declared path (``"pred"``,
  ``"out.pred"``); ``shapes`` asks an earlier value for a shape (the index form of a focal
  target needs ``pred`` of shape ``(N, C)``);
- ``index_of="C"``: the values are class indices into the dimension bound to ``C`` (optionally
  ``== C`` as background, or equal to an ignore index read from a parameter); ``values``: every
  element lies in a closed range. These read the data and run on the server only;
- containers: ``items`` (one schema per position), ``each`` (every element), ``keys``
  (required keys) and ``length`` (a symbol the length binds: one entry per image) for NetsPresso's nested dicts and lists, so that an error names the path of
  the bad element (``args[0].pred[1]``);
- ``when``: the form applies only while the given parameters have the given values.

The server checks every call once, before the loss body runs (``server/engine.py``); the client
runs the structural part of the same checks from the declaration ``DescribeLoss`` returns, and
checks constructor parameters against their declaration, before any tensor travels.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from torch import Tensor

from ._proto import lossd_pb2 as pb
from .errors import LossdError
from .signature import call_signature, remember
from .wire import codec

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INDEX_DTYPES = ("int64",)
INT_DTYPES = ("uint8", "int8", "int16", "int32", "int64")
ANY_DTYPES = (*FLOAT_DTYPES, *INT_DTYPES, "bool")
QUOTE_CHARS = 64  # how much of a caller's value an error quotes (server/errors.py's too)
FORM_KINDS = ("tensor", "tuple", "list", "dict", "none", "any")

Dim = str | int
Shape = tuple[Dim, ...]


@dataclass(frozen=True, kw_only=True)
class TensorRules:
    """A tensor's dtypes, symbolic shape, relations to earlier values and value rules: what a
    tensor Form declares, and what a registry Input declares directly for its single form."""

    dtypes: tuple[str, ...] = FLOAT_DTYPES
    shape: Shape = ("*",)
    same_shape: str | None = None
    broadcast_to: str | None = None
    broadcasts_with: str | None = None
    same_dtype: str | None = None
    # Integer tensors are accepted too, and promoted as torch's type promotion does
    # against this earlier value (torch's mse/l1/smooth_l1 take an integer target).
    promote_with: str | None = None
    index_of: str | None = None
    index_background: bool = False
    # Parameter (or input) names whose first non-None value is the ignored index; an int is a
    # literal fallback (visdet's ``ignore_index=None`` means -100).
    index_ignore: tuple[str | int, ...] = ()
    values: tuple[float, float] | None = None


@dataclass(frozen=True)
class Form(TensorRules):
    """One accepted layout of a value; see the module docstring."""

    kind: str = "tensor"
    shapes: tuple[tuple[str, Shape], ...] = ()
    # The exception class upstream raises when a value rule (index_of, values) fails there.
    upstream: str = ""
    items: tuple[Schema, ...] = ()
    each: Schema = ()
    keys: tuple[tuple[str, Schema], ...] = ()
    min_items: int = 0
    length: str | None = None  # list/tuple: its length binds this symbol (one entry per image)
    when: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FORM_KINDS:
            raise ValueError(f"Form kind {self.kind!r} not in {FORM_KINDS}")
        object.__setattr__(self, "each", schema_of(self.each))
        object.__setattr__(self, "items", tuple(schema_of(s) for s in self.items))
        object.__setattr__(self, "keys", tuple((k, schema_of(s)) for k, s in self.keys))

    def describe(self) -> str:
        """What this form is, in one phrase (errors, docs)."""
        if self.label:
            return self.label
        if self.kind == "tensor":
            return f"{'/'.join(self.dtypes)} tensor of shape {shape_text(self.shape)}"
        if self.kind == "dict":
            return "a dict with keys " + ", ".join(repr(k) for k, _ in self.keys)
        return {"tuple": "a tuple", "list": "a list", "none": "None"}.get(self.kind, "any value")


Schema = tuple[Form, ...]


def schema_of(value: Form | Sequence[Form]) -> Schema:
    return (value,) if isinstance(value, Form) else tuple(value)


def shape_text(shape: Sequence[Dim]) -> str:
    single = len(shape) == 1 and not str(shape[0]).startswith("*")
    return "(" + ", ".join(map(str, shape)) + ("," if single else "") + ")"


class SchemaError(ValueError):
    """A value does not fit its declaration. ``field`` names it by the caller's path."""

    def __init__(self, field: str, message: str, stage: int = 0, upstream: str = "") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.upstream = upstream  # the class upstream raises for this value, when known
        # How far the value got before it failed (kind 0, dtype 1, another value's shape 2,
        # rank or container size 3, a bound size 4, a relation 5; inside a container, + 10 for
        # each child it got to):
        # among alternatives, the one that got furthest explains the error best.
        self.stage = stage

    @classmethod
    def expected(cls, field: str, expected: str, got: object, stage: int = 0) -> SchemaError:
        got = str(got)  # often the caller's own text: echoed bounded, as the server's errors
        if len(got) > 2 * QUOTE_CHARS:
            got = f"{got[:QUOTE_CHARS]}... ({len(got)} characters in all)"
        return cls(field, f"expected {expected}, got {got}", stage)


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def value_text(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{_dtype(value)} of shape {list(value.shape)}"
    return type(value).__name__


@dataclass
class Checker:
    """The state of one call's checks: bound symbols, values seen by declared path, parameters.

    ``values=False`` skips the checks that read tensor data (the client's).
    """

    params: Mapping[str, Any] = field(default_factory=dict)
    values: bool = True
    symbols: dict[str, tuple[Any, str]] = field(default_factory=dict)
    seen: dict[str, tuple[Any, str]] = field(default_factory=dict)
    pending: list[tuple[Callable[..., None], Tensor, str, tuple]] = field(default_factory=list)
    # Values to promote (by declared path) to a dtype, as their form's ``promote_with`` says.
    promoted: dict[str, torch.dtype] = field(default_factory=dict)
    ran: list[tuple[Callable[..., None], Tensor, str, tuple]] = field(default_factory=list)

    def check(self, schema: Schema, value: Any, path: str, where: str) -> None:
        """Check ``value`` (declared at ``path``, sent at ``where``) against ``schema``."""
        self._schema(schema, value, path, where)
        pending, self.pending = self.pending, []
        for run, tensor, at, args in pending if self.values else ():
            run(tensor, *args)
            self.ran.append((run, tensor, at, args))  # server/registry.py's plans replay them

    def _fork(self) -> Checker:
        return Checker(
            self.params, self.values, dict(self.symbols), dict(self.seen), [], self.promoted
        )

    def _schema(self, schema: Schema, value: Any, path: str, where: str) -> None:
        forms = [f for f in schema if all(self.params.get(k) == v for k, v in f.when)]
        if not forms:
            return
        if len(forms) == 1:
            self._form(forms[0], value, path, where)
            return
        failures: list[tuple[Form, SchemaError]] = []
        for form in forms:
            trial = self._fork()
            try:
                trial._form(form, value, path, where)
            except SchemaError as exc:
                failures.append((form, exc))
                continue
            self.symbols, self.seen = trial.symbols, trial.seen
            self.pending += trial.pending
            return
        # The alternative that got furthest says best what is wrong with the value.
        stage = max(exc.stage for _, exc in failures)
        best = [(form, exc) for form, exc in failures if exc.stage == stage]
        if len(best) == 1 or len({exc.field for _, exc in best} - {where}) == 1:
            raise best[0][1]  # one explanation, or all of them about the same other value
        alternatives = "; or ".join(dict.fromkeys(f.describe() for f in forms))
        if stage == 0:
            kinds = " or ".join(dict.fromkeys(_KIND_WORDS[f.kind] for f in forms))
            expected = f"{kinds} ({alternatives})"
        elif stage == 1:
            dtypes = ", ".join(dict.fromkeys(d for f, _ in best for d in f.dtypes))
            expected = f"dtype in {{{dtypes}}} ({alternatives})"
        else:
            expected = f"one of: {alternatives}"
        raise SchemaError.expected(where, expected, value_text(value), stage)

    def _form(self, form: Form, value: Any, path: str, where: str) -> None:
        kind = form.kind
        if kind == "any":
            return
        if kind == "none":
            if value is not None:
                raise SchemaError.expected(where, "None", value_text(value))
            return
        if kind == "tensor":
            self._tensor(form, value, path, where)
            return
        if not isinstance(value, Mapping if kind == "dict" else (list, tuple)):
            raise SchemaError.expected(where, form.describe(), value_text(value))
        self.seen[path] = (value, where)
        if kind == "dict":
            children = [(sub, value.get(k, _MISSING), f".{k}") for k, sub in form.keys]
        else:  # tuple, list
            if form.items and len(value) != len(form.items):
                raise SchemaError.expected(
                    where,
                    f"{form.describe()} of {len(form.items)} items",
                    f"{len(value)} items",
                    3,
                )
            if len(value) < form.min_items:
                raise SchemaError.expected(
                    where, f"{form.describe()} (at least {form.min_items})", "an empty list", 3
                )
            if form.length is not None and not self._bind((form.length,), (len(value),), where):
                size, bound_at = self.symbols[form.length]
                raise SchemaError.expected(
                    where,
                    f"{form.length}={size} entries (as in {bound_at}; {form.describe()})",
                    f"{len(value)} entries",
                    4,
                )
            children = [
                (form.items[i] if form.items else form.each, item, f"[{i}]")
                for i, item in enumerate(value)
            ]
        for i, (sub, item, step) in enumerate(children):
            # How far the value got: past the container, then past i of its children.
            progress = 10 * (i + 1)
            if kind != "dict":  # names starting with "_" are local to one element of a list
                self.symbols = {s: b for s, b in self.symbols.items() if s[0] != "_"}
            if item is _MISSING:
                given = ", ".join(repr(k) for k in value) or "none"
                raise SchemaError(
                    where + step, f"missing key {step[1:]!r} (keys given: {given})", progress
                )
            try:
                self._schema(sub, item, path + step, where + step)
            except SchemaError as exc:
                exc.stage += progress
                raise

    def _tensor(self, form: Form, value: Any, path: str, where: str) -> None:
        what = f" ({form.label})" if form.label else ""
        if not isinstance(value, Tensor):
            raise SchemaError.expected(where, f"a tensor{what}", value_text(value))
        if _dtype(value) not in form.dtypes and not self._promotes(form, value, path, where):
            raise SchemaError.expected(
                where, f"dtype in {{{', '.join(form.dtypes)}}}{what}", _dtype(value), 1
            )
        for other, shape in form.shapes:
            seen, seen_where = self._seen(other, form, where)
            if not self._bind(shape, tuple(seen.shape), seen_where):
                raise SchemaError.expected(
                    where,
                    f"{other} of shape {shape_text(shape)}{what}",
                    f"{other} of shape {list(seen.shape)}",
                    2,
                )
        self._bind_own(form, value, where, what)
        for other, test, words in (
            (form.same_shape, lambda a, b: a.shape == b.shape, "shape {} ({}'s)"),
            (form.broadcast_to, _broadcasts_to, "a shape that broadcasts to {} ({}'s)"),
            (form.broadcasts_with, _broadcasts_with, "a shape that broadcasts with {} ({}'s)"),
        ):
            if other is None:
                continue
            seen, _ = self._seen(other, form, where)
            if not test(value, seen):
                raise SchemaError.expected(
                    where,
                    words.format(list(seen.shape), other) + what,
                    f"shape {list(value.shape)}",
                    5,
                )
        if form.same_dtype is not None:
            seen, _ = self._seen(form.same_dtype, form, where)
            if seen.dtype != value.dtype:
                raise SchemaError.expected(
                    where, f"dtype {_dtype(seen)} ({form.same_dtype}'s){what}", _dtype(value), 5
                )
        self.seen[path] = (value, where)
        if form.index_of is not None:
            size = self.symbols[form.index_of][0]
            ignore = self._ignore_index(form.index_ignore)
            args = (size, where, ignore, form.index_background, form.upstream)
            self.pending.append((check_indices, value, where, args))
        if form.values is not None:
            lo, hi = form.values
            self.pending.append((_check_values, value, where, (lo, hi, where, what, form.upstream)))

    def _promotes(self, form: Form, value: Tensor, path: str, where: str) -> bool:
        """An integer tensor where ``promote_with`` allows it: promoted as torch does. (Not bool:
        torch's l1/smooth_l1 refuse a bool target, which cannot be subtracted.)"""
        if form.promote_with is None or _dtype(value) not in INT_DTYPES:
            return False
        other, _ = self._seen(form.promote_with, form, where)
        self.promoted[path] = torch.promote_types(other.dtype, value.dtype)
        return True

    def _seen(self, other: str, form: Form, where: str) -> tuple[Any, str]:
        """The tensor checked earlier at declared path ``other``, which this form relates to."""
        found = self.seen.get(other)
        if found is not None and isinstance(found[0], Tensor):
            return found
        # The caller sent another layout there (a tensor where this form needs a dict): that
        # value is the one to name.
        parent, _, key = other.rpartition(".")
        if found is None and parent in self.seen:
            value, at = self.seen[parent]
            raise SchemaError.expected(
                at,
                f"a dict with key {key!r} (as {where} is {form.describe()})",
                value_text(value),
                6,
            )
        raise SchemaError.expected(
            where, f"{form.describe()} (with a tensor {other})", value_text(found and found[0]), 2
        )

    def _ignore_index(self, names: Sequence[str | int]) -> int | None:
        for name in names:
            if isinstance(name, int):
                return name
            found = self.params.get(name)
            if found is not None:
                return found
        return None

    def _bind_own(self, form: Form, value: Tensor, where: str, what: str) -> None:
        shape = tuple(value.shape)
        if self._bind(form.shape, shape, where):
            return
        alone = match_shape(form.shape, shape, {})
        if alone is not None:  # the rank fits: a symbol bound by an earlier value does not
            sym = next(s for s in alone if s in self.symbols and self.symbols[s][0] != alone[s])
            size, bound_at = self.symbols[sym]
            raise SchemaError.expected(
                where,
                f"{sym}={_size_text(size)} (as in {bound_at}){what}",
                f"{sym}={_size_text(alone[sym])} in shape {list(shape)}",
                4,
            )
        expected = f"shape {shape_text(form.shape)}"
        loose = tuple(f"_{i}" if isinstance(s, int) else s for i, s in enumerate(form.shape))
        fits = match_shape(loose, shape, {})
        if fits is not None:  # the rank fits: a fixed size does not
            pos, size = next(
                (i, s)
                for i, s in enumerate(form.shape)
                if isinstance(s, int) and fits[f"_{i}"] != s
            )
            star = next((i for i, s in enumerate(form.shape) if str(s)[0] == "*"), len(shape))
            dim = pos if pos < star else pos - len(form.shape)
            expected += f" with {size} there (dim {dim})"
        stage = 4 if fits is not None else 3
        raise SchemaError.expected(where, expected + what, f"shape {list(shape)}", stage)

    def _bind(self, pattern: Sequence[Dim], shape: tuple[int, ...], where: str) -> bool:
        new = match_shape(pattern, shape, self.symbols)
        if new is None:
            return False
        self.symbols.update((sym, (size, where)) for sym, size in new.items())
        return True


def _size_text(size: Any) -> str:
    return shape_text(size) if isinstance(size, tuple) else str(size)


def match_shape(
    pattern: Sequence[Dim], shape: tuple[int, ...], known: Mapping[str, tuple[Any, str]]
) -> dict[str, Any] | None:
    """The new symbol bindings that make ``shape`` fit ``pattern``, or None when it cannot."""
    star = next((i for i, s in enumerate(pattern) if isinstance(s, str) and s[0] == "*"), None)
    if star is None:
        if len(pattern) != len(shape):
            return None
        pairs: list[tuple[Dim, Any]] = list(zip(pattern, shape))
    else:
        head, tail = pattern[:star], pattern[star + 1 :]
        if len(shape) < len(head) + len(tail):
            return None
        pairs = list(zip(head, shape[: len(head)]))
        pairs += list(zip(tail, shape[len(shape) - len(tail) :]))
        if pattern[star] != "*":
            pairs.append((pattern[star], tuple(shape[len(head) : len(shape) - len(tail)])))
    new: dict[str, Any] = {}
    for sym, size in pairs:
        if isinstance(sym, int):
            if size != sym:
                return None
            continue
        if sym == "?":
            continue
        if sym in known:
            if known[sym][0] != size:
                return None
        elif new.setdefault(sym, size) != size:
            return None
    return new


_MISSING = object()
_KIND_WORDS = {
    "tensor": "a tensor",
    "dict": "a dict",
    "list": "a list",
    "tuple": "a tuple",
    "none": "None",
    "any": "any value",
}


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...] | None:
    """torch's broadcasting of two shapes (None when they do not broadcast), in plain Python:
    torch.broadcast_shapes costs tens of microseconds per call."""
    out = []
    for x, y in zip(
        reversed((1,) * (len(b) - len(a)) + tuple(a)), reversed((1,) * (len(a) - len(b)) + tuple(b))
    ):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def _broadcasts_to(value: Tensor, other: Tensor) -> bool:
    return broadcast_shape(value.shape, other.shape) == tuple(other.shape)


def _broadcasts_with(value: Tensor, other: Tensor) -> bool:
    return broadcast_shape(value.shape, other.shape) is not None


def check_indices(
    target: Tensor,
    num_classes: int,
    field: str,
    ignore_index: int | None = None,
    allow_background: bool = False,
    upstream: str = "",
) -> None:
    """Indices must lie in [0, num_classes) (or == num_classes as background), or equal ignore_index.

    Checked before any kernel sees the data: an out-of-range class index must never reach a
    CUDA kernel, where it becomes a device-side assert that poisons the whole context.
    """
    if target.numel() == 0:
        return
    top = num_classes if allow_background else num_classes - 1
    lo, hi = (int(v) for v in torch.aminmax(target))
    if lo >= 0 and hi <= top:
        return  # the common case, one kernel: no masking needed
    valid = target if ignore_index is None else target[target != ignore_index]
    if valid.numel() == 0:
        return
    lo, hi = int(valid.min()), int(valid.max())
    if lo < 0 or hi > top:
        bad = lo if lo < 0 else hi
        ignore = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        error = SchemaError.expected(field, f"class indices in [0, {top}]{ignore}", f"index {bad}")
        error.upstream = upstream
        raise error


def _check_values(
    value: Tensor, lo: float, hi: float, where: str, what: str, upstream: str = ""
) -> None:
    # NaN is outside every range (torch's BCE kernels refuse it too).
    outside = ~((value >= lo) & (value <= hi))
    if value.numel() and bool(outside.any()):
        raise SchemaError(
            where,
            f"expected every value in [{lo:g}, {hi:g}]{what}, got {value[outside][0].item()}",
            upstream=upstream,
        )


# ------------------------------------------------------------------------------------------
# Constructor parameters: the one set of type, choice and range rules
# ------------------------------------------------------------------------------------------


def type_name(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor(dtype={_dtype(value)}, shape={list(value.shape)})"
    return type(value).__name__


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coerce_kind(kind: str, value: Any, where: str) -> Any:
    """``value`` as a parameter (or scalar input) of type ``kind``, in canonical form."""
    if kind == "any":
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if is_number(value):
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "float_list":
        # Integer lists are accepted as floats (fat's YAML `weight: [1, 2, 1]` would otherwise
        # crash upstream with "expected scalar type Float but found Long").
        if isinstance(value, (list, tuple)) and all(is_number(v) for v in value):
            return [float(v) for v in value]
        if isinstance(value, Tensor) and value.dim() == 1 and value.is_floating_point():
            return [float(v) for v in value.tolist()]
    elif kind == "tensor":
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (list, tuple)) and all(is_number(v) for v in value):
            return torch.tensor([float(v) for v in value])
    elif kind == "mapping":
        if isinstance(value, Mapping):
            return value
    elif kind == "list" and isinstance(value, (list, tuple)):
        return list(value)
    words = {"tensor": "a tensor or a list of numbers", "float_list": "a list of numbers"}
    raise SchemaError.expected(where, words.get(kind, kind), type_name(value))


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """The values a declaration allows (a Param, a scalar Input, a ParamRule): one of
    ``choices`` when given, and within ``minimum``..``maximum``, ends included unless exclusive."""

    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    minimum_exclusive: bool = False
    maximum_exclusive: bool = False


def check_range(rule: Bounds, value: Any, where: str) -> None:
    """``value`` within ``rule``'s minimum and maximum (numbers only)."""
    if not is_number(value):
        return
    if isinstance(value, float) and math.isnan(value):
        raise SchemaError.expected(where, "a number", "NaN")
    lo, hi = rule.minimum, rule.maximum
    if lo is not None and (value < lo or (rule.minimum_exclusive and value == lo)):
        raise SchemaError.expected(
            where, f"a value {'>' if rule.minimum_exclusive else '>='} {lo}", value
        )
    if hi is not None and (value > hi or (rule.maximum_exclusive and value == hi)):
        raise SchemaError.expected(
            where, f"a value {'<' if rule.maximum_exclusive else '<='} {hi}", value
        )


def check_param(rule: Any, value: Any, where: str, nullable: bool) -> Any:
    """A constructor parameter against its declaration (``rule``: ``type``, ``choices`` and the
    range of a Param or ParamRule); returns it in canonical form."""
    if value is None:
        if nullable:
            return None
        raise SchemaError.expected(where, f"{rule.type} (None is not allowed)", "None")
    return check_scalar(rule, rule.type, value, where)


def check_scalar(rule: Bounds, kind: str, value: Any, where: str) -> Any:
    """``value`` as a ``kind`` (int, str, bool, ...), then within ``rule``'s choices and range
    (a Param, a ParamRule or a scalar Input); returns it in canonical form."""
    value = coerce_kind(kind, value, where)
    if rule.choices and value not in rule.choices:
        allowed = ", ".join(repr(c) for c in rule.choices)
        raise SchemaError.expected(where, f"one of {allowed}", repr(value))
    check_range(rule, value, where)
    return value


@dataclass(frozen=True)
class ParamRule(Bounds):
    """The checkable part of a parameter's declaration, as DescribeLoss sends it."""

    type: str

    @classmethod
    def from_info(cls, info: pb.ParamInfo) -> ParamRule:
        return cls(
            type=info.type,
            choices=tuple(codec.decode_value(c) for c in info.choices),
            minimum=info.minimum if info.HasField("minimum") else None,
            maximum=info.maximum if info.HasField("maximum") else None,
            minimum_exclusive=info.minimum_exclusive,
            maximum_exclusive=info.maximum_exclusive,
        )


# ------------------------------------------------------------------------------------------
# The declaration on the wire (DescribeLoss / ListLosses)
# ------------------------------------------------------------------------------------------


def form_message(form: Form) -> pb.InputForm:
    """The wire form of a declaration (the server's DescribeLoss answer)."""
    msg = pb.InputForm(
        kind=form.kind,
        dtypes=[codec.wire_dtype(getattr(torch, d)) for d in form.dtypes]
        if form.kind == "tensor"
        else [],
        shape=[str(s) for s in form.shape] if form.kind == "tensor" else [],
        same_shape=form.same_shape or "",
        broadcast_to=form.broadcast_to or "",
        broadcasts_with=form.broadcasts_with or "",
        same_dtype=form.same_dtype or "",
        promote_with=form.promote_with or "",
        shapes=[pb.ShapeOf(path=p, shape=[str(s) for s in shape]) for p, shape in form.shapes],
        index_of=form.index_of or "",
        index_background=form.index_background,
        index_ignore=[str(i) for i in form.index_ignore],
        items=[pb.InputSchema(forms=[form_message(f) for f in s]) for s in form.items],
        each=[form_message(f) for f in form.each],
        keys=[pb.InputKey(name=k, forms=[form_message(f) for f in s]) for k, s in form.keys],
        min_items=form.min_items,
        length=form.length or "",
        label=form.label,
        upstream=form.upstream,
    )
    if form.values is not None:
        msg.values_min, msg.values_max = form.values
    for name, value in form.when:
        codec.encode_value(value, msg.when.add(param=name).value)
    return msg


def _dim(text: str) -> Dim:
    return int(text) if text.lstrip("-").isdigit() else text


def form_from_message(msg: pb.InputForm) -> Form:
    """The declaration a DescribeLoss answer carries, as the checker takes it."""
    tensor = (
        {
            "dtypes": tuple(codec.dtype_name(d) for d in msg.dtypes),
            "shape": tuple(map(_dim, msg.shape)),
        }
        if msg.kind == "tensor"
        else {}
    )
    return Form(
        kind=msg.kind,
        **tensor,
        same_shape=msg.same_shape or None,
        broadcast_to=msg.broadcast_to or None,
        broadcasts_with=msg.broadcasts_with or None,
        same_dtype=msg.same_dtype or None,
        promote_with=msg.promote_with or None,
        shapes=tuple((s.path, tuple(_dim(d) for d in s.shape)) for s in msg.shapes),
        index_of=msg.index_of or None,
        index_background=msg.index_background,
        index_ignore=tuple(_dim(i) for i in msg.index_ignore),
        values=(msg.values_min, msg.values_max) if msg.HasField("values_min") else None,
        items=tuple(tuple(form_from_message(f) for f in s.forms) for s in msg.items),
        each=tuple(form_from_message(f) for f in msg.each),
        keys=tuple((k.name, tuple(form_from_message(f) for f in k.forms)) for k in msg.keys),
        min_items=msg.min_items,
        length=msg.length or None,
        when=tuple((w.param, codec.decode_value(w.value)) for w in msg.when),
        label=msg.label,
        upstream=msg.upstream,
    )


# ------------------------------------------------------------------------------------------
# The client's checks
# ------------------------------------------------------------------------------------------


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
        try:
            check_param(ParamRule.from_info(param), value, field, param.nullable)
        except SchemaError as exc:
            raise _refuse(exc.field, exc.message) from None
    for param in info.params:
        if param.required and param.name not in params:
            raise _refuse(
                f"params.{param.name}",
                f"loss {info.name!r} requires parameter {param.name!r} ({param.type}: {param.doc})",
            )


@dataclass(frozen=True)
class _Declared:
    """What check_call needs of one LossInfo, decoded once."""

    defaults: dict[str, Any]
    inputs: tuple[tuple[int, str, str, Schema], ...]  # position, keyword, declared name, schema
    passed: set = field(default_factory=set)  # call signatures already checked (signature.py)


_DECLARED: dict[int, tuple[pb.LossInfo, _Declared]] = {}


def _declared(info: pb.LossInfo) -> _Declared:
    cached = _DECLARED.get(id(info))
    if cached is not None and cached[0] is info:
        return cached[1]
    declared = _Declared(
        defaults={
            p.name: codec.decode_value(p.default_value) for p in info.params if not p.required
        },
        inputs=tuple(
            (i, d.keyword or d.name, d.name, tuple(form_from_message(f) for f in d.forms))
            for i, d in enumerate(info.inputs)
            if d.forms
        ),
    )
    if len(_DECLARED) > 1024:  # LossClient keeps one LossInfo per loss: this never grows
        _DECLARED.clear()
    _DECLARED[id(info)] = (info, declared)
    return declared


def check_call(
    info: pb.LossInfo, params: Mapping[str, Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Any:
    """The structural checks of the loss's declared inputs, on the client, before sending: only
    what needs no tensor data (kinds, dtypes, shapes, relations, forms); the server checks the
    rest, and everything again. Returns the call's signature (client/signature.py)."""
    declared = _declared(info)
    if (signature := call_signature(params, args, kwargs)) in declared.passed:
        return signature  # the same parameters, layout, dtypes and shapes passed: nothing read
    checker = Checker({**declared.defaults, **params}, values=False)
    for index, key, name, schema in declared.inputs:
        if key in kwargs:
            value, where = kwargs[key], f"kwargs.{key}"
        elif index < len(args):
            value, where = args[index], f"args[{index}]"
        else:
            continue
        if value is None:
            continue
        try:
            checker.check(schema, value, name, where)
        except SchemaError as exc:
            raise _refuse(exc.field, exc.message) from None
    return remember(declared.passed, signature)
