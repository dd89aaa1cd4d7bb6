"""TLS, mutual TLS and bearer-token roles, end to end over real sockets.

The AuditService handlers are checked through the same interceptor with a probe method
registered under ``lossd.v1.AuditService`` (the role is decided per service), which also
reports the principal the handler sees, and through the real ``AuditService.ListRuns``.
"""

from __future__ import annotations

import re

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError
from lossd.client._proto import lossd_pb2 as pb
from lossd.client._proto import lossd_pb2_grpc as pb_grpc
from lossd.client.functional import build_request, remote_loss
from lossd.client.transport import Transport
from lossd.client.wire import codec
from lossd.server import probe
from lossd.server.app import create_server
from lossd.server.config import ServerConfig, SettingError
from lossd.server.security import (
    CertificateRoles,
    TokenError,
    TokenTable,
    current_principal,
    exposure_notes,
)
from tests.support.opskit import TOKENS, health_status, running

AUDIT_PROBE = "/lossd.v1.AuditService/OpsTestWhoAmI"
ADMIN_PROBE = "/lossd.v1.OpsTestAdmin/WhoAmI"


def _whoami(_request: bytes, _context: grpc.ServicerContext) -> bytes:
    principal = current_principal()
    return (
        b""
        if principal is None
        else f"{principal.name}:{','.join(sorted(principal.roles))}".encode()
    )


def _add_probes(server) -> None:
    """Register test-only methods in an audit-read service and in an admin-only service."""
    handler = grpc.unary_unary_rpc_method_handler(_whoami)  # raw bytes in and out
    for method in (AUDIT_PROBE, ADMIN_PROBE):
        service, name = method.strip("/").split("/")
        server.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {name: handler}),)
        )


def _raw(channel: grpc.Channel, method: str, token: str | None) -> str:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    return channel.unary_unary(method)(b"", timeout=10, metadata=metadata).decode()


def _code(call) -> grpc.StatusCode:
    with pytest.raises((grpc.RpcError, LossdError)) as caught:
        call()
    error = caught.value
    return error.code if isinstance(error, LossdError) else error.code()


def _loss(response: pb.ComputeResponse) -> float:
    return float(codec.decode_value(response.loss, "loss"))


def _mse() -> pb.ComputeRequest:
    return build_request("mse", {}, (torch.ones(4), torch.zeros(4)), {})


# ------------------------------------------------------------------------------------------
# TLS and mutual TLS


def test_tls_serves_verified_clients_and_refuses_plaintext_and_unknown_roots(pki):
    with running(tls_cert=pki.server_cert, tls_key=pki.server_key) as server:
        target = f"127.0.0.1:{server.port}"
        good = LossClient(target, timeout=20, tls_ca=pki.ca, retries=0)
        try:
            assert _loss(good.compute(_mse())) == pytest.approx(1.0)
        finally:
            good.close()
        # The health probe CLI follows TLS too (as in a container's HEALTHCHECK).
        assert probe.check(target, tls_ca=pki.ca, tls_server_name="localhost") == "SERVING"
        for client in (
            LossClient(target, timeout=5, retries=0),  # plaintext to a TLS port
            LossClient(
                target, timeout=5, tls_ca=pki.rogue_ca, retries=0
            ),  # server not signed by these roots
        ):
            try:
                assert _code(lambda c=client: c.compute(_mse())) == grpc.StatusCode.UNAVAILABLE
            finally:
                client.close()


def test_mutual_tls_refuses_clients_without_a_certificate_or_with_a_foreign_one(pki):
    with running(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca) as server:
        _add_probes(server)
        target = f"127.0.0.1:{server.port}"
        good = _mtls_client(target, pki, "trainer-7")
        try:
            assert _loss(good.compute(_mse())) == pytest.approx(1.0)
            # Without tokens the principal is the client certificate's common name.
            assert _raw(good.channel, AUDIT_PROBE, None) == "trainer-7:admin,audit-read,compute"
        finally:
            good.close()
        refused = {
            "no client certificate": LossClient(target, timeout=5, tls_ca=pki.ca, retries=0),
            "certificate from another CA": LossClient(
                target,
                timeout=5,
                tls_ca=pki.ca,
                tls_cert=pki.rogue_cert,
                tls_key=pki.rogue_key,
                retries=0,
            ),
        }
        codes = {}
        for why, client in refused.items():
            try:
                codes[why] = _code(lambda c=client: c.compute(_mse()))
            finally:
                client.close()
        assert codes == dict.fromkeys(refused, grpc.StatusCode.UNAVAILABLE)
        # Refused handshakes leave the server healthy for good clients.
        assert _mtls_probe(target, pki, pki.client_cert, pki.client_key) == "SERVING"


