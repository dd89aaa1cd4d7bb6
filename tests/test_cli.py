"""``lossd serve`` as a process: bound address, health, reflection, graceful SIGTERM; ``lossd losses``."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lossd.client import RemoteLoss
from lossd.server import registry
from lossd.server.losses import FAMILY_MODULES  # noqa: F401  (registers the losses)
from tests.support.opskit import samples, scrape, value
from tests.support.serverproc import ServerProcess


@pytest.fixture(scope="module")
def proc():
    with ServerProcess() as server:
        yield server


def test_port_zero_prints_the_bound_address_and_serves(proc):
    assert proc.address.startswith("127.0.0.1:") and proc.port > 0
    with RemoteLoss("mse", endpoint=proc.address) as crit:
        assert crit(torch.ones(2), torch.zeros(2)).item() == 1.0


def test_health_reports_serving_overall_and_per_service(proc):
    with grpc.insecure_channel(proc.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lossd.v1.LossService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(proc):
    with grpc.insecure_channel(proc.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {
        "lossd.v1.LossService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_list_losses_is_the_registry(proc):
    from lossd.client import LossClient

    client = LossClient(proc.address, timeout=10)
    names = [info.name for info in client.list_losses()]
    assert names == sorted(s.name for s in registry.all_specs())
    info = client.describe("cross_entropy")
    assert {"fat", "netspresso"} <= set(info.families)
    smoothing = next(p for p in info.params if p.name == "label_smoothing")
    assert (
        smoothing.type == "float"
        and smoothing.maximum == 1.0
        and smoothing.default_value.float_value == 0.0
    )
    assert any(i.differentiable for i in info.inputs) and info.reference
    client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_calls_then_exits_cleanly(sig):
    server = ServerProcess("--grace-seconds", "20", "--metrics-port", "0").start()
    url = server.metrics_url()
    results: list[object] = []
    x = torch.randn(2000, 1000)  # a call long enough to be in flight when the signal lands

    def slow_call() -> None:
        with RemoteLoss("cross_entropy", endpoint=server.address, timeout=60) as crit:
            try:
                results.append(crit(x.requires_grad_(True), torch.zeros(2000, dtype=torch.long)))
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                results.append(exc)

    threads = [threading.Thread(target=slow_call) for _ in range(3)]
    for t in threads:
        t.start()
    # Signalled once all three calls have reached the server (one arriving after the signal
    # is refused, as it should be) and before they are all answered, however slow this
    # machine is to send them.
    deadline = time.monotonic() + 60
    while True:
        m = samples(scrape(url))
        started, handled = (
            sum(value(m, name, grpc_method=method) for method in ("Compute", "ComputeChunked"))
            for name in ("grpc_server_started_total", "grpc_server_handled_total")
        )
        if started == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    code = server.stop(sig)
    assert started == 3 and handled < 3, f"{started} calls started, {handled} answered"
    for t in threads:
        t.join(60)
    assert code == 0, "".join(server.stderr_lines[-20:])
    assert len(results) == 3
    assert all(isinstance(r, torch.Tensor) for r in results), results
    assert any("draining" in line for line in server.stderr_lines)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lossd.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_losses_command_prints_the_registry():
    out = _cli("losses")
    assert out.returncode == 0
    for spec in registry.all_specs():
        assert f"`{spec.name}`" in out.stdout
    rows = [line.split("`")[1] for line in out.stdout.splitlines() if line.startswith("| `")]
    assert len(set(rows)) == 31 == len(registry.all_specs())  # cross_entropy has two rows


def test_losses_name_prints_the_schema_and_an_example():
    out = _cli("losses", "cross_entropy")
    assert out.returncode == 0
    assert "label_smoothing: float, default 0.0; >= 0.0, <= 1.0" in out.stdout
    assert "example:" in out.stdout and "RemoteLoss(" in out.stdout
    missing = _cli("losses", "nope")
    assert missing.returncode == 2 and "unknown loss 'nope'" in missing.stderr


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--malloc-mmap-threshold-kb", "99999", ": expected 0..32768 (KiB), got 99999"),
        ("--trim-memory-idle-s", "-1", ": expected >= 0"),
        ("--tls-client-ca", "ca.pem", " needs --tls-cert and --tls-key"),
        ("--tls-client-roles", "roles.yaml", " needs --tls-client-ca"),
    ],
)
def test_a_setting_the_server_cannot_use_exits_2_naming_it(flag, value, words):
    out = _cli("serve", "--port", "0", flag, value)
    assert out.returncode == 2 and f"lossd serve: {flag}{words}" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
