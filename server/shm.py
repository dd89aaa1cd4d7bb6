"""The co-located shared-memory fast path of ``ComputeChunked`` (server side).

A client on this host may, instead of sending a chunked request's data frames, hand over two
memfds (anonymous shared memory: no name in /dev/shm, freed by the kernel once neither process
holds them, so a SIGKILL of either side leaves nothing behind). It sends the usual header and
the metadata ``lossd-shm: PID:IN_FD:OUT_FD:TOKEN``:

- IN holds the listed tensors' bytes in the Assembler's layout (64-byte aligned, in header
  order), sealed against writes, shrinking and growing, so what the server digests and audits
  is what it computes on. It is mapped copy-on-write: zero-copy reads, and a loss that writes to
  an input writes to a private page.
- OUT (sealed against shrinking and growing, so the server never faults on it) receives the
  response's large tensors, in the same layout, when they fit; the client reads them in place.

The server opens them as ``/proc/PID/fd/N``, which the kernel allows only to processes that may
trace the client (its own user, or root), only when the caller's ``lossd-shm-host`` (boot id,
pid and user namespace: lossd.client.shm.identity) is its own, so a PID from another host,
container or pid namespace is never looked up, and accepts them only if they are memfds named
``lossd-TOKEN-in``/``-out`` that its own user created, mode 0600, of the sizes the header implies
and at most ``--shm-max-mb``. A handle that is malformed or names anything else is
INVALID_ARGUMENT; one it cannot reach (another namespace or user, shared memory turned off, a
region over the bound) is FAILED_PRECONDITION, on which the client falls back to data frames.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import ipaddress
import mmap
import os
import re
import stat
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.shm import IDENTITY_KEY, identity
from lossd.client.wire.framing import layout

from ._malloc import _libc_function
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted

METADATA_KEY = "lossd-shm"
ACCEPTED_KEY = "lossd-shm-accepted"  # initial metadata: "in", or "in,out" when OUT holds the answer
MODES = ("unix", "loopback", "none")
_HANDLE = re.compile(r"([1-9]\d{0,9}):(\d{1,9}):(\d{1,9}):([0-9a-f]{32})")
_IN_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_OUT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
# A read populate of a shared shmem mapping maps its pages writable (shmem tracks no dirty
# pages), 16 per fault by fault-around: 64 MB of kept OUT pages took 1,025 faults, and the copy
# none, against 16,384 for MADV_POPULATE_WRITE.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14
_MADV_DONTNEED = 4
# /proc/self/pagemap, one 64-bit entry per page: present, and a file page (not a private copy).
_PRESENT_FILE = np.uint64((1 << 63) | (1 << 61))


def handle_of(context: Any) -> str | None:
    if context is None:
        return None
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_KEY:
            return value
    return None


def loopback_peer(peer: str) -> bool:
    """Whether a gRPC peer (``ipv4:127.0.0.1:PORT``, ``ipv6:%5B::1%5D:PORT``) is a loopback
    address of this network namespace."""
    scheme, _, address = urllib.parse.unquote(peer).partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return False
    try:
        ip = ipaddress.ip_address(address.rpartition(":")[0].strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, from a dual-stack socket
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def refusal(mode: str, context: Any) -> str | None:
    """Why a call on ``context``'s connection may not use shared memory under ``--shm mode``
    (None: it may). Every reason starts "shared memory:", on which the client sends the data.
    Neither a loopback peer nor the socket proves one host (``ssh -L`` forwards both, ``kubectl
    port-forward`` or a sidecar reaches 127.0.0.1 from another host or container): the caller's
    identity decides."""
    peer = context.peer() if context is not None else ""
    local = peer.startswith("unix:") or (mode == "loopback" and loopback_peer(peer))
    if mode == "none" or not local:
        return (
            f"shared memory: not accepted on this connection (--shm {mode}); send the data instead"
        )
    theirs = dict(context.invocation_metadata() or ()).get(IDENTITY_KEY)
    if not theirs or theirs != identity():
        return (
            "shared memory: the caller runs on another host or in another pid or user namespace "
            "(its regions cannot be opened from here); send the data instead"
        )
    return None


class Regions:
    """The caller's two regions, opened and checked; ``inputs`` are views of IN."""

    def __init__(
        self, handle: str, listed: Sequence[pb.ChunkedTensor], max_bytes: int, max_request: int
    ) -> None:
        seen: set[str] = set()
        for i, ref in enumerate(listed):
            if ref.size_bytes < 0 or ref.path in seen:
                raise InvalidArgument(
                    f"expected distinct paths and sizes >= 0, got {ref.path!r} of {ref.size_bytes}",
                    field=f"header.tensors[{i}]",
                )
            seen.add(ref.path)
        if sum(ref.size_bytes for ref in listed) > max_request:
            raise ResourceExhausted(
                f"chunked tensors of {sum(ref.size_bytes for ref in listed)} bytes exceed the limit of {max_request} bytes (--max-message-mb)"
            )
        match = _HANDLE.fullmatch(handle)
        if match is None:
            raise InvalidArgument(
                "expected PID:IN_FD:OUT_FD:TOKEN (32 hex digits)", field=METADATA_KEY
            )
        pid, in_fd, out_fd, token = match.groups()
        self.paths = [ref.path for ref in listed]
        self.offsets, size = layout([ref.size_bytes for ref in listed])
        self.sizes = [ref.size_bytes for ref in listed]
        self._in: Tensor | None = None
        self.out: mmap.mmap | None = None
        self.out_size = 0
        fd = _open(pid, in_fd, f"lossd-{token}-in", os.O_RDONLY)
        try:
            _check(fd, "IN", _IN_SEALS, max_bytes, exact=size)
            self._in = _private_map(fd, size) if size else None
        finally:
            os.close(fd)
        try:
            fd = _open(pid, out_fd, f"lossd-{token}-out", os.O_RDWR)
            try:
                self.out_size = _check(fd, "OUT", _OUT_SEALS, max_bytes)
                if self.out_size:
                    self.out = mmap.mmap(fd, self.out_size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        except BaseException:
            self.close()  # IN, already mapped, is not kept alive by this refusal's traceback
            raise

    def inputs(self) -> dict[str, Tensor]:
        if self._in is None:
            return {path: torch.empty(0, dtype=torch.uint8) for path in self.paths}
        buffer = self._in
        return {
            path: buffer[off : off + size]
            for path, off, size in zip(self.paths, self.offsets, self.sizes)
        }

    def forward_done(self) -> None:
        """Give back this process's mapping of the IN pages the loss did not write (Engine.evaluate
        calls it between the loss and its gradients): they stay the client's, in its sealed
        memfd, and a backward that reads an input faults the same bytes in again. The peak RSS of
        a 256 MB cross_entropy (its backward reads no input) fell from 4.00 to 3.01 x the request
        (bench/RESULTS.md, "Server memory"). Pages the loss wrote are private copies: kept."""
        buffer = self._in
        if buffer is not None:
            _drop_clean_pages(buffer.data_ptr(), buffer.numel())

    def write(self, tensors: Sequence[tuple[str, Tensor]]) -> bool:
        """Put the response's outboard tensors (flat uint8) into OUT; False when they don't fit
        (or when the call ended meanwhile and ``close`` let go of OUT)."""
        offsets, size = layout([flat.numel() for _, flat in tensors])
        region = self.out
        if region is None or size > self.out_size:
            return False
        try:
            # An export of the mapping for the whole copy, so that close() from gRPC's thread
            # (the caller gone) cannot unmap it under the copy: torch.frombuffer keeps no export.
            view = memoryview(region)
        except ValueError:  # closed by the call's end
            return False
        try:
            if size:  # map the pages in one call: a write fault per 4 KiB page costs ~2x the copy
                with contextlib.suppress(OSError):  # before Linux 5.14: fault them in as we go
                    region.madvise(_MADV_POPULATE_READ, 0, size)
            out = torch.frombuffer(view, dtype=torch.uint8)
            for (_, flat), off in zip(tensors, offsets):
                out[off : off + flat.numel()].copy_(flat)
            del out
        finally:
            view.release()
            self.close()  # the client reads it now; nothing of ours points into it
            region.close()  # if close() came from gRPC's thread meanwhile, it could not
        return True

    def close(self) -> None:
        """Let go of both regions now. Python's mmap of OUT holds a dup of its descriptor, so
        waiting for the garbage collector (a call that failed or was cancelled leaves its frame
        in a traceback cycle) would keep a killed caller's memory alive in this process."""
        self._in = None
        out, self.out = self.out, None
        if out is not None:
            with contextlib.suppress(BufferError):  # a view still writes: freed with that view
                out.close()


def _private_map(fd: int, size: int) -> Tensor:
    """A copy-on-write mapping of ``fd`` as a uint8 tensor. torch maps it by path and keeps no
    file descriptor (Python's mmap would hold a dup of it for as long as any view lives); the
    path is this process's own descriptor, already checked, so the caller cannot swap it."""
    storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", False, size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


@functools.cache
def _madvise() -> Any:
    return _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def _drop_clean_pages(address: int, size: int) -> None:
    """MADV_DONTNEED the pages of a private file mapping at ``address`` that still map the
    file's own pages, by runs; a page written through the mapping (a private copy, not a file
    page in pagemap) is left alone, and so is everything where pagemap cannot be read."""
    page = mmap.PAGESIZE
    first, count = address // page, -(-(address + size) // page) - address // page
    madvise = _madvise()
    if madvise is None or count <= 0:
        return
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), count * 8, first * 8)
    except OSError:
        return
    if len(raw) != count * 8:
        return
    clean = (np.frombuffer(raw, dtype=np.uint64) & _PRESENT_FILE) == _PRESENT_FILE
    edges = np.flatnonzero(np.diff(clean, prepend=False, append=False))
    for start, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
        if madvise((first + start) * page, (end - start) * page, _MADV_DONTNEED) != 0:
            return


