"""The harness: servers in subprocesses, this process as the client, every column in one run.

Columns of a row (one loss, one payload size, the same tensors throughout):

- ``echo``: bare gRPC unary echo of the request's tensor bytes, answered with the gradient's
  size (``bench.floor``, a trivial servicer with the same server settings);
- ``pingpong``: the same bytes on one long-lived bidi stream (the floor of stream sessions);
- ``local``: torch forward+backward in this process (the server's engine, no transport);
- ``unary`` / ``stream`` / ``chunked``: ``RemoteLoss`` forward + ``.backward()`` end to end
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
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import workloads
from .floor import FloorClient

HERE = Path(__file__).resolve().parent
KB, MB = 1 << 10, 1 << 20
QUICK_SIZES = [1 * KB, 64 * KB, 1 * MB, 64 * MB]
FULL_SIZES = [1 * KB, 16 * KB, 64 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB]
LOSSES = ["cross_entropy", "FocalLoss", "GIoULoss", "yolox_loss", "yolov9_loss", "detr_loss"]
SMALL = 64 * KB  # the "small calls" target applies up to here
LARGE = 64 * MB  # the "large tensors" target applies from here


# --------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    proc: subprocess.Popen
    address: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(argv: list[str], marker: str, workdir: Path, name: str) -> Server:
    """Start ``argv`` and wait for its ``<marker> HOST:PORT`` line on stdout."""
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log.open("wb"), text=True, cwd=HERE.parent
    )
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(marker):
            address = line.split()[-1]
            # Keep draining stdout so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return Server(proc, address, log)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{name} did not start; see {log}:\n{log.read_text()[-3000:]}")


def lossd_argv(
    opts: argparse.Namespace, workdir: Path, workers: int | None = None, port: int = 0
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lossd.server.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers or opts.workers),
        "--max-message-mb",
        str(opts.max_message_mb),
        "--device",
        opts.device,
        "--audit",
        "none",
        "--data-dir",
        str(workdir),
        "--log-level",
        "WARNING",
        *opts.server_arg,
    ]


def floor_argv(opts: argparse.Namespace, workers: int | None = None, port: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.floor",
        "--port",
        str(port),
        "--workers",
        str(workers or opts.workers),
        "--max-message-mb",
        str(opts.max_message_mb),
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


# --------------------------------------------------------------------------------------------
# Timing


def stats(times: list[float]) -> dict[str, float]:
    a = np.asarray(times)
    return {
        "n": len(a),
        "p50": float(np.median(a)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
    }


# --------------------------------------------------------------------------------------------
# One row


def remote_transports() -> list[str]:
    """The transports this client offers (an older client has unary only)."""
    from lossd.client import RemoteLoss

    if "transport" in inspect.signature(RemoteLoss.__init__).parameters:
        return ["unary", "stream", "chunked", "auto"]
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
    from lossd.server.engine import Engine

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
    cells["local"] = lambda: LOCAL_THREAD.submit(evaluate).result()
    for transport in transports:
        if transport == "stream" and w.size > 1 * MB:
            continue  # sessions are for small calls; large ones go chunked
        if transport == "chunked" and w.size < 1 * MB:
            continue
        kwargs = {"transport": transport} if transport != "unary" or len(transports) > 1 else {}
        module = RemoteLoss(
            w.loss, endpoint=lossd_address, max_message_mb=opts.max_message_mb, **kwargs, **w.params
        )
        closers.append(module.close)

        def remote(module: RemoteLoss = module) -> None:
            w.fresh()
            module(*w.args, **w.kwargs).backward()

        cells[transport] = remote

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


# --------------------------------------------------------------------------------------------
# Throughput and memory


def _throughput_worker(
    kind: str, address: str, duration: float, start_at: float, transport: str
) -> int:
    torch.set_num_threads(1)
    w = workloads.build("cross_entropy", 1 * KB)
    if kind == "floor":
        floor = FloorClient(address)
        payload = os.urandom(w.request_bytes)
        if transport == "stream":
            session = floor.ping_pong(payload, w.grad_bytes)
            call = session.round_trip
        else:

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
        module = RemoteLoss("cross_entropy", endpoint=address, **kwargs)

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


# Server designs compared under the same load: small cross_entropy calls from the client pool.
DESIGNS = [
    ("threads", 1, 1),
    ("threads", 4, 1),
    ("threads", 16, 1),
    (
        "processes",
        4,
        2,
    ),  # two `lossd serve` sharing one port (SO_REUSEPORT, grpc's default on Linux)
    ("asyncio", 0, 1),  # grpc.aio, bench/aio_server.py
]


def design_name(kind: str, workers: int, procs: int) -> str:
    if kind == "threads":
        return f"1 process, threads, `--workers {workers}`"
    if kind == "processes":
        return f"{procs} processes on one port (SO_REUSEPORT), `--workers {workers}` each"
    return "1 process, grpc.aio (asyncio)"


def start_design(
    opts: argparse.Namespace, workdir: Path, side: str, kind: str, workers: int, procs: int
) -> list[Server]:
    if kind == "asyncio":
        argv = [sys.executable, "-m", "bench.aio_server", "--kind", side, "--device", opts.device]
        return [start_server(argv, "aio listening on", workdir, f"aio-{side}")]
    port = free_port() if procs > 1 else 0
    servers = []
    try:
        for i in range(procs):
            if side == "floor":
                servers.append(
                    start_server(
                        floor_argv(opts, workers, port),
                        "floor listening on",
                        workdir,
                        f"floor-{kind}{i}",
                    )
                )
            else:
                servers.append(
                    start_server(
                        lossd_argv(opts, workdir, workers, port),
                        "lossd listening on",
                        workdir,
                        f"lossd-{kind}{i}",
                    )
                )
    except Exception:
        for server in servers:
            server.stop()
        raise
    return servers


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

    server = start_server(lossd_argv(opts, workdir), "lossd listening on", workdir, "lossd-memory")
    out: dict[str, Any] = {}
    try:
        small = workloads.build("cross_entropy", 1 * KB)
        with RemoteLoss("cross_entropy", endpoint=server.address) as module:
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
            "cross_entropy", endpoint=server.address, max_message_mb=opts.max_message_mb
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
        cwd=HERE.parent,
        timeout=600,
    )
    if probe.returncode == 0:
        out["local_peak"] = json.loads(probe.stdout.strip().splitlines()[-1])
        out["local_peak"]["ratio"] = out["local_peak"]["raise"] / out["local_peak"]["request_bytes"]
    return out


def huge(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One request of ``--huge-mb`` (default 1 GiB) with every default but ``--max-message-mb``."""
    from lossd.client import RemoteLoss

    server = start_server(lossd_argv(opts, workdir), "lossd listening on", workdir, "lossd-huge")
    try:
        n = (opts.huge_mb * MB) // 8  # mse: prediction and target, float32 each
        gen = torch.Generator().manual_seed(0)
        pred = torch.randn(n, generator=gen).requires_grad_()
        target = torch.randn(n, generator=gen)
        with RemoteLoss(
            "mse", endpoint=server.address
        ) as module:  # client defaults: transport='auto'
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
from bench.harness import rss
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


