"""The co-located shared-memory path of ComputeChunked (issue 14 item 1; client/shm.py,
server/shm.py): equality for every dtype, nothing left after SIGKILL of either side, fallback
when shared memory is unavailable or declined, and handles naming anything but the caller's own
sealed 0600 memfds refused INVALID_ARGUMENT."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
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
    tcp = create_server(ServerConfig(port=0, device="cpu", audit="none"))
    try:
        with RemoteLoss("mse", endpoint=f"127.0.0.1:{tcp.port}", transport="chunked") as crit:
            assert not crit.transport.shm  # loopback TCP: not without shm=True
            framed = crit(pred, target)
            (framed_grad,) = torch.autograd.grad(framed, pred)
    finally:
        tcp.stop(0)
    assert loss.dtype == dtype and torch.equal(loss.detach(), framed.detach())
    assert torch.equal(grad, framed_grad)


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
    before = _dev_shm()
    pred = torch.randn(1 << 20, requires_grad=True)
    with RemoteLoss("mse", endpoint=unix_server.address, transport="chunked") as crit:
        for _ in range(3):
            crit(pred, torch.zeros(1 << 20)).backward()
    assert _memfds() == 0  # neither side holds an fd after the call
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
    """
)


def test_sigkill_of_a_client_mid_calls_leaves_nothing_and_the_server_serves(sock_dir):
    before = _dev_shm()
    with ServerProcess(
        "--port", "-1", "--unix", os.path.join(sock_dir, "s"), "--audit", "none"
    ) as server:
        client = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, server.address], stdout=subprocess.PIPE, text=True
        )
        assert client.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # several calls in, one likely in flight
        client.send_signal(signal.SIGKILL)
        client.wait(30)
        time.sleep(0.5)
        assert _dev_shm() == before
        with RemoteLoss("mse", endpoint=server.address, transport="chunked") as crit:
            pred = torch.ones(1 << 20, requires_grad=True)
            crit(pred, torch.zeros(1 << 20)).backward()
            assert torch.equal(pred.grad, torch.full((1 << 20,), 2 / (1 << 20)))
        deadline = time.monotonic() + 10
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
        assert client.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        time.sleep(1.0)  # the client retries against nobody: it holds at most the call's regions
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


def test_loopback_tcp_uses_shared_memory_only_when_both_sides_opt_in(monkeypatch):
    seen = _shm_calls(monkeypatch)
    running = create_server(ServerConfig(port=0, device="cpu", audit="none", shm="loopback"))
    try:
        pred = torch.randn(1 << 20, requires_grad=True)
        endpoint = f"127.0.0.1:{running.port}"
        with RemoteLoss("mse", endpoint=endpoint, transport="chunked", shm=True) as crit:
            crit(pred, torch.zeros(1 << 20)).backward()
        assert seen == ["out"]
    finally:
        running.stop(0)


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
        out = subprocess.run(
            ["cat", f"/proc/{os.getpid()}/fd/{regions.in_fd}"],
            capture_output=True,
            text=True,
            timeout=30,
            user=65534,
            group=65534,
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
def test_a_client_in_another_pid_namespace_is_declined_and_sends_the_data(sock_dir):
    """Its PID means nothing (or another process) here: the server must not look it up."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.skip("unshare --pid is not allowed here")
    with ServerProcess(
        "--port", "-1", "--unix", os.path.join(sock_dir, "s"), "--audit", "none"
    ) as server:
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
