"""What ``audited=true`` promises: the record survives SIGKILL; a retried request id is recorded
once; a store that cannot be written fails the call UNAVAILABLE, naming the store, never
silently dropping the record."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import pytest
import torch

from lossd.client import AuditClient, LossClient, LossdError
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.server.app import create_server
from lossd.server.config import ServerConfig
from tests.support.serverproc import ServerProcess


def audited_request(
    run_id: str, step: int, request_id: str | None = None, size: int = 8
) -> pb.ComputeRequest:
    logits = torch.randn(size, 5)
    target = torch.randint(0, 5, (size,))
    request = build_request(
        "cross_entropy",
        {},
        [logits, target],
        {},
        ["args[0]"],
        pb.AuditContext(run_id=run_id, step=step, rank=-1, micro_batch=-1),
    )
    if request_id is not None:
        request.request_id = request_id
    return request


def stored_request_ids(endpoint: str, run_id: str) -> list[str]:
    with AuditClient(endpoint, timeout=60) as reader:
        return [r["request_id"] for r in reader.records(run_id)]


def test_acknowledged_records_survive_sigkill_and_a_retried_request_id_is_recorded_once(
    audit_db: str, tmp_path: Path
) -> None:
    flags = (
        "--audit-db",
        audit_db,
        "--data-dir",
        str(tmp_path),
        "--workers",
        "4",
        "--log-level",
        "WARNING",
    )
    acked: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    with ServerProcess(*flags) as proc:
        endpoint = proc.address

        def hammer(worker: int) -> None:
            client = LossClient(endpoint, timeout=30, retries=0)
            step = 0
            try:
                while True:
                    request = audited_request("killed", worker * 100_000 + step)
                    response = client.compute(request)
                    assert response.audited
                    with lock:
                        acked.append(response.request_id)
                        if len(acked) >= 60:
                            enough.set()
                    step += 1
            except LossdError:
                return  # the server is gone
            finally:
                client.close()

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        assert enough.wait(120), "the server acknowledged fewer than 60 audited calls"
        proc.stop(signal.SIGKILL)  # mid-stream: calls are in flight and records are being written
        for t in threads:
            t.join(60)
        assert proc.proc.returncode == -signal.SIGKILL

    with ServerProcess(*flags) as proc:
        stored = stored_request_ids(proc.address, "killed")
        missing = set(acked) - set(stored)
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged records lost to SIGKILL"
        assert len(stored) == len(set(stored))
        # The chain the killed server was appending to is whole: seq 1..N, every link intact.
        with AuditClient(proc.address, timeout=120) as reader:
            messages = list(reader.verify_chain("killed"))
        results, chain = [m.result for m in messages[:-1]], messages[-1].chain
        assert chain.records == len(stored) and chain.broken_links == 0 and not chain.problems
        assert sorted(r.seq for r in results) == list(range(1, len(stored) + 1))
        assert {r.status for r in results} <= {pb.VERIFY_STATUS_OK, pb.VERIFY_STATUS_NOT_CAPTURED}
        assert pb.VERIFY_STATUS_OK in {r.status for r in results}  # the sample is recomputable

        # The same ComputeRequest twice (what LossClient's UNAVAILABLE retry sends): one record.
        client = LossClient(proc.address, timeout=30)
        request = audited_request("retried", 1, request_id="retry-" + uuid.uuid4().hex)
        first, second = client.compute(request), client.compute(request)
        client.close()
        assert first.audited and second.audited
        assert stored_request_ids(proc.address, "retried") == [request.request_id]
        (retried,) = AuditClient(proc.address).records("retried")
        assert retried["seq"] == 1  # the retry took no place in the chain


class FailingConnections:
    """Wraps a store's ``connect`` so every new connection is read-only or cannot grow: what a
    read-only mount or a full disk does to SQLite (same error codes), without needing either."""

    def __init__(self, store, pragma: str) -> None:
        self.store, self.pragma, self.original = store, pragma, store.connect

    def __enter__(self) -> None:
        def connect():
            conn = self.original()
            if "max_page_count" in self.pragma:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {pages}")
            else:
                conn.execute(self.pragma)
            return conn

        self.store.close()  # the writer reconnects through the wrapper
        self.store.connect = connect

    def __exit__(self, *exc: object) -> None:
        self.store.connect = self.original
        self.store.close()


@pytest.mark.parametrize(
    ("pragma", "error"),
    [("PRAGMA query_only = ON", "readonly"), ("max_page_count", "full")],
    ids=["read-only", "full"],
)
def test_an_unwritable_store_fails_audited_calls_unavailable_naming_it(
    tmp_path: Path, pragma: str, error: str
) -> None:
    db = tmp_path / "audit.sqlite3"
    running = create_server(
        ServerConfig(port=0, device="cpu", audit_db=str(db), audit_capture="inputs")
    )
    client = LossClient(f"127.0.0.1:{running.port}", timeout=30, retries=0)
    try:
        assert client.compute(audited_request("store", 0)).audited
        with FailingConnections(running.audit.store, pragma):
            with pytest.raises(LossdError) as caught:
                client.compute(
                    audited_request("store", 1, size=4096)
                )  # a new 80 KiB input must be stored
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert str(db) in caught.value.details and error in caught.value.details.lower()
            assert "not recorded" in caught.value.details
            # Unaudited calls are unaffected, and the failure is counted.
            plain = build_request(
                "cross_entropy", {}, [torch.randn(2, 3), torch.tensor([0, 2])], {}
            )
            assert not client.compute(plain).audited
            assert running.audit.stats()["records_dropped"] == 1
        # Writable again: the server recovers on its own (a fresh connection per failed write).
        assert client.compute(audited_request("store", 2)).audited
        assert [r["step"] for r in AuditClient(f"127.0.0.1:{running.port}").records("store")] == [
            0,
            2,
        ]
    finally:
        client.close()
        running.stop(0)


def test_a_read_only_store_stops_the_server_at_start_naming_it(tmp_path: Path) -> None:
    """A read-only audit database is refused at start-up (exit 2, the store named), as a user
    without write permission sees it (as root, the server runs without CAP_DAC_OVERRIDE, so
    file modes bind it too)."""
    data = tmp_path / "ro"
    data.mkdir()
    db = data / "audit.sqlite3"
    from lossd.server.audit import open_store

    open_store(str(db)).close()  # an existing, migrated trail
    db.chmod(0o444)
    data.chmod(0o555)
    tmp_path.chmod(0o755)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if (
            setpriv is None
            or subprocess.run(
                [setpriv, "--bounding-set=-dac_override,-dac_read_search", "true"]
            ).returncode
            != 0
        ):
            pytest.skip(
                "running as root and cannot drop CAP_DAC_OVERRIDE (setpriv): file modes do not bind root"
            )
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "lossd.server.cli",
            "serve",
            "--port",
            "0",
            "--device",
            "cpu",
            "--audit-db",
            str(db),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    data.chmod(0o755)  # let pytest clean up
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"audit store {db} cannot be opened for writing" in done.stderr
    assert "readonly" in done.stderr.lower()
    assert "lossd listening" not in done.stdout
