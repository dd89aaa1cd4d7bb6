"""Start ``lossd serve`` as a real subprocess and read the address it prints."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServerProcess:
    """A ``lossd serve`` child process. Use as a context manager; ``address`` once started."""

    def __init__(
        self, *flags: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> None:
        self.argv: Sequence[str] = [
            sys.executable,
            "-m",
            "lossd.server.cli",
            "serve",
            "--port",
            "0",
            "--device",
            "cpu",
            *flags,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []  # what it printed after the address line

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env
        )
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("lossd listening on "):
                self.address = line.split()[-1]
                threading.Thread(target=self._drain_stdout, daemon=True).start()
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("lossd serve did not start:\n" + "".join(self.stderr_lines[-30:]))

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

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
