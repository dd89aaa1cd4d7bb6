"""``Assembler``: receives chunked tensor bytes into one preallocated buffer (both sides)."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .._proto import lossd_pb2 as pb
from .framing import ALIGN
from .limits import DecodeError, LimitError

# Buffers this large are mapped with transparent huge pages (madvise): receiving 64 MB into a
# fresh buffer took 40 ms with 4 KiB pages and 18 ms with 2 MiB ones (one page fault per 2 MiB).
HUGE_PAGES_MIN_BYTES = 4 << 20
_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def empty_bytes(size: int) -> Tensor:
    """An uninitialised flat uint8 buffer of ``size`` bytes, 64-byte aligned (page-aligned when
    large). A large one is a private anonymous mapping advised to use huge pages; the tensor
    holds the mapping, which is unmapped when the last view of it is freed."""
    if size < HUGE_PAGES_MIN_BYTES or not _HUGE_PAGES:
        return torch.empty(size, dtype=torch.uint8)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)


class Assembler:
    """Receives the bytes of the listed tensors into one preallocated buffer.

    Sizes are checked against ``max_bytes`` before anything is allocated; the bytes received
    must add up exactly. ``tensors()`` gives each tensor's bytes as a flat uint8 view (64-byte
    aligned, so any dtype can be viewed in place).
    """

    def __init__(
        self, listed: Sequence[pb.ChunkedTensor], max_bytes: int, field: str = "header.tensors"
    ) -> None:
        self.paths: list[str] = []
        self.sizes: list[int] = []
        self.offsets: list[int] = []
        end = 0
        total = 0
        seen: set[str] = set()
        for i, ref in enumerate(listed):
            if ref.size_bytes < 0:
                raise DecodeError(
                    f"{field}[{i}].size_bytes", f"expected a size >= 0, got {ref.size_bytes}"
                )
            if ref.path in seen:
                raise DecodeError(f"{field}[{i}].path", f"duplicate path {ref.path!r}")
            seen.add(ref.path)
            total += ref.size_bytes
            if total > max_bytes:
                raise LimitError(
                    field,
                    f"chunked tensors of more than {total} bytes exceed the limit of {max_bytes} bytes",
                    "--max-message-mb",
                )
            self.paths.append(ref.path)
            self.sizes.append(ref.size_bytes)
            self.offsets.append(end)
            end += -(-ref.size_bytes // ALIGN) * ALIGN
        self.total = total
        self.received = 0
        self.buffer = empty_bytes(end)
        self._array = self.buffer.numpy()
        self._index = 0  # tensor being filled
        self._filled = 0  # bytes of it received

    @property
    def complete(self) -> bool:
        return self.received == self.total

    def feed(self, chunk: memoryview | bytes) -> None:
        data = np.frombuffer(chunk, dtype=np.uint8)
        if self.received + len(data) > self.total:
            raise DecodeError("data", f"expected {self.total} bytes of tensor data, got more")
        pos = 0
        while pos < len(data):
            while self._filled == self.sizes[self._index]:
                self._index += 1
                self._filled = 0
            take = min(len(data) - pos, self.sizes[self._index] - self._filled)
            start = self.offsets[self._index] + self._filled
            self._array[start : start + take] = data[pos : pos + take]
            self._filled += take
            pos += take
        self.received += len(data)

    def read_from(self, read_into: Callable[[memoryview], int]) -> None:
        """Receive every listed tensor straight into its place in the buffer: ``read_into(view)``
        (``socket.recv_into``) fills a prefix of ``view`` and says how much; 0 is the end."""
        view = memoryview(self._array)
        for offset, size in zip(self.offsets, self.sizes):
            pos, end = offset, offset + size
            while pos < end:
                got = read_into(view[pos:end])
                if not got:
                    raise DecodeError(
                        "data",
                        f"the data connection ended after {self.received} of {self.total} bytes",
                    )
                pos += got
                self.received += got

    def tensors(self) -> dict[str, Tensor]:
        return {
            path: self.buffer[off : off + size]
            for path, off, size in zip(self.paths, self.offsets, self.sizes)
        }
