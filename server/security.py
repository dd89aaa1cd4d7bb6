"""Transport security and authorization: TLS/mTLS credentials, bearer tokens, roles.

Tokens come from a YAML or JSON file (``--auth-tokens``) mapping each token to a principal and
its roles::

    "k3Jd...a long random string...":        {principal: trainer-a, roles: [compute]}
    "sha256:9f86d081884c7d659a2feaa0c55ad015...": {principal: auditor, roles: [audit-read]}

A key is the token itself or ``sha256:`` and the hex SHA-256 of the token, so that the file
need not hold usable secrets. Roles: ``compute`` (LossService), ``audit-read`` (AuditService),
``admin`` (everything). Health checks and reflection stay open so probes and ``grpcurl
describe`` work without a token.

Handlers (and ``after_compute`` hooks such as the audit recorder) read the caller's identity with
``current_principal()``; it is set for the duration of each authorized call.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import yaml

from ._handlers import Rewrapped, rewrap
from .config import SettingError
from .errors import PermissionDenied, ServiceError, Unauthenticated, abort

log = logging.getLogger("lossd.security")

COMPUTE, AUDIT_READ, ADMIN = "compute", "audit-read", "admin"
ROLES = frozenset({COMPUTE, AUDIT_READ, ADMIN})

# Role needed per service; any service not listed here (and not open) needs admin.
SERVICE_ROLES: dict[str, str] = {
    "lossd.v1.LossService": COMPUTE,
    "lossd.v1.AuditService": AUDIT_READ,
}
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

MIN_TOKEN_CHARS = 16  # a guessable token is no authentication


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name for the audit trail and the roles the name was granted."""

    name: str
    roles: frozenset[str]

    def may(self, role: str) -> bool:
        return role in self.roles or ADMIN in self.roles


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "lossd_principal", default=None
)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC being handled on this thread, or None when anonymous."""
    return _current.get()


class TokenError(SettingError):
    """The tokens or certificate-roles file is unreadable or malformed; the message names the file
    and entry."""


def _read_mapping(path: Path, flag: str) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TokenError(f"{flag} {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)  # JSON is YAML; safe_load builds plain data only
    except yaml.YAMLError as exc:
        raise TokenError(f"{flag} {path}: not valid YAML or JSON: {exc}") from None


def _roles(roles: Any, where: str) -> frozenset[str]:
    """A validated list of roles (or one role as a string), from a tokens or roles file."""
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise TokenError(f"{where}: 'roles' must be a non-empty list of {sorted(ROLES)}")
    unknown = sorted(set(roles) - ROLES)
    if unknown:
        raise TokenError(f"{where}: unknown role(s) {unknown}; roles are {sorted(ROLES)}")
    return frozenset(roles)


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class TokenTable:
    """Bearer tokens → principals. Lookups compare SHA-256 digests in constant time."""

    def __init__(self, entries: list[_Entry]) -> None:
        if not entries:
            raise TokenError("the tokens file defines no token")
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        path = Path(path)
        data = _read_mapping(path, "--auth-tokens")
        raw = isinstance(data, Mapping) and any(
            not str(key).startswith("sha256:") for key in data
        )  # a file of sha256: digests holds no usable secret
        if raw and os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "%s holds raw tokens and is readable by other users; chmod 600 it (or store sha256: keys)",
                path,
            )
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "tokens") -> TokenTable:
        if not isinstance(data, Mapping):
            raise TokenError(f"{source}: expected a mapping of token -> {{principal, roles}}")
        entries: list[_Entry] = []
        seen: set[bytes] = set()
        for index, (key, value) in enumerate(data.items()):
            where = f"{source}: entry {index + 1}"  # never echo the token itself
            if not isinstance(key, str) or not key:
                raise TokenError(f"{where}: the token must be a non-empty string")
            if key.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(key.removeprefix("sha256:"))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise TokenError(f"{where}: sha256: must be followed by 64 hex digits")
            else:
                if len(key) < MIN_TOKEN_CHARS:
                    raise TokenError(
                        f"{where}: tokens must be at least {MIN_TOKEN_CHARS} characters (use `lossd token`)"
                    )
                digest = hashlib.sha256(key.encode()).digest()
            if not isinstance(value, Mapping):
                raise TokenError(f"{where}: expected {{principal: NAME, roles: [...]}}")
            name = value.get("principal")
            if not isinstance(name, str) or not name.strip():
                raise TokenError(f"{where}: 'principal' must be a non-empty string")
            roles = _roles(value.get("roles"), f"{where} ({name})")
            extra = sorted(set(value) - {"principal", "roles"})
            if extra:
                raise TokenError(f"{where} ({name}): unknown key(s) {extra}")
            if digest in seen:
                raise TokenError(f"{where} ({name}): the same token is listed twice")
            seen.add(digest)
            entries.append(_Entry(digest, Principal(name.strip(), roles)))
        return cls(entries)

    def authenticate(self, token: str) -> Principal | None:
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        # Every entry is compared, match or not, so timing says nothing about which token (or
        # how much of one) was right.
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry.principal
        return found


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    import secrets

    return secrets.token_urlsafe(32)


def token_entry(token: str, principal: str, roles: list[str]) -> str:
    """A tokens-file line that stores the token's SHA-256 rather than the token."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    return (
        f'"sha256:{digest}": {{"principal": {json.dumps(principal)}, "roles": {json.dumps(roles)}}}'
    )


