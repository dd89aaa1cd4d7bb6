"""Server-side progress timeouts for streams: one thread cancels a stream whose current wait (for
the header, for the next frame, for the caller to read the answer) ran past its time.

gRPC Python gives a handler no way to bound a blocking read of the next request message or a
blocking send of a response: the handler's thread waits as long as the caller likes. A stalled
or hostile caller would hold that thread, its admission slot and the memory reserved for its
request. ``Watch.waiting(seconds, what)`` around each such wait arms a timer; on expiry the
watchdog cancels the RPC (the caller sees CANCELLED, the server logs why), the blocked read or
send returns at once, and the handler's ``finally``/``with`` blocks release the slot and memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

log = logging.getLogger("lossd.watchdog")


class Watch:
    """The timer of one stream."""

    def __init__(self, dog: Watchdog, context: grpc.ServicerContext) -> None:
        self.dog = dog
        self.context = context
        self.deadline: float | None = None
        self.what = ""
        self.expired: str | None = None  # what the stream was waiting for when it was cancelled

    @contextmanager
    def waiting(self, seconds: float, what: str) -> Iterator[None]:
        if seconds <= 0:
            yield
            return
        self.dog._arm(self, time.monotonic() + seconds, what)
        try:
            yield
        finally:
            self.dog._disarm(self)


class Watchdog:
    """One thread for every stream of a server; started on first use."""

    def __init__(self) -> None:
        self._armed: dict[int, Watch] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.cancelled = 0

    def watch(self, context: grpc.ServicerContext) -> Watch:
        return Watch(self, context)

    def _arm(self, watch: Watch, deadline: float, what: str) -> None:
        with self._cond:
            watch.deadline, watch.what = deadline, what
            self._armed[id(watch)] = watch
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="lossd-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _disarm(self, watch: Watch) -> None:
        with self._cond:
            self._armed.pop(id(watch), None)
            watch.deadline = None

    def _run(self) -> None:
        while True:
            expired: list[Watch] = []
            with self._cond:
                now = time.monotonic()
                for key, watch in list(self._armed.items()):
                    if watch.deadline is not None and watch.deadline <= now:
                        del self._armed[key]
                        expired.append(watch)
                if not expired:
                    soonest = min((w.deadline for w in self._armed.values()), default=None)
                    self._cond.wait(None if soonest is None else max(soonest - now, 0.01))
                    continue
            for watch in expired:
                watch.expired = watch.what
                self.cancelled += 1
                log.warning("cancelling a stream from %s: %s", _peer(watch.context), watch.what)
                with contextlib.suppress(Exception):  # the call may have ended meanwhile
                    watch.context.cancel()


def _peer(context: Any) -> str:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001
        return "?"
