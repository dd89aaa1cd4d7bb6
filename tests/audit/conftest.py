"""Fixtures of the audit tests: the two storage backends, and SQL access to tamper with them.

``audit_db`` is parametrised over ``sqlite`` (a file in a temp dir) and ``postgres`` (a fresh
database on a real PostgreSQL server the session starts, see pgserver.py). The PostgreSQL cases
skip, saying why, only where no server can be started.
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # serverproc

from pgserver import PostgresServer, PostgresUnavailable  # noqa: E402

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL backend not tested: psycopg is not installed (pip install 'lossd[postgres]')")
    try:
        server = PostgresServer().start()
    except (PostgresUnavailable, OSError) as exc:
        pytest.skip(f"PostgreSQL backend not tested: cannot start a PostgreSQL server here: {exc}")
    yield server
    server.stop()


def make_db(backend: str, directory: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return str(directory / "audit.sqlite3")
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(params=BACKENDS)
def audit_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit store location: a SQLite path or a postgresql:// URL."""
    return make_db(request.param, tmp_path, request)


def sql(db: str, text: str, params: tuple[Any, ...] = ()) -> list[tuple]:
    """Run one statement on the store directly (as someone tampering with it would); commits."""
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db) as conn:
            cur = conn.execute(text.replace("?", "%s"), params)
            rows = cur.fetchall() if cur.description else []
            conn.commit()
            return rows
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute(text, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def independent_digest(t: torch.Tensor) -> str:
    """SHA-256 of dtype + shape + bytes, written from the proto's description, not lossd's code."""
    t = t.detach().contiguous()
    header = b"lossd-tensor-v1\0" + str(t.dtype).replace("torch.", "").encode() + b"\0" + ",".join(str(s) for s in t.shape).encode() + b"\0"
    return hashlib.sha256(header + t.numpy().tobytes()).hexdigest()