def _mtls_probe(target: str, pki, cert: str, key: str) -> str:
    """The health status `lossd health` reads over mTLS with this client certificate."""
    return probe.check(
        target, tls_ca=pki.ca, tls_cert=cert, tls_key=key, tls_server_name="localhost"
    )


def _mtls_client(target: str, pki, who: str) -> LossClient:
    cert, key = {
        "trainer-7": (pki.client_cert, pki.client_key),
        "auditor-1": (pki.auditor_cert, pki.auditor_key),
        "stranger": (pki.stranger_cert, pki.stranger_key),
    }[who]
    return LossClient(target, timeout=20, tls_ca=pki.ca, tls_cert=cert, tls_key=key, retries=0)


def _chunked_code(client: LossClient) -> grpc.StatusCode:
    """The status of one ComputeChunked call (the role check runs for streaming RPCs too)."""
    try:
        remote_loss(
            client,
            "mse",
            {},
            (torch.ones(4), torch.zeros(4)),
            transport=Transport(client, "chunked"),
        )
    except LossdError as error:
        return error.code
    return grpc.StatusCode.OK


def test_certificate_roles_give_each_client_certificate_exactly_its_roles(pki, tmp_path):
    roles = tmp_path / "client-roles.yaml"
    roles.write_text("trainer-7: [compute]\nauditor-1: audit-read\n")
    with running(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        tls_client_roles=str(roles),
    ) as server:
        _add_probes(server)
        target = f"127.0.0.1:{server.port}"
        seen = {}
        for who in ("trainer-7", "auditor-1", "stranger"):
            client = _mtls_client(target, pki, who)
            try:
                try:
                    seen[who, "compute"] = _loss(client.compute(_mse()))
                except LossdError as error:
                    seen[who, "compute"] = (error.code, error.details)
                try:
                    seen[who, "audit"] = _raw(client.channel, AUDIT_PROBE, None)
                except grpc.RpcError as error:
                    seen[who, "audit"] = error.code()
                seen[who, "chunked"] = _chunked_code(client)
            finally:
                client.close()
        assert seen["trainer-7", "compute"] == pytest.approx(1.0)
        assert seen["trainer-7", "audit"] == grpc.StatusCode.PERMISSION_DENIED
        assert seen["trainer-7", "chunked"] == grpc.StatusCode.OK
        assert seen["auditor-1", "compute"] == (
            grpc.StatusCode.PERMISSION_DENIED,
            "principal 'auditor-1' lacks the 'compute' role that /lossd.v1.LossService/Compute needs",
        )
        assert (
            seen["auditor-1", "audit"] == "auditor-1:audit-read"
        )  # the handler sees the certificate's principal
        assert seen["auditor-1", "chunked"] == grpc.StatusCode.PERMISSION_DENIED
        assert seen["stranger", "compute"] == (
            grpc.StatusCode.PERMISSION_DENIED,
            "client certificate 'stranger' is not listed in --tls-client-roles",
        )
        assert (
            seen["stranger", "audit"]
            == seen["stranger", "chunked"]
            == grpc.StatusCode.PERMISSION_DENIED
        )
        # Probes stay open to any certificate the CA signed.
        assert _mtls_probe(target, pki, pki.stranger_cert, pki.stranger_key) == "SERVING"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_client_ca": ""}, "--tls-client-roles needs --tls-client-ca"),
        (
            {"auth_tokens": "TOKENS"},
            "--auth-tokens and --tls-client-roles both grant roles: use one",
        ),
    ],
    ids=["without-mtls", "with-tokens"],
)
def test_certificate_roles_need_mutual_tls_and_exclude_tokens(
    pki, tokens_file, tmp_path, settings, message
):
    roles = tmp_path / "client-roles.yaml"
    roles.write_text("trainer-7: [compute]\n")
    config = ServerConfig(
        port=0,
        device="cpu",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        tls_client_roles=str(roles),
    )
    config = config.replace(**{k: tokens_file if v == "TOKENS" else v for k, v in settings.items()})
    with pytest.raises(SettingError, match=re.escape(message)):
        create_server(config)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trainer-7": ["root"]}, "'trainer-7': unknown role(s) ['root']"),
        ({"trainer-7": []}, "'trainer-7': 'roles' must be a non-empty list"),
        ({"": ["compute"]}, "a common name must be a non-empty string"),
        (["trainer-7"], "expected a mapping of certificate common name -> roles"),
        ({}, "names no certificate"),
    ],
)
def test_malformed_certificate_roles_are_refused_naming_the_entry(data, message):
    with pytest.raises(TokenError) as caught:
        CertificateRoles.parse(data, "client-roles.yaml")
    assert message in str(caught.value)