class CertificateRoles:
    """Client-certificate common names → roles (``--tls-client-roles``, with mutual TLS)::

        trainer-a: [compute]
        auditor-1: audit-read

    A certificate the CA signed whose name is not listed may connect but gets PERMISSION_DENIED.
    """

    def __init__(self, roles: Mapping[str, frozenset[str]]) -> None:
        if not roles:
            raise TokenError("the certificate-roles file names no certificate")
        self._roles = dict(roles)

    @classmethod
    def load(cls, path: str | Path) -> CertificateRoles:
        return cls.parse(_read_mapping(Path(path), "--tls-client-roles"), str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "certificate roles") -> CertificateRoles:
        if not isinstance(data, Mapping):
            raise TokenError(f"{source}: expected a mapping of certificate common name -> roles")
        roles: dict[str, frozenset[str]] = {}
        for name, value in data.items():
            if not isinstance(name, str) or not name.strip():
                raise TokenError(f"{source}: {name!r}: a common name must be a non-empty string")
            roles[name.strip()] = _roles(value, f"{source}: {name!r}")
        return cls(roles)

    def principal(self, common_name: str | None) -> Principal | None:
        roles = self._roles.get(common_name) if common_name else None
        return Principal(common_name, roles) if roles is not None else None


def required_role(method: str) -> str | None:
    """The role ``/package.Service/Method`` needs; None for the open services."""
    service = method.lstrip("/").split("/", 1)[0]
    if service in OPEN_SERVICES:
        return None
    return SERVICE_ROLES.get(service, ADMIN)


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def peer_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client certificate (mutual TLS), when there is one."""
    try:
        names = context.auth_context().get("x509_common_name") or ()
    except Exception:  # noqa: BLE001 - no auth context on a plaintext call
        return None
    return names[0].decode() if names else None


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates each call and checks the role its service needs.

    With a token table, every call outside the open services needs ``authorization: Bearer``
    metadata naming a known token (else UNAUTHENTICATED) whose principal holds the service's role
    (else PERMISSION_DENIED). With certificate roles (mutual TLS), the client certificate's
    common name must be listed with the role (else PERMISSION_DENIED); the check runs in the
    handler, where the TLS session is known. With neither, calls are not authorized here (mutual
    TLS, when configured, has already refused unknown clients) and the principal is the client
    certificate's common name, if any, with every role.
    """

    def __init__(
        self,
        tokens: TokenTable | None,
        certificate_roles: CertificateRoles | None = None,
        *,
        tls: bool = True,
    ) -> None:
        if tokens is not None and certificate_roles is not None:
            raise SettingError("--auth-tokens and --tls-client-roles both grant roles: use one")
        self.tokens = tokens
        self.certificate_roles = certificate_roles
        # Without TLS no caller has a certificate: its name is not looked up (``auth_context()``
        # builds a dict of the connection's properties per call, ~10 us).
        self.tls = tls
        self._wrapped = Rewrapped()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        role = required_role(details.method)
        if role is None:
            return handler
        if self.certificate_roles is not None:
            return self._wrapped.get(
                (handler, details.method),
                lambda: _with_principal(
                    handler, None, self._certificate_check(role, details.method)
                ),
            )
        if self.tokens is None:
            check = None if self.tls else _anonymous
            return self._wrapped.get(handler, lambda: _with_principal(handler, None, check))
        token = bearer_token(details.invocation_metadata)
        if not token:
            return _refusal(
                handler,
                Unauthenticated(
                    "this server needs a bearer token: pass RemoteLoss(token=...) or set LOSSD_TOKEN "
                    "(metadata `authorization: Bearer <token>`)"
                ),
                details.method,
            )
        principal = self.tokens.authenticate(token)
        if principal is None:
            return _refusal(
                handler, Unauthenticated("the bearer token is not valid"), details.method
            )
        if not principal.may(role):
            return _refusal(
                handler,
                PermissionDenied(
                    f"principal {principal.name!r} lacks the {role!r} role that {details.method} needs"
                ),
                details.method,
            )
        return self._wrapped.get((handler, principal), lambda: _with_principal(handler, principal))

    def _certificate_check(
        self, role: str, method: str
    ) -> Callable[[grpc.ServicerContext], Principal]:
        def check(context: grpc.ServicerContext) -> Principal:
            name = peer_name(context)
            principal = self.certificate_roles.principal(name)
            if principal is None:
                _refuse(
                    context,
                    PermissionDenied(
                        f"client certificate {name!r} is not listed in --tls-client-roles"
                    ),
                    method,
                )
            if not principal.may(role):
                _refuse(
                    context,
                    PermissionDenied(
                        f"principal {principal.name!r} lacks the {role!r} role that {method} needs"
                    ),
                    method,
                )
            return principal

        return check


