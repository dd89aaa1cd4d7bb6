"""The hash chain and signed checkpoints, on both backends: every kind of tampering with the
stored records is detected by ``lossd audit verify``, naming the record or the gap; an untouched
run verifies, against a checkpoint too.

Each test writes its own run, then tampers with the database directly, as someone with write
access to it (but not to the signing key) would."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lossd.client import LossClient
from lossd.client._proto import lossd_pb2 as pb
from lossd.client.functional import build_request
from lossd.server.app import create_server
from lossd.server.audit import cli
from lossd.server.audit.records import COLUMNS, GENESIS, Row
from lossd.server.audit.signing import Signer
from lossd.server.config import ServerConfig
from tests.support.auditkit import BACKENDS, make_db, sql

STEPS = 12
NAMES = ("id", *COLUMNS)


@dataclass
class Trail:
    db: str
    endpoint: str
    tmp: Path

    def write_run(self, steps: int = STEPS) -> str:
        run_id = "chain-" + uuid.uuid4().hex[:8]
        with LossClient(self.endpoint, timeout=60) as client:
            for step in range(steps):
                request = build_request(
                    "cross_entropy",
                    {},
                    [torch.randn(4, 3), torch.randint(0, 3, (4,))],
                    {},
                    audit=pb.AuditContext(run_id=run_id, step=step, session="s1"),
                )
                assert client.compute(request).audited
        return run_id

    def write_run_with_rows(self) -> tuple[str, list[Row]]:
        run_id = self.write_run()
        return run_id, self.rows(run_id)

    def rows(self, run_id: str) -> list[Row]:
        raw = sql(
            self.db,
            f"SELECT {', '.join(NAMES)} FROM audit_records WHERE run_id = ? ORDER BY seq, id",
            (run_id,),
        )
        return [Row.from_db(dict(zip(NAMES, r))) for r in raw]

    def store_row(self, row: Row, insert: bool = False) -> None:
        values = list(row.values())
        if insert:
            marks = ", ".join("?" for _ in COLUMNS)
            sql(
                self.db,
                f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES ({marks})",
                tuple(values),
            )
        else:
            sets = ", ".join(f"{c} = ?" for c in COLUMNS)
            sql(self.db, f"UPDATE audit_records SET {sets} WHERE id = ?", (*values, row.id))

    def cover_tracks(self, run_id: str) -> None:
        """What a careful attacker does after editing: the head table matches the stored chain,
        and the server's stored checkpoints are gone. Only a checkpoint kept elsewhere remains."""
        rows = self.rows(run_id)
        head = (rows[-1].seq, rows[-1].record_sha256) if rows else (0, GENESIS)
        sql(
            self.db,
            "UPDATE audit_chains SET records = ?, head_sha256 = ? WHERE run_id = ?",
            (*head, run_id),
        )
        sql(self.db, "DELETE FROM audit_checkpoints WHERE run_id = ?", (run_id,))

    def checkpoint(self, run_id: str) -> Path:
        out = self.tmp / f"{run_id}.checkpoint.json"
        assert cli.main(["checkpoint", run_id, "-o", str(out), "--endpoint", self.endpoint]) == 0
        return out

    def public_key(self) -> Path:
        out = self.tmp / "server.pub"
        if not out.exists():
            assert cli.main(["public-key", "-o", str(out), "--endpoint", self.endpoint]) == 0
        return out

    def verify(self, run_id: str, *extra: str) -> int:
        return cli.main(["verify", run_id, "--quiet", "--endpoint", self.endpoint, *extra])


