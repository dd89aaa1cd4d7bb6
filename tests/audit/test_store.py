"""The store: versioned migrations applied once (on both backends), secrets kept out of logs."""

from __future__ import annotations

from lossd.server.audit.store import migrations, open_store, redact
from lossd.server.config import ServerConfig
from tests.support.auditkit import sql


def test_migrations_are_applied_once_and_recorded(audit_db: str) -> None:
    shipped = migrations()
    assert [v for v, _, _ in shipped] == list(range(1, len(shipped) + 1))  # 0001, 0002, ... no gaps
    first = open_store(audit_db)
    second = open_store(audit_db)  # a second replica starting on the same database
    assert first.migrate() == second.migrate() == shipped[-1][0]
    assert sql(audit_db, "SELECT version, name FROM audit_schema ORDER BY version") == [
        (v, n) for v, n, _ in shipped
    ]
    first.close()
    second.close()


def test_a_postgres_password_never_reaches_messages_or_the_settings_log() -> None:
    url = "postgresql://lossd:s3cret-pw@db.internal:5432/audit"
    assert redact(url) == "postgresql://lossd:***@db.internal:5432/audit"
    assert "s3cret-pw" not in ServerConfig(audit_db=url).describe()
    assert redact("/var/lib/lossd/audit.sqlite3") == "/var/lib/lossd/audit.sqlite3"


def test_records_from_before_the_chain_still_verify_and_the_chain_starts_after_them(
    audit_db: str, tmp_path, monkeypatch, capsys
) -> None:
    """A schema-1 trail migrated to schema 2: its old record keeps its version-1 digest
    (reported as not chained); new records of the same run chain from seq 1."""
    import torch

    from lossd.client import LossClient
    from lossd.client._proto import lossd_pb2 as pb
    from lossd.client.functional import build_request
    from lossd.server.app import create_server
    from lossd.server.audit import cli, store
    from lossd.server.audit.records import HASHED_V1, Row

    shipped = migrations()
    with monkeypatch.context() as m:
        m.setattr(store, "migrations", lambda: shipped[:1])
        open_store(audit_db).close()  # a trail written by a lossd of schema 1
    old = Row(
        request_id="old-1", run_id="legacy", step=0, rank=-1, micro_batch=-1, tags="{}",
        recorded_at_ns=1, peer="", principal="", loss="cross_entropy", params="{}",
        call='{"args":[],"kwargs":{}}', lossd_version="0", torch_version="0", device="cpu",
        dtype="float32", inputs="[]", value="1.0", components="{}", grad_norms="{}",
        non_finite=False, decode_ns=0, compute_ns=0, encode_ns=0, captured=False,
    )  # fmt: skip
    old.record_sha256 = old.digest()  # seq 0: the version-1 digest
    cols = (*HASHED_V1, "record_sha256")
    sql(
        audit_db,
        f"INSERT INTO audit_records ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
        tuple(getattr(old, c) for c in cols),
    )
    running = create_server(
        ServerConfig(port=0, device="cpu", audit_db=audit_db, data_dir=str(tmp_path))
    )
    endpoint = f"127.0.0.1:{running.port}"
    try:
        with LossClient(endpoint, timeout=60) as client:
            for step in (1, 2, 3):
                request = build_request(
                    "cross_entropy",
                    {},
                    [torch.randn(2, 3), torch.tensor([0, 2])],
                    {},
                    audit=pb.AuditContext(run_id="legacy", step=step, session="new"),
                )
                assert client.compute(request).audited
        assert sql(audit_db, "SELECT seq FROM audit_records ORDER BY id") == [
            (0,),
            (1,),
            (2,),
            (3,),
        ]
        assert cli.main(["verify", "legacy", "--endpoint", endpoint]) == 0
        err = capsys.readouterr().err
        assert "chain of 3 records intact" in err and "1 records from before the chain" in err
    finally:
        running.stop(0)