def _with_principal(
    handler: Any,
    principal: Principal | None,
    check: Callable[[grpc.ServicerContext], Principal | None] | None = None,
) -> Any:
    """``handler`` run as ``principal``; or as whom ``check(context)`` names (it aborts the call
    when the caller may not make it); or, failing both, as the client certificate's name."""

    def wrap(behavior: Callable, streaming: bool) -> Callable:
        def resolve(context: grpc.ServicerContext) -> Principal | None:
            if principal is not None:
                return principal
            if check is not None:
                return check(context)
            name = peer_name(context)
            return Principal(name, frozenset(ROLES)) if name else None

        if streaming:

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                # The generator runs one step per response, on whichever thread asks for it:
                # set the principal around each step, not once.
                who = resolve(context)
                responses = iter(behavior(request, context))
                while True:
                    token = _current.set(who)
                    try:
                        item = next(responses)
                    except StopIteration:
                        return
                    finally:
                        _current.reset(token)
                    yield item

            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            return _call_as(resolve(context), behavior, request, context)

        return unary

    return rewrap(handler, lambda behavior: wrap(behavior, handler.response_streaming))


def _anonymous(_context: grpc.ServicerContext) -> None:
    """The caller of a plaintext call without a token: nobody in particular."""
    return None


def _call_as(
    principal: Principal | None, behavior: Callable, request: Any, context: grpc.ServicerContext
) -> Any:
    token = _current.set(principal)
    try:
        return behavior(request, context)
    finally:
        _current.reset(token)


def _refuse(context: grpc.ServicerContext, error: ServiceError, method: str) -> NoReturn:
    log.warning("%s refused for %s: %s %s", method, context.peer(), error.code.name, error)
    abort(context, error)
    raise AssertionError("abort returned")  # context.abort always raises


def _refusal(handler: Any, error: ServiceError, method: str) -> Any:
    def wrap(_behavior: Callable, streaming: bool) -> Callable:
        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            _refuse(context, error, method)

        if streaming:

            def refuse_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                refuse(request, context)
                yield from ()

            return refuse_stream
        return refuse

    return rewrap(handler, lambda behavior: wrap(behavior, handler.response_streaming))


# ------------------------------------------------------------------------------------------
# TLS


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingError(f"{what} {path}: {exc.strerror or exc}") from None


def certificate_roles(config: Any) -> CertificateRoles | None:
    """``--tls-client-roles``, checked against the rest of the security settings."""
    if not config.tls_client_roles:
        return None
    if not config.tls_client_ca:
        raise SettingError(
            "--tls-client-roles needs --tls-client-ca: roles are read from verified client certificates"
        )
    if config.auth_tokens:
        raise SettingError("--auth-tokens and --tls-client-roles both grant roles: use one")
    return CertificateRoles.load(config.tls_client_roles)


def server_credentials(
    tls_cert: str, tls_key: str, tls_client_ca: str = ""
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files; None when TLS is off. ``tls_client_ca`` turns on mTLS."""
    if not tls_cert and not tls_key:
        if tls_client_ca:
            raise SettingError(
                "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)"
            )
        return None
    if not (tls_cert and tls_key):
        raise SettingError("TLS needs both --tls-cert and --tls-key")
    chain = _read(tls_cert, "--tls-cert")
    key = _read(tls_key, "--tls-key")
    if b"-----BEGIN" not in chain or b"PRIVATE KEY-----" not in key:
        raise SettingError(
            "--tls-cert and --tls-key must be PEM files (a certificate chain and its private key)"
        )
    client_ca = _read(tls_client_ca, "--tls-client-ca") if tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def exposure_notes(config: Any) -> list[str]:
    """Remarks on a network-facing server that has TLS or tokens but not both (or none, acknowledged)."""
    notes = []
    if config.allow_insecure and not (config.tls_cert or config.auth_tokens):
        notes.append(
            f"serving {config.host} without TLS or tokens, as acknowledged by --allow-insecure"
        )
    elif config.auth_tokens and not config.tls_cert:
        notes.append(
            "bearer tokens travel in cleartext without TLS: add --tls-cert/--tls-key unless the network is trusted"
        )
    elif config.tls_cert and not (config.auth_tokens or config.tls_client_ca):
        notes.append(
            "TLS without --auth-tokens or --tls-client-ca: any client that can connect may compute"
        )
    elif config.tls_client_ca and not (config.auth_tokens or config.tls_client_roles):
        notes.append(
            "mutual TLS without --tls-client-roles or --auth-tokens: every certificate the CA signed has every role"
        )
    return notes
