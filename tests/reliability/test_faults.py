"""Faults: a server killed or restarted under a training loop, callers that hang up or run out of
time, SIGTERM with calls in flight, SIGKILL during audited writes, a full or read-only audit DB.

Each test states the behaviour documented in the README ("Failure behaviour") and fails if it
regresses. Servers are real ``lossd serve`` subprocesses where a signal or a restart is the
point, and in-process servers (with ``Engine.evaluate`` held at a gate, so nothing depends on
this machine's speed) where the point is what happens to one call.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import closing
from pathlib import Path

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError
from lossd.client._proto import lossd_pb2 as pb
from lossd.client._proto import lossd_pb2_grpc as pb_grpc
from lossd.client.functional import build_request
from lossd.client.transport import Transport
from tests.support.opskit import Gate, running, samples, value
from tests.support.serverproc import ServerProcess, free_port

pytestmark = pytest.mark.faults


# --------------------------------------------------------------------------------------------
# Helpers


def audited(run_id: str, step: int, n: int = 8) -> pb.ComputeRequest:
    """An MSE call that the default ``--audit runs`` records, with its own request id."""
    request = build_request("mse", {}, (torch.randn(n), torch.randn(n)), {}, ["args[0]"])
    request.request_id = uuid.uuid4().hex
    request.audit.run_id = run_id
    request.audit.step = step
    return request


def serve(data: Path, *flags: str, port: int | None = None) -> ServerProcess:
    return ServerProcess(
        "--audit", "runs", "--data-dir", str(data), "--log-level", "WARNING", *(("--port", str(port)) if port else ()), *flags
    )  # fmt: skip


def stored(db: Path, run_id: str | None = None) -> list[tuple[str, int]]:
    """(request_id, step) of the records in a SQLite audit trail, after an integrity check."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        where, args = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
        return conn.execute(
            f"SELECT request_id, step FROM audit_records {where} ORDER BY id", args
        ).fetchall()


def metric(server, name: str, **labels: str) -> float:
    return value(samples(server.metrics.exposition().decode()), name, **labels)


def drained(server) -> None:
    for _ in range(600):
        if metric(server, "lossd_inflight_requests") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("calls still in flight after 30 s")


def written(server) -> int:
    return server.audit.stats()["records_written"]


# --------------------------------------------------------------------------------------------
# a. restart under a training loop


@pytest.mark.parametrize("mode", ["unary", "chunked", "bulk"])
def test_server_killed_and_restarted_during_a_training_loop(tmp_path, mode):
    """SIGKILL mid-loop, a new server on the same port: every step completes within the
    client's deadline (every transport retries UNAVAILABLE with backoff, keeping the request
    id) and the audit trail holds each step exactly once. ``bulk``: chunked calls whose bytes
    go on the --bulk-port connection (server/bulk.py), before and after the restart."""
    port, steps = free_port(), 40
    flags = ("--bulk-port", str(free_port())) if mode == "bulk" else ()
    first = serve(tmp_path, *flags, port=port).start()
    second = None
    # shm=False: the server is on this host, where shared memory would carry the chunked calls.
    client = LossClient(f"127.0.0.1:{port}", timeout=90, retries=60, shm=False)
    transport = Transport(client, "chunked" if mode == "bulk" else mode)
    done: list[tuple[str, int, bool]] = []
    failures: list[BaseException] = []

    def send(step: int) -> tuple[pb.ComputeRequest, pb.ComputeResponse]:
        if mode == "unary":
            request = audited("train", step)
            return request, client.compute(request)
        tensors = (torch.randn(8), torch.randn(8))
        outboard = transport.outboard(list(zip(("args[0]", "args[1]"), tensors)))
        request = build_request("mse", {}, tensors, {}, ["args[0]"], outboard=outboard)
        request.audit.run_id, request.audit.step = "train", step
        return request, transport.send(request, outboard)[0]

    def training_loop() -> None:
        for step in range(1, steps + 1):
            try:
                request, response = send(step)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failures.append(exc)
                return
            done.append((request.request_id, step, response.audited))
            time.sleep(0.02)

    loop = threading.Thread(target=training_loop)
    try:
        loop.start()
        while len(done) < 10 and loop.is_alive():
            time.sleep(0.01)
        first.proc.kill()  # no drain, no flush: the worst case
        first.proc.wait(30)
        killed_at = len(done)
        second = serve(tmp_path, *flags, port=port).start()
        loop.join(120)
        assert not loop.is_alive(), "the training loop hung"
        assert not failures, f"a step failed across the restart: {failures[0]!r}"
        assert killed_at < steps, "the loop ended before the kill: nothing was tested"
        assert [s for _, s, _ in done] == list(range(1, steps + 1))
        assert all(a for _, _, a in done), "a step came back without audited=true"
        records = stored(tmp_path / "audit.sqlite3", "train")
        assert sorted(s for _, s in records) == list(range(1, steps + 1)), (
            "a step is missing or recorded twice"
        )
        assert sorted(r for r, _ in records) == sorted(r for r, _, _ in done)
        # The data connection was still the path after the restart (no fallback to frames).
        assert transport.plane.usable == (mode == "bulk")
    finally:
        transport.close()
        client.close()
        first.stop()
        if second is not None:
            second.stop()


