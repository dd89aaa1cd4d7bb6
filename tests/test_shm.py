"""The co-located shared-memory path of ComputeChunked (issue 14 item 1; client/shm.py,
server/shm.py) where it is taken: the regions round-trip every dtype bit for bit, the server
gives back the input pages after the forward, lets go of the regions as soon as a call ends and
never unmaps them under a write, results and gradients equal the data frames', nothing is left
after SIGKILL of either side, audit digests and the memory budget apply as for data frames, and
the answer region is reused only while no gradient reads it, never by a forked child.

Who is offered shared memory, and the fallback when it is unavailable, declined or refused:
test_shm_access.py."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossdError, RemoteLoss
from lossd.client import shm as client_shm
from lossd.client.wire import framing
from lossd.server import shm as server_shm
from tests.support.serverproc import ServerProcess
from tests.support.shmkit import _framed, _server, _shm_calls
from tests.support.wirekit import ALL_DTYPES

pytestmark = pytest.mark.skipif(not client_shm.available(), reason="needs Linux memfds")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


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