def _open(pid: str, fd: str, name: str, flags: int) -> int:
    proc = f"/proc/{pid}/fd/{fd}"
    try:
        target = os.readlink(proc)
        opened = os.open(proc, flags | os.O_CLOEXEC)
    except OSError as exc:  # another pid namespace, the caller gone, not ours to trace
        raise FailedPrecondition(
            f"shared memory: cannot open the caller's region ({exc.strerror}); send the data instead"
        ) from None
    if target != f"/memfd:{name} (deleted)":
        os.close(opened)
        raise InvalidArgument(
            f"the handle does not name a lossd region ({name})", field=METADATA_KEY
        )
    return opened


def _check(fd: int, which: str, seals: int, max_bytes: int, exact: int | None = None) -> int:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():  # a server run as root, a caller of another user
        raise FailedPrecondition(
            f"shared memory: region {which} belongs to another user; send the data instead"
        )
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        raise InvalidArgument(
            f"region {which} must be a memfd of the server's user, mode 0600", field=METADATA_KEY
        )
    try:
        have = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        have = 0
    if have & seals != seals:
        raise InvalidArgument(f"region {which} is not sealed as required", field=METADATA_KEY)
    if st.st_size > max_bytes:
        raise FailedPrecondition(
            f"shared memory: region {which} of {st.st_size} bytes exceeds --shm-max-mb; send the data instead"
        )
    if exact is not None and st.st_size != exact:
        raise InvalidArgument(
            f"region {which} holds {st.st_size} bytes, the header lists {exact} (aligned)",
            field=METADATA_KEY,
        )
    return st.st_size
