"""/metrics after a mix of good and bad calls: the counts are right and promtool accepts the text."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError, RemoteLoss
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.client.transport import Transport
from lossd.client.wire import framing
from lossd.server.metrics import Metrics
from tests.support.opskit import running, samples, scrape, value

# The grpc_server_* labels of unary Compute calls.
UNARY_COMPUTE = {
    "grpc_service": "lossd.v1.LossService",
    "grpc_method": "Compute",
    "grpc_type": "unary",
}


def _mse(n: int = 8) -> pb.ComputeRequest:
    return build_request("mse", {}, (torch.randn(n), torch.randn(n)), {})


def test_metrics_count_good_and_bad_calls():
    with running(metrics_port=0, max_elements=1000) as server:
        client = LossClient(f"127.0.0.1:{server.port}", timeout=30)
        try:
            for _ in range(3):
                client.compute(_mse())
            nan = build_request("mse", {}, (torch.tensor([float("nan"), 1.0]), torch.zeros(2)), {})
            assert client.compute(nan).non_finite
            refused = {}
            for name, request in {
                "not_found": build_request("no_such_loss", {}, (torch.zeros(2),), {}),
                "invalid_argument": build_request(
                    "mse", {}, (torch.zeros(2), torch.zeros(3, 3)), {}
                ),
                "resource_exhausted": _mse(2000),  # over --max-elements
            }.items():
                with pytest.raises(LossdError) as caught:
                    client.compute(request)
                refused[name] = caught.value.code
            assert refused == {
                "not_found": grpc.StatusCode.NOT_FOUND,
                "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
                "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
            }
            assert len(client.list_losses()) > 10
        finally:
            client.close()
        text = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")

    m = samples(text)
    compute = UNARY_COMPUTE
    assert value(m, "grpc_server_started_total", **compute) == 7
    assert value(m, "grpc_server_handled_total", grpc_code="OK", **compute) == 4
    assert value(m, "grpc_server_handled_total", grpc_code="NotFound", **compute) == 1
    assert value(m, "grpc_server_handled_total", grpc_code="InvalidArgument", **compute) == 1
    assert value(m, "grpc_server_handled_total", grpc_code="ResourceExhausted", **compute) == 1
    assert value(m, "grpc_server_handling_seconds_count", **compute) == 7
    assert value(m, "grpc_server_handled_total", grpc_method="ListLosses", grpc_code="OK") == 1
    assert value(m, "lossd_rejected_requests_total", reason="not_found") == 1
    assert value(m, "lossd_rejected_requests_total", reason="invalid_argument") == 1
    assert value(m, "lossd_rejected_requests_total", reason="resource_exhausted") == 1
    assert value(m, "lossd_requests_total", loss="mse", grpc_code="OK") == 4
    assert value(m, "lossd_requests_total", loss="mse", grpc_code="InvalidArgument") == 1
    # A client-chosen loss name never becomes a label value.
    assert value(m, "lossd_requests_total", loss="unregistered", grpc_code="NotFound") == 1
    assert not any("no_such_loss" in str(labels) for _, labels in m)
    for phase in ("decode", "compute", "encode"):
        assert value(m, "lossd_phase_seconds_count", loss="mse", phase=phase) == 4
    assert value(m, "lossd_non_finite_results_total", loss="mse") == 1
    assert value(m, "lossd_received_bytes_total", loss="mse") > 4 * 64
    assert value(m, "lossd_sent_bytes_total", loss="mse") > 0
    assert value(m, "lossd_inflight_requests") == 0
    assert value(m, "lossd_build_info", device="cpu") == 1

    assert_promtool_accepts(text)


def _chunked_bytes(request, outboard, response, external, chunk_bytes: int) -> tuple[int, ...]:
    """(request bytes, response bytes, request messages, response messages) of one ComputeChunked
    call, as they travel: each side's header message, then its data messages."""
    sent_refs = framing.refs(outboard.tensors)
    header = pb.ComputeChunkedRequest(
        header=pb.ChunkedRequestHeader(request=request, tensors=sent_refs)
    )
    frames_in = list(framing.iter_frames(outboard.tensors, chunk_bytes))
    back = list(external.items())
    answer = pb.ComputeChunkedResponse(
        header=pb.ChunkedResponseHeader(response=response, tensors=framing.refs(back))
    )
    frames_out = list(framing.iter_frames(back, framing.DEFAULT_CHUNK_BYTES))  # the server's
    return (
        header.ByteSize() + sum(map(len, frames_in)),
        answer.ByteSize() + sum(map(len, frames_out)),
        1 + len(frames_in),
        1 + len(frames_out),
    )


