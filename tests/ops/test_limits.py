"""Limits: concurrency, deadlines, message size; each refusal leaves the server serving.

Slow computations are made deterministic by gating ``Engine.evaluate`` on an event, so no test
depends on how fast this machine computes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError
from lossd.client._proto import lossd_pb2 as pb
from lossd.client._proto import lossd_pb2_grpc as pb_grpc
from lossd.client.functional import build_request
from lossd.server.config import ServerConfig, parse
from tests.support.opskit import Gate, health_status, running, samples, value
from tests.support.serverproc import ServerProcess

# Every limit lossd enforces, with a non-default value to set it to.
LIMITS = {
    "max_message_mb": 3,
    "max_concurrent_rpcs": 5,
    "max_rank": 4,
    "max_elements": 1234,
    "max_total_elements": 5678,
    "max_depth": 6,
    "max_items": 789,
    "max_string_bytes": 321,
}


def _mse(n: int = 4) -> pb.ComputeRequest:
    return build_request("mse", {}, (torch.ones(n), torch.zeros(n)), {})


def _inflight_drained(server) -> None:
    """Wait until the server has finished every call (the handler may outlive the client's wait)."""
    for _ in range(600):
        if value(samples(server.metrics.exposition().decode()), "lossd_inflight_requests") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("calls still in flight after 30 s")


def _still_serving(server) -> None:
    client = LossClient(f"127.0.0.1:{server.port}", timeout=30, retries=0)
    try:
        assert client.compute(_mse()).request_id
    finally:
        client.close()
    assert health_status(f"127.0.0.1:{server.port}") == "SERVING"


@contextmanager
def _stub(server) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.LossServiceStub(channel)


def test_calls_beyond_max_concurrent_rpcs_are_refused_at_once():
    with (
        running(max_concurrent_rpcs=2, workers=4, metrics_port=-1) as server,
        _stub(server) as stub,
    ):
        gate = Gate(server.engine)
        slow = [stub.Compute.future(_mse(), timeout=60) for _ in range(2)]
        gate.wait_arrivals(2)  # both are computing: the server is at its limit
        # The third is refused at once. A hang would end in DEADLINE_EXCEEDED instead, so the
        # code alone tells "at once" from "queued".
        with pytest.raises(grpc.RpcError) as caught:
            stub.Compute(_mse(), timeout=20)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-rpcs" in caught.value.details()
        # Probes are outside the limit: a busy replica is not a dead one.
        assert health_status(f"127.0.0.1:{server.port}") == "SERVING"
        gate.open()
        assert all(f.result().request_id for f in slow)  # the admitted calls were not disturbed
        _inflight_drained(server)
        m = samples(server.metrics.exposition().decode())
        assert value(m, "lossd_rejected_requests_total", reason="concurrency_limit") == 1
        assert (
            value(
                m, "grpc_server_handled_total", grpc_method="Compute", grpc_code="ResourceExhausted"
            )
            == 1
        )
        assert value(m, "grpc_server_handled_total", grpc_method="Compute", grpc_code="OK") == 2
        _still_serving(server)


def test_a_deadline_shorter_than_the_computation_discards_the_result():
    with running(metrics_port=-1) as server, _stub(server) as stub:
        gate = Gate(server.engine)
        # The deadline has to outlast the trip to the engine (else the call never arrives: it is
        # refused in the queue, the next test's subject); 5 s does on the busiest CI machine.
        call = stub.Compute.future(_mse(), timeout=5.0)
        gate.wait_arrivals(1)
        with pytest.raises(grpc.RpcError) as caught:
            call.result()  # the client's deadline passes while the engine is held
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server's deadline is the client's plus the headers' transit: the client cancels
        # its stream first. Past the server's own, the guard reads the deadline, not a cancel
        # (1 in 6 runs opened inside that window and saw Cancelled).
        time.sleep(1.0)
        gate.open()
        assert gate.finished.acquire(timeout=30)  # the computation itself ran to its end...
        _inflight_drained(server)
        m = samples(server.metrics.exposition().decode())
        # ...but its result went no further than the deadline guard: the after_compute hooks
        # behind it (metrics here, the audit recorder in production) never saw it.
        assert value(m, "lossd_phase_seconds_count", loss="mse") == 0
        assert value(m, "lossd_sent_bytes_total", loss="mse") == 0
        assert (
            value(
                m, "grpc_server_handled_total", grpc_method="Compute", grpc_code="DeadlineExceeded"
            )
            == 1
        )
        assert value(m, "lossd_rejected_requests_total", reason="deadline_exceeded") == 1
        _still_serving(server)
        assert (
            value(
                samples(server.metrics.exposition().decode()),
                "lossd_phase_seconds_count",
                loss="mse",
                phase="compute",
            )
            == 1
        )


def test_a_call_whose_deadline_passed_in_the_queue_never_computes():
    with (
        running(workers=1, max_concurrent_rpcs=8, metrics_port=-1) as server,
        _stub(server) as stub,
    ):
        gate = Gate(server.engine)
        first = stub.Compute.future(_mse(), timeout=60)
        gate.wait_arrivals(1)  # the only worker thread is busy
        queued = stub.Compute.future(_mse(), timeout=0.5)
        with pytest.raises(grpc.RpcError) as caught:
            queued.result()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.open()
        assert first.result().request_id
        _inflight_drained(server)
        assert not gate.arrived.acquire(timeout=0.5), "the expired call reached the engine"
        _still_serving(server)


def _refusal(server, request, **options) -> LossdError:
    """The error a fresh client gets for ``request``."""
    client = LossClient(f"127.0.0.1:{server.port}", timeout=30, retries=0, **options)
    try:
        with pytest.raises(LossdError) as caught:
            client.compute(request)
    finally:
        client.close()
    return caught.value


def test_an_oversized_message_is_resource_exhausted_and_names_the_setting():
    with running(max_message_mb=1, metrics_port=-1) as server:
        big = build_request("mse", {}, (torch.ones(300_000), torch.zeros(300_000)), {})  # 2.4 MB
        assert big.ByteSize() > 1 << 20
        refused = _refusal(server, big, max_message_mb=64)
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-message-mb" in refused.details
        # The client refuses before sending when its own limit is lower, naming both knobs.
        refused = _refusal(server, big, max_message_mb=1)
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_message_mb" in refused.details and "--max-message-mb" in refused.details
        _still_serving(server)


def test_an_element_cap_is_resource_exhausted_and_names_the_flag():
    with running(max_elements=100, metrics_port=-1) as server:
        refused = _refusal(server, _mse(101))
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-elements" in refused.details and refused.field == "args[0].shape"
        _still_serving(server)


# ------------------------------------------------------------------------------------------
# One configuration object: flags, environment, file


def test_every_limit_is_a_server_config_field():
    names = {f.name for f in fields(ServerConfig)}
    assert set(LIMITS) <= names
    limits = ServerConfig(
        **{k: v for k, v in LIMITS.items() if k not in ("max_message_mb", "max_concurrent_rpcs")}
    ).limits
    assert (limits.max_rank, limits.max_elements, limits.max_depth) == (4, 1234, 6)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_limit_is_settable_by_file_env_and_flag_in_that_priority(name, tmp_path: Path):
    flag = "--" + name.replace("_", "-")
    config_file = tmp_path / "lossd.yaml"
    config_file.write_text(f"{name}: {LIMITS[name]}\n")
    env_key = f"LOSSD_{name.upper()}"
    from_file = ServerConfig.from_sources(env={"LOSSD_CONFIG": str(config_file)})
    from_env = ServerConfig.from_sources(
        env={"LOSSD_CONFIG": str(config_file), env_key: str(LIMITS[name] + 1)}
    )
    assert getattr(from_file, name) == LIMITS[name]
    assert getattr(from_env, name) == LIMITS[name] + 1
    from_flag = parse([flag, str(LIMITS[name] + 2), "--config", str(config_file)])
    assert getattr(from_flag, name) == LIMITS[name] + 2


def test_the_limits_in_force_are_printed_at_start_up(tmp_path: Path):
    config_file = tmp_path / "lossd.yaml"
    config_file.write_text("max_items: 777\nmax_depth: 7\n")
    with ServerProcess(
        "--max-concurrent-rpcs",
        "3",
        "--config",
        str(config_file),
        env={"LOSSD_MAX_ELEMENTS": "4242", "LOSSD_MAX_DEPTH": "9"},
    ) as proc:
        assert health_status(proc.address) == "SERVING"
        log = "".join(proc.stderr_lines)
    for line in (
        "max_concurrent_rpcs = 3",
        "max_items = 777",
        "max_elements = 4242",
        "max_depth = 9",
        "max_message_mb = 256",
    ):
        assert line in log, f"{line!r} not in the start-up log:\n{log}"
