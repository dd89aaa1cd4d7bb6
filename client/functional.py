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

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from torch import Tensor
from torch._C import _functorch
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd import forward_ad

from ._proto import lossd_pb2 as pb
from .amp import caller_autocast
from .connection import LossClient, new_request_id
from .errors import LossdError, LossdTypeError
from .prepared import Decoded, Serialized, tail
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


def _numpy_path(value: Any, path: str) -> str | None:
    if isinstance(value, Tensor):
        return None
    if isinstance(value, np.ndarray):
        return path
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _numpy_path(item, f"{path}[{i}]")
            if found:
                return found
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _numpy_path(item, f"{path}.{key}")
            if found:
                return found
    return None


def reject_numpy(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """A numpy array where upstream takes a tensor: a TypeError (as torch's loss would raise)
    that is a LossdError too, naming the argument and the fix."""
    for value in (*args, *kwargs.values()):
        if not isinstance(value, Tensor):
            break
    else:
        return  # only tensors (the usual call): nothing to walk
    where = _numpy_path(list(args), "args") or _numpy_path(dict(kwargs), "kwargs")
    if where is None:
        return
    raise LossdTypeError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{name}: {where} is a numpy array; lossd losses take torch tensors, as upstream does: "
        "pass torch.from_numpy(array) (or torch.as_tensor(array))",
        field=where,
    )


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
    request = pb.ComputeRequest(loss=name, grad_paths=list(grad_paths), request_id=new_request_id())
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
    timings = response.timings  # once: each read of a submessage field makes its wrapper
    result = RemoteResult(  # positionally: RemoteResult's fields in order (~1 us less)
        response.request_id,
        components,
        list(response.notes),
        response.non_finite,
        response.device,
        {"decode": timings.decode_ns, "compute": timings.compute_ns, "encode": timings.encode_ns},
        response.lossd_version,
        response.audited,
    )
    if result.non_finite:
        why = "; ".join(result.notes) or "see the inputs"
        warnings.warn(
            f"lossd returned a non-finite loss or gradient ({why})", RuntimeWarning, stacklevel=4
        )
    return result


def _send(
    client: LossClient,
    request: pb.ComputeRequest | Serialized,
    transport: Transport | None,
    outboard: codec.Outboard | None,
):
    """(response, tensors that came outside it) over the call's transport; unary by default."""
    if isinstance(request, Serialized):  # a prepared request: unary, its bytes as they are
        raw = client.compute_serialized(request.data, request.request_id)
        try:
            return request.layout.read(raw)
        except DecodeError:  # what gRPC's deserializer makes of an unparseable answer
            raise LossdError(
                grpc.StatusCode.INTERNAL,
                "Exception deserializing response!",
                request_id=request.request_id,
            ) from None
    if transport is None:
        return client.compute(request), None
    return transport.send(request, outboard)


def _loss_value(response: pb.ComputeResponse, external: dict[str, Tensor] | Decoded | None) -> Any:
    """The loss's value (``external``: the tensors outside the message, or a prepared answer's,
    decoded already). A tensor (the usual answer) is decoded as decode_value would, without the
    walk's request-wide budget, which one tensor within the per-tensor limits never exceeds
    (DEFAULT_LIMITS: 2**31 elements a tensor, 2**32 a request)."""
    if isinstance(external, Decoded):
        return external.loss
    loss = response.loss
    if loss.WhichOneof("kind") != "tensor_value":
        return codec.decode_value(loss, "loss", external=external)
    data = external.get("loss") if external else None
    return codec.decode_tensor(loss.tensor_value, "loss", data=data)


def _grads(
    response: pb.ComputeResponse, external: dict[str, Tensor] | Decoded | None
) -> dict[str, Tensor]:
    if isinstance(external, Decoded):
        return external.grads
    if not external:  # inline gradients (unary calls): no per-gradient lookup
        return {g.path: codec.decode_tensor(g.grad, g.path) for g in response.grads}
    return {
        g.path: codec.decode_tensor(g.grad, g.path, data=external.get(f"grads[{i}]"))
        for i, g in enumerate(response.grads)
    }


def _like(value: Any, device: torch.device) -> Any:
    return codec.map_tensors(value, lambda t: t.to(device))


