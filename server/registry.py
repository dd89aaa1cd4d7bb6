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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from lossd.client.schema import ANY_DTYPES as ANY_DTYPES  # the dtype sets losses declare with
from lossd.client.schema import FLOAT_DTYPES as FLOAT_DTYPES
from lossd.client.schema import INDEX_DTYPES as INDEX_DTYPES
from lossd.client.schema import INT_DTYPES as INT_DTYPES
from lossd.client.schema import (
    Bounds,
    Checker,
    Schema,
    SchemaError,
    TensorRules,
    check_param,
    check_range,
    check_scalar,
    is_number,
    type_name,
)
from lossd.client.schema import Form as Form
from lossd.client.signature import call_signature
from lossd.client.wire.codec import iter_tensors

from .errors import InvalidArgument, LossNotFound, quote


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

PARAM_TYPES = ("bool", "int", "float", "str", "float_list", "tensor", "mapping", "list", "any")
# The trainer families a loss can belong to (ListLossesRequest.family).
FAMILIES = ("fat", "netspresso", "visdet")

INPUT_KINDS = ("tensor", "structure", "number", "int", "str", "bool", "any")


@dataclass(frozen=True)
class Param(Bounds):
    """A constructor parameter, with its type, default and allowed range or choices."""

    name: str
    type: str
    default: Any = REQUIRED
    doc: str = ""
    nullable: bool = False
    # A tensor given as a tensor must have this input's dtype: torch refuses a class weight of
    # another dtype ("expected scalar type Float but found Double"). A list of numbers has no
    # dtype and takes the input's.
    same_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"Param {self.name}: type {self.type!r} not in {PARAM_TYPES}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, field_name: str | None = None) -> Any:
        """Check ``value`` against this parameter and return it in canonical form (the rules
        the client applies too, from the declaration DescribeLoss sends: client/schema.py)."""
        where = field_name or f"params.{self.name}"
        try:
            return check_param(self, value, where, self.nullable or self.default is None)
        except SchemaError as exc:
            raise InvalidArgument(exc.message, field=exc.field) from None


def _check_range(spec: Param | Input, value: Any, where: str) -> None:
    try:
        check_range(spec, value, where)
    except SchemaError as exc:
        raise InvalidArgument(exc.message, field=exc.field) from None


@dataclass(frozen=True)
class Input(Bounds, TensorRules):
    """A forward argument.

    A tensor argument declares its dtypes, its symbolic shape and its relations to earlier
    arguments directly (``Input("target", shape=("N",), index_of="C")``); alternatives (an index
    or a probability target, a ``(labels, scores)`` pair, NetsPresso's nested dicts) are
    declared as ``forms``, which replace ``dtypes``/``shape`` and the relations. See
    :mod:`lossd.client.schema` for the vocabulary: the engine checks every call against it once,
    before the loss runs, and the client checks the structural part before sending.
    ``kind="structure"`` or ``"any"`` without forms leaves the layout to the loss.
    """

    name: str
    kind: str = "tensor"
    differentiable: bool = False
    optional: bool = False
    default: Any = None
    doc: str = ""
    # The keyword callers use, when the function cannot use it: upstream forwards may reuse a
    # constructor parameter's name (mmdet CrossEntropyLoss's call-time ``ignore_index``).
    keyword: str | None = None
    forms: tuple[Form, ...] = ()

    @property
    def call_name(self) -> str:
        return self.keyword or self.name

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"Input {self.name}: kind {self.kind!r} not in {INPUT_KINDS}")

    @cached_property
    def schema(self) -> Schema:
        """The accepted layouts (empty: checked as a scalar kind, or by the loss itself)."""
        if self.forms:
            return self.forms
        if self.kind != "tensor":
            return ()
        return (Form(**{f.name: getattr(self, f.name) for f in fields(TensorRules)}),)


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
    if not spec.families or set(spec.families) - set(FAMILIES):
        raise ValueError(f"loss {spec.name!r}: families {spec.families} not within {FAMILIES}")
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


def get(name: str, field: str = "loss") -> LossSpec:
    """The spec registered as ``name``; ``field`` names the request field that carried it."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        if not close:  # case-insensitive matches help e.g. "focalloss" -> "FocalLoss"
            close = [n for n in _REGISTRY if n.lower() == name.lower()]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise LossNotFound(
            f"unknown loss {quote(name)}{hint} (ListLosses lists all {len(_REGISTRY)})",
            field=field,
        ) from None


def all_specs(family: str | None = None) -> list[LossSpec]:
    """Every spec, or those of one family; an unknown family is refused, listing the families."""
    if family is not None and family not in FAMILIES:
        raise InvalidArgument.expected("family", f"one of {', '.join(FAMILIES)}", quote(family))
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.families[0], s.name.lower()))
    return [s for s in specs if family is None or family in s.families]


SCALAR_KINDS = ("number", "int", "str", "bool")


def check_input(spec: Input, value: Any, where: str, checker: Checker | None) -> Any:
    """Check one forward argument against its declaration; returns it in canonical form."""
    if value is None:
        if spec.optional:
            return None
        raise InvalidArgument.expected(where, f"{spec.kind} (argument is required)", "None")
    if spec.kind == "number":
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
            value = value.item()
        if not is_number(value):
            raise InvalidArgument.expected(where, "a number", type_name(value))
        _check_range(spec, value, where)
        return value
    if spec.kind in ("int", "str", "bool"):
        try:
            return check_scalar(spec, spec.kind, value, where)
        except SchemaError as exc:
            raise InvalidArgument(exc.message, field=exc.field) from None
    try:
        checker.check(spec.schema, value, spec.name, where)
    except SchemaError as exc:
        raise InvalidArgument(exc.message, field=exc.field, upstream=exc.upstream or None) from None
    promoted = checker.promoted.get(spec.name)
    return value if promoted is None else value.to(promoted)


def _symbols_key(symbols: dict[str, Any]) -> str | None:
    """The symbols' repr, exact for scalars, strings and lists of them; None if any is a tensor."""
    if any(True for _ in iter_tensors(symbols, "")):
        return None
    return repr(symbols)


