"""Three ``lossd serve`` processes behind one client: round-robin shares, and a replica killed
midway costs no call (UNAVAILABLE is retried on another replica with the same request id)."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from lossd.client import LossClient, LossdError
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.client.wire import codec
from tests.support.opskit import samples, scrape, value
from tests.support.serverproc import ServerProcess

CALLS = 300
THREADS = 3


def _handled_ok(proc: ServerProcess) -> float:
    m = samples(scrape(proc.metrics_url()))
    return value(m, "grpc_server_handled_total", grpc_method="Compute", grpc_code="OK")


def test_three_replicas_share_the_calls_and_survive_a_sigkill():
    flags = ("--metrics-port", "0", "--audit", "none", "--workers", "2", "--log-level", "WARNING")
    replicas = [ServerProcess(*flags) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(ServerProcess.start, replicas))  # start together: each imports torch
    client = LossClient([r.address for r in replicas], timeout=60, retries=6)
    try:
        done = 0
        lock = threading.Lock()
        killed = threading.Event()
        go = threading.Event()  # cleared while the victim is scraped and killed
        go.set()
        victim_share: list[float] = []
        failures: list[BaseException] = []

        def one(i: int) -> None:
            nonlocal done
            x = torch.full((8,), float(i))
            request = build_request("mse", {}, (x, torch.zeros(8)), {})
            sent_id = request.request_id
            assert go.wait(60)
            try:
                response = client.compute(request)
                assert response.request_id == sent_id  # retries kept the caller's id
                assert float(codec.decode_value(response.loss, "loss")) == float(i) ** 2
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                failures.append(exc)
            with lock:
                done += 1
                midway = done == CALLS // 2
            if midway:
                # No new call starts from here until the kill, so the scrape misses at most
                # the calls already in flight (fewer than THREADS).
                go.clear()
                victim_share.append(_handled_ok(replicas[0]))
                replicas[0].proc.send_signal(signal.SIGKILL)
                replicas[0].proc.wait(30)
                killed.set()
                go.set()

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, range(CALLS)))
        assert killed.is_set()
        assert not failures, f"{len(failures)} of {CALLS} calls failed, first: {failures[0]!r}"
        survivors = [_handled_ok(r) for r in replicas[1:]]
    finally:
        client.close()
        for r in replicas:
            r.stop()

    shares = [victim_share[0], *survivors]
    # Round-robin gives each replica about a third of the first half; all of them took part.
    assert all(share >= CALLS // 12 for share in shares), shares
    # Each call was answered once; a call caught in flight by the kill may be counted by the
    # victim and again by the replica that answered its retry, or by neither.
    assert CALLS - THREADS <= sum(shares) <= CALLS + THREADS, shares


def test_unavailable_is_retried_with_the_same_request_id():
    """A replica that answers UNAVAILABLE (draining, restarting) costs a retry, not the call."""
    seen: list[str] = []

    def compute(request: pb.ComputeRequest, context: grpc.ServicerContext) -> pb.ComputeResponse:
        seen.append(request.request_id)
        if len(seen) < 3:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return pb.ComputeResponse(request_id=request.request_id)

    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "lossd.v1.LossService",
                {
                    "Compute": grpc.unary_unary_rpc_method_handler(
                        compute,
                        request_deserializer=pb.ComputeRequest.FromString,
                        response_serializer=pb.ComputeResponse.SerializeToString,
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = LossClient(f"127.0.0.1:{port}", timeout=30, retries=4)
        request = build_request("mse", {}, (torch.zeros(2), torch.zeros(2)), {})
        try:
            assert client.compute(request).request_id == request.request_id
        finally:
            client.close()
        assert seen == [request.request_id] * 3  # two refusals, one answer: one id throughout
        no_retry = LossClient(f"127.0.0.1:{port}", timeout=30, retries=0)
        seen.clear()
        try:
            with pytest.raises(LossdError) as caught:
                no_retry.compute(build_request("mse", {}, (torch.zeros(2), torch.zeros(2)), {}))
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        finally:
            no_retry.close()
    finally:
        server.stop(0)
    assert len(seen) == 1