@pytest.fixture(scope="module", params=BACKENDS)
def trail(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp(f"chain-{request.param}")
    db = make_db(request.param, directory, request)
    running = create_server(
        ServerConfig(
            port=0,
            device="cpu",
            workers=4,
            audit_db=db,
            audit_capture="all",
            data_dir=str(directory),
        )
    )
    yield Trail(db, f"127.0.0.1:{running.port}", directory)
    running.stop(0)


def fails(capsys: pytest.CaptureFixture) -> tuple[list[str], str]:
    out, err = capsys.readouterr()
    return [line for line in out.splitlines() if line.startswith("FAIL")], err


def test_an_untouched_run_verifies_and_extends_its_checkpoint(
    trail: Trail, capsys: pytest.CaptureFixture
) -> None:
    run_id, rows = trail.write_run_with_rows()
    assert [r.seq for r in rows] == list(range(1, STEPS + 1))
    assert rows[0].prev_sha256 == GENESIS
    assert all(b.prev_sha256 == a.record_sha256 for a, b in zip(rows, rows[1:]))
    cp = trail.checkpoint(run_id)
    saved = json.loads(cp.read_text())
    assert (saved["run_id"], saved["records"]) == (run_id, STEPS)
    assert saved["head_sha256"] == rows[-1].record_sha256
    trail.write_run()  # other runs meanwhile change nothing
    checks = ("--checkpoint", str(cp), "--public-key", str(trail.public_key()))
    assert trail.verify(run_id, *checks) == 0
    failed, err = fails(capsys)
    assert not failed
    assert f"{STEPS} verified, 0 failed" in err and f"chain of {STEPS} records intact" in err
    assert f"signed up to seq {STEPS}" in err and "extends the given checkpoint" in err


def test_a_deleted_middle_record_is_named_by_its_gap(
    trail: Trail, capsys: pytest.CaptureFixture
) -> None:
    run_id, rows = trail.write_run_with_rows()
    gone = rows[5]
    sql(trail.db, "DELETE FROM audit_records WHERE id = ?", (gone.id,))
    assert trail.verify(run_id) == 1
    (failed,), err = fails(capsys)
    assert f"CHAIN_BROKEN   run {run_id} seq 7 step 6 record {rows[6].id}" in failed
    assert f"seq 6 missing after record {rows[4].id} (seq 5, step 4" in failed
    assert "records were deleted" in failed and "verify FAILED" in err


def test_a_truncated_tail_is_caught_against_the_checkpoint(
    trail: Trail, capsys: pytest.CaptureFixture
) -> None:
    run_id = trail.write_run()
    cp = trail.checkpoint(run_id)
    rows = trail.rows(run_id)
    for row in rows[-3:]:
        sql(trail.db, "DELETE FROM audit_records WHERE id = ?", (row.id,))
    # Without covering its tracks, the head table already tells.
    assert trail.verify(run_id) == 1
    failed, _ = fails(capsys)
    assert any(f"has {STEPS} records ending in" in f and "tail was removed" in f for f in failed)
    trail.cover_tracks(run_id)
    assert trail.verify(run_id) == 0  # the remaining chain is intact: links alone cannot tell
    capsys.readouterr()
    assert (
        trail.verify(run_id, "--checkpoint", str(cp), "--public-key", str(trail.public_key())) == 1
    )
    (failed,), err = fails(capsys)
    assert f"covers {STEPS} records; the stored chain ends at seq {STEPS - 3}" in failed
    assert f"records {STEPS - 2}..{STEPS} are missing (the tail was truncated)" in failed


def test_a_reordered_pair_is_named(trail: Trail, capsys: pytest.CaptureFixture) -> None:
    run_id, rows = trail.write_run_with_rows()
    a, b = rows[3], rows[4]  # seq 4 and 5 swap places
    sql(trail.db, "UPDATE audit_records SET seq = -1 WHERE id = ?", (a.id,))
    sql(trail.db, "UPDATE audit_records SET seq = ? WHERE id = ?", (a.seq, b.id))
    sql(trail.db, "UPDATE audit_records SET seq = ? WHERE id = ?", (b.seq, a.id))
    assert trail.verify(run_id) == 1
    failed, _ = fails(capsys)
    # The record now at seq 4 links to the record now at seq 5; each one's digest is broken.
    assert any(f"seq 4 step 4 record {b.id}" in f and "RECORD_ALTERED" in f for f in failed)
    assert any(f"record {b.id} (seq 4, step 4" in f and "does not link to" in f for f in failed)
    assert any(f"seq 5 step 3 record {a.id}" in f for f in failed)


def test_a_value_edited_with_its_digest_recomputed_is_named(
    trail: Trail, capsys: pytest.CaptureFixture
) -> None:
    run_id, rows = trail.write_run_with_rows()
    row = rows[7]
    form = json.loads(row.value)
    form["tensor"]["data"][0] *= 0.5  # a "better" loss
    row.value = json.dumps(form, separators=(",", ":"))
    row.record_sha256 = row.digest()  # its own digest is consistent again
    trail.store_row(row)
    assert trail.verify(run_id) == 1
    failed, _ = fails(capsys)
    # The next record committed to the original: the chain names the edited record...
    assert any(
        f"CHAIN_BROKEN   run {run_id} seq 9" in f
        and f"does not link to record {row.id} (seq 8" in f
        for f in failed
    )
    # ... and the recomputation from its captured inputs shows the value is wrong.
    assert any(f"DEVIATION      run {run_id} seq 8 step 7 record {row.id}" in f for f in failed)


def test_an_inserted_forged_record_is_named(trail: Trail, capsys: pytest.CaptureFixture) -> None:
    run_id, rows = trail.write_run_with_rows()
    forged = Row(**{**rows[4].as_dict(), "request_id": "forged-" + uuid.uuid4().hex, "id": 0})
    forged.prev_sha256 = rows[3].record_sha256  # links to seq 4 as the real seq 5 does
    forged.record_sha256 = forged.digest()
    sql(trail.db, "DROP INDEX audit_records_run_seq")  # the attacker removes what stops a duplicate
    try:
        trail.store_row(forged, insert=True)
        assert trail.verify(run_id) == 1
    finally:
        sql(trail.db, "DELETE FROM audit_records WHERE request_id = ?", (forged.request_id,))
        sql(
            trail.db,
            "CREATE UNIQUE INDEX audit_records_run_seq ON audit_records (run_id, seq) WHERE seq > 0",
        )
    (failed,), _ = fails(capsys)
    assert f"CHAIN_BROKEN   run {run_id} seq 5 step 4" in failed
    assert f"request {forged.request_id}) repeats seq 5 of record {rows[4].id}" in failed
    assert "a record was inserted" in failed


def test_a_checkpoint_signed_by_another_key_is_refused(
    trail: Trail, capsys: pytest.CaptureFixture
) -> None:
    from lossd.server.audit.signing import Checkpoint, public_pem

    run_id = trail.write_run()
    genuine = Checkpoint.from_json(trail.checkpoint(run_id).read_text())
    other = Signer.generate()
    forged = other.sign(run_id, genuine.records, genuine.head_sha256, genuine.time_unix_ns)
    path = trail.tmp / "forged.checkpoint.json"
    path.write_text(forged.to_json())
    assert (
        trail.verify(run_id, "--checkpoint", str(path), "--public-key", str(trail.public_key()))
        == 1
    )
    (failed,), _ = fails(capsys)
    assert f"is not signed by the key in {trail.public_key()}" in failed
    assert f"the checkpoint names key {other.key_id}" in failed
    # The same forgery re-labelled with the server's key id fails the signature check too.
    relabelled = Checkpoint(**{**forged.__dict__, "key_id": genuine.key_id})
    path.write_text(relabelled.to_json())
    assert (
        trail.verify(run_id, "--checkpoint", str(path), "--public-key", str(trail.public_key()))
        == 1
    )
    # And a genuine checkpoint does not verify against someone else's public key.
    other_pub = trail.tmp / "other.pub"
    other_pub.write_text(public_pem(other.public))
    good = trail.checkpoint(run_id)
    assert trail.verify(run_id, "--checkpoint", str(good), "--public-key", str(other_pub)) == 1


def test_a_store_rewritten_from_scratch_is_caught_against_the_checkpoint(
    trail: Trail, capsys: pytest.CaptureFixture
) -> None:
    run_id = trail.write_run()
    cp = trail.checkpoint(run_id)
    # A fresh, internally consistent chain: every value lowered, every link recomputed.
    head = GENESIS
    for row in trail.rows(run_id):
        form = json.loads(row.value)
        form["tensor"]["data"][0] *= 0.9
        row.value = json.dumps(form, separators=(",", ":"))
        row.prev_sha256 = head
        row.record_sha256 = head = row.digest()
        trail.store_row(row)
    trail.cover_tracks(run_id)
    assert (
        trail.verify(run_id, "--checkpoint", str(cp), "--public-key", str(trail.public_key())) == 1
    )
    failed, _ = fails(capsys)
    chain = [f for f in failed if f.startswith("FAIL chain:")]
    assert len(chain) == 1
    assert f"the record at seq {STEPS} is not the one the given checkpoint" in chain[0]
    assert "the history was rewritten" in chain[0]


def test_the_server_will_not_sign_a_broken_chain(
    trail: Trail, capsys: pytest.CaptureFixture
) -> None:
    run_id, rows = trail.write_run_with_rows()
    sql(trail.db, "DELETE FROM audit_records WHERE id = ?", (rows[2].id,))
    out = trail.tmp / "refused.json"
    assert cli.main(["checkpoint", run_id, "-o", str(out), "--endpoint", trail.endpoint]) == 2
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err or "not signing" in err
    assert f"seq 3 missing after record {rows[1].id}" in err


def test_a_read_only_replica_signs_with_its_own_key(
    trail: Trail, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--audit none --audit-db ...`` serves the trail: it checkpoints and verifies with its own
    key (a checkpoint of the writer's key does not verify against the replica's public key)."""
    run_id = trail.write_run()
    replica = create_server(
        ServerConfig(port=0, device="cpu", audit="none", audit_db=trail.db, data_dir=str(tmp_path))
    )
    endpoint = f"127.0.0.1:{replica.port}"
    try:
        out, pub = tmp_path / "cp.json", tmp_path / "replica.pub"
        assert cli.main(["checkpoint", run_id, "-o", str(out), "--endpoint", endpoint]) == 0
        assert cli.main(["public-key", "-o", str(pub), "--endpoint", endpoint]) == 0
        argv = ["verify", run_id, "--quiet", "--endpoint", endpoint, "--checkpoint", str(out)]
        assert cli.main([*argv, "--public-key", str(pub)]) == 0
        assert cli.main([*argv, "--public-key", str(trail.public_key())]) == 1
        capsys.readouterr()
    finally:
        replica.stop(0)
