"""Helpers of the audit tests: the storage backends, SQL access to tamper with them, an independent digest."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

BACKENDS = ["sqlite", "postgres"]


def make_db(backend: str, directory: Path, request: pytest.FixtureRequest) -> str:
    """An empty audit store location: a SQLite path, or a fresh database on the session's PostgreSQL."""
    if backend == "sqlite":
        return str(directory / "audit.sqlite3")
    return request.getfixturevalue("postgres").new_database()


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
    header = (
        b"lossd-tensor-v1\0"
        + str(t.dtype).replace("torch.", "").encode()
        + b"\0"
        + ",".join(str(s) for s in t.shape).encode()
        + b"\0"
    )
    return hashlib.sha256(header + t.numpy().tobytes()).hexdigest()
