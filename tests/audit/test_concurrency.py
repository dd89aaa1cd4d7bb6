"""Concurrent writers keep one linear chain per run: the server's worker threads, and two
server processes (replicas) appending to the same run on one database."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import torch

from lossd.client import AuditClient, LossClient
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.server.app import create_server
from lossd.server.config import ServerConfig
from tests.support.serverproc import ServerProcess


def hammer(
    endpoint: str,
    run_id: str,
    first_step: int,
    calls: int,
    session: str,
    rounds: threading.Barrier | None = None,
) -> None:
    """``rounds``: every writer makes call i before any makes call i + 1, so writers interleave
    however the machine schedules them."""
    with LossClient(endpoint, timeout=60) as client:
        for i in range(calls):
            if rounds is not None:
                rounds.wait(120)
            request = build_request(
                "cross_entropy",
                {},
                [torch.randn(3, 4), torch.randint(0, 4, (3,))],
                {},
                audit=pb.AuditContext(run_id=run_id, step=first_step + i, session=session),
            )
            assert client.compute(request).audited


def in_parallel(*jobs: tuple) -> None:
    errors: list[BaseException] = []

    def run(args: tuple) -> None:
        try:
            hammer(*args)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors


def chain_of(endpoint: str, run_id: str) -> tuple[list[pb.VerifyResult], pb.AuditChainReport]:
    with AuditClient(endpoint, timeout=120) as reader:
        messages = list(reader.verify_chain(run_id))
    return [m.result for m in messages if m.HasField("result")], messages[-1].chain


def assert_intact(endpoint: str, run_id: str, records: int) -> None:
    results, chain = chain_of(endpoint, run_id)
    bad = [
        r.message
        for r in results
        if r.status not in (pb.VERIFY_STATUS_OK, pb.VERIFY_STATUS_NOT_CAPTURED)
    ]
    assert not bad, bad[:3]
    assert sorted(r.seq for r in results) == list(range(1, records + 1))
    assert (chain.records, chain.broken_links, list(chain.problems)) == (records, 0, [])


def test_four_threads_on_one_server_build_one_intact_chain(audit_db: str, tmp_path: Path) -> None:
    running = create_server(
        ServerConfig(port=0, device="cpu", workers=4, audit_db=audit_db, data_dir=str(tmp_path))
    )
    endpoint = f"127.0.0.1:{running.port}"
    try:
        in_parallel(*((endpoint, "threads", w * 1000, 30, f"w{w}") for w in range(4)))
        assert_intact(endpoint, "threads", 120)
    finally:
        running.stop(0)


def test_two_server_processes_on_one_database_build_one_intact_chain(
    audit_db: str, tmp_path: Path
) -> None:
    """Two replicas (each its own data directory, so its own signing key) append to the same
    run at once; the run-head lock makes the chain one line, seq 1..N without gaps."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    common = ("--audit-db", audit_db, "--workers", "4", "--log-level", "WARNING")
    with (
        ServerProcess(*common, "--data-dir", str(a_dir)) as a,
        ServerProcess(*common, "--data-dir", str(b_dir)) as b,
    ):
        rounds = threading.Barrier(4)
        in_parallel(
            *((a.address, "replicas", w * 1000, 25, f"a{w}", rounds) for w in range(2)),
            *((b.address, "replicas", 10_000 + w * 1000, 25, f"b{w}", rounds) for w in range(2)),
        )
        assert_intact(a.address, "replicas", 100)
        results, _ = chain_of(a.address, "replicas")
        by_seq = [r.session[0] for r in sorted(results, key=lambda r: r.seq)]
        assert sum(x != y for x, y in zip(by_seq, by_seq[1:])) > 1  # the replicas interleaved
        assert_intact(b.address, "replicas", 100)
        # Each printed its public key at start-up and keeps its private key to itself (0600).
        for proc, directory in ((a, a_dir), (b, b_dir)):
            with AuditClient(proc.address) as reader:
                key = reader.public_key()
            assert any(
                line.startswith(f"lossd audit signing key {key.key_id} ")
                for line in proc.stdout_lines
            )
            mode = stat.S_IMODE((directory / "audit-signing.key").stat().st_mode)
            assert mode == 0o600, oct(mode)
