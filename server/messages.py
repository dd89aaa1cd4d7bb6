"""Conversions between wire messages and engine calls: the servicer's decode and encode steps."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lossd.client import schema
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.wire import codec
from lossd.client.wire.audit import check_audit_fields

from .engine import AutocastPolicy, Evaluation
from .errors import InvalidArgument
from .registry import REQUIRED, Input, LossSpec, Param


@dataclass
class ComputeCall:
    """A decoded ComputeRequest."""

    loss: str
    params: dict[str, Any]
    args: list[Any]
    kwargs: dict[str, Any]
    grad_paths: list[str]
    grad_output: Tensor | None
    request_id: str
    audit: pb.AuditContext
    autocast: AutocastPolicy | None = None
    grad_output_batched: bool = False
    grad_grads: dict[str, Tensor] = field(default_factory=dict)
    memo: dict[str, Any] | None = None  # a layout's plan's, for the engine (server/prepared.py)

    def tensors(self) -> list[tuple[str, Tensor]]:
        """Every tensor of the call with its path, in the order decode_compute decodes them."""
        return _tensors(self.params, self.args, self.kwargs, self.grad_output)


def _tensors(params: Any, args: Any, kwargs: Any, grad_output: Tensor | None) -> list:
    found = [*codec.iter_tensors(params, "params"), *codec.call_tensors(args, kwargs)]
    return found + ([("grad_output", grad_output)] if grad_output is not None else [])


def decode_compute(
    request: pb.ComputeRequest,
    limits: codec.DecodeLimits,
    external: dict[str, Tensor] | None = None,
) -> ComputeCall:
    """``external``: bytes of tensors that came outside the message (chunked transport), by path."""
    codec.check_string_bytes(request.loss, "loss", limits, "loss name")
    budget = codec.new_budget(limits)
    # An empty map (the usual params, kwargs) decodes to {} without the call.
    params = (
        codec.decode_map(request.params, "params", limits, budget=budget, external=external)
        if request.params.entries
        else {}
    )
    args = [
        codec.decode_value(v, f"args[{i}]", limits, budget=budget, external=external)
        for i, v in enumerate(request.args)
    ]
    kwargs = (
        codec.decode_map(request.kwargs, "kwargs", limits, budget=budget, external=external)
        if request.kwargs.entries
        else {}
    )
    grad_output = (
        codec.decode_tensor(
            request.grad_output,
            "grad_output",
            limits,
            data=external.get("grad_output") if external else None,
        )
        if request.HasField("grad_output")
        else None
    )
    if external:
        _check_external(external, params, args, kwargs, grad_output)
    if len(request.grad_paths) > limits.max_items:
        raise codec.LimitError("grad_paths", f"more than {limits.max_items} paths", "--max-items")
    call = checked_call(
        request.loss,
        params,
        args,
        kwargs,
        list(request.grad_paths),
        grad_output,
        request.request_id,
        request.audit if request.HasField("audit") else None,
        request.autocast if request.HasField("autocast") else None,
        request.grad_output_batched,
    )
    if request.grad_grads:
        call.grad_grads = _decode_grad_grads(request, limits)
    return call


def checked_call(
    loss: str,
    params: dict[str, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    grad_paths: list[str],
    grad_output: Tensor | None,
    request_id: str,
    audit: pb.AuditContext | None,
    autocast: pb.Autocast | None,
    grad_output_batched: bool,
) -> ComputeCall:
    """The call of decoded inputs, once its per-call fields (request id, audit context, autocast:
    what changes every call) passed their checks, in this order (also server/prepared.py's)."""
    if audit is not None:
        check_audit_context(audit)
    check_request_id(request_id)
    return ComputeCall(
        loss=loss,
        params=params,
        args=args,
        kwargs=kwargs,
        grad_paths=grad_paths,
        grad_output=grad_output,
        request_id=request_id or uuid.uuid4().hex,
        audit=audit if audit is not None else pb.AuditContext(),
        autocast=decode_autocast(autocast) if autocast is not None else None,
        grad_output_batched=grad_output_batched,
    )


MAX_REQUEST_ID_CHARS = 128


def check_request_id(request_id: str) -> None:
    """A client-chosen request id keys the audit trail on every store: printable, bounded."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument.expected(
            "request_id", f"at most {MAX_REQUEST_ID_CHARS} characters", f"{len(request_id)}"
        )
    bad = None if request_id.isprintable() else next(c for c in request_id if not c.isprintable())
    if bad is not None:
        raise InvalidArgument.expected(
            "request_id", "printable characters (no NUL or control characters)", repr(bad)
        )


def _decode_grad_grads(request: pb.ComputeRequest, limits: codec.DecodeLimits) -> dict[str, Tensor]:
    if len(request.grad_grads) > limits.max_items:
        raise codec.LimitError("grad_grads", f"more than {limits.max_items} vectors", "--max-items")
    out: dict[str, Tensor] = {}
    for i, item in enumerate(request.grad_grads):
        where = f"grad_grads[{i}]"
        if item.path in out:
            raise InvalidArgument(f"path {item.path!r} given twice", field=where)
        tensor = codec.decode_tensor(item.grad, where, limits)
        if not tensor.is_floating_point():
            raise InvalidArgument.expected(where, "a floating-point tensor", str(tensor.dtype))
        out[item.path] = tensor
    return out


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
AUTOCAST_DTYPES = (pb.DATA_TYPE_BFLOAT16, pb.DATA_TYPE_FLOAT16)


def decode_autocast(message: pb.Autocast) -> AutocastPolicy | None:
    """The caller's autocast region, or None when it is not enabled."""
    if not message.enabled:
        return None
    if message.device_type not in AUTOCAST_DEVICE_TYPES:
        raise InvalidArgument.expected(
            "autocast.device_type", "'cpu' or 'cuda'", repr(message.device_type)
        )
    if message.dtype not in AUTOCAST_DTYPES:
        raise InvalidArgument.expected(
            "autocast.dtype",
            "DATA_TYPE_BFLOAT16 or DATA_TYPE_FLOAT16",
            codec.dtype_name(message.dtype),
        )
    return AutocastPolicy(message.device_type, codec.torch_dtype(message.dtype))


def check_audit_context(audit: pb.AuditContext) -> None:
    """Refuse a run id or tags the audit trail could not store, before anything is computed, and
    whether or not this server records the call: the same request gets the same answer anywhere."""
    for field_name, run_id, tags in (
        ("audit.run_id", audit.run_id, None),
        ("audit.tags", None, dict(audit.tags)),
    ):
        try:
            check_audit_fields(run_id, tags)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field=field_name) from None
    for field_name in ("rank", "micro_batch"):
        # -1 is how clients before field presence said "unknown", and still means it.
        if audit.HasField(field_name) and getattr(audit, field_name) < -1:
            raise InvalidArgument.expected(
                f"audit.{field_name}", ">= 0, or unset when unknown", getattr(audit, field_name)
            )


