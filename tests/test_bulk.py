"""The bulk data plane at bulk sizes: tensors of every dtype through the chunked framing and the
huge-page assembly buffer, large calls equal to local torch, and the buffer freed with its views."""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from lossd.client import LossdError, RemoteLoss, bulk
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.client.wire import codec, framing
from lossd.client.wire.assembler import HUGE_PAGES_MIN_BYTES, Assembler, empty_bytes
from lossd.client.wire.audit import tensor_digest
from lossd.server.app import _bulk_listener
from lossd.server.config import ServerConfig, SettingError
from tests.support.opskit import TOKENS, running
from tests.support.serverproc import ServerProcess, free_port
from tests.support.wirekit import ALL_DTYPES

LIMIT = 64 << 20


def _random(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs and infinities included for floats)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool()
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def test_every_dtype_round_trips_bitwise_through_frames_and_a_huge_page_buffer() -> None:
    originals = {
        f"args[{i}]": _random(dtype, (HUGE_PAGES_MIN_BYTES // 8) + 13 * i + 1, i).reshape(-1, 1)
        for i, dtype in enumerate(ALL_DTYPES)
    }
    outboard = codec.Outboard(0)
    messages = {
        path: codec.encode_tensor(t, outboard=outboard, path=path) for path, t in originals.items()
    }
    assert [path for path, _ in outboard.tensors] == list(originals)
    assembler = Assembler(framing.refs(outboard.tensors), max_bytes=LIMIT)
    assert assembler.buffer.numel() >= HUGE_PAGES_MIN_BYTES  # the mapped buffer, not torch.empty
    parse = framing.chunk_parser(pb.ComputeChunkedRequest.FromString)
    for frame in framing.iter_frames(outboard.tensors, framing.DEFAULT_CHUNK_BYTES):
        assembler.feed(parse(frame))
    assert assembler.complete
    received = assembler.tensors()
    del assembler
    gc.collect()  # the views keep the mapping alive on their own
    for path, original in originals.items():
        got = codec.decode_tensor(messages[path], path, data=received[path])
        assert got.dtype == original.dtype and got.shape == original.shape
        assert got.data_ptr() % framing.ALIGN == 0
        # Compared as bytes: NaN payloads and signed zeros must survive too.
        assert torch.equal(got.view(torch.uint8), original.view(torch.uint8)), path


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_large_buffer_is_given_back_when_its_last_view_goes() -> None:
    size = 64 << 20
    before = _rss_bytes()
    buffer = empty_bytes(size)
    view = buffer[size // 2 :]
    del buffer
    buffer_alive = _rss_bytes()
    view.fill_(7)  # writable, and touched: now resident
    assert _rss_bytes() - buffer_alive >= size // 2 - (4 << 20)
    assert int(view[-1]) == 7
    del view
    gc.collect()
    assert _rss_bytes() - before < 8 << 20  # unmapped, not kept in an arena


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_bulk_call_in_data_frames_equals_local_torch_bitwise(bulk_server, dtype) -> None:
    g = torch.Generator().manual_seed(21)
    n = (12 << 20) // (2 * torch.empty(0, dtype=dtype).element_size())  # 12 MB up, 6 MB back
    pred = torch.randn(n, generator=g).to(dtype)
    target = torch.randn(n, generator=g).to(dtype)
    local = pred.clone().requires_grad_()
    expected = torch.nn.functional.mse_loss(local, target)
    expected.backward()
    endpoint = f"127.0.0.1:{bulk_server.port}"
    with RemoteLoss(  # the data frames, at bulk sizes: no shared memory, no data connection
        "mse", endpoint=endpoint, transport="chunked", timeout=120, shm=False
    ) as module:
        module.transport.plane.off()
        leaf = pred.clone().requires_grad_()
        value = module(leaf, target)
        value.backward()
    assert value.dtype == dtype and torch.equal(value.detach(), expected.detach())
    assert leaf.grad.dtype == dtype and torch.equal(leaf.grad, local.grad)


# --------------------------------------------------------------------------------------------
# The bulk data connection (--bulk-port): client/bulk.py, server/bulk.py


def test_every_dtype_round_trips_bitwise_over_a_data_connection() -> None:
    originals = [_random(dtype, 5000 + 7 * i, 40 + i) for i, dtype in enumerate(ALL_DTYPES)]
    flats = [(f"t{i}", t.view(torch.uint8)) for i, t in enumerate(originals)]
    assembler = Assembler(framing.refs(flats), max_bytes=LIMIT)
    left, right = socket.socketpair()
    with left, right:
        sender = bulk.Sender(left, flats)
        assembler.read_from(right.recv_into)
        sender.join()
    assert sender.error is None and assembler.complete
    for (path, flat), original in zip(flats, originals):
        got = assembler.tensors()[path]
        assert (got.data_ptr() - assembler.buffer.data_ptr()) % framing.ALIGN == 0
        assert got.view(original.dtype).shape == original.shape
        assert torch.equal(got, flat), path  # as bytes: NaN payloads must survive too


def test_send_tensors_returns_the_bytes_it_sent_which_the_peer_receives() -> None:
    """The server counts what send_tensors returns (lossd_sent_bytes_total), not a re-sum."""
    flats = [("a", _random(torch.float64, 1000, 50).view(torch.uint8))]
    flats += [("empty", torch.empty(0, dtype=torch.uint8)), ("b", torch.arange(77).byte())]
    left, right = socket.socketpair()
    with left, right:
        sent = bulk.send_tensors(left, flats)
        left.shutdown(socket.SHUT_WR)
        got = b"".join(iter(lambda: right.recv(1 << 16), b""))
    assert sent == 8000 + 77 == len(got)
    assert got == b"".join(flat.numpy().tobytes() for _, flat in flats)


def test_a_data_connection_that_ends_early_is_a_decode_error_naming_the_bytes() -> None:
    flats = [("t", torch.zeros(1000, dtype=torch.uint8))]
    assembler = Assembler(framing.refs(flats), max_bytes=LIMIT)
    left, right = socket.socketpair()
    with right:
        left.sendall(b"x" * 600)
        left.close()
        with pytest.raises(codec.DecodeError, match="ended after 600 of 1000 bytes"):
            assembler.read_from(right.recv_into)


@pytest.mark.parametrize(
    ("target", "tls", "host"),
    [
        ("127.0.0.1:50051", False, "127.0.0.1"),
        ("[::1]:50051", False, "::1"),
        ("ipv4:10.0.0.2:7000", False, "10.0.0.2"),
        ("lossd.example:50051", True, None),  # TLS: never in the clear
        ("ipv4:10.0.0.1:1,10.0.0.2:1", False, None),  # replicas: the port could be another's
        ("unix:/tmp/lossd.sock", False, None),
        ("dns:///lossd:50051", False, None),
    ],
)
def test_the_data_plane_is_offered_only_to_one_plaintext_host(target, tls, host) -> None:
    plane = bulk.Plane(target, tls)
    assert plane.host == host
    plane.learn([(bulk.PORT_KEY, "6000")])
    assert plane.usable == (host is not None)


@pytest.fixture(scope="module")
def bulk_server():
    with running(bulk_port=0, stream_idle_timeout_s=2.0) as server:
        seen: list[dict[str, str]] = []
        server.servicer.after_compute.append(
            lambda event: seen.append(
                {f"args[{i}]": tensor_digest(a) for i, a in enumerate(event.call.args)}
            )
        )
        server.seen = seen
        yield server


@pytest.fixture(scope="module")
def patient_bulk_server():
    """A server that waits the default 30 s for a data connection: a call that falls back "at
    once" is then told from one that waited by a margin no loaded machine's slowness can close
    (with bulk_server's 2 s, a 32 MB call alone can take that long on two busy cores)."""
    with running(bulk_port=0, stream_idle_timeout_s=30.0) as server:
        yield server


def _claims(server, monkeypatch) -> list[str]:
    """The tickets the server's bulk listener is asked for from now on."""
    claimed: list[str] = []
    claim = server.bulk.claim

    def counting(ticket: str, *rest):
        claimed.append(ticket)
        return claim(ticket, *rest)

    monkeypatch.setattr(server.bulk, "claim", counting)
    return claimed


def _mse_inputs(n: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_after_the_first_call_the_bytes_go_on_the_data_connection_and_match_local(
    bulk_server, monkeypatch, dtype
) -> None:
    claimed = _claims(bulk_server, monkeypatch)
    pred, target = _mse_inputs(300_000, 3, dtype)
    local = pred.clone().requires_grad_()
    expected = torch.nn.functional.mse_loss(local, target)
    expected.backward()
    endpoint = f"127.0.0.1:{bulk_server.port}"
    # shm=False: this server is on this host, where shared memory would carry the call.
    with RemoteLoss("mse", endpoint=endpoint, transport="chunked", timeout=60, shm=False) as module:
        assert module.transport.plane.port is None
        for call in range(2):  # the first call's answer names the port; the second uses it
            leaf = pred.clone().requires_grad_()
            value = module(leaf, target)
            value.backward()
            assert torch.equal(value.detach(), expected.detach()) and value.dtype == dtype
            assert torch.equal(leaf.grad, local.grad), call
        assert module.transport.plane.port == bulk_server.bulk.port
    assert len(claimed) == 1
    # What the server computed on (and the audit recorder, a hook like this one, saw) is what
    # was sent: the same digests.
    assert bulk_server.seen[-1] == {
        "args[0]": tensor_digest(pred),
        "args[1]": tensor_digest(target),
    }


def _learned(server, **options) -> RemoteLoss:
    """A chunked RemoteLoss that knows the server's bulk port (and, the server being on this
    host, is told not to use shared memory, which would carry its calls instead)."""
    module = RemoteLoss(
        "mse",
        endpoint=f"127.0.0.1:{server.port}",
        transport="chunked",
        timeout=60,
        shm=False,
        **options,
    )
    module.transport.plane.learn([(bulk.PORT_KEY, str(server.bulk.port))])
    return module


def test_errors_and_limits_keep_their_codes_on_the_data_connection(bulk_server, monkeypatch):
    claimed = _claims(bulk_server, monkeypatch)
    with _learned(bulk_server) as module:
        pred, _ = _mse_inputs(300_000, 4)
        with pytest.raises(LossdError) as caught:  # a shape the loss refuses
            module(pred.requires_grad_(), torch.zeros(299_999))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        huge, target = _mse_inputs(bulk_server.config.max_message_bytes // 8 + 1, 5)
        with pytest.raises(LossdError) as caught:  # over --max-message-mb: refused unread
            module(huge, target)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-message-mb" in str(caught.value)
        value = module(*_mse_inputs(300_000, 6))  # and the next call is served
        assert value.numel() == 1
    assert len(claimed) == 1  # the call over the limit was refused before its data was read


def test_a_server_that_declines_or_cannot_be_reached_gets_data_frames(bulk_server, monkeypatch):
    pred, target = _mse_inputs(300_000, 7)
    expected = torch.nn.functional.mse_loss(pred, target)
    with _learned(bulk_server) as module:  # the server turned its bulk port off since
        monkeypatch.setattr(bulk_server.servicer, "bulk", None)
        assert torch.equal(module(pred, target), expected)
        assert not module.transport.plane.usable
    monkeypatch.undo()
    with _learned(bulk_server) as module:  # a port nothing listens on (a server restarting)
        module.transport.plane.learn([(bulk.PORT_KEY, str(free_port()))])
        assert torch.equal(module(pred, target), expected)
        # Sent as frames, whose answer named the real port: the next call uses it again.
        assert module.transport.plane.port == bulk_server.bulk.port


def _greeted(server) -> socket.socket:
    """A raw data connection that has read the server's greeting (its id)."""
    sock = socket.create_connection(("127.0.0.1", server.bulk.port), timeout=30)
    assert sock.recv(bulk.SERVER_ID_CHARS, socket.MSG_WAITALL) == server.bulk.server_id.encode()
    return sock


def test_a_ticket_without_its_connection_and_a_stalled_connection_end_the_call(bulk_server):
    stub_call = grpc.insecure_channel(f"127.0.0.1:{bulk_server.port}")
    header = pb.ComputeChunkedRequest(
        header=pb.ChunkedRequestHeader(
            request=pb.ComputeRequest(loss="mse"),
            tensors=[pb.ChunkedTensor(path="args[0]", size_bytes=4000)],
        )
    ).SerializeToString()
    method = stub_call.stream_stream(framing.METHOD_CHUNKED)
    ticket = "0123456789abcdef" * 2
    named = ((bulk.METADATA_KEY, f"{ticket}:{bulk_server.bulk.server_id}"),)
    with pytest.raises(grpc.RpcError) as caught:  # nobody connected with this ticket
        list(method(iter([header]), metadata=named, timeout=30))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith("bulk:")
    with pytest.raises(grpc.RpcError) as caught:  # not a ticket
        list(method(iter([header]), metadata=((bulk.METADATA_KEY, "../x"),), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:  # a connection to another server (a balancer)
        other = ((bulk.METADATA_KEY, f"{ticket}:{'0' * bulk.SERVER_ID_CHARS}"),)
        list(method(iter([header]), metadata=other, timeout=30))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another server" in caught.value.details()
    with _greeted(bulk_server) as sock:
        sock.sendall(ticket.encode() + b"x" * 100)  # 100 of the 4000 bytes, then nothing
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(method(iter([header]), metadata=named, timeout=30))
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        assert "after 100 of 4000 bytes" in caught.value.details()
        assert time.monotonic() - t0 < 15  # --stream-idle-timeout-s 2, not forever
    with _greeted(bulk_server) as sock:
        # All 4000 listed bytes come, but the request has no tensor at args[0] to own them.
        sock.sendall(ticket.encode() + b"x" * 4000)
        with pytest.raises(grpc.RpcError) as caught:
            list(method(iter([header]), metadata=named, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "args[0]" in caught.value.details()
    stub_call.close()
    assert torch.equal(  # still serving
        RemoteLoss("mse", endpoint=f"127.0.0.1:{bulk_server.port}")(*_mse_inputs(10, 8)),
        torch.nn.functional.mse_loss(*_mse_inputs(10, 8)),
    )


def test_unclaimed_and_garbage_connections_are_closed(bulk_server) -> None:
    with _greeted(bulk_server) as sock:
        sock.sendall(b"not a ticket at all, 32 bytes..")
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed by the server
    with _greeted(bulk_server) as sock:
        sock.sendall(b"f" * 32)  # a ticket no call names
        sock.settimeout(15)
        # Its wait is timed from when the server took the ticket in (a thread that may run late
        # on a busy machine), so the test waits for that, then past --stream-idle-timeout-s:
        # the next arrival expires it.
        deadline = time.monotonic() + 30
        while b"f" * 32 not in bulk_server.bulk._pending:
            assert time.monotonic() < deadline, "the server never took the ticket in"
            time.sleep(0.01)
        time.sleep(bulk_server.config.stream_idle_timeout_s + 0.5)
        with _greeted(bulk_server) as other:
            other.sendall(b"e" * 32)
            assert sock.recv(1) == b""


def test_stale_connections_filling_every_slot_do_not_lock_the_port_out(monkeypatch) -> None:
    monkeypatch.setattr("lossd.server.bulk.MAX_PENDING", 2)
    listener = _bulk_listener(ServerConfig(bulk_port=0, stream_idle_timeout_s=0.5), None)
    server = type("Server", (), {"bulk": listener})
    try:
        stale = [_greeted(server), _greeted(server)]
        for sock, ticket in zip(stale, (b"a", b"b")):
            sock.sendall(ticket * 32)  # tickets no call will ever name
        deadline = time.monotonic() + 30
        while len(listener._pending) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(listener._pending) == 2  # every slot held
        time.sleep(1.0)  # past their wait (0.5 s); no greeting came meanwhile to expire them
        with _greeted(server) as late:  # greeted, not closed on arrival
            late.sendall(b"c" * 32)
            for sock in stale:
                sock.settimeout(10)
                assert sock.recv(1) == b""  # the stale ones were closed to make room
        for sock in stale:
            sock.close()
    finally:
        listener.close()


def test_auth_applies_before_any_data_is_read(tmp_path, monkeypatch) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({TOKENS["compute"]: {"principal": "t", "roles": ["compute"]}}))
    tokens.chmod(0o600)
    with running(bulk_port=0, auth_tokens=str(tokens)) as server:
        claimed = _claims(server, monkeypatch)
        pred, target = _mse_inputs(300_000, 9)
        with _learned(server, retries=0) as module:  # no token
            with pytest.raises(LossdError) as caught:
                module(pred, target)
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert claimed == []
        with _learned(server, token=TOKENS["compute"]) as module:
            assert torch.equal(module(pred, target), torch.nn.functional.mse_loss(pred, target))
        assert len(claimed) == 1


def test_bulk_port_refuses_tls() -> None:
    config = ServerConfig(bulk_port=0)
    with pytest.raises(SettingError, match="--bulk-port carries tensors in the clear"):
        _bulk_listener(config, credentials=object())


def test_a_connection_the_server_closes_unread_falls_back_without_waiting(
    patient_bulk_server, monkeypatch
):
    full = threading.BoundedSemaphore(1)
    full.acquire()  # as if MAX_PENDING connections were waiting: new ones are closed on arrival
    monkeypatch.setattr(patient_bulk_server.bulk, "_slots", full)
    pred, target = _mse_inputs(4 << 20, 10)  # 32 MB: more than the socket buffers take unread
    with _learned(patient_bulk_server) as module:
        t0 = time.monotonic()
        assert torch.equal(module(pred, target), torch.nn.functional.mse_loss(pred, target))
        # Cancelled and resent as data frames at once, not after the server's wait for a
        # connection that will never come.
        assert time.monotonic() - t0 < patient_bulk_server.config.stream_idle_timeout_s
        assert module.transport.plane.usable  # transient: the frames' answer named it again


def test_the_memory_budget_is_reserved_before_any_byte_is_read(monkeypatch) -> None:
    with running(bulk_port=0, memory_budget_mb=16) as server:
        claimed = _claims(server, monkeypatch)
        with _learned(server, retries=0) as module:
            with pytest.raises(LossdError) as caught:  # 24 MB listed: can never fit in 16 MiB
                module(*_mse_inputs(3 << 20, 11))
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--memory-budget-mb" in str(caught.value)
            pred, target = _mse_inputs(100_000, 12)  # and one that fits is served
            assert torch.equal(module(pred, target), torch.nn.functional.mse_loss(pred, target))
        assert len(claimed) == 1


def test_lossd_serve_prints_the_bulk_port_and_serves_on_it(tmp_path) -> None:
    flags = ("--bulk-port", "0", "--audit", "none", "--data-dir", str(tmp_path))
    with ServerProcess(*flags, timeout=120) as server:
        deadline = time.monotonic() + 30
        while not any("bulk data port" in line for line in server.stdout_lines):
            assert time.monotonic() < deadline, server.stdout_lines
            time.sleep(0.05)
        line = next(line for line in server.stdout_lines if "bulk data port" in line)
        pred, target = _mse_inputs(300_000, 13)
        with RemoteLoss("mse", endpoint=server.address, transport="chunked", shm=False) as module:
            for _ in range(2):
                assert torch.equal(module(pred, target), torch.nn.functional.mse_loss(pred, target))
            assert module.transport.plane.port == int(line.split()[-1])


def test_replicas_behind_one_address_fall_back_at_once(patient_bulk_server) -> None:
    """The connection reached another server than the call (a load balancer picks per
    connection): that server's id does not match, the call is refused and resent as frames."""
    pred, target = _mse_inputs(300_000, 14)
    with running(bulk_port=0) as other, _learned(patient_bulk_server) as module:
        module.transport.plane.learn([(bulk.PORT_KEY, str(other.bulk.port))])
        t0 = time.monotonic()
        assert torch.equal(module(pred, target), torch.nn.functional.mse_loss(pred, target))
        assert time.monotonic() - t0 < patient_bulk_server.config.stream_idle_timeout_s
        assert not module.transport.plane.usable


def test_a_caller_killed_mid_upload_frees_its_memory_and_slot(bulk_server) -> None:
    """The caller goes away with 1 MB of its 8 MB sent (its connection and its call both end, as
    on SIGKILL): the server gives the reserved memory back and keeps serving."""
    budget = bulk_server.servicer.budget
    channel = grpc.insecure_channel(f"127.0.0.1:{bulk_server.port}")
    method = channel.stream_stream(framing.METHOD_CHUNKED)
    pred, target = _mse_inputs(1 << 20, 15)
    outboard = codec.Outboard(0)
    request = build_request("mse", {}, (pred, target), {}, [], outboard=outboard)
    header = pb.ComputeChunkedRequest(
        header=pb.ChunkedRequestHeader(request=request, tensors=framing.refs(outboard.tensors))
    ).SerializeToString()
    ticket = "a" * bulk.TICKET_CHARS
    sock = _greeted(bulk_server)
    sock.sendall(ticket.encode() + b"\0" * (1 << 20))
    named = ((bulk.METADATA_KEY, f"{ticket}:{bulk_server.bulk.server_id}"),)
    call = method(iter([header]), metadata=named, timeout=30)
    deadline = time.monotonic() + 20
    while budget.used < 8 << 20:  # the server reserved the listed bytes and is reading
        assert time.monotonic() < deadline, "the server never reserved the request"
        time.sleep(0.01)
    sock.close()
    call.cancel()
    channel.close()
    while budget.used:
        assert time.monotonic() < deadline, f"{budget.used} bytes still reserved"
        time.sleep(0.01)
    assert torch.equal(
        RemoteLoss("mse", endpoint=f"127.0.0.1:{bulk_server.port}")(pred, target),
        torch.nn.functional.mse_loss(pred, target),
    )
