"""The bulk data plane of ``ComputeChunked`` over a plain TCP connection (client side; the
server's half, and the checks it makes, are in lossd/server/bulk.py).

gRPC Python materialises every data frame as a bytes object on each side, twice copied, and
hands each one between threads: the chunked frames move 0.5-1 GB/s on loopback. The kernel can
instead copy a tensor's memory straight into the peer's assembly buffer (``sendall`` of the
tensor's memory, ``recv_into`` the aligned buffer): 1.6-2.1 GB/s for a third of the CPU
(bench/RESULTS.md, "Cross-host bulk path").

A server started with ``--bulk-port`` names that port in the initial metadata of its
ComputeChunked answers. From then on a chunked call with data to send opens a connection to that
port, reads the server's id (16 hex digits, drawn at its start), writes a ticket it drew (32 hex
digits), and sends the usual header over gRPC with the metadata ``lossd-bulk: TICKET:SERVER_ID``
and no data frames (a call that reaches another server than its connection did, as behind a load
balancer, is refused at once and resent as data frames); its tensors' bytes go on the connection, in
the header's order, concatenated. The answer's header comes over gRPC, the answer's listed bytes
on the connection, the status over gRPC: ids, limits, authentication, errors and audit are the
chunked call's. Anything unusual (no port announced, TLS, a target that is not one host:port, a
refused connection, a server that declines) sends the data frames instead.
"""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Callable, Sequence

from torch import Tensor

METADATA_KEY = "lossd-bulk"
PORT_KEY = "lossd-bulk-port"  # initial metadata of a chunked answer: the server's bulk port
ACCEPTED_KEY = "lossd-bulk-accepted"  # initial metadata: the data came (and the answer's goes) here
TICKET_CHARS = 32
SERVER_ID_CHARS = 16
CONNECT_TIMEOUT_S = 5.0


def host_of(target: str) -> str | None:
    """The host of a plain ``host:port`` target (``[v6]:port`` too); None for anything else
    (unix:, dns:, several replicas), whose data connection could reach another server."""
    if "," in target or target.startswith(("unix:", "unix-abstract:", "dns:", "vsock:")):
        return None
    target = target.removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]")


class Plane:
    """What one transport knows of its server's bulk port; ``usable`` once it was announced."""

    def __init__(self, target: str, tls: bool) -> None:
        # With TLS the data would travel in the clear beside an encrypted call: never.
        self.host = None if tls else host_of(target)
        self.port: int | None = None

    @property
    def usable(self) -> bool:
        return self.host is not None and self.port is not None

    def learn(self, metadata: Sequence[tuple[str, str]] | None) -> None:
        for key, value in metadata or ():
            if key == PORT_KEY and value.isdigit() and 0 < int(value) < 65536:
                self.port = int(value)

    def off(self) -> None:
        """Never again: the server declined, or the port cannot be reached from here."""
        self.host = None

    def forget(self) -> None:
        """Until the server names its port again (its next chunked answer): it was restarting,
        or had too many connections waiting."""
        self.port = None

    def open(self, timeout: float | None) -> tuple[socket.socket, str]:
        """A data connection that has sent its ticket, and the call's ``lossd-bulk`` metadata
        value (the ticket and the id of the server the connection reached); raises OSError."""
        ticket = secrets.token_hex(TICKET_CHARS // 2)
        limit = CONNECT_TIMEOUT_S if timeout is None else min(timeout, CONNECT_TIMEOUT_S)
        sock = socket.create_connection((self.host, self.port), timeout=limit)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server_id = sock.recv(SERVER_ID_CHARS, socket.MSG_WAITALL)
            if len(server_id) != SERVER_ID_CHARS:  # closed at once: too many connections waiting
                raise ConnectionRefusedError("the bulk port closed the connection unanswered")
            sock.sendall(ticket.encode())
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return sock, f"{ticket}:{server_id.decode('ascii', 'replace')}"


def send_tensors(sock: socket.socket, tensors: Sequence[tuple[str, Tensor]]) -> int:
    """The bytes of ``tensors`` (flat CPU uint8), concatenated, straight from their memory;
    returns how many were sent (all of them: ``sendall`` raises OSError otherwise)."""
    sent = 0
    for _, flat in tensors:
        if flat.numel():
            sock.sendall(memoryview(flat.numpy()))
            sent += flat.numel()
    return sent


class Sender:
    """``send_tensors`` on a thread, so that the caller can read the answer (or its refusal)
    meanwhile; ``error`` is what stopped it, if anything, after which ``on_error()`` runs (the
    caller cancels its call rather than wait for an answer to bytes that will not come)."""

    def __init__(
        self,
        sock: socket.socket,
        tensors: Sequence[tuple[str, Tensor]],
        on_error: Callable[[], object] = lambda: None,
    ) -> None:
        self.error: OSError | None = None
        self._on_error = on_error
        self._thread = threading.Thread(
            target=self._run, args=(sock, tensors), name="lossd-bulk-send", daemon=True
        )
        self._thread.start()

    def _run(self, sock: socket.socket, tensors: Sequence[tuple[str, Tensor]]) -> None:
        try:
            send_tensors(sock, tensors)
        except OSError as exc:
            self.error = exc
            self._on_error()

    def join(self) -> None:
        self._thread.join()
