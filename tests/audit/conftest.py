"""Fixtures of the audit tests: the two storage backends, and SQL access to tamper with them.

``audit_db`` is parametrised over ``sqlite`` (a file in a temp dir) and ``postgres`` (a fresh
database on a real PostgreSQL server the session starts, see pgserver.py). The PostgreSQL cases
skip, saying why, only where no server can be started.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # serverproc

from auditkit import BACKENDS, make_db  # noqa: E402
from pgserver import PostgresServer, PostgresUnavailable  # noqa: E402


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
