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
import functools
import os
import secrets
import sys
import threading
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from ._channel import is_loopback_target
from ._proto import lossd_pb2 as pb
from .wire.framing import layout

METADATA_KEY = "lossd-shm"
IDENTITY_KEY = "lossd-shm-host"
ACCEPTED_KEY = "lossd-shm-accepted"
MODE = 0o600
_IN_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_OUT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create") and bool(identity())


@functools.cache
def identity() -> str:
    """This kernel and this process's pid and user namespaces (boot id, namespace inodes), sent
    with a handle: the server opens ``/proc/PID/fd/N`` only when its own are the same, so a PID
    from another host, container or pid namespace is declined (data frames), never misread.
    Empty where they cannot be read: no shared memory then."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        spaces = [os.readlink(f"/proc/self/ns/{ns}") for ns in ("pid", "user")]
    except OSError:
        return ""
    return " ".join([boot, *spaces])


def local_target(target: str) -> bool:
    """Whether calls to ``target`` offer shared memory: a ``unix:`` socket, or TCP to loopback
    addresses only. Loopback is no proof of one host (a port-forward, an SSH tunnel, a sidecar in
    another container): the server's identity check declines those, and the call sends data."""
    return not target.startswith("unix-abstract:") and is_loopback_target(target)


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, MODE)
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Out:
    """One OUT memfd and the storage its last answer was mapped into (weakly)."""

    def __init__(self, token: str, size: int) -> None:
        self.fd = _memfd(f"lossd-{token}-out", size)
        self.size = size
        self.mapped: StorageWeakRef | None = None
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _OUT_SEALS)
        except BaseException:
            self.close()
            raise

    def unreferenced(self) -> bool:
        return self.mapped is None or self.mapped.expired()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # a live answer keeps its mapping: the pages go when it does
        self.fd = -1


class Pool:
    """One transport's OUT regions, kept between its calls: their pages stay allocated, so the
    server's copy into OUT is a memcpy, not a page allocation and a fault per 4 KiB (bench/
    RESULTS.md, co-located, has the figures). A region is reused only once no tensor of its last
    answer is alive: copy-on-write keeps only the pages the client wrote, so a live view would
    see the next answer. IN is never reused: it is sealed against writes for good. ``token``
    names this process's regions; the server accepts a handle only with it."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self._idle: list[_Out] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def take(self, size: int) -> _Out:
        with self._lock:
            idle, self._idle = self._idle, []
            if self._pid != os.getpid():  # a forked child: the parent may reuse these; never share
                for out in idle:
                    out.close()  # this process's copies of the descriptors only
                self._pid, idle = os.getpid(), []
        found = None
        for out in idle:
            if found is None and out.size >= size and out.unreferenced():
                found = out
            else:
                out.close()  # too small, or still read by its answer's tensors
        return found if found is not None else _Out(self.token, size)

    def give(self, out: _Out) -> None:
        with self._lock:
            self._idle.append(out)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for out in idle:
            out.close()


class Regions:
    """IN filled with ``tensors`` (flat uint8, in the header's order) and sealed; OUT with room
    for ``answer_bytes``, from ``pool`` when given (a fresh region's pages cost nothing until the
    server writes them)."""

    def __init__(
        self, tensors: Sequence[tuple[str, Tensor]], answer_bytes: int, pool: Pool | None = None
    ) -> None:
        self._pool = pool
        token = pool.token if pool is not None else secrets.token_hex(16)
        offsets, size = layout([flat.numel() for _, flat in tensors])
        self.in_fd = _memfd(f"lossd-{token}-in", size)
        self._out: _Out | None = None
        self._answered = False
        try:
            for (_, flat), off in zip(tensors, offsets):
                view = memoryview(flat.numpy())
                while view:  # pwrite may write less than asked (2 GiB at most per call)
                    done = os.pwrite(self.in_fd, view, off)
                    view, off = view[done:], off + done
            fcntl.fcntl(self.in_fd, fcntl.F_ADD_SEALS, _IN_SEALS)
            self._out = pool.take(answer_bytes) if pool is not None else _Out(token, answer_bytes)
        except BaseException:
            self.close()
            raise
        self.out_fd = self._out.fd
        self.handle = f"{os.getpid()}:{self.in_fd}:{self.out_fd}:{token}"

    def answer(self, listed: Sequence[pb.ChunkedTensor]) -> dict[str, Tensor]:
        """The answer's tensors, as copy-on-write views of OUT (zero-copy reads)."""
        out = self._out
        offsets, size = layout([ref.size_bytes for ref in listed])
        if out is None or size > out.size or any(ref.size_bytes < 0 for ref in listed):
            raise ValueError(f"the answer lists {size} bytes, more than the OUT region holds")
        if not size:
            self._answered = True
            return {ref.path: torch.empty(0, dtype=torch.uint8) for ref in listed}
        # Copy-on-write, mapped by torch from our own descriptor: it keeps no fd open (Python's
        # mmap would hold one per answer for as long as its gradients live).
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{out.fd}", False, size)
        out.mapped = StorageWeakRef(storage)
        self._answered = True
        buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        return {ref.path: buffer[off : off + ref.size_bytes] for ref, off in zip(listed, offsets)}

    def close(self) -> None:
        """Let go of IN; OUT goes back to the pool once the server answered in it (it writes
        nothing after that; a call cut short might still be written to, so it is let go)."""
        if self.in_fd >= 0:
            os.close(self.in_fd)
        self.in_fd = -1
        out, self._out = self._out, None
        if out is not None and self._pool is not None and self._answered:
            self._pool.give(out)
        elif out is not None:
            out.close()
