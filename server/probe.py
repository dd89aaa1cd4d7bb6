"""``lossd health``: a gRPC health probe for Docker HEALTHCHECK, Kubernetes exec probes and scripts.

Exits 0 when the server answers SERVING, 1 otherwise. It asks the standard
``grpc.health.v1.Health/Check`` (open even when tokens are required) and never imports torch,
so it costs a fraction of a second however often it runs.

By default it probes ``127.0.0.1`` on the server's own port and with the server's own TLS
setting, read by the same settings object ``lossd serve`` uses (``LOSSD_PORT``,
``LOSSD_TLS_CERT``, the ``LOSSD_CONFIG`` file), so a container's probe follows its server's
configuration; settings the server would refuse make the probe exit 2, naming the setting.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .config import ServerConfig, SettingError


def parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The probe's flags, defaulting to the server's own port and TLS setting (a SettingError
    when those settings are bad, as ``lossd serve`` would refuse them)."""
    server = ServerConfig.from_sources(env=env)
    port, server_cert = server.port, server.tls_cert
    p = argparse.ArgumentParser(
        prog="lossd health", description="Exit 0 when the lossd server reports SERVING."
    )
    default = f"unix:{os.path.abspath(server.unix)}" if port == -1 else f"127.0.0.1:{port}"
    p.add_argument(
        "--endpoint",
        default=default,
        help="host:port or unix:PATH to probe (default: 127.0.0.1 and the server's port; its --unix socket with --port -1)",
    )
    p.add_argument("--service", default="", help="service to ask about; empty: the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds before the probe gives up")
    p.add_argument(
        "--tls-ca",
        default=env.get("LOSSD_HEALTH_TLS_CA") or server_cert or None,
        help="PEM roots to verify the server (default: $LOSSD_HEALTH_TLS_CA, else the server's own --tls-cert when it has one)",
    )
    p.add_argument(
        "--tls-cert",
        default=env.get("LOSSD_HEALTH_TLS_CERT"),
        help="client certificate, for a server that requires mutual TLS",
    )
    p.add_argument(
        "--tls-key", default=env.get("LOSSD_HEALTH_TLS_KEY"), help="private key of --tls-cert"
    )
    p.add_argument(
        "--tls-server-name",
        default=env.get("LOSSD_HEALTH_TLS_SERVER_NAME") or ("localhost" if server_cert else None),
        help="name to verify in the server certificate (default with TLS: localhost)",
    )
    return p


def check(
    endpoint: str,
    service: str = "",
    timeout: float = 3.0,
    *,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_server_name: str | None = None,
) -> str:
    """The health status name the server reports (``SERVING``, ``NOT_SERVING``, ...)."""
    if tls_ca or tls_cert:
        credentials = grpc.ssl_channel_credentials(
            Path(tls_ca).read_bytes() if tls_ca else None,
            Path(tls_key).read_bytes() if tls_key else None,
            Path(tls_cert).read_bytes() if tls_cert else None,
        )
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(endpoint, credentials, options=options)
    else:
        channel = grpc.insecure_channel(endpoint)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    try:
        args = parser(env).parse_args(argv)
    except SettingError as exc:
        print(f"lossd health: {exc}", file=sys.stderr)
        return 2
    try:
        status = check(**vars(args))  # the probe's flags are check's parameters
    except grpc.RpcError as error:
        print(
            f"lossd health: {args.endpoint}: {error.code().name}: {error.details()}",
            file=sys.stderr,
        )
        return 1
    except OSError as error:
        print(f"lossd health: {error}", file=sys.stderr)
        return 1
    print(f"{args.endpoint}: {status}")
    return 0 if status == "SERVING" else 1


def token_main(argv: Sequence[str] | None = None) -> int:
    """``lossd token``: print a new token and the tokens-file line that grants it."""
    from .security import ROLES, new_token, token_entry

    p = argparse.ArgumentParser(
        prog="lossd token", description="Make a bearer token and its --auth-tokens entry."
    )
    p.add_argument(
        "--principal", required=True, help="who the token identifies (recorded in the audit trail)"
    )
    p.add_argument(
        "--roles", default="compute", help=f"comma-separated, from {', '.join(sorted(ROLES))}"
    )
    args = p.parse_args(argv)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = sorted(set(roles) - ROLES)
    if unknown or not roles:
        p.error(f"unknown roles {unknown}; choose from {sorted(ROLES)}")
    token = new_token()
    print(
        f"# give this token to {args.principal} (LOSSD_TOKEN=...); it is not stored anywhere:\n# {token}"
    )
    print("# add this line to the --auth-tokens file:")
    print(token_entry(token, args.principal, roles))
    return 0