def test_every_transport_is_counted_exactly_with_its_bytes():
    """Unary, chunked and auto (small: unary; large: chunked) calls, then a RemoteLoss that
    closes normally: exact call, message and byte counts, the chunked payload included, and no
    call counted Canceled or as a refusal."""
    totals = dict.fromkeys(("received", "sent", "msgs_in", "msgs_out", "unary", "chunked"), 0)
    with running(metrics_port=-1) as server:
        target = f"127.0.0.1:{server.port}"
        client = LossClient(target, timeout=60, shm=False)  # data frames, counted as they travel
        try:
            for mode, n in (("unary", 16), ("chunked", 16), ("auto", 16), ("auto", 1 << 20)):
                transport = Transport(client, mode)
                args = (torch.randn(n), torch.randn(n))  # auto: 8 MiB goes chunked, 128 B unary
                outboard = transport.outboard(list(zip(("args[0]", "args[1]"), args)))
                request = build_request("mse", {}, args, {}, ["args[0]"], outboard=outboard)
                response, external = transport.send(request, outboard)
                transport.close()
                if outboard is None:
                    totals["unary"] += 1
                    totals["received"] += request.ByteSize()
                    totals["sent"] += response.ByteSize()
                    continue
                totals["chunked"] += 1
                moved = _chunked_bytes(request, outboard, response, external, transport.chunk_bytes)
                for key, amount in zip(("received", "sent", "msgs_in", "msgs_out"), moved):
                    totals[key] += amount
        finally:
            client.close()
        with RemoteLoss("l1", endpoint=target, transport="chunked", timeout=60, shm=False) as crit:
            leaf = torch.randn(8, requires_grad=True)
            crit(leaf, torch.zeros(8)).backward()
        m = samples(server.metrics.exposition().decode())
    assert (totals["unary"], totals["chunked"]) == (2, 2)
    service = {"grpc_service": "lossd.v1.LossService"}
    chunked = {"grpc_method": "ComputeChunked", "grpc_type": "bidi_stream", **service}
    unary = {"grpc_method": "Compute", "grpc_type": "unary", **service}
    assert value(m, "grpc_server_started_total", **unary) == 2
    assert value(m, "grpc_server_handled_total", grpc_code="OK", **unary) == 2
    assert value(m, "grpc_server_started_total", **chunked) == 3
    assert value(m, "grpc_server_handled_total", grpc_code="OK", **chunked) == 3
    assert value(m, "grpc_server_handled_total", grpc_code="Canceled") == 0
    assert value(m, "grpc_server_handled_total", **service) == 6  # and DescribeLoss, OK
    assert value(m, "lossd_rejected_requests_total") == 0
    assert value(m, "lossd_requests_total", loss="mse", grpc_code="OK") == 4
    assert value(m, "lossd_requests_total", loss="l1", grpc_code="OK") == 1
    assert value(m, "lossd_received_bytes_total", loss="mse") == totals["received"]
    assert value(m, "lossd_sent_bytes_total", loss="mse") == totals["sent"]
    assert totals["sent"] > 4 << 20  # the 4 MiB gradient that went back in chunks
    # Then the l1 call's: a header and one data message per input; back, a header holding its
    # small gradient (the server sends tensors of 64 KiB and more in chunks).
    assert value(m, "grpc_server_msg_received_total", **chunked) == totals["msgs_in"] + 3
    assert value(m, "grpc_server_msg_sent_total", **chunked) == totals["msgs_out"] + 1
    assert value(m, "lossd_inflight_requests") == 0


