"""``ConnectionOptions`` (how a client reaches lossd) and ``LossClient`` (the RPCs over it)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import grpc

from ._channel import (
    DEFAULT_MAX_MESSAGE_MB,
    channel_credentials,
    make_channel,
    make_stub,
    resolve_endpoint,
    serialized_compute,
    warn_cleartext_token,
)
from ._proto import lossd_pb2 as pb
from .errors import LossdError, from_rpc_error

DEFAULT_TIMEOUT_S = 300.0  # each call's default deadline, retries included
MAX_BACKOFF_S = 2.0
# The client never cancels an attempt itself (a stream call past its deadline raises _Expired):
# CANCELLED here means the server ended the call unanswered (a drain's end), so it is retried.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


@dataclass(frozen=True)
class ConnectionOptions:
    """How every client class (``LossClient``, ``RemoteLoss``, ``AuditClient``) connects.

    Unset values take their ``$LOSSD_*`` defaults when the options are made, so a copy of a
    module (pickled into a DataLoader worker, say) connects exactly as the original did.

    Attributes:
        endpoint: ``host:port``, several (list or comma-separated; balanced round-robin), or a
            gRPC target such as ``dns:///lossd:50051``, or ``unix:/path`` for a server started
            with ``lossd serve --unix /path`` on this host. Default ``$LOSSD_ENDPOINT``, else
            ``127.0.0.1:50051``. Held as the resolved gRPC target.
        timeout: deadline of each call in seconds, retries included. Default
            ``DEFAULT_TIMEOUT_S`` (300 s, long enough for a 256 MiB call on a CPU server; or
            ``$LOSSD_TIMEOUT``), so a hung server ends a call with DEADLINE_EXCEEDED instead of
            blocking training forever. None: no deadline.
        max_message_mb: largest request or response this client sends or accepts.
        token: bearer token sent with every call (default ``$LOSSD_TOKEN``).
        tls: use TLS (implied by any of the files below; default ``$LOSSD_TLS``).
        tls_ca: PEM roots that signed the server (default ``$LOSSD_TLS_CA``; None: system roots).
        tls_cert, tls_key: the client's certificate chain and key, for mutual TLS
            (default ``$LOSSD_TLS_CERT`` / ``$LOSSD_TLS_KEY``).
        tls_server_name: name to check the server's certificate against, when it differs from
            the endpoint's host (an IP address, a test certificate).
        retries: how many times a call that failed with UNAVAILABLE (a replica down, restarting
            or draining) or that the server cancelled (a drain's end) is tried again, with
            jittered exponential backoff capped at 2 s. None (default): as often as ``timeout``
            allows (4 times when there is no deadline), so a restart within the deadline costs
            no failed step. Retries keep the request id, so the audit trail records the
            evaluation once.
        shm: co-located shared memory for chunked calls (large tensors written once into a
            memfd, gradients read in place; README "Shared memory on one host"). None (default)
            or True: offered over a ``unix:`` endpoint and loopback TCP (127.0.0.1, ::1,
            localhost); False (or ``$LOSSD_SHM`` of 0, false, no, off or none): never. A server
            that declines it (``--shm unix`` or ``none``, a caller in another host, container
            or pid namespace behind 127.0.0.1) gets the data frames.
    """

    endpoint: str | Sequence[str] | None = None
    timeout: float | None = DEFAULT_TIMEOUT_S
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    token: str | None = None
    tls: bool | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    retries: int | None = None
    shm: bool | None = None

    def __post_init__(self) -> None:
        env = os.environ
        timeout = self.timeout
        if timeout == DEFAULT_TIMEOUT_S and env.get("LOSSD_TIMEOUT"):
            timeout = float(env["LOSSD_TIMEOUT"])
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds (or None: no deadline), got {timeout!r}")
        resolved = {
            "timeout": timeout,
            "endpoint": resolve_endpoint(self.endpoint),
            "token": self.token if self.token is not None else env.get("LOSSD_TOKEN") or None,
            "tls": self.tls
            if self.tls is not None
            else env.get("LOSSD_TLS", "").lower() in ("1", "true", "yes"),
            "tls_ca": self.tls_ca or env.get("LOSSD_TLS_CA") or None,
            "tls_cert": self.tls_cert or env.get("LOSSD_TLS_CERT") or None,
            "tls_key": self.tls_key or env.get("LOSSD_TLS_KEY") or None,
            "shm": self.shm
            if self.shm is not None or not env.get("LOSSD_SHM")
            else env["LOSSD_SHM"].strip().lower() not in ("0", "false", "no", "off", "none"),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    @classmethod
    def names(cls) -> frozenset[str]:
        """The keyword arguments that are connection options (the rest of a call's are not)."""
        return frozenset(f.name for f in fields(cls))


def new_request_id() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex`` makes it, in a third
    of its time (1.5 vs 5 us: no UUID object)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


class LossClient:
    """A connection to a lossd server (or several replicas). Thread-safe; reuse it.

    ``LossClient(endpoint, timeout=..., token=..., ...)`` takes the fields of
    ``ConnectionOptions`` as keywords; ``LossClient(options=...)`` takes them made already.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        *,
        options: ConnectionOptions | None = None,
        **settings: Any,
    ) -> None:
        if options is None:
            options = ConnectionOptions(endpoint, **settings)
        elif endpoint is not None or settings:
            raise TypeError("give LossClient either options= or connection keywords, not both")
        self.options = options
        self._credentials = channel_credentials(
            options.tls, options.tls_ca, options.tls_cert, options.tls_key
        )
        if options.token and self._credentials is None:
            warn_cleartext_token(options.endpoint)
        self._metadata = (("authorization", f"Bearer {options.token}"),) if options.token else None
        self._channel: grpc.Channel | None = None
        self._stub = self._compute_serialized = None
        self._described: dict[str, pb.LossInfo] = {}

    @property
    def target(self) -> str:
        return self.options.endpoint

    @property
    def timeout(self) -> float | None:
        return self.options.timeout

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = make_channel(
                self.target,
                self.options.max_message_mb,
                self._credentials,
                self.options.tls_server_name,
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
        self._channel = self._stub = self._compute_serialized = None

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
        size = len(request) if isinstance(request, bytes) else request.ByteSize()
        limit_mb = self.options.max_message_mb
        if size > limit_mb << 20:
            raise LossdError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {size} bytes exceeds the client's limit of {limit_mb} MiB "
                "(send it in chunks with RemoteLoss(transport='auto'), or raise RemoteLoss(max_message_mb=...) "
                "and `lossd serve --max-message-mb`)",
                request_id=request_id,
            )

    def call(self, method: str, request: Any, *, request_id: str | None = None) -> Any:
        """Invoke one unary RPC, retrying UNAVAILABLE within the deadline; failures become LossdError."""
        return self._invoke(getattr(self.stub, method), request, request_id)

    def compute_serialized(self, data: bytes, request_id: str) -> bytes:
        """``Compute`` of a request already serialized (a prepared request: client/prepared.py);
        the response's bytes, for the caller to parse."""
        if self._compute_serialized is None:
            self._compute_serialized = serialized_compute(self.channel)
        return self._invoke(self._compute_serialized, data, request_id)

    def _invoke(self, rpc: Any, request: Any, request_id: str | None) -> Any:
        self.check_size(request, request_id)
        timeout = self.options.timeout
        metadata = self._metadata
        # The first try here, any retry in ``retrying`` against the same deadline: a call that
        # succeeds at once makes no closure and enters no retry loop.
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            try:
                return rpc(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as error:
                failed = error
            return self.retrying(
                lambda remaining: rpc(request, timeout=remaining, metadata=metadata),
                deadline=deadline,
                failed=failed,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error, request_id, self.target) from None

    def retrying(
        self,
        attempt: Callable[[float | None], Any],
        *,
        deadline: float | None = None,
        failed: grpc.RpcError | None = None,
    ) -> Any:
        """``attempt(seconds left)`` until it does not fail UNAVAILABLE (or server-CANCELLED).

        The one retry policy of every transport: jittered exponential backoff capped at
        ``MAX_BACKOFF_S``, until the call's deadline (or ``retries`` more tries, when given), never
        past it. The caller keeps the request id across tries, so the audit trail records the
        evaluation once. ``failed``: how a first try, made already against ``deadline``, failed.
        """
        if failed is None:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
        retries = self.options.retries
        if retries is None and deadline is None:
            retries = 4
        backoff = 0.05
        tries = 0
        while True:
            if failed is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                try:
                    return attempt(remaining)
                except grpc.RpcError as error:
                    failed = error
            error, failed = failed, None
            pause = backoff * (0.5 + random.random())  # jitter: replicas restarting together
            if (
                error.code() not in RETRYABLE
                or (retries is not None and tries >= retries)
                or (deadline is not None and time.monotonic() + pause >= deadline)
            ):
                raise error
            tries += 1
            time.sleep(pause)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def compute(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        if not request.request_id:
            request.request_id = new_request_id()
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