# --------------------------------------------------------------------------------------------
# b, c. callers that hang up or run out of time


def _until_the_caller_is_gone(event) -> None:
    deadline = time.monotonic() + 30
    while event.context.is_active() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["cancel", "close_channel"])
def test_a_caller_that_hangs_up_mid_request_frees_the_work(how):
    """The computation already running finishes, but its result is neither sent nor audited,
    the in-flight gauge returns to 0 and the next call is served and recorded."""
    with running(audit="runs", metrics_port=-1) as server:
        gate = Gate(server.engine)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        call = pb_grpc.LossServiceStub(channel).Compute.future(audited("hangup", 1), timeout=60)
        assert gate.arrived.acquire(timeout=30), "the call never reached the engine"
        assert metric(server, "lossd_inflight_requests") == 1
        if how == "cancel":
            assert call.cancel()
        else:
            channel.close()
        with pytest.raises(grpc.FutureCancelledError if how == "cancel" else grpc.RpcError):
            call.result(timeout=30)
        # The hang-up travels to the server asynchronously: the result is held (ahead of the
        # deadline guard) until the server's context knows, as for any result that finishes
        # after the hang-up has landed, however long a busy machine takes to deliver it.
        server.servicer.after_compute.insert(0, _until_the_caller_is_gone)
        gate.released.set()
        assert gate.finished.acquire(timeout=30)
        drained(server)
        server.servicer.after_compute.remove(_until_the_caller_is_gone)
        assert written(server) == 0, "a cancelled call was audited"
        assert metric(server, "lossd_rejected_requests_total", reason="cancelled") == 1
        channel.close()
        with closing(LossClient(f"127.0.0.1:{server.port}", timeout=30, retries=0)) as client:
            assert client.compute(audited("hangup", 2)).audited
        assert written(server) == 1


def test_a_deadline_shorter_than_the_computation(tmp_path):
    """DEADLINE_EXCEEDED for the caller; the late result is not audited; the server stays
    healthy and the next call is served and recorded."""
    with running(audit="runs", metrics_port=-1) as server:
        gate = Gate(server.engine)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.LossServiceStub(channel)
            # Long enough to reach the engine on a busy machine (it must expire there, held).
            call = stub.Compute.future(audited("deadline", 1), timeout=5.0)
            assert gate.arrived.acquire(timeout=30)
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gate.released.set()
            assert gate.finished.acquire(timeout=30)
            drained(server)
            assert written(server) == 0, "a result nobody waited for was audited"
            response = stub.Compute(audited("deadline", 2), timeout=30)
            assert response.audited
        assert written(server) == 1
        assert [s for _, s in stored(Path(server.audit.store.path), "deadline")] == [2]


# --------------------------------------------------------------------------------------------
# d, e. signals


def _big_audited(run_id: str, step: int) -> pb.ComputeRequest:
    """A call that keeps one worker busy for a while (decode, softmax, gradient, input digest)."""
    request = build_request(
        "cross_entropy",
        {},
        (torch.randn(32768, 100), torch.randint(0, 100, (32768,))),
        {},
        ["args[0]"],
    )
    request.request_id = uuid.uuid4().hex
    request.audit.run_id = run_id
    request.audit.step = step
    return request


