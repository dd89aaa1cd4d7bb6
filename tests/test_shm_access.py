"""Who gets the co-located shared-memory path of ComputeChunked (issue 14 item 1; client/shm.py,
server/shm.py), and what everyone else gets: it is offered to Unix and loopback targets only and
taken over loopback TCP by default, accepted only from a caller with the server's identity (not
one behind a port-forward, in another pid namespace or of another user), and otherwise declined
or unavailable with a fallback to the data frames that gives the same results; handles naming
anything but the caller's own sealed 0600 memfds are refused INVALID_ARGUMENT.

The path itself (regions, equality, what is left after a call or a SIGKILL): test_shm.py."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading

import grpc
import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossdError, RemoteLoss
from lossd.client import shm as client_shm
from lossd.client import transport as client_transport
from lossd.client.wire import framing
from lossd.server import shm as server_shm
from lossd.server.app import create_server
from lossd.server.config import ServerConfig
from lossd.server.errors import InvalidArgument
from tests.support.serverproc import ServerProcess
from tests.support.shmkit import _framed, _server, _shm_calls

pytestmark = pytest.mark.skipif(not client_shm.available(), reason="needs Linux memfds")


def test_a_server_with_shm_none_gets_the_data_frames(sock_dir):
    running = _server(sock_dir, shm="none")
    try:
        pred = torch.randn(1 << 20, requires_grad=True)
        with RemoteLoss("mse", endpoint=running.address, transport="chunked") as crit:
            assert crit.transport.shm
            loss = crit(pred, torch.zeros(1 << 20))
            assert not crit.transport.shm  # declined once: data frames from now on
            loss.backward()
        assert torch.allclose(loss, (pred.detach() ** 2).mean())
    finally:
        running.stop(0)


def test_without_memfds_the_client_sends_the_data(unix_server, monkeypatch):
    def unavailable(*_args, **_kwargs):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", unavailable)
    pred = torch.randn(1 << 20, requires_grad=True)
    with RemoteLoss("mse", endpoint=unix_server.address, transport="chunked") as crit:
        loss = crit(pred, torch.zeros(1 << 20))
        assert not crit.transport.shm
    assert torch.allclose(loss, (pred.detach() ** 2).mean())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loopback_tcp_uses_shared_memory_by_default_and_equals_the_data_frames(
    host, dtype, monkeypatch
):
    """Both sides' defaults (``lossd serve``, ``RemoteLoss``): a chunked call over loopback TCP
    goes through shared memory, bit for bit what the data frames give. ``::1`` because gRPC
    names that peer ``ipv6:%5B::1%5D:PORT`` (escaped)."""
    if host == "::1" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    seen = _shm_calls(monkeypatch)
    running = create_server(ServerConfig(host=host, port=0, device="cpu", audit="none"))
    endpoint = f"[{host}]:{running.port}" if ":" in host else f"{host}:{running.port}"
    try:
        torch.manual_seed(6)
        pred = torch.randn(512, 1024, dtype=dtype, requires_grad=True)  # 1-2 MiB: chunked, forced
        target = torch.randn(512, 1024, dtype=dtype)
        with RemoteLoss("mse", endpoint=endpoint, transport="chunked", timeout=60) as crit:
            assert crit.transport.shm  # offered by default
            loss = crit(pred, target)
            (grad,) = torch.autograd.grad(loss, pred)
            assert crit.transport.shm  # and accepted
        assert seen == ["out"]
        framed, framed_grad = _framed(endpoint, pred, target)
        assert seen == ["out"]
    finally:
        running.stop(0)
    assert loss.dtype == dtype and torch.equal(loss.detach(), framed.detach())
    assert torch.equal(grad, framed_grad)


def test_large_calls_with_every_client_default_use_shared_memory_over_loopback(monkeypatch):
    seen = _shm_calls(monkeypatch)
    running = create_server(ServerConfig(port=0, device="cpu", audit="none"))
    try:
        torch.manual_seed(7)
        logits = torch.randn(2048, 1000, requires_grad=True)  # 8 MB: auto picks the chunked path
        target = torch.randint(0, 1000, (2048,))
        with RemoteLoss("cross_entropy", endpoint=f"localhost:{running.port}") as crit:
            remote = crit(logits, target)
            (remote_grad,) = torch.autograd.grad(remote, logits)
    finally:
        running.stop(0)
    assert seen == ["out"]
    local = F.cross_entropy(logits, target)
    (local_grad,) = torch.autograd.grad(local, logits)
    assert torch.allclose(remote, local, rtol=1e-6) and torch.allclose(remote_grad, local_grad)


@pytest.mark.parametrize(
    ("target", "offered"),
    [
        ("unix:/run/lossd.sock", True),
        ("127.0.0.1:50051", True),
        ("127.0.0.2:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("ipv4:127.0.0.1:50051,127.0.0.1:50052", True),  # replicas, all on this host
        ("10.0.0.2:50051", False),
        ("lossd.example:50051", False),
        ("ipv4:127.0.0.1:1,10.0.0.2:1", False),  # one replica elsewhere
        ("dns:///localhost:50051", False),  # resolved by gRPC: no telling here
        ("unix-abstract:lossd", False),  # lossd serve has no abstract sockets
    ],
)
def test_shared_memory_is_offered_to_unix_and_loopback_targets_only(target, offered):
    assert client_shm.local_target(target) is offered


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:40000", True),
        ("ipv4:127.9.8.7:40000", True),
        ("ipv6:%5B::1%5D:40000", True),  # as gRPC 1.6x+ writes it
        ("ipv6:[::1]:40000", True),
        ("ipv6:%5B::ffff:127.0.0.1%5D:40000", True),  # a dual-stack socket's IPv4 caller
        ("ipv4:10.0.0.2:40000", False),
        ("ipv6:%5B::2%5D:40000", False),
        ("ipv6:%5B::ffff:10.0.0.2%5D:40000", False),
        ("unix:/run/lossd.sock", False),  # (accepted by refusal() itself, in every mode but none)
        ("", False),
    ],
)
def test_the_server_recognises_loopback_peers(peer, loopback):
    assert server_shm.loopback_peer(peer) is loopback


def _context(peer: str, identity: str | None):
    metadata = () if identity is None else ((client_shm.IDENTITY_KEY, identity),)
    return type(
        "Ctx", (), {"peer": lambda self: peer, "invocation_metadata": lambda self: metadata}
    )()


def test_the_default_mode_accepts_loopback_only_from_a_caller_with_its_identity():
    mine, other = client_shm.identity(), "another-boot pid:[1] user:[1]"
    tcp, lan, sock = "ipv4:127.0.0.1:40000", "ipv4:10.0.0.2:40000", "unix:"
    assert ServerConfig().shm == "loopback"
    assert server_shm.refusal("loopback", _context(tcp, mine)) is None
    assert server_shm.refusal("loopback", _context(sock, mine)) is None
    assert "another host" in server_shm.refusal("loopback", _context(tcp, other))
    assert "another host" in server_shm.refusal("loopback", _context(tcp, None))
    assert "not accepted" in server_shm.refusal("loopback", _context(lan, mine))
    assert "(--shm unix)" in server_shm.refusal("unix", _context(tcp, mine))
    assert server_shm.refusal("unix", _context(sock, mine)) is None
    for peer in (tcp, sock):
        assert "(--shm none)" in server_shm.refusal("none", _context(peer, mine))


class _Forwarder:
    """A TCP forwarder on 127.0.0.1, as ``kubectl port-forward`` or ``ssh -L`` is: the server
    sees a loopback peer whatever host or container the caller is in."""

    def __init__(self, port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._to = port
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                caller, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self._to))
            for a, b in ((caller, server), (server, caller)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def test_a_caller_behind_a_loopback_forward_with_another_identity_gets_the_data_frames(
    monkeypatch,
):
    """A caller on another host (or in another container) reaching 127.0.0.1 through a
    port-forward or tunnel: its identity (boot id, pid and user namespace) is not the server's,
    so the server declines (FAILED_PRECONDITION "shared memory:") before opening anything, and
    the client resends the call, and its later calls, as data frames."""
    running = create_server(ServerConfig(port=0, device="cpu", audit="none"))
    forward = _Forwarder(running.port)
    declined: list[str] = []
    refusal = server_shm.refusal

    def recording(mode, context):
        why = refusal(mode, context)
        declined.append(why)
        return why

    monkeypatch.setattr(server_shm, "refusal", recording)
    opened = _shm_calls(monkeypatch)
    try:
        torch.manual_seed(8)
        pred = torch.randn(1 << 20, requires_grad=True)
        target = torch.randn(1 << 20)
        framed, framed_grad = _framed(f"127.0.0.1:{running.port}", pred, target)
        monkeypatch.setattr(client_shm, "identity", lambda: "another-boot pid:[1] user:[1]")
        endpoint = f"127.0.0.1:{forward.port}"
        with RemoteLoss("mse", endpoint=endpoint, transport="chunked", timeout=60) as crit:
            assert crit.transport.shm  # a loopback target: offered
            loss = crit(pred, target)
            (grad,) = torch.autograd.grad(loss, pred)
            assert not crit.transport.shm  # declined: data frames from now on
            crit(pred, target)
    finally:
        forward.close()
        running.stop(0)
    assert forward.connections >= 1  # the calls went through the forward
    assert len(declined) == 1 and declined[0].startswith("shared memory: the caller runs on")
    assert opened == []  # no region was read
    assert torch.equal(loss.detach(), framed.detach()) and torch.equal(grad, framed_grad)


def test_a_server_that_does_not_know_shared_memory_gets_the_data_frames(monkeypatch):
    """A lossd from before shared memory (or a proxy that drops the call's metadata) ignores the
    handle and waits for data frames; the stream it sees ends after the header (INVALID_ARGUMENT
    "the stream ended after 0 of N bytes"), and the client resends the call as data frames, as
    on a refusal: a new client on loopback keeps working with an older server."""
    monkeypatch.setattr(server_shm, "handle_of", lambda context: None)
    opened = _shm_calls(monkeypatch)
    running = create_server(ServerConfig(port=0, device="cpu", audit="none"))
    try:
        torch.manual_seed(10)
        pred = torch.randn(1 << 20, requires_grad=True)
        target = torch.randn(1 << 20)
        with RemoteLoss(
            "mse", endpoint=f"127.0.0.1:{running.port}", transport="chunked", retries=0
        ) as crit:
            assert crit.transport.shm
            loss = crit(pred, target)
            assert not crit.transport.shm
            (grad,) = torch.autograd.grad(loss, pred)
    finally:
        running.stop(0)
    assert opened == []
    assert torch.equal(loss.detach(), F.mse_loss(pred.detach(), target))
    assert torch.allclose(grad, 2 * (pred.detach() - target) / (1 << 20), rtol=1e-6, atol=0)


def test_shm_false_and_the_servers_unix_or_none_send_the_data_frames_over_loopback(monkeypatch):
    opened = _shm_calls(monkeypatch)
    torch.manual_seed(9)
    pred = torch.randn(1 << 20, requires_grad=True)
    target = torch.randn(1 << 20)
    expected = F.mse_loss(pred.detach(), target)
    made = []
    original = client_shm.Regions.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(client_shm.Regions, "__init__", counting)
    for mode in ("none", "unix"):  # offered, declined once, then data frames
        running = create_server(ServerConfig(port=0, device="cpu", audit="none", shm=mode))
        try:
            endpoint = f"127.0.0.1:{running.port}"
            with RemoteLoss("mse", endpoint=endpoint, transport="chunked") as crit:
                assert crit.transport.shm
                assert torch.equal(crit(pred, target), expected)
                assert not crit.transport.shm
                assert torch.equal(crit(pred, target), expected)
        finally:
            running.stop(0)
    assert len(made) == 2  # one offer per server, none after the refusal
    running = create_server(ServerConfig(port=0, device="cpu", audit="none"))
    try:
        endpoint = f"127.0.0.1:{running.port}"
        with RemoteLoss("mse", endpoint=endpoint, transport="chunked", shm=False) as crit:
            assert not crit.transport.shm
            assert torch.equal(crit(pred, target), expected)
        monkeypatch.setenv("LOSSD_SHM", "0")
        with RemoteLoss("mse", endpoint=endpoint, transport="chunked") as crit:
            assert not crit.transport.shm
            assert torch.equal(crit(pred, target), expected)
        monkeypatch.setenv("LOSSD_SHM", "loopback")  # the server's setting, in the same env
        with RemoteLoss("mse", endpoint=endpoint, transport="chunked") as crit:
            assert crit.transport.shm
    finally:
        running.stop(0)
    assert len(made) == 2 and opened == []  # shm=False and LOSSD_SHM=0 made no region


def _tampered(monkeypatch, change) -> None:
    original = client_transport.Transport._regions

    def regions(self, outboard):
        made = original(self, outboard)
        change(made)
        return made

    monkeypatch.setattr(client_transport.Transport, "_regions", regions)


def _refused(endpoint: str) -> LossdError:
    with (
        RemoteLoss("mse", endpoint=endpoint, transport="chunked", retries=0) as crit,
        pytest.raises(LossdError) as caught,
    ):
        crit(torch.randn(1 << 18), torch.zeros(1 << 18))
    return caught.value


def test_a_malformed_handle_is_invalid_argument(unix_server, monkeypatch):
    def change(r):
        r.handle = "/dev/shm/../../etc/shadow"

    _tampered(monkeypatch, change)
    error = _refused(unix_server.address)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "lossd-shm" in str(error)


def test_a_handle_naming_a_file_that_is_no_lossd_region_is_invalid_argument(
    unix_server, monkeypatch
):
    secret = os.open("/etc/hostname" if os.path.exists("/etc/hostname") else __file__, os.O_RDONLY)

    def change(r):
        pid, _, out_fd, token = r.handle.split(":")
        r.handle = f"{pid}:{secret}:{out_fd}:{token}"

    _tampered(monkeypatch, change)
    try:
        error = _refused(unix_server.address)
    finally:
        os.close(secret)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not name a lossd region" in str(error)


def test_a_wrong_token_is_invalid_argument(unix_server, monkeypatch):
    def change(r):
        r.handle = r.handle[:-32] + "0" * 32

    _tampered(monkeypatch, change)
    assert _refused(unix_server.address).code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_region_readable_by_others_or_unsealed_is_refused():
    flat = torch.zeros(4096, dtype=torch.uint8)
    refs = framing.refs([("args[0]", flat)])
    regions = client_shm.Regions([("args[0]", flat)], 4096)
    try:
        assert stat.S_IMODE(os.fstat(regions.in_fd).st_mode) == 0o600
        assert stat.S_IMODE(os.fstat(regions.out_fd).st_mode) == 0o600
        os.fchmod(regions.in_fd, 0o644)
        with pytest.raises(InvalidArgument, match="mode 0600"):
            server_shm.Regions(regions.handle, refs, 1 << 30, 1 << 30)
    finally:
        regions.close()
    # An unsealed region (its owner could change it under the server): refused.
    fd = os.memfd_create("lossd-" + "a" * 32 + "-in", os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 4096)
        with pytest.raises(InvalidArgument, match="not sealed"):
            server_shm.Regions(f"{os.getpid()}:{fd}:{fd}:{'a' * 32}", refs, 1 << 30, 1 << 30)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_open_a_region():
    flat = torch.zeros(4096, dtype=torch.uint8)
    regions = client_shm.Regions([("args[0]", flat)], 4096)
    try:
        # setpriv drops to the other user after exec: subprocess's own user= forks this
        # process, gRPC's threads and all, and CI once saw that child die of SIGBUS before exec.
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + ["cat", f"/proc/{os.getpid()}/fd/{regions.in_fd}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        regions.close()
    assert out.returncode != 0 and "Permission denied" in out.stderr, out.stderr


_NAMESPACED_CLIENT = textwrap.dedent(
    """
    import sys, torch
    from lossd.client import RemoteLoss
    pred = torch.arange(1 << 20, dtype=torch.float32).requires_grad_()
    with RemoteLoss("mse", endpoint=sys.argv[1], transport="chunked", timeout=60) as crit:
        offered = crit.transport.shm
        loss = crit(pred, torch.zeros(1 << 20))
        loss.backward()
        exact = torch.equal(pred.grad, 2 * pred.detach() / (1 << 20))
        print(offered, crit.transport.shm, exact, loss.item() == (pred.detach() ** 2).mean().item())
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a pid namespace (unshare)")
@pytest.mark.parametrize("over", ["unix", "loopback"])
def test_a_client_in_another_pid_namespace_is_declined_and_sends_the_data(sock_dir, over):
    """Its PID means nothing (or another process) here: the server must not look it up. Over
    loopback TCP this is a container with host networking, or a sidecar in the server's pod
    (one network namespace, not one pid namespace): declined by default too."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.skip("unshare --pid is not allowed here")
    listen = ("--port", "-1", "--unix", os.path.join(sock_dir, "s"))
    with ServerProcess(
        *(listen if over == "unix" else ("--port", "0")), "--audit", "none"
    ) as server:
        assert server.address.startswith("unix:" if over == "unix" else "127.0.0.1:")
        out = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"]
            + [_NAMESPACED_CLIENT, server.address],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=os.getcwd(),
        )
    assert out.returncode == 0, out.stderr[-2000:]
    # Offered, declined (FAILED_PRECONDITION "shared memory:"), then data frames: exact.
    assert out.stdout.split() == ["True", "False", "True", "True"], out.stdout


def test_an_identity_that_is_not_the_servers_is_declined(unix_server, monkeypatch):
    monkeypatch.setattr(client_shm, "identity", lambda: "another-boot pid:[1] user:[1]")
    pred = torch.randn(1 << 20, requires_grad=True)
    with RemoteLoss("mse", endpoint=unix_server.address, transport="chunked") as crit:
        assert crit.transport.shm
        loss = crit(pred, torch.zeros(1 << 20))
        assert not crit.transport.shm  # declined: data frames from now on
    assert torch.allclose(loss, (pred.detach() ** 2).mean())
    context = type(
        "Ctx", (), {"peer": lambda self: "unix:", "invocation_metadata": lambda self: ()}
    )
    assert "another host" in server_shm.refusal("unix", context())  # no identity: declined too


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a region to another user")
def test_a_region_of_another_user_is_declined_not_read():
    """A server run as root may open anyone's descriptors: it still reads only its own user's."""
    from lossd.server.errors import FailedPrecondition

    flat = torch.zeros(4096, dtype=torch.uint8)
    regions = client_shm.Regions([("args[0]", flat)], 4096)
    try:
        os.fchown(regions.in_fd, 65534, 65534)
        with pytest.raises(
            FailedPrecondition, match="^shared memory: region IN belongs to another"
        ):
            server_shm.Regions(regions.handle, framing.refs([("args[0]", flat)]), 1 << 30, 1 << 30)
    finally:
        regions.close()
