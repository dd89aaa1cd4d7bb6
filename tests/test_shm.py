"""The co-located shared-memory path of ComputeChunked (issue 14 item 1; client/shm.py,
server/shm.py): equality for every dtype, nothing left after SIGKILL of either side, fallback
when shared memory is unavailable or declined, and handles naming anything but the caller's own
sealed 0600 memfds refused INVALID_ARGUMENT."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

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
from tests.support.wirekit import ALL_DTYPES

pytestmark = pytest.mark.skipif(not client_shm.available(), reason="needs Linux memfds")


@pytest.fixture()
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="lossd-", dir="/tmp") as d:
        yield d


def _server(sock_dir: str, **settings):
    path = os.path.join(sock_dir, "lossd.sock")
    settings = {"audit": "none", **settings}
    return create_server(ServerConfig(port=-1, unix=path, device="cpu", **settings))


@pytest.fixture()
def unix_server(sock_dir):
    running = _server(sock_dir)
    yield running
    running.stop(0)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _shm_calls(monkeypatch) -> list[str]:
    """Records, per chunked call, whether its answer came back through OUT."""
    seen: list[str] = []
    original = client_shm.Regions.answer

    def answer(self, listed):
        seen.append("out")
        return original(self, listed)

    monkeypatch.setattr(client_shm.Regions, "answer", answer)
    return seen


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_regions_round_trip_every_dtype_bit_for_bit(dtype):
    torch.manual_seed(0)
    values = (torch.randn(3, 1000) * 50).to(dtype)
    small = torch.arange(5).to(dtype)  # not a multiple of the alignment
    tensors = [("args[0]", _flat(values)), ("args[1]", _flat(small))]
    refs = framing.refs(tensors)
    room = sum(-(-f.numel() // framing.ALIGN) * framing.ALIGN for _, f in tensors)
    regions = client_shm.Regions(tensors, room)
    try:
        served = server_shm.Regions(regions.handle, refs, 1 << 30, 1 << 30)
        got = served.inputs()
        for (path, flat), original in zip(tensors, (values, small)):
            assert torch.equal(got[path], flat)
            assert torch.equal(got[path].view(dtype).reshape(original.shape), original)
        assert served.write(tensors)  # the answer's tensors go into OUT...
        back = regions.answer(refs)  # ...and are read in place
        for path, flat in tensors:
            assert torch.equal(back[path], flat)
    finally:
        regions.close()


def _mapped_pages(tensor: torch.Tensor) -> list[bool]:
    """Whether each page under ``tensor`` is in this process's page table (/proc/self/pagemap)."""
    page = mmap.PAGESIZE
    first, count = tensor.data_ptr() // page, -(-tensor.numel() // page)
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), count * 8, first * 8)
    except OSError:
        pytest.skip("no /proc/self/pagemap here (the server then keeps its mapping of IN)")
    return [bool(entry >> 63) for entry in struct.unpack(f"{count}Q", raw)]