class _PositionalFunction(torch.autograd.Function):
    """A Function whose ``forward`` takes positional arguments without defaults.

    torch's ``apply`` binds the arguments of a Function that has ``setup_context`` to its
    ``forward``'s signature on every call (``inspect.signature``, for the defaults: ~0.1 ms per
    apply, two applies per training step); for such a forward the binding is the identity, so
    outside functorch transforms it is skipped. Under a transform torch's own ``apply`` runs.
    """

    @classmethod
    def apply(cls, *args: Any) -> Any:
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))

    @classmethod
    def apply_unwrapped(cls, *args: Any) -> Any:
        """``apply`` of arguments that hold no functorch-wrapped tensor (remote_loss refuses
        them), dead or alive: nothing to unwrap."""
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)


class _RemoteLossFunction(_PositionalFunction):
    """Autograd node whose forward is the RPC; ``call`` carries everything but the tensors.

    Its backward is ``_RemoteGrad`` (itself differentiable: double backward), its ``jvp`` gives
    forward-mode AD, and nothing in either branches on tensor data (``vmap`` runs them).
    """

    @staticmethod
    def forward(call: _Call, *diff_tensors: Tensor) -> Tensor:  # noqa: ARG004 - tensors reach autograd through apply
        response, external = _send(call.client, call.request, call.transport, call.outboard)
        call.result = _result(response)
        value = _loss_value(response, external)
        if not isinstance(value, Tensor):
            raise LossdError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{call.request.loss} returned a {type(value).__name__}, not a tensor; gradients need a tensor",
            )
        # The server returns gradients with the value whenever the loss is a scalar.
        call.grads = _grads(response, external)
        call.scalar = value.numel() == 1
        call.value_shape, call.value_dtype = value.shape, value.dtype
        return _on(value, call.device)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ARG004
        ctx.call = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        tensors = ctx.saved_tensors
        if torch.is_grad_enabled() or not _plain(grad_output) or _tangent(grad_output, tensors):
            return (None, *_RemoteGrad.apply(ctx.call, grad_output, *tensors))
        # A backward without create_graph and without tangents records nothing: ``apply`` would
        # only wrap forward's outputs (~25 us per step), so forward runs as is.
        return (None, *_RemoteGrad.forward(ctx.call, grad_output, *tensors))

    @staticmethod
    def jvp(ctx, _call_tangent: None, *tangents: Tensor | None) -> Tensor:
        """Forward-mode AD: the loss's Jacobian times the inputs' tangents. A scalar loss has its
        gradient here already (J t = sum_i <g_i, t_i>); otherwise the server computes J t."""
        call: _Call = ctx.call
        dtype = call.value_dtype
        pairs = [(p, t) for p, t in zip(call.paths, tangents) if t is not None]
        if call.scalar and call.grads is not None:
            total = torch.zeros(call.value_shape, dtype=dtype, device=call.device)
            for path, tangent in pairs:
                g = call.grads.get(path)
                if g is not None:
                    total = total + (g.to(tangent.device, dtype) * tangent.to(dtype)).sum()
            return total
        found = _followup(
            call,
            torch.ones(call.value_shape, dtype=dtype),
            grad_grads={p: t for p, t in pairs},
        )
        jvp = found.get(GRAD_OUTPUT)
        if jvp is None:
            return torch.zeros(call.value_shape, dtype=dtype, device=call.device)
        return jvp.to(call.device, dtype).reshape(call.value_shape)

    @staticmethod
    def vmap(info, in_dims, call: _Call, *diff_tensors: Tensor):  # noqa: ARG004
        raise NotImplementedError(
            f"lossd: {call.request.loss} cannot run under vmap over its inputs (each evaluation "
            "is one RPC); call RemoteLoss once per sample, or vmap only its backward"
        )