def test_bytes_on_the_bulk_data_connection_are_counted_with_the_call():
    """A chunked call whose tensors travel on --bulk-port's data connection counts them in
    lossd_received/sent_bytes_total, like data frames: only its small header moves over gRPC."""
    n = 1 << 18  # 1 MiB per input, forced chunked
    tensor_bytes, gradient_bytes = 2 * 4 * n, 4 * n
    with running(metrics_port=-1, bulk_port=0) as server:
        endpoint = f"127.0.0.1:{server.port}"
        with RemoteLoss(
            "mse", endpoint=endpoint, transport="chunked", timeout=60, shm=False
        ) as crit:
            crit(torch.randn(n, requires_grad=True), torch.randn(n)).backward()  # learns the port
            before = samples(server.metrics.exposition().decode())
            crit(torch.randn(n, requires_grad=True), torch.randn(n)).backward()
            assert crit.transport.plane.port == server.bulk.port  # it went on the connection
        after = samples(server.metrics.exposition().decode())

    def grew(name: str) -> float:
        return value(after, name, loss="mse") - value(before, name, loss="mse")

    assert tensor_bytes < grew("lossd_received_bytes_total") < tensor_bytes + 4096
    assert gradient_bytes < grew("lossd_sent_bytes_total") < gradient_bytes + 4096


def test_audit_and_device_memory_collectors_read_their_sources_at_scrape_time():
    stats = {
        "queue_depth": 3,
        "queue_capacity": 4096,
        "records_written": 10,
        "write_seconds_sum": 0.5,
        "write_seconds_count": 5,
    }
    metrics = Metrics(
        device="cuda:0",
        audit_stats=lambda: stats,
        memory_probe=lambda: {"allocated": 1024, "reserved": 4096},
    )
    m = samples(metrics.exposition().decode())
    assert value(m, "lossd_audit_queue_depth") == 3
    assert value(m, "lossd_audit_write_seconds_count") == 5
    assert value(m, "lossd_audit_write_seconds_sum") == 0.5
    assert value(m, "lossd_audit_records_written_total") == 10
    assert value(m, "lossd_device_memory_allocated_bytes", device="cuda:0") == 1024
    assert value(m, "lossd_device_memory_reserved_bytes", device="cuda:0") == 4096
    stats["queue_depth"] = 7
    assert value(samples(metrics.exposition().decode()), "lossd_audit_queue_depth") == 7


def test_a_failing_stats_source_does_not_break_the_scrape():
    def broken():
        raise RuntimeError("writer gone")

    metrics = Metrics(audit_stats=broken)
    m = samples(metrics.exposition().decode())
    assert value(m, "lossd_audit_queue_depth") == 0
    assert value(m, "lossd_build_info") == 1


def test_phase_hook_uses_registered_names_only():
    metrics = Metrics()
    response = pb.ComputeResponse()
    response.timings.compute_ns = 2_000_000
    event = SimpleNamespace(
        result=SimpleNamespace(spec=SimpleNamespace(name="mse"), non_finite=False),
        response=response,
        request_bytes=10,
    )
    metrics.after_compute(event)
    m = samples(metrics.exposition().decode())
    assert value(m, "lossd_phase_seconds_sum", loss="mse", phase="compute") == pytest.approx(0.002)
    assert metrics.loss_label("../../etc/passwd") == "unregistered"


