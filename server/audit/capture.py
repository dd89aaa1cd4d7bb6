"""Input capture: each distinct input tensor stored once, by digest, zlib-compressed.

The request thread compresses (zlib releases the GIL, so handler threads compress in parallel);
the writer thread inserts. Past the size cap new tensors are recorded by digest only (the record
says which inputs were captured) and a counter says how many were skipped; nothing is evicted
to make room, since an audit trail that silently loses evidence is worse than one that stops
collecting it. Retention deletes tensors no audited call has used for N days.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict

import torch
from torch import Tensor

from lossd.client.wire.audit import digest_bytes
from lossd.client.wire.codec import tensor_bytes

from .records import Blob

CODEC = "zlib"
_LEVEL = 1  # float data barely compresses past level 1; speed matters more on the request path


def compress(tensor: Tensor) -> Blob:
    raw = tensor_bytes(tensor)
    return Blob(digest="", codec=CODEC, raw_bytes=raw.nbytes, data=zlib.compress(raw, _LEVEL))


def restore(data: bytes, codec: str, dtype: str, shape: list[int]) -> tuple[Tensor, str]:
    """Decompress a stored tensor; returns it and the digest of what was actually stored (a
    description instead of a digest when the bytes cannot be decompressed: never a match)."""
    if codec != CODEC:
        return torch.empty(0), f"unknown codec {codec!r}"
    try:
        raw = zlib.decompress(data)
    except zlib.error as exc:  # altered or truncated bytes: a mismatch, reported as such
        return torch.empty(0), f"undecodable ({exc})"
    digest = digest_bytes(dtype, shape, raw)
    torch_type = getattr(torch, dtype)
    view = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.bool: torch.uint8}.get(
        torch_type, torch_type
    )
    itemsize = torch.empty((), dtype=view).element_size()
    numel = 1
    for s in shape:
        numel *= s
    if len(raw) != numel * itemsize:
        return torch.empty(0), digest  # the caller reports the digest mismatch
    flat = torch.frombuffer(bytearray(raw), dtype=view) if raw else torch.empty(0, dtype=view)
    return flat.view(torch_type).reshape(shape), digest


class Capture:
    """Decides, per input of an audited call, whether it gets stored; thread-safe."""

    def __init__(self, max_bytes: int, stored_bytes: int = 0, known_limit: int = 100_000) -> None:
        self.max_bytes = max_bytes
        self.stored_bytes = (
            stored_bytes  # compressed bytes in the store (approximate with replicas)
        )
        self.skipped = 0
        self._known: OrderedDict[str, None] = OrderedDict()  # digests known to be stored (LRU)
        self._known_limit = known_limit
        self._lock = threading.Lock()

    def __call__(self, digest: str, tensor: Tensor) -> tuple[bool, Blob | None]:
        with self._lock:
            if digest in self._known:
                self._known.move_to_end(digest)
                return True, None
        blob = compress(tensor)
        blob.digest = digest
        with self._lock:
            if digest in self._known:  # another thread stored it meanwhile
                return True, None
            if self.stored_bytes + len(blob.data) > self.max_bytes:
                self.skipped += 1
                return False, None
            self.stored_bytes += len(blob.data)
            self._remember(digest)
        return True, blob

    def _remember(self, digest: str) -> None:
        self._known[digest] = None
        if len(self._known) > self._known_limit:
            self._known.popitem(last=False)

    def forget(self, digests: list[str] | None = None, freed_bytes: int = 0) -> None:
        """After retention deleted blobs (or a failed write): they are no longer known."""
        with self._lock:
            if digests is None:
                self._known.clear()
            else:
                for d in digests:
                    self._known.pop(d, None)
            self.stored_bytes = max(0, self.stored_bytes - freed_bytes)
