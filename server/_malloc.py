"""Giving freed memory back to the operating system (glibc), without taxing the hot path.

glibc keeps freed buffers for reuse. Its mmap threshold is dynamic: each freed mmapped block raises
it to that block's size (up to 32 MiB), so after one 16 MiB request every later buffer below 16 MiB
comes from the per-thread arenas, which keep freed memory mapped. Reusing it is what makes
back-to-back large calls fast, but a server whose handler threads took requests of many sizes then
holds hundreds of MiB while idle (bench/RESULTS.md, "Server memory"). Two remedies, both measured:

- ``IdleTrimmer`` (``--trim-memory-idle-s``, on by default): once the server has computed nothing
  for that long after large traffic, ``malloc_trim(0)`` returns every free page. Busy servers keep
  their fast reuse; idle ones shrink back.
- ``set_mmap_threshold`` (``--malloc-mmap-threshold-kb``, off by default): a fixed threshold keeps
  large buffers out of the arenas altogether, which also bounds the peak under mixed load, at the
  price of fresh page faults on every large buffer (16 MB calls measured 40-60 % slower).

Above the dynamic threshold's 32 MiB ceiling glibc maps every buffer afresh and unmaps it when
freed, so each evaluation of a large call faults all its buffers in again: half of a 64 MB
cross_entropy forward + backward on one thread (130-170 ms, 58-70 ms with the pages reused).
``reuse_large_buffers`` (``--malloc-reuse-large``, on by default) extends the arenas' reuse to
them, up to the 64 MiB a thread's arena holds; the idle trim gives them back as it does the
smaller ones.

Larger buffers still fault in 4 KiB at a time. ``request_huge_pages`` (``--malloc-huge-pages``, on
by default) has torch back every buffer of 2 MiB and more with transparent huge pages, one fault
per 2 MiB. With ``M_MMAP_MAX`` 0 as the server sets it, on a thread of its own: a 256 MB
cross_entropy forward + backward took 224-247 ms instead of 371-391 (without huge pages three calls
in ten took 600-1,629 ms), a 64 MB one 58-60 ms instead of 66-222 (kernel THP mode madvise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import MAX_THRESHOLD_KB, SettingError

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # <malloc.h>
M_MMAP_MAX = -4
# Read once by torch's CPU allocator (c10 alloc_cpu): a buffer of 2 MiB or more is then
# madvise(MADV_HUGEPAGE)d, so the kernel backs it with 2 MiB pages where it can.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
HUGE_PAGE = 2 << 20
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _libc_function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """A glibc allocator function, or None where the C library has none (musl, macOS)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def _mallopt(option: int, value: int, flag: str) -> bool:
    """glibc's ``mallopt(option, value)``, process-wide; False where it failed or the C library
    is not glibc (``flag``, the setting that asked, then has no effect)."""
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        log.info("not glibc: %s has no effect", flag)
        return False
    return mallopt(option, value) == 1


def set_mmap_threshold(kib: int) -> bool:
    """Fix glibc's mmap threshold at ``kib`` KiB (process-wide); 0 leaves glibc's dynamic default.

    Returns whether the threshold was set: False for 0 and where the C library is not glibc.
    """
    if not 0 <= kib <= MAX_THRESHOLD_KB:
        raise SettingError(
            f"--malloc-mmap-threshold-kb: expected 0..{MAX_THRESHOLD_KB} (KiB), got {kib}"
        )
    return kib != 0 and _mallopt(M_MMAP_THRESHOLD, kib << 10, "--malloc-mmap-threshold-kb")


