"""Remote evaluation with exact autograd.

``LossClient`` makes the RPCs; ``remote_loss`` runs one loss call through it and attaches the
returned gradients to the autograd graph:

- scalar loss: the gradients come back with the value in the same RPC; ``backward`` scales them
  by ``grad_output`` (exact for ``loss.backward()``, whose grad_output is 1, and for power-of-two
  scales such as AMP's loss scaling);
- non-scalar loss (``reduction='none'``): ``backward`` sends ``grad_output`` in a second RPC and
  receives the exact vector-Jacobian products;
- no input requires grad (eval, ``torch.no_grad``): value only, no gradient is computed.
"""

from __future__ import annotations

import os
import random
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from torch import Tensor

from . import codec
from ._channel import (
    DEFAULT_MAX_MESSAGE_MB,
    channel_credentials,
    make_channel,
    make_stub,
    resolve_endpoint,
    warn_cleartext_token,
)
from ._proto import lossd_pb2 as pb
from .amp import caller_autocast
from .errors import LossdError, from_rpc_error
from .transport import Transport


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


class LossClient:
    """A connection to a lossd server (or several replicas). Thread-safe; reuse it.

    Args:
        endpoint: ``host:port``, several (list or comma-separated; balanced round-robin), or a
            gRPC target such as ``dns:///lossd:50051``. Default ``$LOSSD_ENDPOINT``, else
            ``127.0.0.1:50051``.
        timeout: deadline of each call in seconds, retries included (None: none).
        max_message_mb: largest request or response this client sends or accepts.
        token: bearer token sent with every call (default ``$LOSSD_TOKEN``).
        tls: use TLS (implied by any of the files below; default ``$LOSSD_TLS``).
        tls_ca: PEM roots that signed the server (default ``$LOSSD_TLS_CA``; None: system roots).
        tls_cert, tls_key: the client's certificate chain and key, for mutual TLS
            (default ``$LOSSD_TLS_CERT`` / ``$LOSSD_TLS_KEY``).
        tls_server_name: name to check the server's certificate against, when it differs from
            the endpoint's host (an IP address, a test certificate).
        retries: how many times a call that failed with UNAVAILABLE (a replica down or
            restarting) is tried again, with jittered exponential backoff, within ``timeout``.
            Retries keep the request id, so the audit trail records the evaluation once.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        token: str | None = None,
        tls: bool | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_server_name: str | None = None,
        retries: int = 4,
    ) -> None:
        env = os.environ
        self.target = resolve_endpoint(endpoint)
        self.timeout = timeout
        self.max_message_mb = max_message_mb
        self.token = token if token is not None else env.get("LOSSD_TOKEN") or None
        self.tls = (
            tls if tls is not None else env.get("LOSSD_TLS", "").lower() in ("1", "true", "yes")
        )
        self.tls_ca = tls_ca or env.get("LOSSD_TLS_CA") or None
        self.tls_cert = tls_cert or env.get("LOSSD_TLS_CERT") or None
        self.tls_key = tls_key or env.get("LOSSD_TLS_KEY") or None
        self.tls_server_name = tls_server_name
        self.retries = retries
        self._credentials = channel_credentials(self.tls, self.tls_ca, self.tls_cert, self.tls_key)
        if self.token and self._credentials is None:
            warn_cleartext_token(self.target)
        self._metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        self._channel: grpc.Channel | None = None
        self._stub = None
        self._described: dict[str, pb.LossInfo] = {}

    def options(self) -> dict[str, Any]:
        """Everything needed to open an equivalent client (for copies of a module)."""
        return {
            "endpoint": self.target,
            "timeout": self.timeout,
            "max_message_mb": self.max_message_mb,
            "token": self.token,
            "tls": self.tls,
            "tls_ca": self.tls_ca,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "tls_server_name": self.tls_server_name,
            "retries": self.retries,
        }

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = make_channel(
                self.target, self.max_message_mb, self._credentials, self.tls_server_name
            )
        return self._channel

    @property
    def stub(self):
        if self._stub is None:
            self._stub = make_stub(self.channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def __enter__(self) -> LossClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata every call carries (the bearer token); the stream transports use it too."""
        return self._metadata

    def check_size(self, request: Any, request_id: str | None = None) -> None:
        """Refuse, before sending, a message over this client's limit, naming the knobs."""
        size = request.ByteSize()
        if size > self.max_message_mb << 20:
            raise LossdError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {size} bytes exceeds the client's limit of {self.max_message_mb} MiB "
                "(send it in chunks with RemoteLoss(transport='auto'), or raise RemoteLoss(max_message_mb=...) "
                "and `lossd serve --max-message-mb`)",
                request_id=request_id,
            )

    def call(self, method: str, request: Any, *, request_id: str | None = None) -> Any:
        """Invoke one unary RPC, retrying UNAVAILABLE within the deadline; failures become LossdError."""
        self.check_size(request, request_id)
        rpc = getattr(self.stub, method)
        try:
            return self.retrying(
                lambda remaining: rpc(request, timeout=remaining, metadata=self._metadata)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, request_id) from None

    def retrying(self, attempt: Callable[[float | None], Any]) -> Any:
        """``attempt(seconds left)`` until it does not fail UNAVAILABLE, within ``timeout``.

        The one retry policy of every transport: up to ``retries`` more tries, jittered
        exponential backoff, never past the caller's deadline. The caller keeps the request id
        across tries, so the audit trail records the evaluation once.
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        backoff = 0.05
        for tries_left in range(self.retries, -1, -1):
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                return attempt(remaining)
            except grpc.RpcError as error:
                pause = backoff * (0.5 + random.random())  # jitter: replicas restarting together
                if (
                    error.code() != grpc.StatusCode.UNAVAILABLE
                    or not tries_left
                    or (deadline is not None and time.monotonic() + pause >= deadline)
                ):
                    raise
                time.sleep(pause)
                backoff = min(backoff * 2, 2.0)
        raise AssertionError("unreachable")  # the loop always returns or raises

    def compute(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        return self.call("Compute", request, request_id=request.request_id)

    def list_losses(self, family: str = "") -> list[pb.LossInfo]:
        return list(self.call("ListLosses", pb.ListLossesRequest(family=family)).losses)

    def describe(self, name: str) -> pb.LossInfo:
        """The server's declaration of a loss; cached, since a server's registry is fixed."""
        info = self._described.get(name)
        if info is None:
            info = self._described[name] = self.call(
                "DescribeLoss", pb.DescribeLossRequest(name=name)
            ).loss
        return info


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