# --------------------------------------------------------------------------------------------
# Report


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


def _ms(cell: dict[str, Any] | None, key: str = "p50") -> str:
    if not cell:
        return "–"
    if "error" in cell:
        return "error"
    return f"{cell[key] * 1e3:.2f}"


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= MB else f"{n >> 10} KB"


def best_remote(row: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    cells = [
        (t, row[t])
        for t in ("auto", "chunked", "stream", "unary")
        if isinstance(row.get(t), dict) and "p50" in row[t]
    ]
    return min(cells, key=lambda c: c[1]["p50"]) if cells else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured figure (ratios from this run)."""
    out = []
    for row in result.get("rows", []):
        if "p50" not in row.get("local", {}) or "p50" not in row.get("echo", {}):
            continue  # a failed floor or local column: reported in the table, no ratio to judge
        local = row["local"]["p50"]
        name = f"{row['loss']} {_size(row['size'])}"
        if row["size"] <= SMALL:
            if "p50" in row.get("unary", {}):
                ratio = row["unary"]["p50"] / (row["echo"]["p50"] + local)
                out.append(
                    {
                        "target": f"{name} unary <= 1.2 x (echo + local)",
                        "value": ratio,
                        "met": ratio <= 1.2,
                    }
                )
            if "p50" in row.get("stream", {}) and "pingpong" in row:
                ratio = row["stream"]["p50"] / (row["pingpong"]["p50"] + local)
                out.append(
                    {
                        "target": f"{name} stream <= 1.2 x (pingpong + local)",
                        "value": ratio,
                        "met": ratio <= 1.2,
                    }
                )
        if row["size"] >= LARGE:
            best = best_remote(row)
            if best:
                ratio = best[1]["p50"] / row["echo"]["p50"]
                transport_only = max(0.0, best[1]["p50"] - local) / row["echo"]["p50"]
                out.append(
                    {
                        "target": f"{name} {best[0]} <= 0.5 x echo (transport alone, lossd - local: {transport_only:.2f} x echo)",
                        "value": ratio,
                        "met": ratio <= 0.5,
                    }
                )
    for transport, cell in (result.get("throughput") or {}).items():
        ratio = cell["lossd_rps"] / cell["floor_rps"]
        out.append(
            {
                "target": f"throughput {result['config']['clients']} clients ({transport}) >= 0.7 x trivial handler",
                "value": ratio,
                "met": ratio >= 0.7,
            }
        )
    mem = result.get("memory") or {}
    if "peak" in mem:
        r = mem["peak"]["ratio"]
        out.append(
            {
                "target": f"peak RSS raise for one {mem['peak']['request_bytes'] >> 20} MB request <= 3x",
                "value": r,
                "met": r <= 3,
            }
        )
    if "drift" in mem:
        r = mem["drift"]["ratio"]
        out.append(
            {
                "target": f"RSS drift over {mem['drift']['calls']} calls < 5 %",
                "value": r,
                "met": r < 0.05,
            }
        )
    return out


def table(result: dict[str, Any]) -> str:
    cols = [
        "loss",
        "payload",
        "input",
        "req MB",
        "echo p50/p99",
        "pingpong p50",
        "local p50",
        "unary p50/p99",
        "stream p50/p99",
        "chunked p50/p99",
        "auto p50/p99",
        "best/floor",
        "MB/s",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:

        def both(key: str, row: dict = row) -> str:
            cell = row.get(key)
            return f"{_ms(cell)} / {_ms(cell, 'p99')}" if cell and "p50" in cell else _ms(cell)

        best = best_remote(row)
        if best is None or "p50" not in row.get("local", {}) or "p50" not in row.get("echo", {}):
            ratio = mbs = "–"
        else:
            floor = (
                row["echo"]["p50"] + row["local"]["p50"]
                if row["size"] < LARGE
                else row["echo"]["p50"]
            )
            if row["size"] <= SMALL and best[0] == "stream" and "pingpong" in row:
                floor = row["pingpong"]["p50"] + row["local"]["p50"]
            ratio = f"{best[1]['p50'] / floor:.2f} ({best[0]})"
            mbs = f"{(row['request_bytes'] + row['grad_bytes']) / best[1]['p50'] / MB:.0f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    row["loss"],
                    _size(row["size"]),
                    row["shape"],
                    f"{row['request_bytes'] / MB:.3f}",
                    both("echo"),
                    _ms(row.get("pingpong")),
                    _ms(row.get("local")),
                    both("unary"),
                    both("stream"),
                    both("chunked"),
                    both("auto"),
                    ratio,
                    mbs,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def render_machine(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}; Python {m['python']}, "
        f"torch {m['torch']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}; server device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f". Load average at the start: {m.get('load', '?')}."
    )


def render_targets(items: list[dict[str, Any]]) -> list[str]:
    if not items:
        return []
    parts = ["\nTargets:\n", "| target | measured | met |\n|---|---|---|"]
    for t in items:
        parts.append(f"| {t['target']} | {t['value']:.2f} | {'yes' if t['met'] else '**no**'} |")
    return parts


def render_sections(result: dict[str, Any]) -> dict[str, str]:
    """Markdown per part of the run ("rows", "concurrency", "memory"), each self-contained."""
    head = f"`{result['command']}` ({result['started']}). " + render_machine(result)
    all_targets = targets(result)
    sections = {}
    if "rows" in result:
        parts = [
            head,
            f"Server `--workers {result['config']['workers']}`; times in ms, p50 / p99 (n in the JSON); `local` = the "
            "server's engine (validation + forward + autograd.grad) in the bench process; `best/floor` = best lossd "
            "transport / (echo + local) below 64 MB [(pingpong + local) when the best is stream], / echo from 64 MB; "
            "MB/s = (request + gradient bytes) / best p50.",
            "",
            table(result),
        ]
        parts += [f"\n- {note}" for note in result.get("notes", [])]
        tp = result.get("throughput")
        if tp:
            parts.append(
                f"\nThroughput, {result['config']['clients']} client processes, small cross_entropy calls (16x16 f32 + targets), requests/s:\n"
            )
            parts.append(
                "| transport | trivial handler | lossd | ratio | CPU ms per call, trivial: server / clients | lossd: server / clients |\n"
                "|---|---|---|---|---|---|"
            )
            for transport, cell in tp.items():
                fl, ls = cell.get("floor", {}), cell.get("lossd", {})
                parts.append(
                    f"| {transport} | {cell['floor_rps']:.0f} | {cell['lossd_rps']:.0f} | {cell['lossd_rps'] / cell['floor_rps']:.2f} | "
                    f"{fl.get('server_cpu_ms', 0):.2f} / {fl.get('client_cpu_ms', 0):.2f} | {ls.get('server_cpu_ms', 0):.2f} / {ls.get('client_cpu_ms', 0):.2f} |"
                )
        parts += render_targets(
            [t for t in all_targets if not t["target"].startswith(("peak", "RSS"))]
        )
        sections["rows"] = "\n".join(parts)
    if "concurrency" in result:
        parts = [
            head,
            f"{result['config']['clients']} client processes, each looping `RemoteLoss('cross_entropy', transport='unary')` "
            "forward+backward on 16x16 logits (lossd) or a bare unary echo of the same bytes (trivial handler), "
            f"{result['config']['throughput_seconds']:.0f} s per cell; requests/s:",
            "",
            "| server design | trivial handler | lossd | lossd / trivial | server CPU ms per call: trivial / lossd |",
            "|---|---|---|---|---|",
        ]
        for row in result["concurrency"]:
            fl, ls = row.get("floor_rps"), row.get("lossd_rps")
            ratio = f"{ls / fl:.2f}" if fl and ls else "–"
            cpu = f"{row.get('floor_cpu', {}).get('server_cpu_ms', 0):.2f} / {row.get('lossd_cpu', {}).get('server_cpu_ms', 0):.2f}"
            parts.append(f"| {row['design']} | {fl or 0:.0f} | {ls or 0:.0f} | {ratio} | {cpu} |")
        sections["concurrency"] = "\n".join(parts)
    if "memory" in result:
        mem = result["memory"]
        parts = [head, ""]
        if "peak" in mem:
            p = mem["peak"]
            parts.append(
                f"- one {p['request_bytes'] / MB:.0f} MB cross_entropy request (+ as large a gradient), default transport (chunked): "
                f"peak RSS rose {p['raise'] / MB:.0f} MB = {p['ratio']:.2f} x the request (RSS before {p['rss_before'] / MB:.0f} MB, "
                f"peak after {p['hwm_after'] / MB:.0f} MB; {p['seconds']:.2f} s end to end)"
            )
        if "drift" in mem:
            d = mem["drift"]
            parts.append(
                f"- {d['calls']} small calls after 500 warm-up calls: RSS {d['rss_before'] / MB:.1f} MB -> {d['rss_after'] / MB:.1f} MB "
                f"({d['ratio'] * 100:+.2f} %; {d['calls'] / d['seconds']:.0f} calls/s from one client)"
            )
        if "local_peak" in mem:
            lp = mem["local_peak"]
            parts.append(
                f"- the same evaluation in a bare process, no server (inputs already in memory): peak RSS rose "
                f"{lp['raise'] / MB:.0f} MB = {lp['ratio']:.2f} x the request. That is torch's own working set for "
                "cross_entropy forward + autograd.grad (log-softmax, the dense gradient of the log-softmax, the input "
                "gradient); the server adds the request buffer (1 x) on top."
            )
        parts += render_targets([t for t in all_targets if t["target"].startswith(("peak", "RSS"))])
        sections["memory"] = "\n".join(parts)
    if "huge" in result:
        h = result["huge"]
        sections["huge"] = (
            f"{head}\n\n- one {h['request_bytes'] / MB:.0f} MB `mse` request (prediction + target, float32) through "
            f"`RemoteLoss('mse')` with every client default (transport `auto` -> chunked) and `lossd serve --max-message-mb "
            f"{opts_mb(result)}`: {h['seconds']:.1f} s forward+backward, value bitwise equal to local: "
            f"{h['value_matches_local']}, server peak RSS {h['server_peak'] / MB:.0f} MB"
        )
    return sections


def opts_mb(result: dict[str, Any]) -> int:
    return result["config"].get("max_message_mb", 0)


def write_results(sections: dict[str, str], path: Path) -> None:
    """Replace each measured section of RESULTS.md between its markers, keeping the rest."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    for name, body in sections.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        block = f"{start}\n{body}\n{end}"
        if start in text and end in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
        else:
            text = text.rstrip("\n") + f"\n\n## {SECTION_TITLES[name]}\n\n{block}\n"
    path.write_text(text)


SECTION_TITLES = {
    "rows": "Latency and bandwidth",
    "concurrency": "Concurrency: server designs",
    "memory": "Server memory",
    "huge": "A 1 GiB request",
}


# --------------------------------------------------------------------------------------------
# Main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 KB..64 MB, short budgets, fewer calls (under 2 minutes)",
    )
    p.add_argument(
        "--concurrency",
        action="store_true",
        help="run the server-design comparison (threads/processes/asyncio)",
    )
    p.add_argument("--memory", action="store_true", help="run the server memory measurement")
    p.add_argument(
        "--huge",
        action="store_true",
        help="one --huge-mb request (1 GiB) with defaults but --max-message-mb",
    )
    p.add_argument("--huge-mb", type=int, default=1024)
    p.add_argument(
        "--rows",
        action="store_true",
        help="run the latency/bandwidth table (the default when no part is named)",
    )
    p.add_argument(
        "--write-results",
        action="store_true",
        help="update the measured sections of bench/RESULTS.md",
    )
    p.add_argument(
        "--device", default="cpu", help="server device (and of the local column): cpu, cuda, cuda:N"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="lossd --workers (concurrent evaluations); the floor gets the same pool",
    )
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--sizes", default="", help="comma-separated sizes in KB (overrides the mode's)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per cell before stopping (min calls still run)",
    )
    p.add_argument("--max-n", type=int, default=None)
    p.add_argument(
        "--max-message-mb",
        type=int,
        default=1100,
        help="both servers' --max-message-mb (the one flag for >= 1 GiB)",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        default=256,
        help="size of the request for the peak-RSS measurement",
    )
    p.add_argument(
        "--drift-calls",
        type=int,
        default=None,
        help="small calls for the RSS drift (default 10000; 1000 with --quick)",
    )
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--throughput-seconds", type=float, default=None)
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `lossd serve` (repeatable)",
    )
    p.add_argument("--no-write", action="store_true", help="write no JSON to bench/results/")
    opts = p.parse_args(argv)
    opts.budget = opts.budget if opts.budget is not None else (0.2 if opts.quick else 2.0)
    opts.max_n = opts.max_n or (150 if opts.quick else 2000)
    opts.throughput_seconds = opts.throughput_seconds or (2.0 if opts.quick else 8.0)
    opts.drift_calls = opts.drift_calls or (1000 if opts.quick else 10_000)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if torch_threads_of(opts.server_arg) > 0:
        torch.set_num_threads(
            torch_threads_of(opts.server_arg)
        )  # the local column matches the server
    import lossd.server.losses  # noqa: F401 - registers every loss
    from lossd.server import registry

    named = {part for part in ("rows", "concurrency", "memory", "huge") if getattr(opts, part)}
    parts = named or ({"rows", "memory"} if opts.quick else {"rows", "concurrency", "memory"})
    sizes = (
        [int(s) * KB for s in opts.sizes.split(",")]
        if opts.sizes
        else (QUICK_SIZES if opts.quick else FULL_SIZES)
    )
    known = {s.name for s in registry.all_specs(None)}
    notes = [
        f"{name} is not registered on this server yet: skipped"
        for name in opts.losses.split(",")
        if name not in known
    ]
    losses = [name for name in opts.losses.split(",") if name in known]
    transports = remote_transports()
    if transports == ["unary"]:
        notes.append("this client has the unary transport only")
    machine_info = machine(opts.device)
    machine_info["load"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    result: dict[str, Any] = {
        "mode": "quick" if opts.quick else "full",
        "machine": machine_info,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {
            "workers": opts.workers,
            "clients": opts.clients,
            "max_message_mb": opts.max_message_mb,
            "throughput_seconds": opts.throughput_seconds,
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": notes,
    }
    t_start = time.perf_counter()
    torch.manual_seed(0)
    pool = None  # started after the rows: spawned clients importing torch would load the machine
    try:
        with tempfile.TemporaryDirectory(prefix="lossd-bench-") as tmp:
            workdir = Path(tmp)
            if "rows" in parts:
                result["rows"] = []
                pool = run_rows(opts, workdir, result, losses, sizes, transports)
            if "concurrency" in parts:
                pool = pool or ClientPool(opts.clients)
                result["concurrency"] = concurrency(opts, workdir, pool)
            if "memory" in parts:
                result["memory"] = memory(opts, workdir)
            if "huge" in parts:
                result["huge"] = huge(opts, workdir)
    finally:
        if pool is not None:
            pool.close()
    result["seconds"] = time.perf_counter() - t_start
    result["targets"] = targets(result)
    sections = render_sections(result)
    print()
    for name, body in sections.items():
        print(f"## {SECTION_TITLES[name]}\n\n{body}\n")
    print(f"({result['seconds']:.0f} s)")
    if not opts.no_write:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = (
            results
            / f"{stamp}-{result['mode']}-{'-'.join(sorted(parts))}-{opts.device.replace(':', '')}.json"
        )
        path.write_text(json.dumps(result, indent=1))
        print(f"JSON: {path.relative_to(HERE.parent)}")
    if opts.write_results:
        out = HERE / (
            "RESULTS.md" if opts.device == "cpu" else f"RESULTS-{opts.device.replace(':', '')}.md"
        )
        write_results(sections, out)
        print(f"updated {out.relative_to(HERE.parent)}")
    return 0


def run_rows(
    opts: argparse.Namespace,
    workdir: Path,
    result: dict[str, Any],
    losses: list[str],
    sizes: list[int],
    transports: list[str],
) -> ClientPool:
    """The side-by-side table, then throughput of the default servers (same run, same servers);
    returns the client pool it started for the throughput, for reuse."""
    floor_server = start_server(floor_argv(opts), "floor listening on", workdir, "floor")
    lossd_server = start_server(lossd_argv(opts, workdir), "lossd listening on", workdir, "lossd")
    try:
        floor = FloorClient(floor_server.address)
        for loss in losses:
            for size in sizes:
                cap = (
                    workloads.QUICK_MAX_SIZE.get(loss)
                    if opts.quick
                    else workloads.MAX_SIZE.get(loss)
                )
                if cap is not None and size > cap:
                    continue
                w = workloads.build(loss, size)
                row = run_row(w, floor, lossd_server.address, opts, transports)
                result["rows"].append(row)
                best = best_remote(row)
                print(
                    f"{loss:>14} {_size(size):>7}  echo {_ms(row.get('echo'))}  local {_ms(row.get('local'))}  "
                    + "  ".join(f"{t} {_ms(row.get(t))}" for t in transports if t in row)
                    + (f"  best {best[0]}" if best else ""),
                    flush=True,
                )
                del w
        floor.close()
        caps = workloads.QUICK_MAX_SIZE if opts.quick else workloads.MAX_SIZE
        skipped = [
            f"{loss} above {_size(caps[loss])}"
            for loss in losses
            if loss in caps and max(sizes) > caps[loss]
        ]
        if skipped:
            result["notes"].append(
                "not measured in this mode (compute, not transport, would dominate or take minutes): "
                + ", ".join(skipped)
            )
        pool = ClientPool(opts.clients)
        result["throughput"] = {}
        for transport in ("unary", "stream") if len(transports) > 1 else ("unary",):
            floor_cell = pool.rps(
                floor_server.address,
                "floor",
                opts.throughput_seconds,
                transport,
                [floor_server.pid],
            )
            lossd_cell = pool.rps(
                lossd_server.address,
                "lossd",
                opts.throughput_seconds,
                transport,
                [lossd_server.pid],
            )
            floor_rps, lossd_rps = floor_cell["rps"], lossd_cell["rps"]
            result["throughput"][transport] = {
                "floor_rps": floor_rps,
                "lossd_rps": lossd_rps,
                "floor": floor_cell,
                "lossd": lossd_cell,
            }
            print(
                f"throughput {transport}: trivial {floor_rps:.0f}/s, lossd {lossd_rps:.0f}/s",
                flush=True,
            )
    finally:
        floor_server.stop()
        lossd_server.stop()
    return pool