def reuse_large_buffers() -> bool:
    """Serve buffers above the dynamic threshold's 32 MiB ceiling from glibc's arenas too
    (``M_MMAP_MAX`` 0, process-wide).

    Returns whether it took effect: False where the C library is not glibc. A thread's arena
    holds at most 64 MiB, and glibc maps a larger buffer for it whatever ``M_MMAP_MAX`` says, so
    the reuse covers buffers up to 64 MiB (a 64 MB call's). One arena and no top trim, which
    would cover larger ones, measured worse in the bench (bench/RESULTS.md, "Co-located").
    """
    return _mallopt(M_MMAP_MAX, 0, "--malloc-reuse-large")


def request_huge_pages() -> bool:
    """Ask torch's CPU allocator for transparent huge pages (``HUGE_PAGES_ENV``); it must run
    before torch is imported, as ``lossd serve`` does. Returns whether the variable was set here:
    False once torch is loaded (too late to take effect) or where the caller set it already, to
    any value (theirs stands)."""
    if "torch" in sys.modules or HUGE_PAGES_ENV in os.environ:
        return False
    os.environ[HUGE_PAGES_ENV] = "1"
    return True


def thp_mode() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``); "" where
    it has none."""
    try:
        with open(THP_MODE, encoding="ascii") as f:
            return f.read().partition("[")[2].partition("]")[0]
    except OSError:
        return ""


def huge_pages_in_use() -> bool:
    """Whether this process's large torch buffers get huge pages: the kernel allows them
    (``thp_mode``) and the mapping a 4 MiB torch buffer lies in is marked MADV_HUGEPAGE (``hg``
    in its smaps VmFlags), which torch's allocator does only with ``HUGE_PAGES_ENV``. Reads
    /proc/self/smaps once: ~2.5 ms at start-up with torch loaded."""
    if thp_mode() not in ("always", "madvise"):
        return False
    try:
        import torch

        probe = torch.empty(2 * HUGE_PAGE, dtype=torch.uint8)
        address, inside = probe.data_ptr(), False
        with open("/proc/self/smaps", encoding="ascii") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    start, end = (int(x, 16) for x in head.split("-"))
                    inside = start <= address < end
                elif inside and head == "VmFlags:":
                    return "hg" in line.split()[1:]
    except OSError:  # no /proc
        return False
    return False


class IdleTrimmer:
    """``after_compute`` hook and a thread: ``malloc_trim(0)`` once no evaluation has finished for
    ``idle_s`` seconds after at least ``min_bytes`` of requests since the last trim.

    A trim may fall inside a long evaluation (nothing finishes meanwhile). That is safe:
    ``malloc_trim`` is thread-safe and releases only pages no live buffer holds.
    """

    def __init__(
        self, idle_s: float, min_bytes: int = 64 << 20, trim: Callable[[int], int] | None = None
    ) -> None:
        if idle_s < 0:
            raise SettingError(f"--trim-memory-idle-s: expected >= 0 (0 never trims), got {idle_s}")
        self.idle_s = idle_s
        self.min_bytes = min_bytes
        self._trim = trim if trim is not None else _libc_function("malloc_trim", [ctypes.c_size_t])
        self._lock = threading.Lock()
        self._pending_bytes = 0
        self._last_compute = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> IdleTrimmer:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lossd-memory-trim", daemon=True)
            self._thread.start()
        return self

    @property
    def enabled(self) -> bool:
        return self.idle_s > 0 and self._trim is not None

    def after_compute(self, event: Any) -> None:
        with self._lock:
            self._pending_bytes += event.request_bytes
            self._last_compute = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _due(self) -> float:
        """0 when a trim is due now, else seconds until it may be (or one idle period)."""
        with self._lock:
            if self._pending_bytes < self.min_bytes:
                return self.idle_s
            quiet = time.monotonic() - self._last_compute
            if quiet < self.idle_s:
                return self.idle_s - quiet
            self._pending_bytes = 0
            return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self._due()
            if wait > 0:
                self._stop.wait(wait)
                continue
            started = time.perf_counter()
            self._trim(0)
            log.debug(
                "returned freed memory to the OS in %.1f ms", (time.perf_counter() - started) * 1e3
            )
