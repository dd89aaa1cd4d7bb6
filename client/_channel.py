"""Channels and stubs: one channel per endpoint set, reused for every call."""

from __future__ import annotations

import ipaddress
import json
import os
import warnings
from pathlib import Path

import grpc

from ._proto import lossd_pb2_grpc as pb_grpc

DEFAULT_ENDPOINT = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_MB = 256


def resolve_endpoint(endpoint: str | list[str] | tuple[str, ...] | None) -> str:
    """``endpoint`` or $LOSSD_ENDPOINT or 127.0.0.1:50051; several endpoints become one target.

    ``unix:/path`` (or ``unix:///path``) is a server's ``--unix`` socket, passed to gRPC as is."""
    if endpoint is None:
        endpoint = os.environ.get("LOSSD_ENDPOINT") or DEFAULT_ENDPOINT
    if isinstance(endpoint, (list, tuple)):
        for one in endpoint:
            check_endpoint(one)
        return "ipv4:" + ",".join(endpoint) if len(endpoint) > 1 else endpoint[0]
    if not endpoint.startswith(_GRPC_SCHEMES):
        for one in endpoint.split(","):
            check_endpoint(one)
    if "," in endpoint and ":" in endpoint and not endpoint.startswith(("ipv4:", "ipv6:", "dns:")):
        return "ipv4:" + endpoint
    return endpoint


# gRPC target forms passed through as they are (their syntax is gRPC's to check).
_GRPC_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")


def check_endpoint(endpoint: str) -> None:
    """``host:port`` (``[v6]:port``) with a port in 1..65535; a URL or a missing port (which gRPC
    would silently take as 443) is refused with a ValueError saying what to write instead."""
    from .errors import LossdValueError

    def refuse(why: str) -> None:
        raise LossdValueError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"endpoint {endpoint!r}: {why}; write host:port, e.g. 127.0.0.1:50051 "
            "(or a gRPC target such as dns:///lossd:50051 or unix:/path/lossd.sock)",
            field="endpoint",
        )

    if not isinstance(endpoint, str) or not endpoint.strip():
        refuse("empty")
    if "://" in endpoint and not endpoint.startswith(_GRPC_SCHEMES):
        refuse(f"a URL scheme ({endpoint.split('://')[0]}://) is not a gRPC address")
    if endpoint.startswith(_GRPC_SCHEMES):
        return
    host, sep, port = endpoint.rpartition(":")
    if host.count(":") and not host.startswith("["):
        refuse("an IPv6 address needs brackets, as in [::1]:50051")
    if not sep or not host:
        refuse("no port (gRPC would silently use 443)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        refuse(f"port {port!r} is not in 1..65535")


def channel_credentials(
    tls: bool | None, ca: str | None, cert: str | None, key: str | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when asked for (``tls=True``, or any of the files given), else None.

    ``ca``: PEM roots that signed the server (None: the system's); ``cert``/``key``: the
    client's own certificate chain and key, for mutual TLS.
    """
    if not (tls or ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )


def is_loopback_target(target: str) -> bool:
    """``unix:`` or every host of ``target`` a loopback address (or ``localhost``)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True  # a socket on this host: nothing on a network path to read a token
    hosts = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    for endpoint in hosts.split(","):
        host = endpoint.rsplit(":", 1)[0].strip("[]") if ":" in endpoint else endpoint
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def warn_cleartext_token(target: str) -> None:
    """A bearer token over plaintext to another machine can be read by anyone on the path."""
    if not is_loopback_target(target):
        warnings.warn(
            f"sending a bearer token to {target} without TLS: pass tls_ca=... (or tls=True)",
            UserWarning,
            stacklevel=4,
        )


def make_channel(
    target: str,
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    limit = max_message_mb << 20
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Several replicas behind one target: spread calls instead of pinning the first.
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    ]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, credentials, options=options)


def make_stub(channel: grpc.Channel) -> pb_grpc.LossServiceStub:
    return pb_grpc.LossServiceStub(channel)


def serialized_compute(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """``Compute`` with the request and the response as their serialized bytes."""
    return channel.unary_unary(
        "/lossd.v1.LossService/Compute",
        request_serializer=None,
        response_deserializer=None,
        _registered_method=True,
    )
