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