def _inflight(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as page:
        return value(samples(page.read().decode()), "lossd_inflight_requests")


def test_sigterm_with_calls_in_flight_finishes_them_and_flushes_the_audit_queue(tmp_path):
    """SIGTERM while one call computes and another waits for the one worker: both are answered
    OK and audited, and the process exits 0 with the trail flushed. Calls still on the wire
    when the drain begins are refused UNAVAILABLE (which clients retry elsewhere, with the same
    request id), never CANCELLED, never computed, never recorded."""
    calls = 6
    proc = serve(
        tmp_path, "--workers", "1", "--metrics-port", "0", "--grace-seconds", "120"
    ).start()
    outcomes: list[tuple[str, grpc.StatusCode, bool]] = []
    try:
        url = proc.metrics_url()
        options = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        with grpc.insecure_channel(proc.address, options=options) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            requests = [_big_audited("sigterm", i) for i in range(calls)]
            futures = [stub.Compute.future(r, timeout=120) for r in requests]
            # Until one computes and more wait for the worker. The gauge counts a call a moment
            # before admission takes it (a drain then refuses it UNAVAILABLE): with three
            # counted, two are admitted unless two of them are in that moment at once.
            for _ in range(6000):
                if _inflight(url) >= 3:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the calls never reached the server")
            proc.proc.send_signal(signal.SIGTERM)
            pending = sum(not f.done() for f in futures)
            assert pending >= 2, "the calls were answered before SIGTERM: nothing was tested"
            for request, future in zip(requests, futures):
                try:
                    outcomes.append(
                        (request.request_id, grpc.StatusCode.OK, future.result().audited)
                    )
                except grpc.RpcError as error:
                    outcomes.append((request.request_id, error.code(), False))
        try:
            code = proc.proc.wait(150)
        except subprocess.TimeoutExpired:
            proc.proc.send_signal(signal.SIGUSR1)  # the server dumps its threads' stacks
            time.sleep(2)
            raise AssertionError(
                "no exit after the drain:\n" + "".join(proc.stderr_lines[-200:])
            ) from None
        assert code == 0, "".join(proc.stderr_lines[-20:])
    finally:
        proc.stop()
    answered = [rid for rid, code, _ in outcomes if code == grpc.StatusCode.OK]
    assert {code for _, code, _ in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, (
        outcomes
    )
    assert len(answered) >= 2, f"the calls in flight at SIGTERM did not all finish: {outcomes}"
    assert all(audited for _, code, audited in outcomes if code == grpc.StatusCode.OK)
    assert sorted(r for r, _ in stored(tmp_path / "audit.sqlite3", "sigterm")) == sorted(answered)


_SLOW_READER = """
import sys, torch
from lossd.client import LossClient, LossdError
from lossd.client.functional import build_request
n = 8 << 20  # a 32 MB gradient: more than the socket buffers and HTTP/2 windows hold unread
request = build_request("mse", {}, (torch.ones(n), torch.zeros(n)), {}, ["args[0]"])
with LossClient(sys.argv[1], timeout=120, retries=0) as client:
    try:
        print(len(client.compute(request).grads[0].grad.data), flush=True)
    except LossdError as exc:
        print(exc.code.name, exc.details, flush=True)
"""


def test_a_drain_delivers_an_answer_its_reader_is_slow_to_take():
    """The drain waits (within the grace) until gRPC has sent each answer, not a fixed second
    after the handler returned: an answer still on its way, its record already committed, was
    cut off on a busy machine (the caller saw UNAVAILABLE for a call the trail holds)."""
    with running(audit="none", metrics_port=-1) as server:
        gate = Gate(server.engine)
        reader = subprocess.Popen(
            [sys.executable, "-c", _SLOW_READER, f"127.0.0.1:{server.port}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            gate.wait_arrivals(1)
            reader.send_signal(signal.SIGSTOP)  # it reads nothing until SIGCONT
            stopping = threading.Thread(target=server.stop, args=(60,))
            stopping.start()
            gate.open()
            assert gate.finished.acquire(timeout=30)
            time.sleep(3)  # past the second the drain used to give answers, whatever the load
            assert stopping.is_alive(), "the drain ended with an answer undelivered"
            reader.send_signal(signal.SIGCONT)
            out, _ = reader.communicate(timeout=120)
            stopping.join(60)
        finally:
            reader.kill()
    assert out.strip() == str(4 * (8 << 20)), out
    assert not stopping.is_alive()


# A server whose main thread blocks SIGTERM once gRPC's, the audit writer's and the metrics
# threads exist, so the kernel must deliver the signal to one of those threads (what CI once hit
# by chance: the main thread then slept in an untimed wait and the server never drained).
_SIGTERM_ON_ANOTHER_THREAD = """
import signal, sys
from lossd.server import app, cli
create_server = app.create_server
def create_then_block(config):
    running = create_server(config)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return running
app.create_server = create_then_block
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_delivered_to_another_thread_still_drains_and_exits(tmp_path):
    proc = serve(tmp_path, "--metrics-port", "0", "--log-level", "INFO")
    proc.argv = [sys.executable, "-c", _SIGTERM_ON_ANOTHER_THREAD, *proc.argv[3:]]
    proc.start()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            assert (
                pb_grpc.LossServiceStub(channel)
                .Compute(audited("other-thread", 0), timeout=30)
                .audited
            )
        proc.proc.send_signal(signal.SIGTERM)
        try:
            code = proc.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("SIGTERM taken by a non-main thread was never acted on") from None
    finally:
        proc.stop()
    assert code == 0, "".join(proc.stderr_lines[-20:])
    assert any("SIGTERM received: draining" in line for line in proc.stderr_lines), (
        proc.stderr_lines[-20:]
    )
    assert len(stored(tmp_path / "audit.sqlite3", "other-thread")) == 1


def test_sigkill_during_audited_writes_keeps_every_acknowledged_record(tmp_path):
    """Writers hammer an audited server; SIGKILL; after a restart the database is consistent
    and holds every record whose call answered audited=true."""
    proc = serve(tmp_path, "--workers", "4").start()
    acked: list[str] = []
    stop = threading.Event()

    def writer(index: int) -> None:
        with closing(LossClient(proc.address, timeout=30, retries=0)) as client:
            step = 0
            while not stop.is_set():
                step += 1
                request = audited(f"kill-{index}", step)
                try:
                    if client.compute(request).audited:
                        acked.append(request.request_id)
                except LossdError:
                    return  # the server is gone

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        while len(acked) < 200 and all(t.is_alive() for t in threads):
            time.sleep(0.01)
        proc.proc.kill()
        proc.proc.wait(30)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        proc.stop()
    assert len(acked) >= 200
    restarted = serve(tmp_path).start()  # opens the trail again (WAL recovery)
    try:
        with closing(LossClient(restarted.address, timeout=30, retries=0)) as client:
            assert client.compute(audited("after-kill", 1)).audited
    finally:
        restarted.stop()
    ids = {r for r, _ in stored(tmp_path / "audit.sqlite3")}
    missing = [r for r in acked if r not in ids]
    assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:3]}"


# --------------------------------------------------------------------------------------------
# f. a full or read-only audit database


def test_full_audit_disk_fails_calls_unavailable_and_recovers(tmp_path):
    """The audit DB cannot grow (the server's file-size limit stands in for a full disk): audited
    calls fail UNAVAILABLE naming the audit store, none is acknowledged without its record, and
    the server recovers on its own once there is room again."""
    proc = serve(tmp_path).start()
    db = tmp_path / "audit.sqlite3"
    try:
        with closing(LossClient(proc.address, timeout=30, retries=0)) as client:
            assert client.compute(audited("full", 0)).audited  # the WAL exists and is in use
            sizes = [p.stat().st_size for p in tmp_path.glob("audit.sqlite3*")]
            resource.prlimit(
                proc.proc.pid,
                resource.RLIMIT_FSIZE,
                (max(sizes) + (64 << 10), resource.RLIM_INFINITY),
            )
            acked, refused, failure = [], [], None
            for step in range(1, 5000):
                request = audited("full", step, n=256)
                try:
                    response = client.compute(request)
                except LossdError as exc:
                    failure = exc
                    refused.append(request.request_id)
                    break
                assert response.audited
                acked.append(request.request_id)
            assert failure is not None, "the audit store never filled up"
            assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
            assert "audit store" in failure.details and str(db) in failure.details, failure.details
            assert client.compute(
                build_request("mse", {}, (torch.ones(3), torch.zeros(3)), {})
            ).loss  # unaudited calls still served
            resource.prlimit(
                proc.proc.pid,
                resource.RLIMIT_FSIZE,
                (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
            )
            again = audited("full", 10_000)
            assert client.compute(again).audited, "no recovery once the disk had room"
            acked.append(again.request_id)
    finally:
        proc.stop()
    ids = {r for r, _ in stored(db, "full")}
    assert set(acked) <= ids, "an acknowledged record is missing"
    assert proc.proc.returncode == 0


def _make_read_only(path: Path) -> None:
    """Make ``path`` (a directory) read-only for this process, root included, or skip."""
    if os.geteuid() != 0:
        for p in [path, *path.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return
    if shutil.which("mount") is None:
        pytest.skip("running as root without mount(8): cannot make a directory read-only")
    # Root ignores permissions: a read-only bind mount is what a read-only volume looks like.
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bind.stderr.strip()}")
    remount = subprocess.run(
        ["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True
    )
    if remount.returncode != 0:
        subprocess.run(["umount", str(path)], check=False)
        pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")


def _undo_read_only(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["umount", str(path)], check=False)
    else:
        for p in [path, *path.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_read_only_audit_database_refuses_to_start_and_names_it(tmp_path):
    """A trail that cannot be written is found at start-up, not at the first audited call: the
    server exits non-zero naming the store (records are never accepted only to be lost)."""
    data = tmp_path / "data"
    data.mkdir()
    first = serve(data).start()
    with closing(LossClient(first.address, timeout=30, retries=0)) as client:
        kept = audited("ro", 1)
        assert client.compute(kept).audited
    assert first.stop() == 0
    _make_read_only(data)
    try:
        proc = serve(data)
        with pytest.raises(RuntimeError) as caught:
            proc.start()
        assert proc.proc.returncode not in (None, 0)
        assert "audit store" in str(caught.value) and str(data / "audit.sqlite3") in str(
            caught.value
        ), str(caught.value)
    finally:
        _undo_read_only(data)
    assert [r for r, _ in stored(data / "audit.sqlite3", "ro")] == [kept.request_id]
