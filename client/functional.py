"""Remote evaluation with exact autograd.

``remote_loss`` runs one loss call through a ``LossClient`` (``connection.py``) and attaches the
returned gradients to the autograd graph:

- scalar loss: the gradients come back with the value in the same RPC; ``backward`` scales them
  by ``grad_output`` (exact for ``loss.backward()``, whose grad_output is 1, and for power-of-two
  scales such as AMP's loss scaling);
- non-scalar loss (``reduction='none'``): ``backward`` sends ``grad_output`` in a second RPC and
  receives the exact vector-Jacobian products;
- no input requires grad (eval, ``torch.no_grad``): value only, no gradient is computed.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from torch import Tensor

from ._proto import lossd_pb2 as pb
from .amp import caller_autocast
from .connection import LossClient
from .errors import LossdError
from .transport import Transport
from .wire import codec


@dataclass
class RemoteResult:
    """What the server said about the last evaluation besides the value."""

    request_id: str
    components: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    non_finite: bool = False
    device: str = ""
    timings_ns: dict[str, int] = field(default_factory=dict)
    lossd_version: str = ""
    audited: bool = False


def build_request(
    name: str,
    params: Mapping[str, Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    grad_paths: Sequence[str] = (),
    audit: pb.AuditContext | None = None,
    outboard: codec.Outboard | None = None,
    autocast: pb.Autocast | None = None,
) -> pb.ComputeRequest:
    """``outboard``: collect large tensors there instead of inlining them (chunked transport);
    ``autocast``: the caller's autocast region, evaluated under the same policy."""
    request = pb.ComputeRequest(loss=name, grad_paths=list(grad_paths), request_id=uuid.uuid4().hex)
    codec.encode_map(params, request.params, outboard=outboard, path="params")
    for i, arg in enumerate(args):
        codec.encode_value(arg, request.args.add(), outboard=outboard, path=f"args[{i}]")
    codec.encode_map(kwargs, request.kwargs, outboard=outboard, path="kwargs")
    if audit is not None:
        request.audit.CopyFrom(audit)
    if autocast is not None:
        request.autocast.CopyFrom(autocast)
    return request


def _result(response: pb.ComputeResponse) -> RemoteResult:
    components = (
        codec.decode_map(response.components, "components")
        if response.HasField("components")
        else {}
    )
    result = RemoteResult(
        request_id=response.request_id,
        components=components,
        notes=list(response.notes),
        non_finite=response.non_finite,
        device=response.device,
        timings_ns={
            "decode": response.timings.decode_ns,
            "compute": response.timings.compute_ns,
            "encode": response.timings.encode_ns,
        },
        lossd_version=response.lossd_version,
        audited=response.audited,
    )
    if result.non_finite:
        why = "; ".join(result.notes) or "see the inputs"
        warnings.warn(
            f"lossd returned a non-finite loss or gradient ({why})", RuntimeWarning, stacklevel=4
        )
    return result


def _send(
    call: _Call | None,
    client: LossClient,
    request: pb.ComputeRequest,
    transport: Transport | None,
    outboard: codec.Outboard | None,
):
    """(response, tensors that came outside it) over the call's transport; unary by default."""
    if transport is None:
        return client.compute(request), None
    return transport.send(request, outboard)


def _grads(response: pb.ComputeResponse, external: dict[str, Tensor] | None) -> dict[str, Tensor]:
    return {
        g.path: codec.decode_tensor(
            g.grad, g.path, data=external.get(f"grads[{i}]") if external else None
        )
        for i, g in enumerate(response.grads)
    }


def _like(value: Any, device: torch.device) -> Any:
    return codec.map_tensors(value, lambda t: t.to(device))


class _RemoteLossFunction(torch.autograd.Function):
    """Autograd node whose forward is the RPC; ``call`` carries everything but the tensors."""

    @staticmethod
    def forward(ctx, call: _Call, *diff_tensors: Tensor) -> Tensor:  # noqa: ARG004 - tensors reach autograd through apply
        response, external = _send(call, call.client, call.request, call.transport, call.outboard)
        call.result = _result(response)
        value = codec.decode_value(response.loss, "loss", external=external)
        if not isinstance(value, Tensor):
            raise LossdError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{call.request.loss} returned a {type(value).__name__}, not a tensor; gradients need a tensor",
            )
        grads = _grads(response, external)
        ctx.call = call
        # The server returns gradients with the value whenever the loss is a scalar.
        ctx.scalar = value.numel() == 1
        ctx.grads = grads
        return value.to(call.device)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        call: _Call = ctx.call
        if ctx.scalar:
            grads = ctx.grads
            one = bool((grad_output == 1).all())
            scale = None if one else grad_output.reshape(())
        else:
            # Non-scalar loss: ask the server for the exact vector-Jacobian products.
            request = pb.ComputeRequest()
            request.CopyFrom(call.request)
            request.request_id = uuid.uuid4().hex
            request.ClearField("audit")  # the evaluation was recorded by the forward call
            outboard = None
            if call.outboard is not None:  # the inputs went in chunks: so do they again
                outboard = codec.Outboard(call.outboard.min_bytes)
                outboard.tensors = list(call.outboard.tensors)
            codec.encode_tensor(
                grad_output.detach(), request.grad_output, outboard=outboard, path="grad_output"
            )
            response, external = _send(call, call.client, request, call.transport, outboard)
            grads = _grads(response, external)
            scale = None
        out: list[Tensor | None] = [None]
        for path, tensor in zip(call.paths, call.tensors):
            g = grads.get(path)
            if g is not None:
                g = g.to(device=tensor.device, dtype=tensor.dtype)
                if scale is not None:
                    g = g * scale.to(device=g.device, dtype=g.dtype)
            out.append(g)
        return tuple(out)


@dataclass
class _Call:
    client: LossClient
    request: pb.ComputeRequest
    paths: list[str]
    tensors: list[Tensor]
    device: torch.device
    result: RemoteResult | None = None
    transport: Transport | None = None
    outboard: codec.Outboard | None = None


def remote_loss(
    client: LossClient,
    name: str,
    params: Mapping[str, Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    audit: pb.AuditContext | None = None,
    transport: Transport | None = None,
) -> tuple[Any, RemoteResult]:
    """Evaluate ``name`` remotely as ``upstream(**params)(*args, **kwargs)``.

    Returns the loss (on the first input tensor's device, attached to autograd when an input
    requires grad) and the server's ``RemoteResult``. ``transport`` picks unary, stream session
    or chunked per call (see ``lossd.client.transport``); None: unary ``Compute``.
    """
    kwargs = dict(kwargs or {})
    tensors = list(codec.call_tensors(args, kwargs))
    device = tensors[0][1].device if tensors else torch.device("cpu")
    track = torch.is_grad_enabled()
    diff = [(p, t) for p, t in tensors if track and t.requires_grad]
    outboard = transport.outboard(tensors) if transport is not None else None
    request = build_request(
        name, params, args, kwargs, [p for p, _ in diff], audit, outboard, caller_autocast(device)
    )
    if not diff:
        response, external = _send(None, client, request, transport, outboard)
        result = _result(response)
        return _like(codec.decode_value(response.loss, "loss", external=external), device), result
    call = _Call(
        client,
        request,
        [p for p, _ in diff],
        [t for _, t in diff],
        device,
        transport=transport,
        outboard=outboard,
    )
    value = _RemoteLossFunction.apply(call, *call.tensors)
    return value, call.result  # type: ignore[return-value]