def check_inputs(
    spec: LossSpec,
    bound: dict[str, Any],
    wheres: Mapping[str, str],
    params: Mapping[str, Any],
    memo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the given arguments of one call (by input name, updated in place to their canonical
    form) against the spec's declaration; ``wheres`` names each as the caller sent it, ``params``
    are the canonical constructor parameters (forms may depend on them). ``memo``: kept by the
    caller for calls of one signature (a request layout's plan, server/prepared.py), it holds
    the CheckPlan once found and the symbols it was found with, so that a call with the same
    symbols replays it without computing the signature of its tensors."""
    # Scalars first: a form may read one (visdet's call-time ignore_index), as it reads params.
    scalars = [i for i in spec.inputs if i.kind in SCALAR_KINDS and i.name in bound]
    for declared in scalars:
        bound[declared.name] = check_input(
            declared, bound[declared.name], wheres[declared.name], None
        )
    symbols = {**params, **{i.name: bound[i.name] for i in scalars}}
    # A memo holds for the symbols it was found with (a scalar sent as a tensor changes them),
    # compared by repr: none where a tensor among them, whose repr elides, would make it unsound.
    key = _symbols_key(symbols) if memo is not None else None
    cached = memo.get("checks") if key is not None else None
    if cached is not None and cached[0] is spec and cached[2] == key:
        cached[1].replay(bound)
        return bound
    others = [i for i in spec.inputs if i.name in bound and i.kind not in SCALAR_KINDS]
    given = {i.name: bound[i.name] for i in others}
    signature = call_signature(symbols, [], given)
    signature = signature and (signature, tuple(wheres.items()))
    cached = _PLANS.get((id(spec), signature)) if signature is not None else None
    if cached is not None and cached[0] is spec:
        if key is not None:
            memo["checks"] = (*cached, key)
        cached[1].replay(bound)
        return bound
    checker = Checker(symbols)  # only for a signature not seen yet: the plan replays the rest
    for declared in others:
        bound[declared.name] = check_input(
            declared, bound[declared.name], wheres[declared.name], checker
        )
    plan = CheckPlan.of(checker, given, wheres) if signature is not None else None
    if plan is not None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[(id(spec), signature)] = (spec, plan)
        if key is not None:
            memo["checks"] = (spec, plan, key)
    return bound


@dataclass(frozen=True)
class CheckPlan:
    """What the checks of one call signature (parameters, layout, dtypes and shapes of the
    inputs, where each was sent) came to when they passed: the value checks that ran, by where
    their tensor was sent, and the promotions. The structural checks read nothing but the
    signature, so another call with the same one runs only these (``check_inputs``)."""

    wheres: tuple[tuple[str, str], ...]  # (input name, where it was sent)
    checks: tuple[tuple[Callable[..., None], str, tuple], ...]  # (check, where its tensor is, args)
    promotions: tuple[tuple[str, torch.dtype], ...]

    @classmethod
    def of(
        cls, checker: Checker, given: Mapping[str, Any], wheres: Mapping[str, str]
    ) -> CheckPlan | None:
        plan = cls(
            tuple((name, wheres[name]) for name in given),
            tuple((run, at, args) for run, _, at, args in checker.ran),
            tuple((name, dtype) for name, dtype in checker.promoted.items() if name in given),
        )
        found = plan._tensors(given)
        if any(found.get(at) is not tensor for _, tensor, at, _ in checker.ran):
            return None  # a checked tensor is not where its path says (a key with a dot): no plan
        return plan

    def _tensors(self, values: Mapping[str, Any]) -> dict[str, Tensor]:
        return {at: t for name, where in self.wheres for at, t in iter_tensors(values[name], where)}

    def replay(self, bound: dict[str, Any]) -> None:
        tensors = self._tensors(bound)
        try:
            for check, at, args in self.checks:
                check(tensors[at], *args)
        except SchemaError as exc:  # as check_input reports it
            raise InvalidArgument(
                exc.message, field=exc.field, upstream=exc.upstream or None
            ) from None
        for name, dtype in self.promotions:
            bound[name] = bound[name].to(dtype)


_PLANS: dict[tuple[int, Any], tuple[LossSpec, CheckPlan]] = {}
MAX_PLANS = 1024  # call signatures remembered, all losses together


def check_param_dtypes(spec: LossSpec, given: Mapping[str, Any], bound: Mapping[str, Any]) -> None:
    """Refuse, as torch does, a tensor parameter whose dtype differs from its input's
    (``Param.same_dtype``): torch raises RuntimeError for a class weight of another dtype."""
    for param in spec.params:
        value, other = given.get(param.name), bound.get(param.same_dtype or "")
        if param.same_dtype is None or not isinstance(value, Tensor):
            continue
        if isinstance(other, Tensor) and value.dtype != other.dtype:
            raise InvalidArgument.expected(
                f"params.{param.name}",
                f"dtype {_dtype_name(other)} (the {param.same_dtype}'s, as torch requires)",
                _dtype_name(value),
                upstream="RuntimeError",
            )


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
