"""The compute engine: runs a registered loss and its gradients on one device. No gRPC here.

``Engine.evaluate`` takes decoded Python values (what the upstream forward takes), validates
them against the loss's declaration, runs the loss under autograd on the engine's device, and
returns the value, the gradients for the requested paths, the components and a non-finite flag.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lossd.client.wire.codec import LEAF_TYPES, call_tensors, iter_tensors, map_tensors

from . import losses as _losses  # noqa: F401  (registers every loss)
from . import registry
from .config import SettingError
from .derivatives import gradients
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from .registry import LossOutput, LossSpec


@dataclass
class Evaluation:
    """The result of one evaluation; tensors are detached and still on the engine's device."""

    spec: LossSpec
    params: dict[str, Any]
    value: Any
    grads: dict[str, Tensor]
    components: dict[str, Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    non_finite: bool = False
    device: str = "cpu"
    compute_ns: int = 0


@dataclass(frozen=True)
class AutocastPolicy:
    """The caller's ``torch.autocast`` region: its device type and lower-precision dtype."""

    device_type: str
    dtype: torch.dtype

    def region(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else CPU; a CUDA device torch cannot see is a
    SettingError naming ``--device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SettingError(
                f"--device {name}: torch {torch.__version__} sees no CUDA device; use cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise SettingError(f"--device {name}: torch sees {count} CUDA device(s)")
    return device


class Engine:
    """Evaluates registered losses on one device."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device

    def evaluate(
        self,
        loss: str,
        params: Mapping[str, Any] | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        grad_paths: Sequence[str] = (),
        grad_output: Tensor | None = None,
        *,
        autocast: AutocastPolicy | None = None,
        grad_output_batched: bool = False,
        grad_grads: Mapping[str, Tensor] | None = None,
        after_forward: Callable[[], None] | None = None,
        memo: dict[str, Any] | None = None,
    ) -> Evaluation:
        """``autocast``: evaluate the forward and the gradients inside that autocast region, as
        upstream runs inside the caller's (its op policy is the device type's, so a CPU region is
        evaluated on CPU whatever the engine's device). ``grad_output_batched``, ``grad_grads``:
        a batch of products, or second-order ones (see ``derivatives``). ``after_forward``: called
        once the loss returned, before its gradients (the shared-memory path gives back its
        mapping of the inputs' pages there; server/shm.py). ``memo``: what the input checks found
        for calls of one signature (``registry.check_inputs``), kept by the caller."""
        spec = registry.get(loss)
        device = self._device_for(autocast)
        canonical = canonical_params(spec, params or {})
        kwargs = dict(kwargs or {})
        bound = bind_inputs(spec, list(args), kwargs, canonical, memo=memo)
        registry.check_param_dtypes(spec, params or {}, bound)

        def to_device(value: Any) -> Any:
            # A top-level tensor or scalar (the usual input, parameter) without map_tensors' walk.
            kind = type(value)
            if kind is Tensor:
                return _to(value, device)
            if kind in LEAF_TYPES:
                return value
            return map_tensors(value, lambda tensor: _to(tensor, device))

        bound = {name: to_device(value) for name, value in bound.items()}
        call_params = {name: to_device(value) for name, value in canonical.items()}
        n_positional = len(args)
        names = [i.name for i in spec.inputs]
        call_args = [bound[n] for n in names[:n_positional]]
        call_kwargs = {
            n: bound[n] for n in names[n_positional:] if n in bound
        }  # function names, not call names

        wanted = _mark_requires_grad(call_args, call_kwargs, grad_paths)

        region = autocast.region() if autocast is not None else contextlib.nullcontext()
        start = time.perf_counter_ns()
        try:
            with torch.set_grad_enabled(bool(wanted)), region:
                out = spec.fn(*call_args, **call_kwargs, **call_params)
                result = out if isinstance(out, LossOutput) else LossOutput(out)
                if after_forward is not None:
                    after_forward()
                grads = gradients(
                    result.value,
                    wanted,
                    grad_output,
                    device,
                    batched=grad_output_batched,
                    grad_grads=grad_grads,
                )
        except InvalidArgument as exc:
            exc.field = _wire_field(exc.field, spec, n_positional, call_kwargs)
            raise
        except torch.OutOfMemoryError as exc:
            raise ResourceExhausted(
                f"out of device memory evaluating {loss} on {device}: {exc}".split("\n")[0]
            ) from None
        # Anything else (a RuntimeError or IndexError included) is a bug in lossd: the servicer
        # logs it with its traceback and request id and answers INTERNAL. Inputs upstream itself
        # crashes on are refused where upstream crashes, inside ``errors.upstream_raises``.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_ns = time.perf_counter_ns() - start

        if type(result.value) is Tensor:  # the usual loss value: no walk
            value = result.value.detach()
            non_finite = _non_finite(value)
        else:
            value = map_tensors(result.value, lambda t: t.detach())
            non_finite = any(_non_finite(t) for _, t in iter_tensors(value, ""))
        components = {k: v.detach() for k, v in result.components.items()}
        non_finite = non_finite or any(_non_finite(g) for g in grads.values())
        return Evaluation(
            spec=spec,
            params=canonical,
            value=value,
            grads=grads,
            components=components,
            notes=list(result.notes),
            non_finite=non_finite,
            device=str(device),
            compute_ns=compute_ns,
        )

    def _device_for(self, autocast: AutocastPolicy | None) -> torch.device:
        if autocast is None or autocast.device_type == self.device.type:
            return self.device
        if autocast.device_type == "cpu":
            return torch.device("cpu")  # CPU autocast's policy, reproduced exactly on the CPU
        raise FailedPrecondition(
            f"the caller runs inside torch.autocast({autocast.device_type!r}), whose op policy only "
            f"a {autocast.device_type} device reproduces; this server computes on {self.device.type}. "
            f"Use a lossd server with a {autocast.device_type} device, or call the loss outside autocast",
            field="autocast",
        )


def _to(tensor: Tensor, device: torch.device) -> Tensor:
    # detach(): a fresh leaf, so marking it requires_grad never touches the caller's tensor.
    return tensor.detach() if tensor.device == device else tensor.to(device, non_blocking=True)


def canonical_params(spec: LossSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.canonical_params(given)``, remembered for parameters given as plain scalars (the
    usual ones, also none at all): those validate to the same canonical form every time."""
    key = _params_key(spec, given)
    cached = _CANONICAL.get(key) if key is not None else None
    if cached is not None and cached[0] is spec:
        return dict(cached[1])
    canonical = spec.canonical_params(given)
    if key is not None:
        if len(_CANONICAL) >= MAX_LAYOUTS:
            _CANONICAL.clear()
        _CANONICAL[key] = (spec, dict(canonical))
    return canonical


def _params_key(spec: LossSpec, given: Mapping[str, Any]) -> tuple | None:
    key: list[Any] = [id(spec)]
    for name, value in given.items():
        kind = type(value)
        if kind not in LEAF_TYPES:
            return None  # a tensor or a sequence: validated every time
        # The type, since 1 == 1.0 == True; a float by its hex form, since -0.0 == 0.0.
        key.append((name, kind, value.hex() if kind is float else value))
    return tuple(key)


_CANONICAL: dict[tuple, tuple[LossSpec, dict[str, Any]]] = {}


def bind_inputs(
    spec: LossSpec,
    args: list[Any],
    kwargs: dict[str, Any],
    params: Mapping[str, Any] | None = None,
    *,
    by_name: bool = False,
    memo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Match a call's positional and keyword arguments to the declared inputs and check them
    against their declaration, once, before the loss runs (``params``: the canonical
    constructor parameters, which forms may depend on). Errors name the field as the caller
    sent it (``args[1]``), or by the argument's name with ``by_name`` (a direct Python call)."""
    key = (id(spec), len(args), tuple(kwargs), by_name)
    layout = _LAYOUTS.get(key)
    if layout is not None and layout[0] is spec:  # this layout passed: bind it, check the rest
        by_keyword, wheres = layout[1], layout[2]
        bound = dict(zip(layout[3], args))
        for call_name, value in kwargs.items():
            bound[by_keyword[call_name]] = value
        registry.check_inputs(spec, bound, wheres, params or {}, memo)
        return bound
    names = [i.name for i in spec.inputs]
    by_keyword = {i.call_name: i.name for i in spec.inputs}
    if len(args) > len(names):
        raise InvalidArgument.expected(
            "args",
            f"at most {len(names)} positional arguments ({', '.join(by_keyword)})",
            len(args),
        )
    bound: dict[str, Any] = dict(zip(names, args))
    for call_name, value in kwargs.items():
        name = by_keyword.get(call_name)
        if name is None:
            hint = (
                " (it is a constructor parameter: pass it in params)"
                if spec.param(call_name)
                else ""
            )
            raise InvalidArgument(
                f"unexpected keyword argument {call_name!r} for {spec.name}{hint}; forward takes {', '.join(by_keyword)}",
                field=f"kwargs.{call_name}",
            )
        if name in bound:
            raise InvalidArgument(
                f"argument {call_name!r} given both positionally and by keyword",
                field=f"kwargs.{call_name}",
            )
        bound[name] = value
    wheres = {
        declared.name: (
            declared.name
            if by_name
            else f"kwargs.{declared.call_name}"
            if declared.call_name in kwargs
            else f"args[{index}]"
        )
        for index, declared in enumerate(spec.inputs)
    }
    for declared in spec.inputs:
        if declared.name not in bound and not declared.optional:
            raise InvalidArgument(
                f"{spec.name} needs argument {declared.name!r} ({declared.doc or declared.kind})",
                field=wheres[declared.name],
            )
    if len(_LAYOUTS) >= MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (spec, by_keyword, wheres, names)
    registry.check_inputs(spec, bound, wheres, params or {}, memo)
    return bound


# How the arguments of a call bind to a loss's inputs and where each was sent depend only on the
# loss, the number of positional arguments and the keywords: checked once per such layout (it is
# stored once it passed, so only keywords the loss declares reach the key), then replayed.
_LAYOUTS: dict[tuple, tuple[LossSpec, dict[str, str], dict[str, str], list[str]]] = {}
MAX_LAYOUTS = 1024  # layouts remembered, all losses together (beyond: forgotten, re-checked)


def _mark_requires_grad(
    args: list[Any], kwargs: dict[str, Any], grad_paths: Sequence[str]
) -> dict[str, Tensor]:
    if not grad_paths:
        return {}
    tensors = _top_level(args, grad_paths)
    if tensors is None:
        tensors = dict(call_tensors(args, kwargs))
    wanted: dict[str, Tensor] = {}
    for i, path in enumerate(grad_paths):
        tensor = tensors.get(path)
        if tensor is None:
            available = ", ".join(tensors) or "none"
            raise InvalidArgument(
                f"no input tensor at path {path!r} (tensors in this call: {available})",
                field=f"grad_paths[{i}]",
            )
        if not tensor.is_floating_point():
            raise InvalidArgument.expected(
                f"grad_paths[{i}]",
                "a path to a floating-point tensor",
                f"{path} of dtype {str(tensor.dtype).removeprefix('torch.')}",
            )
        if path in wanted:
            raise InvalidArgument(f"path {path!r} requested twice", field=f"grad_paths[{i}]")
        tensor.requires_grad_(True)
        wanted[path] = tensor
    return wanted


_ARG_INDEX = {f"args[{i}]": i for i in range(16)}


def _top_level(args: list[Any], grad_paths: Sequence[str]) -> dict[str, Tensor] | None:
    """The tensors at ``grad_paths`` when each is a positional argument's own path
    (``args[0]``), as ``call_tensors`` names them, without walking the call; else None."""
    found = {}
    for path in grad_paths:
        index = _ARG_INDEX.get(path, -1)
        if not 0 <= index < len(args) or type(args[index]) is not Tensor:
            return None
        found[path] = args[index]
    return found


def _wire_field(
    field: str | None, spec: LossSpec, n_positional: int, kwargs: Mapping[str, Any]
) -> str | None:
    """Loss functions name fields by argument (``target``, ``out.pred[1]``); callers know paths
    (``args[1]``, ``args[0].pred[1]``, ``kwargs.target``)."""
    if not field:
        return field
    for index, declared in enumerate(spec.inputs):
        name = declared.name
        if field == name or field.startswith((name + ".", name + "[")):
            prefix = (
                f"args[{index}]"
                if index < n_positional and name not in kwargs
                else f"kwargs.{declared.call_name}"
            )
            return prefix + field[len(name) :]
    return field


def _non_finite(tensor: Tensor) -> bool:
    if not tensor.is_floating_point():
        return False
    numel = tensor.numel()
    if numel <= 1:  # a loss value: read the element itself, no reduction op
        return numel == 1 and not math.isfinite(float(tensor))
    # A finite sum proves every element finite (NaN and +-inf propagate), in one reduction; only a
    # non-finite sum (which finite values can also overflow to) needs the element-wise check. In
    # the tensor's own dtype: a float64 sum of 8M float32 took 30-70 ms here, its own 1.6 ms.
    if math.isfinite(float(tensor.sum())):
        return False
    return not bool(torch.isfinite(tensor).all())
