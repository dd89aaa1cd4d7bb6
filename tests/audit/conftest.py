"""Fixtures of the audit tests: the two storage backends, and SQL access to tamper with them.

``audit_db`` is parametrised over ``sqlite`` (a file in a temp dir) and ``postgres`` (a fresh
database on a real PostgreSQL server the session starts, see tests/support/pgserver.py). The PostgreSQL cases
skip, saying why, only where no server can be started.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.auditkit import BACKENDS, make_db
from tests.support.pgserver import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip(
            "PostgreSQL backend not tested: psycopg is not installed (pip install 'lossd[postgres]')"
        )
    try:
        server = PostgresServer().start()
    except (PostgresUnavailable, OSError) as exc:
        pytest.skip(f"PostgreSQL backend not tested: cannot start a PostgreSQL server here: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def audit_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit store location: a SQLite path or a postgresql:// URL."""
    return make_db(request.param, tmp_path, request)