# ------------------------------------------------------------------------------------------
# Bearer tokens and roles


@pytest.fixture(scope="module")
def token_server(tokens_file):
    with running(auth_tokens=tokens_file) as server:
        _add_probes(server)
        yield server


@pytest.fixture(scope="module")
def channel(token_server):
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as ch:
        yield ch


def _client(server, token: str | None) -> LossClient:
    return LossClient(f"127.0.0.1:{server.port}", timeout=20, token=token or "", retries=0)


@pytest.mark.parametrize(
    ("who", "compute", "audit", "admin"),
    [
        (
            "compute",
            "trainer-a:compute",
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            "audit",
            grpc.StatusCode.PERMISSION_DENIED,
            "auditor:audit-read",
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        ("admin", "ops:admin", "ops:admin", "ops:admin"),
    ],
)
def test_each_role_reaches_exactly_its_services(token_server, channel, who, compute, audit, admin):
    client = _client(token_server, TOKENS[who])
    try:
        if isinstance(compute, str):
            assert _loss(client.compute(_mse())) == pytest.approx(1.0)
            assert len(client.list_losses()) > 10
        else:
            assert _code(lambda: client.compute(_mse())) == compute
            assert _code(lambda: client.list_losses()) == compute
    finally:
        client.close()
    for method, expected in ((AUDIT_PROBE, audit), (ADMIN_PROBE, admin)):
        if isinstance(expected, str):
            assert _raw(channel, method, TOKENS[who]) == expected  # the handler sees who called
        else:
            assert _code(lambda m=method: _raw(channel, m, TOKENS[who])) == expected


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        ("compute", grpc.StatusCode.PERMISSION_DENIED),
        ("audit", grpc.StatusCode.OK),
        ("admin", grpc.StatusCode.OK),
        ("none", grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_the_real_audit_service_needs_audit_read(token_server, channel, who, expected):
    stub = pb_grpc.AuditServiceStub(channel)
    metadata = (("authorization", f"Bearer {TOKENS[who]}"),) if who in TOKENS else None
    # A run is recorded first (a compute call with a run id), so the reader has something to list.
    client = _client(token_server, TOKENS["compute"])
    try:
        request = _mse()
        request.audit.run_id = "ops-role-test"
        assert client.compute(request).audited
    finally:
        client.close()
    if expected is grpc.StatusCode.OK:
        runs = stub.ListRuns(pb.ListRunsRequest(), timeout=10, metadata=metadata).runs
        assert "ops-role-test" in {r.run_id for r in runs}
    else:
        assert (
            _code(lambda: stub.ListRuns(pb.ListRunsRequest(), timeout=10, metadata=metadata))
            == expected
        )


def test_permission_denied_names_the_principal_and_the_missing_role(channel):
    with pytest.raises(grpc.RpcError) as caught:
        _raw(channel, AUDIT_PROBE, TOKENS["compute"])
    assert "trainer-a" in caught.value.details() and "audit-read" in caught.value.details()


@pytest.mark.parametrize(
    "metadata",
    [
        None,  # no token at all
        (("authorization", "Bearer tok-wrong-0123456789abcdef"),),
        (("authorization", "Bearer " + TOKENS["compute"][:-1]),),  # a prefix of a valid token
        (("authorization", "Basic " + TOKENS["compute"]),),  # not a bearer token
        (("authorization", "Bearer "),),
    ],
    ids=["missing", "wrong", "prefix", "basic-scheme", "empty"],
)
def test_missing_or_wrong_tokens_are_unauthenticated(channel, metadata):
    compute = channel.unary_unary(
        "/lossd.v1.LossService/Compute",
        request_serializer=pb.ComputeRequest.SerializeToString,
        response_deserializer=pb.ComputeResponse.FromString,
    )
    for call in (
        lambda: compute(_mse(), timeout=10, metadata=metadata),
        lambda: channel.unary_unary(AUDIT_PROBE)(b"", timeout=10, metadata=metadata),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKENS["compute"] not in caught.value.details()  # a presented token is never echoed


def test_the_client_reads_its_token_from_the_environment(token_server, monkeypatch):
    monkeypatch.setenv("LOSSD_TOKEN", TOKENS["compute"])
    client = LossClient(f"127.0.0.1:{token_server.port}", timeout=20, retries=0)
    try:
        assert _loss(client.compute(_mse())) == pytest.approx(1.0)
    finally:
        client.close()
    monkeypatch.delenv("LOSSD_TOKEN")
    anonymous = LossClient(f"127.0.0.1:{token_server.port}", timeout=20, retries=0)
    try:
        assert _code(lambda: anonymous.compute(_mse())) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        anonymous.close()


def test_health_and_reflection_stay_open_without_a_token(token_server, channel):
    assert health_status(f"127.0.0.1:{token_server.port}") == "SERVING"
    assert probe.main(["--endpoint", f"127.0.0.1:{token_server.port}"], env={}) == 0
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "lossd.v1.LossService" in names


def test_tokens_and_tls_together(pki, tokens_file):
    with running(
        tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens=tokens_file
    ) as server:
        target = f"127.0.0.1:{server.port}"
        with_token = LossClient(
            target, timeout=20, tls_ca=pki.ca, token=TOKENS["compute"], retries=0
        )
        without = LossClient(target, timeout=20, tls_ca=pki.ca, token="", retries=0)
        try:
            assert _loss(with_token.compute(_mse())) == pytest.approx(1.0)
            assert _code(lambda: without.compute(_mse())) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            with_token.close()
            without.close()


# ------------------------------------------------------------------------------------------
# The tokens file


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"short": {"principal": "a", "roles": ["compute"]}}, "at least 16 characters"),
        ({"x" * 20: {"principal": "a", "roles": ["root"]}}, "unknown role(s) ['root']"),
        (
            {"x" * 20: {"principal": "", "roles": ["compute"]}},
            "'principal' must be a non-empty string",
        ),
        ({"x" * 20: {"principal": "a", "roles": []}}, "'roles' must be a non-empty list"),
        ({"sha256:abcd": {"principal": "a", "roles": ["compute"]}}, "64 hex digits"),
        (
            {"x" * 20: {"principal": "a", "roles": ["compute"], "role": "admin"}},
            "unknown key(s) ['role']",
        ),
        ([], "expected a mapping"),
        ({}, "defines no token"),
    ],
)
def test_malformed_token_files_are_refused_without_echoing_tokens(data, message):
    with pytest.raises(TokenError) as caught:
        TokenTable.parse(data, "tokens.yaml")
    assert message in str(caught.value)
    assert "x" * 20 not in str(caught.value)


