"""The co-located shared-memory fast path of ``ComputeChunked`` (client side; the server's half,
and the checks it makes, are in lossd/server/shm.py).

For a chunked call to a server on this host, the inputs are written once into a sealed memfd
(IN) and the answer's large tensors come back in a second one (OUT), read in place: no data
frames either way. memfds have no name in /dev/shm and are freed by the kernel when neither
process holds them, so nothing is left behind if either side is killed. Anything unusual (no
memfds on this platform, a server that does not accept them) falls back to the data frames.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from ._proto import lossd_pb2 as pb
from .wire.framing import layout

METADATA_KEY = "lossd-shm"
ACCEPTED_KEY = "lossd-shm-accepted"
MODE = 0o600
_IN_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_OUT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


def local_target(target: str, opted_in: bool) -> bool:
    """Whether calls to ``target`` may offer shared memory: a ``unix:`` socket, or loopback TCP
    when the caller opted in (``shm=True``)."""
    if target.startswith("unix:"):
        return True
    if not opted_in:
        return False
    host = target.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, MODE)
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Regions:
    """IN filled with ``tensors`` (flat uint8, in the header's order) and sealed; OUT with room
    for ``answer_bytes`` (its pages cost nothing until the server writes them)."""

    def __init__(self, tensors: Sequence[tuple[str, Tensor]], answer_bytes: int) -> None:
        token = secrets.token_hex(16)
        offsets, size = layout([flat.numel() for _, flat in tensors])
        self.in_fd = _memfd(f"lossd-{token}-in", size)
        self.out_fd = -1
        try:
            for (_, flat), off in zip(tensors, offsets):
                view = memoryview(flat.numpy())
                while view:  # pwrite may write less than asked (2 GiB at most per call)
                    done = os.pwrite(self.in_fd, view, off)
                    view, off = view[done:], off + done
            fcntl.fcntl(self.in_fd, fcntl.F_ADD_SEALS, _IN_SEALS)
            self.out_size = answer_bytes
            self.out_fd = _memfd(f"lossd-{token}-out", answer_bytes)
            fcntl.fcntl(self.out_fd, fcntl.F_ADD_SEALS, _OUT_SEALS)
        except BaseException:
            self.close()
            raise
        self.handle = f"{os.getpid()}:{self.in_fd}:{self.out_fd}:{token}"

    def answer(self, listed: Sequence[pb.ChunkedTensor]) -> dict[str, Tensor]:
        """The answer's tensors, as copy-on-write views of OUT (zero-copy reads)."""
        offsets, size = layout([ref.size_bytes for ref in listed])
        if size > self.out_size or any(ref.size_bytes < 0 for ref in listed):
            raise ValueError(f"the answer lists {size} bytes, more than the {self.out_size} given")
        if not size:
            return {ref.path: torch.empty(0, dtype=torch.uint8) for ref in listed}
        # Copy-on-write, mapped by torch from our own descriptor: it keeps no fd open (Python's
        # mmap would hold one per answer for as long as its gradients live).
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{self.out_fd}", False, size)
        buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        return {ref.path: buffer[off : off + ref.size_bytes] for ref, off in zip(listed, offsets)}

    def close(self) -> None:
        for fd in (self.in_fd, self.out_fd):
            if fd >= 0:
                os.close(fd)
        self.in_fd = self.out_fd = -1
