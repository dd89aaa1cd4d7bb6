"""Measurement: one row's columns, throughput from client processes, server designs, server
memory and a 1 GiB request; every figure a dict that bench/report.py renders.

Columns of a row (one loss, one payload size, the same tensors throughout):

- ``echo``: bare gRPC unary echo of the request's tensor bytes, answered with the gradient's
  size (``bench.floor``, a trivial servicer with the same server settings);
- ``pingpong``: the same bytes on one long-lived bidi stream (what a session transport could save);
- ``local``: torch forward+backward in this process (the server's engine, no transport);
- ``unary`` / ``chunked`` / ``auto``: ``RemoteLoss`` forward + ``.backward()`` end to end
  with that transport; ``auto`` is what a user gets by default.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.support.serverproc import cpu_seconds, rss_kib

from . import workloads
from .floor import FloorClient
from .servers import DESIGNS, ROOT, design_name, lossd_server, network_path, start_design

KB, MB = 1 << 10, 1 << 20


def rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, bytes."""
    current, peak = rss_kib(pid)
    return {"VmRSS": current << 10, "VmHWM": peak << 10}


def stats(times: list[float]) -> dict[str, float]:
    a = np.asarray(times)
    return {
        "n": len(a),
        "p50": float(np.median(a)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
    }


def remote_transports() -> list[str]:
    """The transports this client offers (an older client has unary only)."""
    from lossd.client import RemoteLoss

    if "transport" in inspect.signature(RemoteLoss.__init__).parameters:
        return ["unary", "chunked", "auto"]
    return ["unary"]


LOCAL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-local")


def torch_threads_of(server_args: list[str]) -> int:
    """The ``--torch-threads`` given to the server, so the local column runs with the same."""
    for i, arg in enumerate(server_args):
        if arg.startswith("--torch-threads="):
            return int(arg.split("=", 1)[1])
        if arg == "--torch-threads" and i + 1 < len(server_args):
            return int(server_args[i + 1])
    from lossd.server.config import ServerConfig

    return ServerConfig().torch_threads  # the server's default


def local_cell(w: workloads.Workload, opts: argparse.Namespace) -> Callable[[], int]:
    """The ``local`` column: the server's engine on ``w`` in this process; each call returns the
    evaluation's own nanoseconds."""
    from lossd.server.engine import Engine

    engine = Engine(opts.device if opts.device != "auto" else "cpu")
    local_args = workloads.to_device(w.args, engine.device)
    paths = workloads.grad_paths(local_args, w.args)

    def evaluate() -> int:
        t0 = time.perf_counter_ns()
        engine.evaluate(w.loss, w.params, local_args, {}, paths)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter_ns() - t0

    # Like the server, evaluate on a pool thread (not the main thread: under load, OpenMP regions
    # started from the main thread of a busy process were up to 10x slower); time it there.
    return lambda: LOCAL_THREAD.submit(evaluate).result()


def remote_cell(w: workloads.Workload, module: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """A remote column: ``module`` (a RemoteLoss) forward and backward on fresh leaves of ``w``."""

    def remote() -> None:
        w.fresh()
        module(*w.args, **w.kwargs).backward()

    return remote


def run_row(
    w: workloads.Workload,
    floor: FloorClient,
    lossd_address: str,
    opts: argparse.Namespace,
    transports: list[str],
) -> dict[str, Any]:
    """Every column of one row, measured interleaved: one call of each column per round, so
    every column sees the same machine (other jobs' load moves all of them, not one)."""
    from lossd.client import RemoteLoss

    min_n, max_n = (3 if w.size >= 16 * MB else 5), opts.max_n
    row: dict[str, Any] = {
        "loss": w.loss,
        "size": w.size,
        "shape": w.shape,
        "request_bytes": w.request_bytes,
        "grad_bytes": w.grad_bytes,
    }
    payload = (
        os.urandom(w.request_bytes)
        if w.request_bytes < 4 * MB
        else np.random.bytes(w.request_bytes)
    )
    cells: dict[str, Callable[[], Any]] = {
        "echo": functools.partial(floor.echo, payload, w.grad_bytes)
    }
    closers: list[Callable[[], Any]] = []
    if w.size <= 1 * MB:
        session = floor.ping_pong(payload, w.grad_bytes)
        cells["pingpong"] = session.round_trip
        closers.append(session.close)

    cells["local"] = local_cell(w, opts)
    for transport in transports:
        if transport == "chunked" and w.size < 1 * MB:
            continue
        kwargs = {"transport": transport} if transport != "unary" or len(transports) > 1 else {}
        module = RemoteLoss(
            w.loss,
            endpoint=lossd_address,
            max_message_mb=opts.max_message_mb,
            **network_path(),
            **kwargs,
            **w.params,
        )
        closers.append(module.close)
        cells[transport] = remote_cell(w, module)

    times: dict[str, list[float]] = {name: [] for name in cells}
    try:
        for name, fn in list(cells.items()):  # warm-up: connections, streams, first-call costs
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a failed column is reported, the run goes on
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                del cells[name]
        deadline = time.perf_counter() + opts.budget * max(1, len(cells))
        rounds = 0
        while rounds < max_n and (rounds < min_n or time.perf_counter() < deadline):
            for name, fn in list(cells.items()):
                t0 = time.perf_counter_ns()
                try:
                    inner = fn()
                except Exception as exc:  # noqa: BLE001
                    row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    del cells[name]
                    continue
                elapsed = inner if name == "local" else time.perf_counter_ns() - t0
                times[name].append(elapsed / 1e9)
            rounds += 1
    finally:
        for close in closers:
            close()
    for name, values in times.items():
        if values and "error" not in row.get(name, {}):
            row[name] = stats(values)
    return row


def _throughput_worker(
    kind: str, address: str, duration: float, start_at: float, transport: str
) -> int:
    torch.set_num_threads(1)
    w = workloads.build("cross_entropy", 1 * KB)
    if kind == "floor":
        floor = FloorClient(address)
        payload = os.urandom(w.request_bytes)

        def call() -> None:
            floor.echo(payload, w.grad_bytes)
    else:
        from lossd.client import RemoteLoss

        kwargs = (
            {"transport": transport}
            if "transport" in inspect.signature(RemoteLoss.__init__).parameters
            else {}
        )
        torch.set_num_threads(1)
        module = RemoteLoss("cross_entropy", endpoint=address, **network_path(), **kwargs)

        def call() -> None:
            w.fresh()
            module(*w.args).backward()

    for _ in range(20):
        call()
    time.sleep(max(0.0, start_at - time.time()))
    end = time.time() + duration
    count = 0
    cpu = time.process_time()
    while time.time() < end:
        call()
        count += 1
    return count, time.process_time() - cpu


class ClientPool:
    """``clients`` spawned client processes, started once (importing torch takes seconds)."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.pool = multiprocessing.get_context("spawn").Pool(clients)
        self.pool.map(_warm, range(clients), chunksize=1)

    def rps(
        self, address: str, kind: str, duration: float, transport: str, pids: Sequence[int] = ()
    ) -> dict[str, float]:
        """Requests/s of all clients together, and CPU seconds per request of the clients and of
        the server processes ``pids`` (which explains a ratio: the cores are shared)."""
        start_at = time.time() + 1.5  # every client warmed up and connected before the clock starts
        before = sum(cpu_seconds(pid) for pid in pids)
        runs = self.pool.starmap(
            _throughput_worker, [(kind, address, duration, start_at, transport)] * self.clients
        )
        calls = sum(n for n, _ in runs)
        out = {
            "rps": calls / duration,
            "client_cpu_ms": 1e3 * sum(c for _, c in runs) / max(calls, 1),
        }
        if pids:
            # Includes the 1.5 s warm-up (20 calls per client), a small overestimate.
            out["server_cpu_ms"] = (
                1e3 * (sum(cpu_seconds(pid) for pid in pids) - before) / max(calls, 1)
            )
        return out

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def _warm(_: int) -> None:
    import lossd.client  # noqa: F401 - import torch and the client once per worker process

    time.sleep(1.0)  # hold this worker, so that every worker gets one of the warm-up tasks


def concurrency(opts: argparse.Namespace, workdir: Path, pool: ClientPool) -> list[dict[str, Any]]:
    rows = []
    for kind, workers, procs in DESIGNS:
        row: dict[str, Any] = {
            "design": design_name(kind, workers, procs),
            "kind": kind,
            "workers": workers,
            "processes": procs,
        }
        for side in ("floor", "lossd"):
            servers = start_design(opts, workdir, side, kind, workers, procs)
            try:
                cell = pool.rps(
                    servers[0].address,
                    side,
                    opts.throughput_seconds,
                    "unary",
                    [srv.pid for srv in servers],
                )
                row[f"{side}_rps"] = cell["rps"]
                row[f"{side}_cpu"] = cell
            except Exception as exc:  # noqa: BLE001 - a failed design is reported, the run goes on
                row[f"{side}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                for server in servers:
                    server.stop()
        print(
            f"concurrency {row['design']}: trivial {row.get('floor_rps', 0):.0f}/s, lossd {row.get('lossd_rps', 0):.0f}/s",
            flush=True,
        )
        rows.append(row)
    return rows


def memory(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Server RSS: drift over many small calls, then the peak for one large request."""
    from lossd.client import RemoteLoss

    server = lossd_server(opts, workdir).start()
    out: dict[str, Any] = {}
    try:
        small = workloads.build("cross_entropy", 1 * KB)
        with RemoteLoss("cross_entropy", endpoint=server.address, **network_path()) as module:
            for _ in range(500):
                small.fresh()
                module(*small.args).backward()
            before = rss(server.pid)["VmRSS"]
            t0 = time.perf_counter()
            for _ in range(opts.drift_calls):
                small.fresh()
                module(*small.args).backward()
            after = rss(server.pid)["VmRSS"]
        out["drift"] = {
            "calls": opts.drift_calls,
            "rss_before": before,
            "rss_after": after,
            "seconds": time.perf_counter() - t0,
            "ratio": after / before - 1,
        }
        print(
            f"memory drift: {before / MB:.1f} MB -> {after / MB:.1f} MB over {opts.drift_calls} calls",
            flush=True,
        )
        # Peak: one large request (cross_entropy, so the gradient is as large as the request).
        big = workloads.build("cross_entropy", opts.memory_mb * MB)
        with RemoteLoss(
            "cross_entropy",
            endpoint=server.address,
            max_message_mb=opts.max_message_mb,
            **network_path(),
        ) as module:
            base = rss(server.pid)
            t0 = time.perf_counter()
            module(*big.args).backward()
            seconds = time.perf_counter() - t0
        peak = rss(server.pid)
        out["peak"] = {
            "request_bytes": big.request_bytes,
            "rss_before": base["VmRSS"],
            "hwm_before": base["VmHWM"],
            "hwm_after": peak["VmHWM"],
            "raise": peak["VmHWM"] - base["VmRSS"],
            "seconds": seconds,
            "ratio": (peak["VmHWM"] - base["VmRSS"]) / big.request_bytes,
        }
        print(
            f"memory peak: +{out['peak']['raise'] / MB:.0f} MB for {big.request_bytes / MB:.0f} MB",
            flush=True,
        )
    finally:
        server.stop()
    # The same evaluation with no server: what torch itself needs on top of the inputs.
    probe = subprocess.run(
        [sys.executable, "-c", _LOCAL_PEAK, str(opts.memory_mb * MB), opts.device],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    if probe.returncode == 0:
        out["local_peak"] = json.loads(probe.stdout.strip().splitlines()[-1])
        out["local_peak"]["ratio"] = out["local_peak"]["raise"] / out["local_peak"]["request_bytes"]
    from lossd.client import shm

    if shm.available():  # the same request through shared memory, over a Unix socket
        from .colocated import memory_peak

        out["colocated_peak"] = memory_peak(opts, workdir)
    return out


def huge(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One request of ``--huge-mb`` (default 1 GiB) with every default but ``--max-message-mb``
    (and ``shm=False``: the network path)."""
    from lossd.client import RemoteLoss

    server = lossd_server(opts, workdir).start()
    try:
        n = (opts.huge_mb * MB) // 8  # mse: prediction and target, float32 each
        gen = torch.Generator().manual_seed(0)
        pred = torch.randn(n, generator=gen).requires_grad_()
        target = torch.randn(n, generator=gen)
        # Client defaults (transport='auto') but for the network path: on this host shared
        # memory would carry the call (the co-located rows measure that).
        with RemoteLoss("mse", endpoint=server.address, **network_path()) as module:
            t0 = time.perf_counter()
            value = module(pred, target)
            value.backward()
            seconds = time.perf_counter() - t0
        expected = torch.nn.functional.mse_loss(pred.detach(), target)
        out = {
            "request_bytes": 8 * n,
            "seconds": seconds,
            "server_peak": rss(server.pid)["VmHWM"],
            "value_matches_local": bool(torch.equal(value.detach(), expected)),
            "grad_numel": pred.grad.numel(),
        }
        print(
            f"huge: {8 * n / MB:.0f} MB mse in {seconds:.1f} s, value equal to local: {out['value_matches_local']}",
            flush=True,
        )
        return out
    finally:
        server.stop()


# Run in a fresh interpreter: inputs built, RSS read, then one Engine.evaluate (what the server runs).
_LOCAL_PEAK = """
import json, sys
from bench import workloads
from bench.measure import rss
from lossd.server.engine import Engine
import os
w = workloads.build("cross_entropy", int(sys.argv[1]))
engine = Engine(sys.argv[2])
args = workloads.to_device(w.args, engine.device)
paths = workloads.grad_paths(args, w.args)
before = rss(os.getpid())["VmRSS"]
engine.evaluate("cross_entropy", {}, args, {}, paths)
after = rss(os.getpid())["VmHWM"]
print(json.dumps({"request_bytes": w.request_bytes, "raise": after - before}))
"""


def machine(device: str) -> dict[str, Any]:
    import google.protobuf
    import grpc

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "device": device,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