def _check_external(
    external: dict[str, Tensor], params: Any, args: Any, kwargs: Any, grad_output: Tensor | None
) -> None:
    # Every chunked tensor must land on a tensor of the request, or its bytes would be ignored.
    known = {p for p, _ in _tensors(params, args, kwargs, grad_output)}
    for i, path in enumerate(external):
        if path not in known:
            raise codec.DecodeError(
                f"header.tensors[{i}].path",
                f"expected the path of a tensor of the request, got {path!r}",
            )


def encode_compute(
    result: Evaluation, request_id: str, version: str, outboard: codec.Outboard | None = None
) -> pb.ComputeResponse:
    """``outboard``: collect large tensors there instead of inlining them (chunked transport)."""
    response = pb.ComputeResponse(
        non_finite=result.non_finite,
        notes=result.notes,
        device=result.device,
        lossd_version=version,
        request_id=request_id,
    )
    codec.encode_value(result.value, response.loss, outboard=outboard, path="loss")
    for i, (path, grad) in enumerate(result.grads.items()):
        codec.encode_tensor(
            grad, response.grads.add(path=path).grad, outboard=outboard, path=f"grads[{i}]"
        )
    if result.components:
        codec.encode_map(result.components, response.components)
    return response


def loss_info(spec: LossSpec) -> pb.LossInfo:
    """The wire description of a loss, derived from its declaration."""
    return pb.LossInfo(
        name=spec.name,
        families=list(spec.families),
        summary=spec.summary,
        params=[_param_info(p) for p in spec.params],
        inputs=[_input_info(i) for i in spec.inputs],
        reference=spec.reference,
        example=spec.example,
    )


def _param_info(param: Param) -> pb.ParamInfo:
    info = pb.ParamInfo(
        name=param.name,
        type=param.type,
        required=param.default is REQUIRED,
        nullable=param.nullable or param.default is None,
        minimum_exclusive=param.minimum_exclusive,
        maximum_exclusive=param.maximum_exclusive,
        doc=param.doc,
    )
    if param.default is not REQUIRED:
        codec.encode_value(_plain(param.default), info.default_value)
    for choice in param.choices:
        codec.encode_value(choice, info.choices.add())
    if param.minimum is not None:
        info.minimum = param.minimum
    if param.maximum is not None:
        info.maximum = param.maximum
    return info


def _input_info(declared: Input) -> pb.InputInfo:
    return pb.InputInfo(
        name=declared.name,
        kind=declared.kind,
        dtypes=[codec.wire_dtype(_torch_dtype(d)) for d in declared.dtypes]
        if declared.kind == "tensor"
        else [],
        shape=[str(s) for s in declared.shape] if declared.kind == "tensor" else [],
        differentiable=declared.differentiable,
        optional=declared.optional,
        doc=declared.doc,
        forms=[schema.form_message(f) for f in declared.schema],
        keyword=declared.keyword or "",
    )


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