class _RemoteGrad(_PositionalFunction):
    """The gradients of a remote loss with respect to its inputs, given ``grad_output``.

    A scalar loss's gradients came back with the value: they are scaled by ``grad_output``
    (exact for ``loss.backward()`` and for GradScaler's power-of-two scales). A non-scalar loss
    asks the server for the exact vector-Jacobian products. Differentiating these gradients
    (``create_graph=True``, then backward again) asks the server for second derivatives.
    """

    @staticmethod
    def forward(call: _Call, grad_output: Tensor, *tensors: Tensor):
        if call.scalar and call.grads is not None:
            grads = _scaled(call, grad_output)
        elif _functorch.is_legacy_batchedtensor(grad_output):
            # gradcheck's check_batched_grad vmaps the backward with torch's legacy vmap, which
            # does not dispatch to ``vmap`` below: the batch arrives as a legacy batched tensor
            # of the innermost vmap level. Unwrap it (batch first), ask once, rewrap.
            level = torch._C._vmapmode_increment_nesting() - 1
            torch._C._vmapmode_decrement_nesting()
            batch = torch._remove_batch_dim(grad_output, level, 1, 0)
            outs = _RemoteGrad.vmap(None, (None, 0), call, batch, *tensors)[0]
            return tuple(None if o is None else torch._add_batch_dim(o, 0, level) for o in outs)
        else:
            grads = _followup(call, grad_output)
        return tuple(_like_input(grads.get(p), t) for p, t in zip(call.paths, tensors))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ARG004
        ctx.call = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *vectors: Tensor | None):
        call: _Call = ctx.call
        grad_output, *tensors = ctx.saved_tensors
        grad_grads = {p: v for p, v in zip(call.paths, vectors) if v is not None}
        if not grad_grads:
            return (None, None, *[None] * len(tensors))
        found = _followup(call, grad_output, grad_grads=grad_grads)
        d_output = found.get(GRAD_OUTPUT)
        if d_output is not None:
            d_output = d_output.to(grad_output.device, grad_output.dtype).reshape(grad_output.shape)
        out = (d_output, *(_like_input(found.get(p), t) for p, t in zip(call.paths, tensors)))
        if torch.is_grad_enabled():  # create_graph=True: a third derivative may follow
            out = _ThirdOrder.apply(len(out), *out, *vectors, *tensors)
        return (None, *out)

    @staticmethod
    def vmap(info, in_dims, call: _Call, grad_output: Tensor, *tensors: Tensor):  # noqa: ARG004
        """The backward under ``vmap`` (gradcheck's check_batched_grad, Jacobians by vmap): a
        batch of grad_outputs, along ``in_dims[1]``; the inputs themselves are not batched."""
        if any(d is not None for d in in_dims[2:]) or _functorch.is_legacy_batchedtensor(
            grad_output
        ):
            raise NotImplementedError(
                f"lossd: the backward of {call.request.loss} cannot be vmapped over its inputs"
            )
        if in_dims[1] is None:
            outs = _RemoteGrad.forward(call, grad_output, *tensors)
            return outs, tuple(None for _ in outs)
        batch = grad_output.movedim(in_dims[1], 0)
        if call.scalar and call.grads is not None:
            scale = batch.reshape(-1)
            grads = {
                p: g.to(scale.device)[None] * scale.reshape(-1, *[1] * g.dim())
                for p, g in call.grads.items()
            }
        else:
            grads = _followup(call, batch, batched=True)
        outs = tuple(_like_input(grads.get(p), t) for p, t in zip(call.paths, tensors))
        return outs, tuple(None if o is None else 0 for o in outs)


class _ThirdOrder(torch.autograd.Function):
    """Second derivatives taken with ``create_graph=True``: differentiable-looking values whose
    backward refuses, naming the feature (never a silently zero third derivative)."""

    @staticmethod
    def forward(ctx, n: int, *values_then_anchors: Tensor | None):  # noqa: ARG004
        return tuple(None if v is None else v.clone() for v in values_then_anchors[:n])

    @staticmethod
    def backward(ctx, *grads: Tensor | None):  # noqa: ARG004
        raise NotImplementedError(
            "lossd computes derivatives of a remote loss up to the second order: a third "
            "derivative (differentiating a double backward) is not supported"
        )


def _scaled(call: _Call, grad_output: Tensor) -> dict[str, Tensor]:
    """A scalar loss's gradients times ``grad_output``. When it is 1 (``loss.backward()``) the
    gradients themselves are handed over (``g * 1`` is bitwise ``g``) and the call lets go of
    them: nothing else holds them then, so AccumulateGrad keeps them rather than clones (no view
    is needed for that, ~5 us), the caller may add into what it kept in place, and a co-located
    answer region is free again once the caller's backward is done. A later backward of the same
    graph asks the server for the products."""
    grads = call.grads or {}
    # item(), not ``bool(scale == 1)``: the same comparison without an eq kernel (9 -> 0.7 us).
    if grad_output.is_cpu and _plain(grad_output) and grad_output.item() == 1:
        call.grads = None
        return grads  # decoded on the CPU, as grad_output is: nothing to move
    scale = grad_output.reshape(())
    out = {}
    for path, g in grads.items():
        moved = g.to(scale.device)
        # a copy made by the move is scaled in place
        out[path] = moved.mul_(scale) if moved is not g else g * scale
    return out


