"""Servers as real subprocesses: start one, read the address it prints, stop it; what they cost
(resident memory, CPU time). The tests' ``lossd serve`` processes and the benchmark's servers
(bench/servers.py) are both started here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ChildProcess:
    """A server child process that prints ``<marker> HOST:PORT`` once it listens. Use as a
    context manager; ``address`` once started. Its stdout after that line is kept in
    ``stdout_lines`` and its stderr in ``stderr_lines`` (both drained, so it never blocks)."""

    def __init__(
        self,
        argv: Sequence[str],
        marker: str,
        *,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        cwd: str | Path | None = None,
    ) -> None:
        self.argv: Sequence[str] = list(argv)
        self.marker = marker
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.timeout = timeout
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []  # what it printed after the address line

    def start(self) -> ChildProcess:
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.cwd,
        )
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(self.marker):
                self.address = line.split()[-1]
                threading.Thread(target=self._drain_stdout, daemon=True).start()
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        name = " ".join(self.argv[1:4])
        raise RuntimeError(f"{name} did not start:\n" + "".join(self.stderr_lines[-30:]))

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout_lines.append(line)

    def metrics_url(self, timeout: float = 30.0) -> str:
        """The /metrics URL it printed (start it with ``--metrics-port 0``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stdout_lines):
                if line.startswith("lossd metrics on "):
                    return line.split()[-1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("lossd serve printed no metrics URL (was --metrics-port given?)")

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, sig: int | None = None, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ChildProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess(ChildProcess):
    """``lossd serve --port 0 --device cpu`` and ``flags`` (a later flag wins) as a child."""

    def __init__(
        self,
        *flags: str,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        cwd: str | Path | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "lossd.server.cli", "serve", "--port", "0", "--device", "cpu"]
        super().__init__([*argv, *flags], "lossd listening on ", env=env, timeout=timeout, cwd=cwd)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serving(address: str, timeout: float = 10.0) -> bool:
    """Whether the server at ``address`` answers its LossService health check SERVING."""
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="lossd.v1.LossService"), timeout=timeout
            )
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of a process in KiB, from /proc (Linux)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]
