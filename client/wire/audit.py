"""What both sides agree on about the audit trail: tensor digests and run-id and tag bounds.

``tensor_digest`` is the exact SHA-256 the server records for each input, so a caller can prove
which tensors it sent without storing them. The bounds are enforced by the server; the client
checks them too, so a bad tag fails when a module is built, not at its first step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from torch import Tensor

from .codec import tensor_bytes

MAX_RUN_ID_CHARS = 256
MAX_TAGS = 64
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 1024

_DIGEST_PREFIX = b"lossd-tensor-v1\0"


def tensor_digest(tensor: Tensor) -> str:
    """Hex SHA-256 of ``lossd-tensor-v1\\0 dtype \\0 shape \\0 bytes`` (little-endian, C order).

    ``dtype`` is torch's name without ``torch.`` (``float32``), ``shape`` the sizes joined by
    commas (empty for a 0-d tensor). The bytes are exactly what travels on the wire.
    """
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    host = host.contiguous().resolve_conj().resolve_neg()
    return digest_bytes(
        str(host.dtype).removeprefix("torch."), tuple(host.shape), tensor_bytes(host)
    )


def digest_bytes(dtype: str, shape: tuple[int, ...] | list[int], data: bytes | memoryview) -> str:
    h = hashlib.sha256(_DIGEST_PREFIX)
    h.update(dtype.encode() + b"\0" + ",".join(str(int(s)) for s in shape).encode() + b"\0")
    h.update(data)
    return h.hexdigest()


def check_audit_fields(run_id: str | None, tags: Mapping[str, str] | None) -> None:
    """Raise ValueError for a run id or tags the server would refuse."""
    if run_id is not None and not isinstance(run_id, str):
        raise ValueError(f"run_id must be a string, got {type(run_id).__name__}")
    if run_id is not None and len(run_id) > MAX_RUN_ID_CHARS:
        raise ValueError(
            f"run_id must have at most {MAX_RUN_ID_CHARS} characters, got {len(run_id)}"
        )
    if run_id and "\0" in run_id:
        raise ValueError("run_id must not contain NUL characters")
    tags = tags or {}
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags, got {len(tags)}")
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"tags must map strings to strings, got {key!r}: {value!r}")
        if not key or len(key) > MAX_TAG_KEY_CHARS or len(value) > MAX_TAG_VALUE_CHARS:
            raise ValueError(
                f"tag {key[:40]!r}: keys need 1..{MAX_TAG_KEY_CHARS} characters and values at most "
                f"{MAX_TAG_VALUE_CHARS}, got a key of {len(key)} and a value of {len(value)}"
            )
        if "\0" in key or "\0" in value:
            raise ValueError(f"tag {key[:40]!r}: keys and values must not contain NUL characters")
