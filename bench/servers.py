"""Process control: the servers the benchmark measures, as child processes.

Starting, reading the bound address and stopping are tests/support/serverproc.py's, shared with
the tests; here are only the bench's own command lines and the server designs it compares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tests.support.serverproc import ChildProcess, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]  # `-m bench.floor` resolves from here
START_TIMEOUT_S = 120.0


def network_path() -> dict[str, Any]:
    """RemoteLoss keywords for the rows that measure the network path to a ``lossd_server`` on
    this host: since shared memory is the default over loopback (client/shm.py), they turn it
    off (``shm=False``), and the co-located rows (bench/colocated.py) measure it. Empty for a
    client from before that option (an A/B against an older commit)."""
    from lossd.client.connection import ConnectionOptions

    return {"shm": False} if "shm" in ConnectionOptions.names() else {}


def lossd_server(
    opts: argparse.Namespace,
    workdir: Path,
    workers: int | None = None,
    port: int = 0,
    reuse_port: bool = False,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """``lossd serve`` with the bench's settings (not yet started); ``reuse_port`` for one of
    several processes sharing ``port`` (lossd serve refuses a port in use without it); ``env``
    added to the environment (bench/before.py's, for an older tree)."""
    return ServerProcess(
        "--port",
        str(port),
        *(["--reuse-port"] if reuse_port else []),
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
        env=env,
        timeout=START_TIMEOUT_S,
        cwd=ROOT,
    )


def floor_server(
    opts: argparse.Namespace, workers: int | None = None, port: int = 0
) -> ChildProcess:
    """The trivial handler (bench/floor.py) with the same pool and message limit (not started)."""
    argv = [sys.executable, "-m", "bench.floor", "--port", str(port)]
    argv += [
        "--workers",
        str(workers or opts.workers),
        "--max-message-mb",
        str(opts.max_message_mb),
    ]
    return ChildProcess(argv, "floor listening on ", timeout=START_TIMEOUT_S, cwd=ROOT)


def aio_server(opts: argparse.Namespace, side: str) -> ChildProcess:
    """bench/aio_server.py: the grpc.aio design, serving ``side`` (floor or lossd)."""
    argv = [sys.executable, "-m", "bench.aio_server", "--kind", side, "--device", opts.device]
    return ChildProcess(argv, "aio listening on ", timeout=START_TIMEOUT_S, cwd=ROOT)


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
) -> list[ChildProcess]:
    """The started processes of one design, serving ``side``: the trivial handler or lossd."""
    if kind == "asyncio":
        return [aio_server(opts, side).start()]
    port = free_port() if procs > 1 else 0
    servers: list[ChildProcess] = []
    try:
        for _ in range(procs):
            server = (
                floor_server(opts, workers, port)
                if side == "floor"
                else lossd_server(opts, workdir, workers, port, reuse_port=procs > 1)
            )
            servers.append(server.start())
    except Exception:
        for server in servers:
            server.stop()
        raise
    return servers
