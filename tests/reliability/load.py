"""Sustained load: several client processes against one ``lossd serve`` subprocess, audit on.

    .venv/bin/python -m tests.reliability.load --duration 180 --clients 4     # a few minutes
    .venv/bin/python -m tests.reliability.load --duration 30 --max-requests 3000

Loopback only, bounded in time (``--duration``) and in count (``--max-requests``, all clients
together). Each client process mixes, at random:

- valid calls of every registered loss (float32/float64, with gradients), checked against the
  same request evaluated in the client process (a wrong value counts as an unexpected error);
- larger calls (cross-entropy up to 32768 x 100, MSE on 2**20 elements over ComputeChunked);
- bad calls (unknown loss, undecodable bytes, byte counts that disagree with shapes, class
  indices out of range, terabyte shape claims, rank 9), whose status must be the one the same
  request gets locally;
- over unary Compute and ComputeChunked; half the valid calls carry an
  audit run id (``load-<client>``) and must come back ``audited``.

The report (JSON on stdout): requests, unexpected errors (must be 0; the first few are shown),
latency p50/p99 of successful calls, the server's peak RSS, and the audit check: the SQLite
trail holds exactly the acknowledged audited calls, each once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from lossd.client import transport as wire
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.client.wire import codec
from lossd.server.config import ServerConfig
from lossd.server.engine import Engine
from lossd.server.errors import to_service_error
from lossd.server.service import LossServicer, Malformed, safe_parser
from tests.reliability import hostile
from tests.support.serverproc import ServerProcess, rss_kib

RUN_PREFIX = "load-"
MAX_MESSAGE = 512 << 20


@dataclass
class Case:
    """One request of the mix and what it must give: a response or a status code."""

    name: str
    payload: bytes
    want: pb.ComputeResponse | None
    want_code: grpc.StatusCode | None
    chunked_ok: bool = False  # tensors worth sending in chunks
    audit: bool = False  # may carry an audit run id


def _expected(
    reference: LossServicer, payload: bytes
) -> tuple[pb.ComputeResponse | None, grpc.StatusCode | None]:
    try:
        parsed = safe_parser(pb.ComputeRequest)(payload)
        if isinstance(parsed, Malformed):
            return None, grpc.StatusCode.INVALID_ARGUMENT
        return reference.compute(parsed), None
    except Exception as exc:  # noqa: BLE001 - compared as its status
        return None, to_service_error(exc).code


def build_cases() -> tuple[list[Case], list[Case], list[Case]]:
    """(valid small, large, bad) cases, with the answers computed here."""
    # The server's torch thread count (--torch-threads), so that vectorised and scalar kernel
    # paths split the work alike and float32 answers agree to the rounding, not just roughly.
    torch.set_num_threads(ServerConfig().torch_threads)
    reference = LossServicer(Engine("cpu"), ServerConfig().limits)

    def case(name: str, request: pb.ComputeRequest | bytes, **kw: Any) -> Case:
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        want, code = _expected(reference, payload)
        return Case(name, payload, want, code, **kw)

    valid = [
        case(
            f"{spec.name}/{str(dtype)[6:]}",
            hostile.seed_request(spec.name, dtype, True),
            audit=True,
        )
        for spec in hostile.all_specs()
        for dtype in (torch.float32, torch.float64)
    ]
    torch.manual_seed(0)
    large = []
    for n in (256, 4096, 32768):
        logits, target = torch.randn(n, 100), torch.randint(0, 100, (n,))
        large.append(
            case(
                f"cross_entropy/{n}x100",
                build_request("cross_entropy", {}, [logits, target], {}, ["args[0]"]),
                audit=True,
            )
        )
    a, b = torch.randn(1 << 20), torch.randn(1 << 20)
    large.append(
        case(
            "mse/2**20",
            build_request("mse", {}, [a, b], {}, ["args[0]"]),
            chunked_ok=True,
            audit=True,
        )
    )

    def tensor_request(loss: str, *tensors: pb.Tensor) -> pb.ComputeRequest:
        request = pb.ComputeRequest(loss=loss)
        for t in tensors:
            request.args.add().tensor_value.CopyFrom(t)
        return request

    def f32(shape, data=None):
        return pb.Tensor(
            dtype=pb.DATA_TYPE_FLOAT32,
            shape=shape,
            data=bytes(4 * int(torch.tensor(shape).prod())) if data is None else data,
        )

    logits = codec.encode_tensor(torch.randn(4, 3))
    bad = [
        case("unknown loss", pb.ComputeRequest(loss="no_such_loss")),
        case("garbage bytes", b"\xff\xff\xff\x07garbage"),
        case("byte count", tensor_request("mse", f32([4, 4]), f32([4, 4], b"\0" * 12))),
        case(
            "class out of range",
            tensor_request(
                "cross_entropy", logits, codec.encode_tensor(torch.tensor([0, 1, 7, 2]))
            ),
        ),
        case(
            "negative class",
            tensor_request(
                "cross_entropy", logits, codec.encode_tensor(torch.tensor([0, -5, 1, 2]))
            ),
        ),
        case(
            "terabyte claim",
            tensor_request("mse", f32([1 << 20, 1 << 20], b"\0" * 16), f32([1], b"\0" * 4)),
        ),
        case("rank 9", tensor_request("mse", f32([1] * 9), f32([1] * 9))),
        case(
            "NaN param",
            build_request(
                "smooth_l1", {"beta": float("nan")}, [torch.randn(3), torch.randn(3)], {}, []
            ),
        ),
    ]
    for c in bad:
        assert c.want_code is not None, f"bad case {c.name!r} is accepted locally"
    return valid, large, bad


# --------------------------------------------------------------------------------------------
# One client process


def client_main(
    index: int, address: str, start: Any, deadline: Any, budget: int, seed: int, out: Any
) -> None:
    """Build the cases, wait at ``start`` (a barrier: the load begins when every client is ready),
    then send requests until ``deadline.value`` or ``budget``; put a summary dict on ``out``."""
    rng = random.Random(seed)
    valid, large, bad = build_cases()
    start.wait()
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    channel = grpc.insecure_channel(address, options=options)
    unary = channel.unary_unary(
        "/lossd.v1.LossService/Compute",
        request_serializer=lambda b: b,
        response_deserializer=pb.ComputeResponse.FromString,
    )
    chunked = wire.chunked_method(channel)
    latencies: list[int] = []
    counts: dict[str, int] = {}
    unexpected: list[str] = []
    audited: list[str] = []
    sent = 0
    step = 0
    while sent < budget and time.time() < deadline.value:
        roll = rng.random()
        c = rng.choice(valid if roll < 0.7 else large if roll < 0.78 else bad)
        try:
            request = pb.ComputeRequest.FromString(c.payload)
        except DecodeError:  # the undecodable case goes as its bytes
            request = None
        audit = c.audit and rng.random() < 0.5
        if request is not None:
            request.request_id = uuid.uuid4().hex
            if audit:
                step += 1
                request.audit.run_id = f"{RUN_PREFIX}{index}"
                request.audit.step = step
        transport = "chunked" if c.chunked_ok and rng.random() < 0.7 else "unary"
        t0 = time.perf_counter_ns()
        response = error = None
        try:
            if transport == "unary":
                response = unary(
                    request.SerializeToString() if request is not None else c.payload, timeout=120
                )
            else:
                outboard = codec.Outboard(64 << 10)
                header = pb.ComputeRequest()
                header.CopyFrom(request)
                for path, t in hostile.tensor_slots(header):
                    if len(t.data) >= outboard.min_bytes:
                        outboard.tensors.append(
                            (path, torch.frombuffer(bytearray(t.data), dtype=torch.uint8))
                        )
                        t.data = b""
                response, external = wire.chunked_compute(
                    chunked, header, outboard, timeout=120, max_bytes=MAX_MESSAGE
                )
                for path, flat in external.items():
                    response.grads[int(path[6:-1])].grad.data = flat.numpy().tobytes()
        except grpc.RpcError as exc:
            error = exc
        elapsed = time.perf_counter_ns() - t0
        sent += 1
        key = f"{transport}:{'OK' if error is None else error.code().name}"
        counts[key] = counts.get(key, 0) + 1
        why = _judge(c, response, error, audit)
        if why:
            unexpected.append(f"client {index} {c.name} via {transport}: {why}")
        elif error is None:
            latencies.append(elapsed)
            if response.audited:
                audited.append(request.request_id)
    channel.close()
    out.put(
        {
            "index": index,
            "sent": sent,
            "counts": counts,
            "latencies": latencies,
            "unexpected": unexpected,
            "audited": audited,
        }
    )


def _judge(
    c: Case, response: pb.ComputeResponse | None, error: grpc.RpcError | None, audit: bool
) -> str:
    """'' when the answer is the expected one; else what is wrong."""
    if c.want_code is not None:
        if error is None:
            return f"expected {c.want_code.name}, got a result"
        return (
            ""
            if error.code() == c.want_code
            else f"expected {c.want_code.name}, got {error.code().name}: {error.details()}"
        )
    if error is not None:
        return f"expected a result, got {error.code().name}: {error.details()}"
    diff = hostile.same_result(response, c.want, rtol=1e-5, atol=1e-6)
    if diff:
        return f"wrong result: {diff}"
    if response.audited != audit:
        return f"audited={response.audited}, expected {audit}"
    return ""


# --------------------------------------------------------------------------------------------
# The run


def percentile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


IDLE_WAIT_S = 4.0  # past the server's default --trim-memory-idle-s of 2 s


def run(
    duration: float,
    clients: int,
    max_requests: int,
    data_dir: str | None = None,
    workers: int = 4,
    memory_budget_mb: int = 0,
) -> dict[str, Any]:
    """Start a server, load it, check the audit trail, stop it; return the report."""
    data = Path(data_dir or tempfile.mkdtemp(prefix="lossd-load-"))
    db = data / "audit.sqlite3"
    server = ServerProcess(
        "--audit",
        "runs",
        "--data-dir",
        str(data),
        "--workers",
        str(workers),
        "--log-level",
        "WARNING",
        "--memory-budget-mb",
        str(memory_budget_mb),
    )
    from lossd.server.budget import default_budget_mb

    report: dict[str, Any] = {
        "duration_s": duration,
        "clients": clients,
        "memory_budget_mb": memory_budget_mb or default_budget_mb(),
    }
    with server:
        pid = server.proc.pid
        baseline = rss_kib(pid)[0]
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                try:
                    samples.append(rss_kib(pid)[0])
                except (OSError, KeyError):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ctx = mp.get_context("spawn")  # no forked gRPC or torch state
        out = ctx.Queue()
        barrier = ctx.Barrier(clients + 1)
        deadline = ctx.Value("d", 0.0)
        share = max(1, max_requests // clients)
        procs = [
            ctx.Process(
                target=client_main,
                args=(i, server.address, barrier, deadline, share, 1000 + i, out),
            )
            for i in range(clients)
        ]
        for p in procs:
            p.start()
        deadline.value = time.time() + 600 + duration  # replaced below, once every client is ready
        barrier.wait(timeout=600)
        start = time.time()
        deadline.value = start + duration
        results = [out.get(timeout=duration + 300) for _ in procs]
        for p in procs:
            p.join(60)
        wall = time.time() - start
        stop.set()
        sampler.join()
        rss, peak = rss_kib(pid)
        time.sleep(
            IDLE_WAIT_S
        )  # the server gives freed memory back once idle (--trim-memory-idle-s)
        rss_idle = rss_kib(pid)[0]
        alive = server.proc.poll() is None
        acked = [rid for r in results for rid in r["audited"]]
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            stored = [
                row[0]
                for row in conn.execute(
                    "SELECT request_id FROM audit_records WHERE run_id LIKE ?", (RUN_PREFIX + "%",)
                )
            ]
        exit_code = server.stop()
    latencies = [v for r in results for v in r["latencies"]]
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
    unexpected = [u for r in results for u in r["unexpected"]]
    report.update(
        wall_s=round(wall, 1),
        requests=sum(r["sent"] for r in results),
        requests_per_s=round(sum(r["sent"] for r in results) / wall, 1),
        outcomes=dict(sorted(counts.items())),
        unexpected_errors=len(unexpected),
        unexpected_first=unexpected[:10],
        p50_ms=round(percentile(latencies, 0.50), 2),
        p99_ms=round(percentile(latencies, 0.99), 2),
        max_ms=round(max(latencies, default=0) / 1e6, 2),
        rss_baseline_mib=baseline // 1024,
        rss_end_mib=rss // 1024,
        rss_idle_mib=rss_idle // 1024,
        rss_peak_mib=max(peak, *samples, 0) // 1024,
        server_alive=alive,
        server_exit_code=exit_code,
        audited_acknowledged=len(acked),
        audit_records=len(stored),
        audit_distinct=len(set(stored)),
        audit_exact=sorted(acked) == sorted(stored),
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=180.0, help="seconds of load (default 180)"
    )
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000, help="cap on requests, all clients together"
    )
    parser.add_argument("--workers", type=int, default=4, help="server handler threads")
    parser.add_argument(
        "--data-dir", default=None, help="server data dir (the audit DB); default a temp dir"
    )
    parser.add_argument(
        "--memory-budget-mb", type=int, default=0, help="the server's budget (default: its own)"
    )
    args = parser.parse_args(argv)
    report = run(
        args.duration,
        args.clients,
        args.max_requests,
        args.data_dir,
        args.workers,
        args.memory_budget_mb,
    )
    print(json.dumps(report, indent=2))
    ok = (
        report["requests"] > 0
        and report["unexpected_errors"] == 0
        and report["audit_exact"]
        and report["server_alive"]
        and report["server_exit_code"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
