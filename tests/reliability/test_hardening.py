"""Hardening against a hostile or unlucky world (issue 12): each test drives one attack or fault
against a running server on loopback and states what the server must do instead of failing."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lossd.client import LossClient, LossdError, RemoteLoss
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.connection import DEFAULT_TIMEOUT_S, ConnectionOptions
from lossd.client.functional import build_request
from lossd.client.wire import codec, framing
from lossd.server import registry
from lossd.server.registry import Input, LossSpec
from tests.support.opskit import TOKENS, health_status, running
from tests.support.serverproc import ServerProcess, free_port, rss_kib

# --------------------------------------------------------------------------------------------
# lossd's own bugs are INTERNAL, not "upstream raises the same"


def _index_bug(input):
    return input.sum() + input[input.numel() + 3]  # IndexError: a bug, not the caller's input


def _shape_bug(input):
    return (input @ torch.ones(input.numel() + 1)).sum()  # RuntimeError from torch: still a bug


@pytest.fixture()
def broken_losses():
    specs = [
        LossSpec(
            name=f"broken_{kind}",
            fn=fn,
            families=("fat",),
            summary="a deliberately broken loss (tests only)",
            inputs=(Input("input", differentiable=True),),
        )
        for kind, fn in (("index", _index_bug), ("shape", _shape_bug))
    ]
    for spec in specs:
        registry.register(spec)
    try:
        yield [s.name for s in specs]
    finally:
        for spec in specs:
            registry._REGISTRY.pop(spec.name, None)


def test_a_bug_in_a_loss_is_internal_naming_the_request_id_and_logged_with_its_traceback(
    broken_losses, caplog
):
    with running(metrics_port=-1) as server:
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30, retries=0)
        try:
            for name in broken_losses:
                request = build_request(name, {}, (torch.ones(4),), {}, ["args[0]"])
                with (
                    caplog.at_level(logging.INFO, logger="lossd"),
                    pytest.raises(LossdError) as caught,
                ):
                    client.compute(request)
                assert caught.value.code == grpc.StatusCode.INTERNAL, caught.value
                assert request.request_id in caught.value.details
                assert "upstream" not in caught.value.details
                logged = [
                    r
                    for r in caplog.records
                    if r.levelno == logging.ERROR and request.request_id in r.getMessage()
                ]
                assert logged and logged[0].exc_info is not None, "no ERROR with its traceback"
            # A deliberate refusal (upstream's own raise, reproduced where upstream raises) stays
            # INVALID_ARGUMENT, and the server keeps serving.
            spec = registry.get("yolox_loss")
            args, kwargs, params = spec.make_example(torch.float32)
            args[0]["pred"][0] = torch.full_like(args[0]["pred"][0], float("nan"))
            with pytest.raises(LossdError) as caught:
                client.compute(build_request("yolox_loss", params, args, kwargs))
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "upstream raises the same" in caught.value.details
            assert client.compute(
                build_request("mse", {}, (torch.ones(3), torch.zeros(3)), {})
            ).request_id
        finally:
            client.close()


# --------------------------------------------------------------------------------------------
# The memory budget: amplifying requests, near-limit concurrent load, the protobuf bomb

BUDGET_MB = 384


def _yolox_bomb() -> pb.ComputeRequest:
    """A 2 MB yolox_loss call: 80,000 GT boxes on one 100x100 grid (SimOTA's cost: G x A x C)."""
    g, classes = 80_000, 2
    pred = [torch.zeros(1, 5 + classes, 100, 100)]
    xy = torch.rand(g, 2) * 700
    boxes = torch.cat([xy, xy + 16], dim=1)
    target = {
        "gt": [{"boxes": boxes, "labels": torch.zeros(g, dtype=torch.int64)}],
        "img_size": 800,
        "num_classes": classes,
    }
    return build_request(
        "yolox_loss", {"l1_activate_epoch": 0}, ({"pred": pred}, target), {}, ["args[0].pred[0]"]
    )


def _retinanet_bomb() -> pb.ComputeRequest:
    """A 1.6 MB retinanet_loss call: 40,000 GT boxes against 40,000 anchors (the IoU: G x A)."""
    n = 40_000
    xy = torch.rand(n, 2) * 500
    anchors = torch.cat([xy, xy + 32], dim=1)
    out = {
        "anchors": anchors,
        "cls_logits": [torch.zeros(1, n, 1)],
        "bbox_regression": [torch.zeros(1, n, 4)],
    }
    gt = [{"boxes": anchors[:1000].repeat(40, 1), "labels": torch.zeros(n, dtype=torch.int64)}]
    return build_request("retinanet_loss", {}, (out, {"gt": gt}), {}, ["args[0].cls_logits[0]"])


def _pidnet_bomb() -> pb.ComputeRequest:
    """A 2.6 MB pidnet_loss call: 1,000-class 4x4 logits resized to 400x500 labels."""
    c = 1000
    out = {
        "pred": torch.zeros(1, c, 4, 4),
        "extra_p": torch.zeros(1, c, 4, 4),
        "extra_d": torch.zeros(1, 1, 4, 4),
    }
    target = {
        "target": torch.zeros(1, 400, 500, dtype=torch.int64),
        "bd_gt": torch.zeros(1, 400, 500),
    }
    return build_request("pidnet_loss", {}, (out, target), {}, ["args[0].pred"])


def _detr_bomb() -> pb.ComputeRequest:
    """A 1.4 MB detr_loss call: 20,000 queries matched to 20,000 GT boxes (B * Q x total GT)."""
    n = 20_000
    pred = torch.cat([torch.full((1, n, 4), 0.25), torch.zeros(1, n, 1)], -1)
    out = {"pred": pred, "aux_pred": None, "dn_aux_pred": None, "dn_meta": None}
    xy = torch.rand(n, 2) * 500
    target = {
        "gt": [{"boxes": torch.cat([xy, xy + 16], 1), "labels": torch.zeros(n, dtype=torch.int64)}],
        "img_size": 640,
        "num_classes": 1,
    }
    matcher = {"type": "HungarianMatcher", "alpha": 0.25, "gamma": 2.0, "use_focal_loss": True,
               "weight_dict": {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}}  # fmt: skip
    params = {"matcher": matcher, "weight_dict": {"loss_vfl": 1}, "losses": ["vfl"]}
    return build_request("detr_loss", params, (out, target), {}, ["args[0].pred"])


def _yolov9_bomb() -> pb.ComputeRequest:
    """A 2.5 MB yolov9_loss call: 20,000 GT boxes against 6,400 anchor points (B x G x A)."""
    g = 20_000
    pred = [torch.zeros(1, 4 * 16 + 1, 80, 80)]
    xy = torch.rand(g, 2) * 600
    target = {
        "gt": [{"boxes": torch.cat([xy, xy + 16], 1), "labels": torch.zeros(g, dtype=torch.int64)}],
        "img_size": 640,
        "num_classes": 1,
    }
    return build_request(
        "yolov9_loss",
        {"l1_activate_epoch": None},
        ({"pred": pred}, target),
        {},
        ["args[0].pred[0]"],
    )


def _raw_compute(address: str, payload: bytes, timeout: float = 120) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    ) as ch:
        call = ch.unary_unary(
            "/lossd.v1.LossService/Compute",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            return call(payload, timeout=timeout)
        except grpc.RpcError as error:
            return error


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("budget")
    # A fixed mmap threshold, so that freed buffers leave RSS at once (with glibc's dynamic one they
    # stay in per-thread arenas until the idle trim) and RSS measures what the budget bounds.
    flags = ("--memory-budget-mb", str(BUDGET_MB), "--max-items", "10000", "--audit", "none",
             "--malloc-mmap-threshold-kb", "1024", "--workers", "8")  # fmt: skip
    with ServerProcess("--data-dir", str(data), "--log-level", "WARNING", *flags) as proc:
        # Warm up (torch's lazy initialisations), then take the idle footprint as the baseline.
        client = LossClient(proc.address, timeout=60, retries=0)
        client.compute(build_request("mse", {}, (torch.ones(8), torch.zeros(8)), {}))
        client.close()
        proc.baseline_kib = rss_kib(proc.proc.pid)[0]
        yield proc


def _growth_mib(proc) -> float:
    return (rss_kib(proc.proc.pid)[1] - proc.baseline_kib) / 1024


@pytest.mark.parametrize(
    "build", [_yolox_bomb, _retinanet_bomb, _pidnet_bomb, _detr_bomb, _yolov9_bomb]
)
def test_an_amplifying_request_is_refused_within_the_budget(budget_server, build):
    request = build()
    assert request.ByteSize() < 3 << 20  # small on the wire...
    error = _raw_compute(budget_server.address, request.SerializeToString())
    assert isinstance(error, grpc.RpcError), "the amplifying call was computed"
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "--memory-budget-mb" in error.details() and "estimated" in error.details()
    assert f"{BUDGET_MB:,.1f} MiB" in error.details()
    # ...and the server neither died nor grew past its budget.
    assert budget_server.proc.poll() is None
    assert _growth_mib(budget_server) < BUDGET_MB


def test_a_protobuf_bomb_is_refused_before_it_is_parsed(budget_server):
    # 3 million empty values (6 MB): parsed in full they would take ~200 MB of message objects.
    value = b"\x1a\x02\x0a\x00"  # args { none_value {} }
    payload = b"\x0a\x03mse" + value * 3_000_000
    before = rss_kib(budget_server.proc.pid)[0]
    error = _raw_compute(budget_server.address, payload)
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "--max-items" in error.details() and "before parsing" in error.details()
    assert (rss_kib(budget_server.proc.pid)[0] - before) / 1024 < 60
    assert budget_server.proc.poll() is None


def test_near_limit_concurrent_calls_wait_for_the_budget_and_all_succeed(budget_server):
    # 10 concurrent 12 MB calls: each reserves ~9x its size (decode + working set), so only a
    # few fit in the budget at once; the rest wait for memory within their deadline.
    n = 1_500_000
    request = build_request("mse", {}, (torch.randn(n), torch.randn(n)), {}, ["args[0]"])
    payload = request.SerializeToString()
    results: list = [None] * 10

    def one(i: int) -> None:
        results[i] = _raw_compute(budget_server.address, payload, timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert not errors, [(e.code(), e.details()) for e in errors]
    # What the budget does not count, per call: its request while gRPC holds it waiting, and its
    # answer once its reservation has ended (service.py releases it when compute returns): the
    # response message, gRPC's serialization of it and the copy gRPC sends, 3 x the gradient.
    # How many of these are alive at the peak depends on how fast the callers read, i.e. on the
    # machine's load (CI measured 498.5 MiB; an idle box 250-310): the bound allows them all.
    answer_bytes = 4 * n  # the float32 gradient of args[0]
    outside_budget_mib = len(results) * (len(payload) + 3 * answer_bytes) / (1 << 20)
    assert _growth_mib(budget_server) < BUDGET_MB + outside_budget_mib
    # A single call that could never fit is refused at once, naming the budget and its estimate.
    n = 6_000_000
    big = build_request("mse", {}, (torch.randn(n), torch.randn(n)), {}, ["args[0]"])
    error = _raw_compute(budget_server.address, big.SerializeToString())
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--memory-budget-mb" in error.details()


# --------------------------------------------------------------------------------------------
# Slots belong to authorised work; stalled and unread streams are cut off


def test_authorised_calls_succeed_while_100_anonymous_watch_and_reflection_streams_are_open(
    tokens_file,
):
    with running(auth_tokens=tokens_file, max_concurrent_rpcs=8, metrics_port=-1) as server:
        target = f"127.0.0.1:{server.port}"
        hostile = grpc.insecure_channel(target)
        watches = [
            health_pb2_grpc.HealthStub(hostile).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            for _ in range(100)
        ]
        stop = threading.Event()

        def idle_requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            stop.wait(60)

        reflections = [
            reflection_pb2_grpc.ServerReflectionStub(hostile).ServerReflectionInfo(
                idle_requests(), timeout=60
            )
            for _ in range(100)
        ]
        try:
            # Every stream has reached the server: it got its first answer (a Watch the status,
            # a reflection session its list) or was refused (past the cap on probe streams).
            for call in watches + reflections:
                try:
                    next(call)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            client = LossClient(target, token=TOKENS["compute"], timeout=30, retries=0)
            try:
                for _ in range(3 * 8):
                    assert client.compute(
                        build_request("mse", {}, (torch.ones(3), torch.zeros(3)), {})
                    ).request_id
            finally:
                client.close()
            assert health_status(target) == "SERVING"
            # Unauthenticated lossd streams hold no slot either.
            anonymous = LossClient(target, timeout=10, retries=0)
            with pytest.raises(LossdError) as caught:
                anonymous.compute(build_request("mse", {}, (torch.ones(3), torch.zeros(3)), {}))
            anonymous.close()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert server.admission.active == 0
        finally:
            stop.set()
            for call in watches + reflections:
                call.cancel()
            hostile.close()


def _chunked_call(target: str, messages, timeout: float = 30):
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
    method = channel.stream_stream(
        "/lossd.v1.LossService/ComputeChunked",
        request_serializer=None,
        response_deserializer=None,
    )
    return channel, method(messages, timeout=timeout)


def _chunked_header(n: int) -> tuple[bytes, list[bytes], list]:
    tensors = (torch.randn(n), torch.randn(n))
    outboard = codec.Outboard(0)
    request = build_request("mse", {}, tensors, {}, ["args[0]"], outboard=outboard)
    header = pb.ComputeChunkedRequest(
        header=pb.ChunkedRequestHeader(request=request, tensors=framing.refs(outboard.tensors))
    ).SerializeToString()
    return header, list(framing.iter_frames(outboard.tensors, 1 << 20)), outboard.tensors


def _released(server, seconds: float) -> float:
    """Seconds until the server holds no slot and no reserved memory (fails after ``seconds``)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if server.admission.active == 0 and server.servicer.budget.used == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(
        f"still held after {seconds} s: {server.admission.active} slots, "
        f"{server.servicer.budget.used} bytes reserved"
    )


class _HeldAtCancel(logging.Handler):
    """(slots in use, bytes reserved) of a server each time its watchdog logs a cancel."""

    def __init__(self, server) -> None:
        super().__init__(logging.WARNING)
        self.server = server
        self.seen: list[tuple[int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((self.server.admission.active, self.server.servicer.budget.used))


@pytest.mark.parametrize("stall", ["after the header", "one byte short"])
def test_a_stalled_chunked_upload_is_cancelled_and_releases_its_slot_and_memory(stall):
    settings = dict(stream_idle_timeout_s=1.0, max_concurrent_rpcs=4, metrics_port=-1)
    with running(**settings) as server:
        header, _, tensors = _chunked_header(2_000_000)  # 16 MB of tensor data
        stop = threading.Event()

        def messages():
            yield header
            if stall == "one byte short":
                data = b"".join(flat.numpy().tobytes() for _, flat in tensors)
                yield framing.frame_data(memoryview(data)[:-1])  # all but the last byte
            stop.wait(30)

        # What the stream holds is read when the watchdog cancels it (it logs, then cancels):
        # the stall is then certain, whenever a busy machine got the header through.
        held = _HeldAtCancel(server)
        logging.getLogger("lossd.watchdog").addHandler(held)
        channel, call = _chunked_call(f"127.0.0.1:{server.port}", messages())
        try:
            with pytest.raises(grpc.RpcError) as caught:
                next(call)
            assert caught.value.code() == grpc.StatusCode.CANCELLED, caught.value.details()
            assert server.servicer.watchdog.cancelled == 1  # the idle timeout, not the deadline
            slots, reserved = held.seen[0]
            assert slots == 1
            if stall == "one byte short":
                assert reserved > 16_000_000  # its memory was reserved...
            assert _released(server, 5.0) < 5.0  # ...and is given back once it is cancelled
        finally:
            logging.getLogger("lossd.watchdog").removeHandler(held)
            stop.set()
            channel.close()


def test_an_unread_answer_is_cancelled_and_releases_its_slot_and_memory():
    settings = dict(stream_send_timeout_s=1.0, max_concurrent_rpcs=4, metrics_port=-1)
    with running(**settings) as server:
        header, frames, _ = _chunked_header(4_000_000)  # its gradient (16 MB) comes back in chunks

        channel, call = _chunked_call(f"127.0.0.1:{server.port}", iter([header, *frames]))
        try:
            next(call)  # the response header; the 16 MB of gradient chunks are never read
            deadline = time.monotonic() + 10
            while server.admission.active and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _released(server, 5.0) < 5.0
            assert server.servicer.watchdog.cancelled >= 1
        finally:
            call.cancel()
            channel.close()


# --------------------------------------------------------------------------------------------
# Restarts survived by default; a hung server ends the call at the deadline; drains


def _serve(data, port: int, *flags: str) -> ServerProcess:
    return ServerProcess(
        "--audit", "runs", "--data-dir", str(data), "--log-level", "WARNING", "--port", str(port),
        *flags,
    )  # fmt: skip


def _records(db) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT request_id, step FROM audit_records WHERE run_id = 'train' ORDER BY id"
        ).fetchall()


def test_a_training_loop_with_default_settings_survives_three_sigkill_restarts(tmp_path):
    assert ConnectionOptions().timeout == DEFAULT_TIMEOUT_S  # finite by default
    port, steps, kills = free_port(), 45, (8, 20, 32)
    server = _serve(tmp_path, port).start()
    crit = RemoteLoss("mse", endpoint=f"127.0.0.1:{port}", run_id="train")  # all defaults
    model = torch.nn.Linear(4, 1)
    failed: list[BaseException] = []
    done: list[tuple[str, bool]] = []
    killer_go = threading.Event()

    def killer() -> None:
        nonlocal server
        for at in kills:
            while len(done) + len(failed) < at:
                time.sleep(0.005)
            server.proc.kill()  # no drain, no flush
            server.proc.wait(30)
            server = _serve(tmp_path, port).start()
        killer_go.set()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        for step in range(steps):
            crit.step = step
            x = torch.randn(8, 4)
            try:
                loss = crit(model(x).squeeze(1), torch.zeros(8))
                loss.backward()
                done.append((crit.last_result.request_id, crit.last_result.audited))
            except Exception as exc:  # noqa: BLE001 - counted: the test wants none
                failed.append(exc)
            time.sleep(0.02)
        thread.join(120)
        assert killer_go.is_set(), "the restarts did not all happen during the loop"
        assert not failed, f"{len(failed)} failed steps, the first: {failed[0]!r}"
        assert all(audited for _, audited in done)
        records = _records(tmp_path / "audit.sqlite3")
        assert sorted(s for _, s in records) == list(range(steps)), "a step missing or twice"
        assert len({r for r, _ in records}) == len(records) == steps
    finally:
        crit.close()
        server.stop()


def test_a_sigstopped_server_ends_a_default_call_at_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSD_TIMEOUT", "3")  # the default deadline, shortened for the test
    with _serve(tmp_path, 0) as server:
        crit = RemoteLoss("mse", endpoint=server.address)
        x = torch.ones(4, requires_grad=True)
        crit(x, torch.zeros(4)).backward()
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(LossdError) as caught:
                crit(x, torch.zeros(4))
            took = time.monotonic() - start
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
            crit.close()
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
        # At the 3 s deadline, not before; the upper bound only has to tell "ended" from "hung"
        # (forever), so it leaves a busy machine's scheduling delays plenty of room.
        assert 2.5 < took < 30, took


def test_a_drain_with_an_idle_client_ends_at_once_and_its_next_call_is_retried(tmp_path):
    port = free_port()
    # A grace far longer than any slow exit (interpreter and torch teardown on a busy machine
    # take seconds), so "ended at once" and "waited out the grace" stay far apart.
    server = _serve(tmp_path, port, "--grace-seconds", "300").start()
    crit = RemoteLoss("mse", endpoint=f"127.0.0.1:{port}", run_id="train")
    second = None
    try:
        crit.step = 0
        crit(
            torch.ones(4, requires_grad=True), torch.zeros(4)
        ).backward()  # the client is connected
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0
        assert time.monotonic() - start < 60, "the drain waited out the grace for an idle client"
        second = _serve(tmp_path, port).start()
        crit.step = 1
        crit(torch.ones(4, requires_grad=True), torch.zeros(4)).backward()  # not CANCELLED
        assert crit.last_result.audited
    finally:
        crit.close()
        server.stop()
        if second is not None:
            second.stop()


# --------------------------------------------------------------------------------------------
# Start-up and client errors


def test_a_second_server_on_a_port_in_use_refuses_to_start(tmp_path):
    port = free_port()
    with _serve(tmp_path / "a", port):
        second = subprocess.run(
            [sys.executable, "-m", "lossd.server.cli", "serve", "--port", str(port),
             "--device", "cpu", "--audit", "none", "--data-dir", str(tmp_path / "b")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"--port {port}" in second.stderr and "in use" in second.stderr
        assert "--reuse-port" in second.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "lossd.server.cli", "serve", "--port", "99999"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--port" in bad.stderr and "65535" in bad.stderr


def test_metrics_beyond_loopback_warn_and_idle_metrics_connections_time_out(tmp_path, monkeypatch):
    from lossd.server import metrics as metrics_module

    with _serve(tmp_path, 0, "--metrics-port", "0", "--metrics-host", "0.0.0.0") as proc:
        proc.metrics_url()
        for _ in range(100):  # stderr is read by a thread
            if any("beyond loopback" in line for line in proc.stderr_lines):
                break
            time.sleep(0.05)
        assert any("beyond loopback" in line for line in proc.stderr_lines), proc.stderr_lines
    monkeypatch.setattr(metrics_module, "HTTP_TIMEOUT_S", 1.0)
    with running(metrics_port=0) as server:
        idle = []
        for _ in range(3 * metrics_module.HTTP_MAX_CONNECTIONS):  # connect, send nothing
            conn = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10)
            idle.append(conn)
        try:
            start = time.monotonic()
            assert idle[0].recv(1) == b"", "the server kept an idle connection open"
            assert time.monotonic() - start < 5
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            assert "lossd_" in urllib.request.urlopen(url, timeout=15).read().decode()
        finally:
            for conn in idle:
                conn.close()


def test_client_errors_name_the_endpoint_the_argument_and_the_fix():
    for endpoint, why in (
        ("http://127.0.0.1:50051", "URL scheme"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:99999", "1..65535"),
    ):
        with pytest.raises(LossdError) as caught:
            LossClient(endpoint)
        assert isinstance(caught.value, ValueError) and why in caught.value.details
        assert endpoint in caught.value.details
    # Nothing listening: UNAVAILABLE with a hint naming the endpoint and `lossd serve`.
    endpoint = f"127.0.0.1:{free_port()}"
    client = LossClient(endpoint, timeout=3)
    try:
        with pytest.raises(LossdError) as caught:
            client.compute(build_request("mse", {}, (torch.ones(2), torch.zeros(2)), {}))
    finally:
        client.close()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE, caught.value
    assert endpoint in caught.value.details and "lossd serve" in caught.value.details
    # A numpy array: a LossdError that is a TypeError, naming the argument and the fix.
    crit = RemoteLoss("mse", endpoint=endpoint)
    with pytest.raises(TypeError) as caught:
        crit(np.ones(3, dtype=np.float32), torch.zeros(3))
    crit.close()
    assert isinstance(caught.value, LossdError) and caught.value.field == "args[0]"
    assert "torch.from_numpy" in caught.value.details


def test_the_token_file_warning_fires_only_for_raw_tokens(tmp_path, caplog):
    import hashlib
    import json

    from lossd.server.security import TokenTable

    digest = "sha256:" + hashlib.sha256(b"a-long-enough-token-123").hexdigest()
    digests = tmp_path / "digests.json"
    digests.write_text(json.dumps({digest: {"principal": "a", "roles": ["compute"]}}))
    raw = tmp_path / "raw.json"
    raw.write_text(
        json.dumps({"a-long-enough-token-123": {"principal": "a", "roles": ["compute"]}})
    )
    for path in (digests, raw):
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="lossd.security"):
        TokenTable.load(digests)
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        TokenTable.load(raw)
    assert any("readable by other users" in r.getMessage() for r in caplog.records)