def test_after_the_forward_the_server_gives_back_the_input_pages_the_loss_did_not_write():
    """Between the loss and its gradients the server drops its mapping of IN's pages (its peak
    RSS): a backward that reads an input gets the same bytes again, and a page the loss wrote
    (a private copy) keeps what was written."""
    page = mmap.PAGESIZE
    values = _flat(torch.randn(16 * page // 4))
    tensors = [("args[0]", values)]
    regions = client_shm.Regions(tensors, 0)
    try:
        served = server_shm.Regions(regions.handle, framing.refs(tensors), 1 << 30, 1 << 30)
        got = served.inputs()["args[0]"]
        assert torch.equal(got, values)  # every page mapped now
        if not all(_mapped_pages(got)):
            pytest.skip("pagemap shows no present pages here (a sandboxed /proc)")
        got[3 * page] = values[3 * page] ^ 0xFF  # the loss writes into its input: a private copy
        served.forward_done()
        mapped = _mapped_pages(got)
        assert mapped[3] and sum(mapped) == 1  # only the written page is still mapped
        expected = values.clone()
        expected[3 * page] ^= 0xFF
        assert torch.equal(got, expected)  # the others read the region's bytes again
        served.close()
    finally:
        regions.close()


def test_a_call_that_ends_before_its_answer_lets_go_of_the_regions_at_once():
    """A cancelled or failed call closes its regions from gRPC's callback and its ExitStack,
    not when the garbage collector gets to a traceback cycle (CI once saw a killed client's
    OUT descriptor still held 10 s later)."""
    flat = _flat(torch.randn(4096))
    tensors = [("args[0]", flat)]
    regions = client_shm.Regions(tensors, flat.numel())
    try:
        held = _memfds()
        served = server_shm.Regions(regions.handle, framing.refs(tensors), 1 << 30, 1 << 30)
        assert _memfds() == held + 1  # Python's mmap of OUT keeps a dup of its descriptor
        view = served.inputs()["args[0]"]
        served.close()
        served.close()  # gRPC's callback and the ExitStack may both come
        assert _memfds() == held
        assert torch.equal(view, flat)  # a view still in use keeps its own mapping
        assert not served.write(tensors)  # nothing is written after the call ended
    finally:
        regions.close()


_CLOSE_DURING_WRITE = textwrap.dedent(
    """
    import threading, torch
    from lossd.client import shm as client_shm
    from lossd.client.wire import framing
    from lossd.server import shm as server_shm

    flat = torch.ones(16 << 20, dtype=torch.uint8)
    tensors = [("args[0]", flat)]
    for _ in range(8):
        regions = client_shm.Regions(tensors, flat.numel())
        served = server_shm.Regions(regions.handle, framing.refs(tensors), 1 << 30, 1 << 30)
        stop = threading.Event()

        def closer():
            while not stop.is_set():
                served.close()  # as gRPC's callback does when the caller goes mid-copy

        thread = threading.Thread(target=closer)
        thread.start()
        served.write(tensors)
        stop.set()
        thread.join()
        regions.close()
    print("served", flush=True)
    """
)


def test_closing_the_regions_from_another_thread_never_unmaps_them_under_a_write():
    """torch.frombuffer keeps no buffer export, so without one of its own a write() could have
    its mapping unmapped by close() on gRPC's thread mid-copy (a SIGSEGV, or a write into
    whatever was mapped there next); run apart, so that a crash fails only this test."""
    done = subprocess.run(
        [sys.executable, "-c", _CLOSE_DURING_WRITE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "served", done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_remote_loss_through_shared_memory_equals_the_data_frames(unix_server, dtype, monkeypatch):
    seen = _shm_calls(monkeypatch)
    torch.manual_seed(1)
    pred = torch.randn(512, 1024, dtype=dtype, requires_grad=True)  # 1-2 MiB: chunked, forced
    target = torch.randn(512, 1024, dtype=dtype)
    with RemoteLoss("mse", endpoint=unix_server.address, transport="chunked", timeout=60) as crit:
        assert crit.transport.shm
        loss = crit(pred, target)
        (grad,) = torch.autograd.grad(loss, pred)
    assert seen == ["out"]
    framed, framed_grad = _framed(unix_server.address, pred, target)
    assert seen == ["out"]  # the data frames' call made no region
    assert loss.dtype == dtype and torch.equal(loss.detach(), framed.detach())
    assert torch.equal(grad, framed_grad)


def _framed(endpoint: str, pred: torch.Tensor, target: torch.Tensor):
    """mse and its gradient over the data frames (``shm=False``) to ``endpoint``."""
    with RemoteLoss("mse", endpoint=endpoint, transport="chunked", shm=False, timeout=60) as crit:
        assert not crit.transport.shm
        framed = crit(pred, target)
        (framed_grad,) = torch.autograd.grad(framed, pred)
    return framed, framed_grad


def test_cross_entropy_with_int64_targets_through_shared_memory_equals_local(unix_server):
    torch.manual_seed(2)
    logits = torch.randn(2048, 1000, requires_grad=True)  # 8 MB: auto picks the chunked path
    target = torch.randint(0, 1000, (2048,))
    with RemoteLoss("cross_entropy", endpoint=unix_server.address, timeout=60) as crit:
        remote = crit(logits, target)
        (remote_grad,) = torch.autograd.grad(remote, logits)
    local = F.cross_entropy(logits, target)
    (local_grad,) = torch.autograd.grad(local, logits)
    assert torch.allclose(remote, local, rtol=1e-6) and torch.allclose(remote_grad, local_grad)


def _memfds(pid: int | str = "self") -> int:
    fds = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fds):
        with contextlib.suppress(OSError):
            count += os.readlink(f"{fds}/{name}").startswith("/memfd:lossd-")
    return count


def _dev_shm() -> set[str]:
    """lossd's entries in /dev/shm (other programs on the box come and go)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {name for name in os.listdir("/dev/shm") if "lossd" in name}


def test_no_region_outlives_a_call_or_appears_in_dev_shm(unix_server):
    # Earlier tests in this process may have left modules unclosed: their answer regions go
    # when the collector frees them, which must not happen in the middle of this count.
    gc.collect()
    held = _memfds()
    before = _dev_shm()
    pred = torch.randn(1 << 20, requires_grad=True)
    with RemoteLoss("mse", endpoint=unix_server.address, transport="chunked") as crit:
        for _ in range(3):
            crit(pred, torch.zeros(1 << 20)).backward()
    assert _memfds() == held  # neither side holds an fd after the call
    assert _dev_shm() == before


_CLIENT = textwrap.dedent(
    """
    import sys, torch
    from lossd.client import RemoteLoss
    pred = torch.randn(1 << 22, requires_grad=True)
    with RemoteLoss("mse", endpoint=sys.argv[1], transport="chunked", timeout=60) as crit:
        print("ready", flush=True)
        while True:
            crit(pred, torch.zeros(1 << 22)).backward()
            print("call", flush=True)
    """
)


def _calls_in(client: subprocess.Popen, calls: int = 3) -> None:
    """Until ``client`` has made ``calls`` calls (its next one starts at once), however slow."""
    assert client.stdout.readline().strip() == "ready"
    for _ in range(calls):
        assert client.stdout.readline().strip() == "call"


def test_sigkill_of_a_client_mid_calls_leaves_nothing_and_the_server_serves(sock_dir):
    before = _dev_shm()
    with ServerProcess(
        "--port", "-1", "--unix", os.path.join(sock_dir, "s"), "--audit", "none"
    ) as server:
        client = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, server.address], stdout=subprocess.PIPE, text=True
        )
        _calls_in(client)  # several calls in, the next one in flight
        client.send_signal(signal.SIGKILL)
        client.wait(30)
        time.sleep(0.5)
        assert _dev_shm() == before
        with RemoteLoss("mse", endpoint=server.address, transport="chunked") as crit:
            pred = torch.ones(1 << 20, requires_grad=True)
            crit(pred, torch.zeros(1 << 20)).backward()
            assert torch.equal(pred.grad, torch.full((1 << 20,), 2 / (1 << 20)))
        deadline = time.monotonic() + 60  # let go at the call's end, however late on a busy box
        while _memfds(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _memfds(server.proc.pid) == 0  # the killed client's regions were let go


def test_sigkill_of_the_server_mid_calls_leaves_nothing(sock_dir):
    before = _dev_shm()
    server = ServerProcess("--port", "-1", "--unix", os.path.join(sock_dir, "s"), "--audit", "none")
    server.start()
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, server.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _calls_in(client)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        # The client retries against nobody: it comes to hold at most the call's regions.
        deadline = time.monotonic() + 30
        while _memfds(client.pid) > 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dev_shm() == before
        assert _memfds(client.pid) <= 2
    finally:
        client.kill()
        client.wait(30)
    assert _dev_shm() == before


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


def test_audit_digests_and_the_memory_budget_apply_as_for_data_frames(sock_dir, monkeypatch):
    from lossd.client import AuditClient

    seen = _shm_calls(monkeypatch)
    running = _server(sock_dir, audit="all", data_dir=os.path.join(sock_dir, "data"))
    try:
        torch.manual_seed(3)
        pred = torch.randn(1 << 20, requires_grad=True)
        target = torch.randn(1 << 20)
        values = []
        for shm in (True, False):
            with RemoteLoss(
                "mse", endpoint=running.address, transport="chunked", run_id=f"r-{shm}", shm=shm
            ) as crit:
                values.append(crit(pred, target).item())
        assert seen == ["out"] and values[0] == values[1]
        with AuditClient(running.address) as audit:
            digests = [
                [(i.path, i.sha256) for i in record.inputs]
                for shm in (True, False)
                for record, _ in audit.raw_records(f"r-{shm}")
            ]
        assert len(digests) == 2 and digests[0] == digests[1] and digests[0][0][1]
    finally:
        running.stop(0)
    # The budget: a region's tensors reserve their bytes as data frames would.
    tight = _server(sock_dir, memory_budget_mb=2)
    try:
        with (
            RemoteLoss("mse", endpoint=tight.address, transport="chunked", retries=0) as crit,
            pytest.raises(LossdError) as caught,
        ):
            crit(torch.randn(1 << 20), torch.zeros(1 << 20))  # 8 MiB of inputs
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        tight.stop(0)


def test_the_answer_region_is_reused_only_once_no_gradient_reads_it(unix_server):
    """OUT is kept between calls (its pages stay allocated), but never rewritten while a tensor
    of its last answer lives: that gradient keeps its values through later calls."""
    made = []
    original = client_shm._Out.__init__

    def counting(self, *args):
        made.append(1)
        original(self, *args)

    torch.manual_seed(4)
    pred = torch.randn(1 << 19, requires_grad=True)
    with RemoteLoss("mse", endpoint=unix_server.address, transport="chunked") as crit:
        client_shm._Out.__init__ = counting
        try:
            for _ in range(3):  # the gradient freed before each next call: one region for all
                pred.grad = None
                crit(pred, torch.zeros(1 << 19)).backward()
            assert len(made) == 1
            kept = pred.grad  # alive through the next calls: the next one gets a new region
            expected = kept.clone()
            for target in (torch.ones(1 << 19), torch.full((1 << 19,), 3.0)):
                pred.grad = None
                crit(pred, target).backward()
                assert torch.equal(pred.grad, 2 * (pred.detach() - target) / (1 << 19))
            assert len(made) == 2 and torch.equal(kept, expected)  # the new one was reused
        finally:
            client_shm._Out.__init__ = original


def test_backward_of_a_scalar_is_exact_once_twice_and_scaled(unix_server):
    torch.manual_seed(5)
    logits = torch.randn(4096, 100, requires_grad=True)
    target = torch.randint(0, 100, (4096,))
    local = F.cross_entropy(logits, target)
    (expected,) = torch.autograd.grad(local, logits)
    with RemoteLoss("cross_entropy", endpoint=unix_server.address, transport="chunked") as crit:
        loss = crit(logits, target)
        (once,) = torch.autograd.grad(loss, logits, retain_graph=True)
        (again,) = torch.autograd.grad(loss, logits, retain_graph=True)  # asked of the server
        (scaled,) = torch.autograd.grad(loss, logits, grad_outputs=torch.tensor(0.75))
        twice = crit(logits, target)
        twice.backward(retain_graph=True)  # .grad keeps the handed-over gradient itself...
        twice.backward()  # ...and this one is added into it in place
    assert torch.equal(once, expected)  # grad_output 1: the server's gradient, bit for bit
    assert torch.equal(again, expected)
    assert torch.allclose(scaled, 0.75 * expected, rtol=1e-6, atol=0)
    assert torch.equal(logits.grad, expected + expected)


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


def test_a_forked_child_never_reuses_its_parents_answer_region(monkeypatch):
    pool = client_shm.Pool()
    flat = torch.zeros(4096, dtype=torch.uint8)
    refs = framing.refs([("args[0]", flat)])

    def call() -> int:
        """One answered call; the inode of the OUT region it used."""
        regions = client_shm.Regions([("args[0]", flat)], 4096, pool)
        try:
            regions.answer(refs)  # answered (no tensor of it kept): OUT goes back to the pool
            return os.fstat(regions.out_fd).st_ino
        finally:
            regions.close()

    try:
        first = call()
        assert call() == first  # the same process: reused
        monkeypatch.setattr(os, "getpid", lambda: -1)  # as in a child after fork()
        assert call() != first
    finally:
        pool.close()
