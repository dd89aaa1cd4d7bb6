"""Helpers and fixtures for the operations tests: throwaway certificates, token files, servers with settings.

Certificates and keys are generated at test time (never committed): a CA, a server certificate
for localhost/127.0.0.1, a client certificate the CA signed, and a client certificate signed by
an unrelated CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from lossd.server.app import RunningServer, create_server
from lossd.server.config import ServerConfig

x509 = pytest.importorskip(
    "cryptography.x509", reason="the TLS tests need the cryptography package (dev extra)"
)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, key, issuer_name: str, issuer_key, *, ca: bool = False, server: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
    return str(path)


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_cert: str
    rogue_key: str
    auditor_cert: str  # CA-signed, common name "auditor-1"
    auditor_key: str
    stranger_cert: str  # CA-signed, common name "stranger"
    stranger_key: str


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("lossd test CA", ca_key, "lossd test CA", ca_key, ca=True)
    rogue_ca = _cert("rogue CA", rogue_ca_key, "rogue CA", rogue_ca_key, ca=True)
    server_key, client_key, rogue_key, auditor_key, stranger_key = (
        _key(),
        _key(),
        _key(),
        _key(),
        _key(),
    )
    return Pki(
        ca=_write(d / "ca.pem", ca),
        server_cert=_write(
            d / "server.pem",
            _cert("lossd-server", server_key, "lossd test CA", ca_key, server=True),
        ),
        server_key=_write(d / "server.key", key=server_key),
        client_cert=_write(
            d / "client.pem", _cert("trainer-7", client_key, "lossd test CA", ca_key)
        ),
        client_key=_write(d / "client.key", key=client_key),
        rogue_ca=_write(d / "rogue-ca.pem", rogue_ca),
        rogue_cert=_write(d / "rogue.pem", _cert("trainer-7", rogue_key, "rogue CA", rogue_ca_key)),
        rogue_key=_write(d / "rogue.key", key=rogue_key),
        auditor_cert=_write(
            d / "auditor.pem", _cert("auditor-1", auditor_key, "lossd test CA", ca_key)
        ),
        auditor_key=_write(d / "auditor.key", key=auditor_key),
        stranger_cert=_write(
            d / "stranger.pem", _cert("stranger", stranger_key, "lossd test CA", ca_key)
        ),
        stranger_key=_write(d / "stranger.key", key=stranger_key),
    )


TOKENS = {
    "compute": "tok-compute-0123456789abcdef",
    "audit": "tok-audit-0123456789abcdef",
    "admin": "tok-admin-0123456789abcdef",
}


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    import hashlib

    path = tmp_path_factory.mktemp("auth") / "tokens.json"
    path.write_text(
        json.dumps(
            {
                TOKENS["compute"]: {"principal": "trainer-a", "roles": ["compute"]},
                # Stored as a digest, as a careful operator would.
                "sha256:" + hashlib.sha256(TOKENS["audit"].encode()).hexdigest(): {
                    "principal": "auditor",
                    "roles": ["audit-read"],
                },
                TOKENS["admin"]: {"principal": "ops", "roles": ["admin"]},
            }
        )
    )
    path.chmod(0o600)
    return str(path)


@contextmanager
def running(**settings) -> Iterator[RunningServer]:
    """An in-process server on a free loopback port with these settings (state in a temp dir)."""
    import tempfile

    data_dir = tempfile.mkdtemp(prefix="lossd-ops-")  # never the user's ~/.local/share/lossd
    config = ServerConfig(
        **{"port": 0, "device": "cpu", "workers": 4, "data_dir": data_dir, **settings}
    )
    server = create_server(config)
    try:
        yield server
    finally:
        server.stop(0)
        shutil.rmtree(data_dir, ignore_errors=True)


def health_status(
    target: str, credentials: grpc.ChannelCredentials | None = None, **options
) -> str:
    opts = list(options.items())
    channel = (
        grpc.secure_channel(target, credentials, options=opts)
        if credentials
        else grpc.insecure_channel(target)
    )
    with channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and want <= set(ls))


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


class Gate:
    """Holds every evaluation of a server's engine at its start until ``open()``; counts those that
    arrived and finished (so tests decide what is in flight, whatever the machine's speed)."""

    def __init__(self, engine) -> None:
        self.arrived = threading.Semaphore(0)
        self.released = threading.Event()
        self.finished = threading.Semaphore(0)
        self._evaluate = engine.evaluate
        engine.evaluate = self._gated  # the servicer calls engine.evaluate per request

    def _gated(self, *args, **kwargs):
        self.arrived.release()
        self.released.wait(60)
        try:
            return self._evaluate(*args, **kwargs)
        finally:
            self.finished.release()

    def wait_arrivals(self, n: int) -> None:
        for _ in range(n):
            assert self.arrived.acquire(timeout=30), "a call never reached the engine"

    def open(self) -> None:
        self.released.set()