def test_queued_updates_are_bounded_and_every_read_sees_them_all():
    """Per-call updates are queued and applied in batches (Metrics.defer): the queue never
    holds PENDING_LIMIT of them, and a scrape (of every name, of some names over HTTP, or a
    registry read) sees every update made before it, summed exactly."""
    from lossd.server.metrics import PENDING_LIMIT

    metrics = Metrics()
    calls = 2 * PENDING_LIMIT + 7
    for i in range(calls):
        response = pb.ComputeResponse()
        response.timings.decode_ns = 1_000
        response.timings.compute_ns = 1_000_000 * (1 + i % 3)
        event = SimpleNamespace(
            result=SimpleNamespace(spec=SimpleNamespace(name="mse"), non_finite=i % 5 == 0),
            response=response,
        )
        metrics.after_compute(event)
        assert len(metrics._pending) < PENDING_LIMIT
    assert metrics._pending  # the last ones are still queued: reads must apply them
    labels = {"loss": "mse", "phase": "compute"}
    assert metrics.registry.get_sample_value("lossd_phase_seconds_count", labels) == calls
    assert not metrics._pending
    metrics.after_compute(event)
    httpd, port = metrics.serve_http("127.0.0.1", 0)
    try:
        text = scrape(f"http://127.0.0.1:{port}/metrics?name[]=lossd_phase_seconds_count")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert value(samples(text), "lossd_phase_seconds_count", **labels) == calls + 1
    metrics.after_compute(event)
    m = samples(metrics.exposition().decode())
    assert value(m, "lossd_phase_seconds_count", **labels) == calls + 2
    # 1, 2 and 3 ms in turn: every observation lands in its own bucket, none is lost.
    expected = sum(1 + i % 3 for i in range(calls)) + 2 * (1 + (calls - 1) % 3)
    assert value(m, "lossd_phase_seconds_sum", **labels) == pytest.approx(expected / 1e3)
    assert value(m, "lossd_phase_seconds_bucket", le="0.001", **labels) == sum(
        1 for i in range(calls) if i % 3 == 0
    ) + 2 * ((calls - 1) % 3 == 0)
    non_finite = sum(1 for i in range(calls) if i % 5 == 0) + 2 * ((calls - 1) % 5 == 0)
    assert value(m, "lossd_non_finite_results_total", loss="mse") == non_finite


