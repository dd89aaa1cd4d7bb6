"""The bulk data plane of ``ComputeChunked`` over a plain TCP connection (server side; the
protocol is described in lossd/client/bulk.py).

``--bulk-port`` opens a second TCP port that carries nothing but tensor bytes. The server greets
each connection with its id (16 hex digits drawn at start-up); the connection writes a ticket (32
hex digits) and then waits: it is a pipe for whichever ComputeChunked call
names that ticket in its ``lossd-bulk`` metadata. Everything else stays on gRPC: the call is
authenticated, admitted, refused over its limits and has its memory reserved before any byte is
read from the connection, its errors are its status, and the audit recorder sees the tensors
computed on (views of the one request buffer, as with data frames).

Bounds: at most ``MAX_PENDING`` connections wait for their call, each closed when no call claims
it within --stream-idle-timeout-s, or when its ticket does not come within
``GREETING_TIMEOUT_S``; a claimed connection's reads are bounded by --stream-idle-timeout-s and its
writes by --stream-send-timeout-s, like the data frames'. Plaintext only: a server with TLS
refuses --bulk-port (server/app.py), since the bytes would travel in the clear.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from lossd.client.bulk import (
    ACCEPTED_KEY,
    METADATA_KEY,
    PORT_KEY,
    SERVER_ID_CHARS,
    TICKET_CHARS,
    send_tensors,
)

from .errors import FailedPrecondition, InvalidArgument

__all__ = [
    "ACCEPTED_KEY",
    "METADATA_KEY",
    "MOVED_ATTRIBUTE",
    "PORT_KEY",
    "BulkListener",
    "moved",
    "send_tensors",
    "ticket_of",
]

log = logging.getLogger("lossd.bulk")

MAX_PENDING = 64
GREETING_TIMEOUT_S = 10.0
CLAIM_POLL_S = 0.25  # how often a call waiting for its connection checks that it is still wanted
_TICKET = re.compile(rb"[0-9a-f]{%d}" % TICKET_CHARS)
_METADATA = re.compile(f"([0-9a-f]{{{TICKET_CHARS}}}):([0-9a-f]{{{SERVER_ID_CHARS}}})")


MOVED_ATTRIBUTE = "lossd_bulk_moved"  # [received, sent] on the call's data connection


def moved(context: Any, received: int = 0, sent: int = 0) -> None:
    """Adds to the bytes ``context``'s call moved on its data connection, which the metrics
    interceptor counts with the bytes of its gRPC messages (``lossd_*_bytes_total``)."""
    counts = getattr(context, MOVED_ATTRIBUTE, None)
    if counts is None:
        counts = [0, 0]
        setattr(context, MOVED_ATTRIBUTE, counts)
    counts[0] += received
    counts[1] += sent


def ticket_of(context: Any) -> tuple[str, str] | None:
    """The call's (ticket, id of the server its connection reached), if it names one."""
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_KEY:
            match = _METADATA.fullmatch(value) if isinstance(value, str) else None
            if match is None:
                raise InvalidArgument(
                    f"expected TICKET:SERVER_ID ({TICKET_CHARS} and {SERVER_ID_CHARS} lowercase hex digits)",
                    field=METADATA_KEY,
                )
            return match.group(1), match.group(2)
    return None


class BulkListener:
    """The --bulk-port socket and the connections waiting for their call."""

    def __init__(self, host: str, port: int, idle_timeout_s: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=MAX_PENDING)
        self.port: int = self._sock.getsockname()[1]
        self.server_id = secrets.token_hex(SERVER_ID_CHARS // 2)
        self.idle_timeout_s = idle_timeout_s if idle_timeout_s > 0 else 30.0
        self._pending: dict[bytes, tuple[socket.socket, float]] = {}
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(MAX_PENDING)
        self._closed = False
        threading.Thread(target=self._accept, name="lossd-bulk", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                # Full: connections past their wait go first. Expiring only on a greeting
                # would let MAX_PENDING stale tickets lock the port out for good.
                with self._cond:
                    self._expire()
                if not self._slots.acquire(blocking=False):
                    conn.close()  # too many connections waiting for their call
                    continue
            threading.Thread(target=self._greet, args=(conn,), daemon=True).start()

    def _greet(self, conn: socket.socket) -> None:
        kept = False
        try:
            conn.settimeout(GREETING_TIMEOUT_S)
            conn.sendall(self.server_id.encode())
            ticket = conn.recv(TICKET_CHARS, socket.MSG_WAITALL)
            if _TICKET.fullmatch(ticket):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._cond:
                    self._expire()
                    if ticket not in self._pending and not self._closed:
                        self._pending[ticket] = (conn, time.monotonic())
                        self._cond.notify_all()
                        kept = True
        except OSError:
            pass
        finally:
            if not kept:
                conn.close()
                self._slots.release()

    def _expire(self) -> None:
        """Close the connections no call claimed in time (the lock held)."""
        now = time.monotonic()
        for ticket, (conn, since) in list(self._pending.items()):
            if now - since > self.idle_timeout_s:
                del self._pending[ticket]
                conn.close()
                self._slots.release()

    def claim(self, ticket: str, active: Callable[[], bool] = lambda: True) -> socket.socket:
        """The connection that sent ``ticket``, waiting for it up to --stream-idle-timeout-s, or
        until the call is no longer ``active`` (its caller gave up on the connection)."""
        key = ticket.encode()
        deadline = time.monotonic() + self.idle_timeout_s
        with self._cond:
            while key not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or not active():
                    raise FailedPrecondition(
                        "bulk: no data connection came with this call's ticket within "
                        f"{self.idle_timeout_s:g} s; send the data instead"
                    )
                self._cond.wait(min(left, CLAIM_POLL_S))
            conn, _ = self._pending.pop(key)
        self._slots.release()
        return conn

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for conn, _ in self._pending.values():
                conn.close()
            self._pending.clear()
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._sock.close()