def _plain(tensor: Tensor) -> bool:
    """Neither a functorch-wrapped nor a legacy-batched tensor (gradcheck's batched backward)."""
    return not (
        _functorch.is_functorch_wrapped_tensor(tensor) or _functorch.is_legacy_batchedtensor(tensor)
    )


def _tangent(grad_output: Tensor, tensors: Sequence[Tensor]) -> bool:
    """Whether a forward-mode tangent rides on any of them (``apply`` then runs the jvp rule)."""
    if _no_dual_level():
        return False
    return any(forward_ad.unpack_dual(t).tangent is not None for t in (grad_output, *tensors))


def _no_dual_level() -> bool:
    """Outside every ``forward_ad.dual_level``, where ``unpack_dual`` finds no tangent on any
    tensor (it reads the same level): the tangent checks are then skipped (~0.5 us a tensor)."""
    return forward_ad._current_level < 0


def _like_input(grad: Tensor | None, tensor: Tensor) -> Tensor | None:
    if grad is None:
        return None
    if grad.is_cpu and tensor.is_cpu and grad.dtype is tensor.dtype:
        return grad  # what ``to`` returns here, without its dispatch (~1 us)
    return grad.to(device=tensor.device, dtype=tensor.dtype)


def _on(value: Tensor, device: torch.device) -> Tensor:
    """``value.to(device)``; a CPU value for a CPU caller as it is, without the dispatch."""
    return value if value.is_cpu and device.type == "cpu" else value.to(device)