def test_a_digest_entry_authenticates_the_token_it_hashes(tokens_file):
    table = TokenTable.load(tokens_file)
    assert table.authenticate(TOKENS["audit"]).name == "auditor"  # stored as sha256:...
    assert table.authenticate(TOKENS["compute"]).roles == frozenset({"compute"})
    assert table.authenticate("sha256:" + "0" * 64) is None


# ------------------------------------------------------------------------------------------
# Exposure


@pytest.mark.parametrize(
    ("flags", "loud", "note"),
    [
        ((), True, None),
        (("--allow-insecure",), False, "as acknowledged by --allow-insecure"),
        (("--auth-tokens", "TOKENS"), False, "bearer tokens travel in cleartext"),
    ],
    ids=["open", "acknowledged", "tokens-without-tls"],
)
def test_a_network_facing_server_warns_unless_secured_or_acknowledged(
    tokens_file, flags, loud, note
):
    from tests.support.serverproc import ServerProcess

    flags = tuple(tokens_file if f == "TOKENS" else f for f in flags)
    with ServerProcess("--host", "0.0.0.0", "--audit", "none", *flags) as proc:
        assert health_status(f"127.0.0.1:{proc.port}") == "SERVING"
        log = "".join(proc.stderr_lines)
    assert ("WITHOUT TLS or authentication" in log) is loud, log
    if note:
        assert note in log


def test_mutual_tls_without_certificate_roles_is_noted(pki):
    config = ServerConfig(
        host="0.0.0.0", tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    assert exposure_notes(config) == [
        "mutual TLS without --tls-client-roles or --auth-tokens: every certificate the CA signed has every role"
    ]
    assert exposure_notes(config.replace(tls_client_roles="client-roles.yaml")) == []
