"""The checkpoint signing key (Ed25519) and the checkpoint statement it signs.

The key is the server's: generated at first start as ``<data-dir>/audit-signing.key`` (PKCS#8
PEM, mode 0600, created atomically so two replicas starting at once on one data directory end
up with the same key), or read from ``--audit-signing-key``. Its public half is printed at
start-up and served by ``AuditService.GetPublicKey``; the key id is the first 16 hex digits of
the SHA-256 of the raw 32-byte public key.

A checkpoint says "run R's chain had N records ending in H at time T, signed by key K". The
signed bytes are ``lossd-checkpoint-v1 NUL R NUL N NUL H NUL T NUL K`` (UTF-8, numbers in
decimal); run ids never hold NUL (the server refuses them), so the fields cannot run together.

``cryptography`` is a runtime dependency: the trail is on by default, and without signatures a
truncated tail or a history rewritten from scratch would pass verification unnoticed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lossd.client._proto import lossd_pb2 as pb

from .store import AuditStoreError, Store, StoredCheckpoint

KEY_FILE = "audit-signing.key"
FORMAT = "lossd-checkpoint-v1"


class SigningKeyError(AuditStoreError):
    """The signing key cannot be read or created; the message names the file."""


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(public)).hexdigest()[:16]


def raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """A PEM public key (what ``lossd audit public-key`` writes) or 32 raw bytes in base64."""
    data = Path(path).read_bytes()
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except ValueError as exc:
        raise ValueError(f"{path}: not an Ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    records: int
    head_sha256: str
    time_unix_ns: int
    key_id: str
    signature: bytes = b""

    def message(self) -> bytes:
        fields = (FORMAT, self.run_id, self.records, self.head_sha256, self.time_unix_ns)
        return "\0".join(str(f) for f in (*fields, self.key_id)).encode()

    def verifies(self, public: Ed25519PublicKey) -> bool:
        """True when signed by ``public`` (and the key id names that key)."""
        if self.key_id != key_id(public):
            return False
        try:
            public.verify(self.signature, self.message())
        except InvalidSignature:
            return False
        return True

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "run_id": self.run_id,
                "records": self.records,
                "head_sha256": self.head_sha256,
                "time_unix_ns": self.time_unix_ns,
                "key_id": self.key_id,
                "signature": base64.b64encode(self.signature).decode(),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "checkpoint") -> Checkpoint:
        try:
            obj: Any = json.loads(text)
            if obj.get("format") != FORMAT:
                raise ValueError(f"format is {obj.get('format')!r}, expected {FORMAT!r}")
            return cls(
                run_id=str(obj["run_id"]),
                records=int(obj["records"]),
                head_sha256=str(obj["head_sha256"]),
                time_unix_ns=int(obj["time_unix_ns"]),
                key_id=str(obj["key_id"]),
                signature=base64.b64decode(obj["signature"], validate=True),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{source}: not a lossd checkpoint ({exc})") from None


def checkpoint_message(cp: Checkpoint) -> pb.AuditCheckpoint:
    """The wire form (``AuditCheckpoint`` has the dataclass's fields, by name)."""
    return pb.AuditCheckpoint(**{f.name: getattr(cp, f.name) for f in fields(Checkpoint)})


def checkpoint_of(message: pb.AuditCheckpoint) -> Checkpoint:
    return Checkpoint(**{f.name: getattr(message, f.name) for f in fields(Checkpoint)})


class Signer:
    """The server's signing key."""

    def __init__(self, private: Ed25519PrivateKey, path: str = "") -> None:
        self._private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)
        self.path = path

    @classmethod
    def generate(cls) -> Signer:
        """A key held in memory only (a recorder built without one, in tests)."""
        return cls(Ed25519PrivateKey.generate())

    def secret(self) -> bytes:
        """The raw private key, to derive other secrets from (the capture sample's)."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @classmethod
    def load_or_create(cls, path: str | Path) -> Signer:
        path = Path(path).expanduser()
        try:
            if not path.exists():
                _create(path)
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise SigningKeyError(
                f"audit signing key {path} cannot be read or created ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningKeyError(
                f"audit signing key {path} is not an Ed25519 key ({type(private).__name__})"
            )
        return cls(private, str(path))

    def sign(self, run_id: str, records: int, head_sha256: str, time_unix_ns: int) -> Checkpoint:
        unsigned = Checkpoint(run_id, records, head_sha256, time_unix_ns, self.key_id)
        return Checkpoint(
            run_id,
            records,
            head_sha256,
            time_unix_ns,
            self.key_id,
            self._private.sign(unsigned.message()),
        )

    def describe(self) -> str:
        """The start-up line: key id, file, and the public key (raw, base64)."""
        public = base64.b64encode(raw_public(self.public)).decode()
        return f"audit signing key {self.key_id} ({self.path}): public key ed25519 {public}"


def sign_and_store(
    store: Store, signer: Signer, run_id: str, records: int, head: str
) -> Checkpoint:
    """Sign (run, records, head) now and store the checkpoint; returns it."""
    cp = signer.sign(run_id, records, head, time.time_ns())
    store.add_checkpoint(
        StoredCheckpoint(
            run_id,
            records,
            head,
            cp.time_unix_ns,
            cp.key_id,
            base64.b64encode(cp.signature).decode(),
        )
    )
    return cp


def _create(path: Path) -> None:
    """Write a new key with mode 0600; a key another process created meanwhile wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".audit-key-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process's key won the race
            os.link(tmp, path)  # atomic, and fails if the key exists
    finally:
        os.unlink(tmp)