def _followup(
    call: _Call,
    grad_output: Tensor,
    *,
    batched: bool = False,
    grad_grads: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Derivatives the forward RPC did not return: vector-Jacobian products with
    ``grad_output`` (a batch of them), or second-order products (``grad_grads``), by path."""
    request = pb.ComputeRequest()
    if isinstance(call.request, Serialized):
        request.ParseFromString(call.request.data)
    else:
        request.CopyFrom(call.request)
    request.request_id = new_request_id()
    request.ClearField("audit")  # the evaluation was recorded by the forward call
    outboard = None
    if call.outboard is not None:  # the inputs went in chunks: so do they again
        outboard = codec.Outboard(call.outboard.min_bytes)
        outboard.tensors = list(call.outboard.tensors)
    codec.encode_tensor(
        grad_output.detach(), request.grad_output, outboard=outboard, path="grad_output"
    )
    request.grad_output_batched = batched
    for path, vector in (grad_grads or {}).items():
        codec.encode_tensor(vector.detach(), request.grad_grads.add(path=path).grad)
    response, external = _send(call.client, request, call.transport, outboard)
    return _grads(response, external)


GRAD_OUTPUT = "grad_output"  # where the server puts d/d(grad_output) of a second-order request


@dataclass
class _Call:
    client: LossClient
    request: pb.ComputeRequest | Serialized
    paths: list[str]
    tensors: list[Tensor]
    device: torch.device
    result: RemoteResult | None = None
    transport: Transport | None = None
    outboard: codec.Outboard | None = None
    grads: dict[str, Tensor] | None = field(default_factory=dict)  # None once handed over
    scalar: bool = True
    value_shape: torch.Size = field(default_factory=torch.Size)
    value_dtype: torch.dtype = torch.float32


def _primal(tensor: Tensor) -> Tensor:
    return forward_ad.unpack_dual(tensor).primal


def _differentiable(tensor: Tensor, track: bool) -> bool:
    """Whether the loss must be differentiable in ``tensor``: it requires grad (and grad mode is
    on), or it carries a forward-mode tangent."""
    if track and tensor.requires_grad:
        return True
    if _no_dual_level() or not tensor.is_floating_point():
        return False
    return forward_ad.unpack_dual(tensor).tangent is not None


COMPILE_BREAK = (
    "lossd: RemoteLoss computes the loss on a lossd server over gRPC, outside any graph; "
    "compile with fullgraph=False, where the loss call is a graph break"
)


@torch.compiler.disable(reason=COMPILE_BREAK)
def remote_loss(
    client: LossClient,
    name: str,
    params: Mapping[str, Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    audit: pb.AuditContext | None = None,
    transport: Transport | None = None,
    _signature: Any = None,
) -> tuple[Any, RemoteResult]:
    """Evaluate ``name`` remotely as ``upstream(**params)(*args, **kwargs)``.

    Returns the loss (on the first input tensor's device, attached to autograd when an input
    requires grad or carries a forward-mode tangent) and the server's ``RemoteResult``.
    ``transport`` picks unary or chunked per call (see ``lossd.client.transport``); None: unary
    ``Compute``. Under ``torch.compile`` the call is a graph break (``fullgraph=True`` raises,
    naming lossd). ``_signature``: RemoteLoss's own, the one ``check_call`` returned for exactly
    these params and inputs (client/signature.py); it keys the prepared request a unary call of a
    signature seen before is sent as (client/prepared.py), so it is private: any other value would
    replay another call's layout.
    """
    signature = _signature
    kwargs = dict(kwargs or {})
    if signature is None:  # a signature holds no numpy array (``_sign`` refuses them)
        reject_numpy(name, args, kwargs)
    tensors = _call_tensors(args, kwargs)
    device = tensors[0][1].device if tensors else torch.device("cpu")
    wrapped = [p for p, t in tensors if _functorch.is_functorch_wrapped_tensor(t)]
    if wrapped:
        raise NotImplementedError(
            f"lossd: {name} cannot be called inside a torch.func transform (grad, jvp, vmap, "
            f"jacrev, ...) over its inputs ({', '.join(wrapped)}): the loss is one RPC on real "
            "tensors. Use torch.autograd (backward, grad, create_graph=True) or "
            "torch.autograd.forward_ad, which RemoteLoss supports"
        )
    track = torch.is_grad_enabled()
    if _no_dual_level():  # no tangent on any tensor: what requires grad is differentiable
        diff = [(p, t) for p, t in tensors if t.requires_grad] if track else []
    else:
        diff = [(p, t) for p, t in tensors if _differentiable(t, track)]
        if any(forward_ad.unpack_dual(t).tangent is not None for _, t in diff):
            # Forward-mode AD: the primal values travel; the tangents stay here (see ``jvp``).
            args = codec.map_tensors(list(args), _primal)
            kwargs = codec.map_tensors(kwargs, _primal)
            signature = None  # not prepared: rare, and the tensors sent are not the ones walked
    grad_paths = [p for p, _ in diff]
    outboard = transport.outboard(tensors) if transport is not None else None
    autocast = caller_autocast(device)
    prepared = transport.prepared if transport is not None and outboard is None else None
    key = (name, signature, *grad_paths) if prepared is not None and signature is not None else None
    layout = prepared.layout(key) if key is not None else None
    if layout is not None:
        request_id = new_request_id()
        data = layout.fill([t for _, t in tensors], tail(request_id, audit, autocast))
        request: pb.ComputeRequest | Serialized = Serialized(data, request_id, name, layout)
    else:
        request = build_request(name, params, args, kwargs, grad_paths, audit, outboard, autocast)
        if key is not None:

            def body(a: Sequence[Any], k: dict[str, Any]) -> pb.ComputeRequest:
                plain = build_request(name, params, a, k, grad_paths)
                plain.ClearField("request_id")
                return plain

            prepared.learn(key, [t for _, t in tensors], body, args, kwargs, request)
    if not diff:
        response, external = _send(client, request, transport, outboard)
        result = _result(response)
        return _like(_loss_value(response, external), device), result
    call = _Call(
        client,
        request,
        grad_paths,
        [t for _, t in diff],
        device,
        transport=transport,
        outboard=outboard,
    )
    value = _RemoteLossFunction.apply_unwrapped(call, *call.tensors)
    return value, call.result  # type: ignore[return-value]


_ARG_PATHS = tuple(f"args[{i}]" for i in range(8))


def _call_tensors(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[tuple[str, Tensor]]:
    """``codec.call_tensors`` as a list; of a call of a few tensors alone (the usual one),
    without the walk."""
    if kwargs or len(args) > len(_ARG_PATHS):
        return list(codec.call_tensors(args, kwargs))
    for arg in args:
        if not isinstance(arg, Tensor):
            return list(codec.call_tensors(args, kwargs))
    return list(zip(_ARG_PATHS, args))