def test_exact_counts_over_http_with_auth_refusals_and_bounded_labels(tokens_file):
    from lossd.server import registry
    from lossd.server.limits import CONCURRENCY_LIMIT
    from lossd.server.metrics import CODE_NAMES, REFUSALS
    from tests.support.opskit import TOKENS

    good = [
        _mse(16),
        _mse(32),
        build_request("mse", {}, (torch.tensor([float("inf"), 1.0]), torch.zeros(2)), {}),
    ]
    with running(metrics_port=0, auth_tokens=tokens_file) as server:
        target = f"127.0.0.1:{server.port}"
        clients = {
            who: LossClient(target, timeout=30, token=token, retries=0)
            for who, token in {
                "compute": TOKENS["compute"],
                "audit": TOKENS["audit"],
                "none": "",
                "wrong": "tok-wrong-0123456789abcdef",
            }.items()
        }
        try:
            responses = [clients["compute"].compute(r) for r in good]
            codes = []
            for who, request in (
                ("none", _mse()),
                ("wrong", _mse()),
                ("audit", _mse()),
                ("compute", build_request("mse", {}, (torch.zeros(2), torch.zeros(5)), {})),
            ):
                with pytest.raises(LossdError) as caught:
                    clients[who].compute(request)
                codes.append(caught.value.code)
        finally:
            for c in clients.values():
                c.close()
        text = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert codes == [
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]

    m = samples(text)
    compute = UNARY_COMPUTE
    assert value(m, "grpc_server_started_total", **compute) == 7
    assert value(m, "grpc_server_handled_total", **compute) == 7
    assert value(m, "grpc_server_handled_total", grpc_code="OK", **compute) == 3
    assert value(m, "grpc_server_handled_total", grpc_code="Unauthenticated", **compute) == 2
    assert value(m, "grpc_server_handled_total", grpc_code="PermissionDenied", **compute) == 1
    assert value(m, "grpc_server_handled_total", grpc_code="InvalidArgument", **compute) == 1
    assert value(m, "lossd_rejected_requests_total", reason="unauthenticated") == 2
    assert value(m, "lossd_rejected_requests_total", reason="permission_denied") == 1
    assert value(m, "lossd_rejected_requests_total", reason="invalid_argument") == 1
    assert value(m, "lossd_rejected_requests_total") == 4
    assert value(m, "lossd_requests_total", loss="mse", grpc_code="OK") == 3
    # Bytes are counted for evaluated calls only, exactly as they travelled.
    assert value(m, "lossd_received_bytes_total", loss="mse") == sum(r.ByteSize() for r in good)
    assert value(m, "lossd_sent_bytes_total", loss="mse") == sum(r.ByteSize() for r in responses)
    assert value(m, "lossd_non_finite_results_total", loss="mse") == 1
    assert value(m, "lossd_phase_seconds_count", loss="mse", phase="compute") == 3

    # Bounded labels: every label name is known and every value comes from a fixed set.
    bounded = {
        "loss": {s.name for s in registry.all_specs()} | {"unregistered"},
        "grpc_code": set(CODE_NAMES.values()),
        "reason": set(REFUSALS.values()) | {CONCURRENCY_LIMIT},
        "phase": {"decode", "compute", "encode"},
        "grpc_type": {"unary", "client_stream", "server_stream", "bidi_stream"},
        "grpc_service": {
            "lossd.v1.LossService",
            "lossd.v1.AuditService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        },
        "grpc_method": {
            "Compute",
            "ComputeChunked",
            "ListLosses",
            "DescribeLoss",
            "ListRuns",
            "GetRecords",
            "VerifyRun",
            "Check",
            "Watch",
            "ServerReflectionInfo",
        },
    }
    free = {"le", "quantile", "version", "torch_version", "device"}  # fixed per process
    for _name, labels in m:
        for key, val in labels:
            assert key in bounded or key in free, f"unexpected label {key}"
            if key in bounded:
                assert val in bounded[key], f"label {key}={val!r} is not from a bounded set"
    for request in good:
        assert request.request_id not in text
    # Every served family is in the README's generated list (server/metrics.py catalogue()).
    from prometheus_client.parser import text_string_to_metric_families

    from lossd.server.metrics import catalogue

    listed = {name for name, *_ in catalogue()}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue  # prometheus-client's creation timestamp of each counter and histogram
        assert family.name + ("_total" if family.type == "counter" else "") in listed, family.name

    assert_promtool_accepts(text)


def assert_promtool_accepts(text: str) -> None:
    """promtool's own lint passes on the exposition (skips, after the checks before it, where
    promtool is not installed)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (apt-get install -y prometheus); the parse checks above passed"
        )
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_batch_that_fails_to_apply_is_logged_and_fails_no_caller(caplog, monkeypatch):
    """A bug in applying queued updates is lossd's own: logged with its traceback, never raised
    into the handler (or the scrape) that happened to apply the batch."""
    from lossd.server import metrics as metrics_module

    metrics = Metrics()

    def broken(*_):
        raise RuntimeError("injected")

    monkeypatch.setattr(metrics, "_apply", broken)
    with caplog.at_level("ERROR", logger="lossd.metrics"):
        for _ in range(metrics_module.PENDING_LIMIT + 1):
            metrics.defer(metrics_module._STARTED, ("unary", "lossd.v1.LossService", "Compute"))
        metrics.exposition()  # a scrape applies what is queued: it still answers
    assert not metrics._pending
    failures = [r for r in caplog.records if "could not be applied" in r.getMessage()]
    assert failures and all(r.exc_info and "injected" in str(r.exc_info[1]) for r in failures)
