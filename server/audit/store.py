"""Audit storage: one interface, two backends (SQLite embedded, PostgreSQL for replicas).

Both run the same versioned SQL (``migrations/NNNN_*.sql``) and the same statements; only the
placeholder style and two type words differ. The writer thread owns one connection and commits
batches (group commit); every reader opens its own short-lived connection, so exports and
verifications never hold the writer up (SQLite WAL: readers see the last commit, never block).

Durability: SQLite runs ``journal_mode=WAL`` with ``synchronous=FULL``: a commit is on disk (WAL
fsynced) before ``write`` returns, so a record whose call answered ``audited=true`` survives
``kill -9`` and power loss. (NORMAL would survive kill -9 too, since the WAL is in the OS page
cache, but not power loss; batching already makes FULL cheap.) PostgreSQL commits are durable
by its own settings (``synchronous_commit=on``, the default).

The hash chain (one per run): ``write`` gives each new record the next ``seq`` of its run and the
``record_sha256`` of the record before it, under a lock on the run's row in ``audit_chains``
(PostgreSQL: ``SELECT ... FOR UPDATE``, runs locked in sorted order so two replicas never
deadlock; SQLite: ``BEGIN IMMEDIATE``, one writer per database). Appends to one run are thereby
serialised across every writer on the database, so a run has one linear chain whichever
replicas served it, and one checkpoint covers all of it; different runs never wait on each
other. The head row is updated in the same transaction as the records.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .records import COLUMNS, GENESIS, Pending, Row, uncapture

_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_PAGE = 500  # records per read query (keyset pagination keeps reads short)


@dataclass(frozen=True)
class Selector:
    run_id: str
    step_min: int | None = None
    step_max: int | None = None
    loss: str = ""

    def matches(self, row: Row) -> bool:
        return (
            row.run_id == self.run_id
            and (self.step_min is None or row.step >= self.step_min)
            and (self.step_max is None or row.step <= self.step_max)
            and (not self.loss or row.loss == self.loss)
        )


@dataclass(frozen=True)
class SessionSummary:
    session: str
    records: int
    first_step: int
    last_step: int
    first_time_ns: int
    last_time_ns: int


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    records: int
    first_step: int
    last_step: int
    first_time_ns: int
    last_time_ns: int
    losses: tuple[str, ...]
    sessions: tuple[SessionSummary, ...] = ()


@dataclass(frozen=True)
class StoredCheckpoint:
    run_id: str
    records: int
    head_sha256: str
    signed_at_ns: int
    key_id: str
    signature: str  # base64


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped in the package, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        m = _MIGRATION.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip()]


class Store:
    """Base class; subclasses say how to connect and the dialect's words."""

    words: dict[str, str] = {}
    placeholder = "?"

    def __init__(self, location: str) -> None:
        self.location = location
        self._writer: Any = None
        self._lock = threading.Lock()  # the writer connection (also used by flush at shutdown)
        self.last_inserted = (
            0  # records the last write inserted (written by the writer thread only)
        )
        self.last_heads: dict[str, tuple[int, str]] = {}  # run -> (records, head) after it

    @property
    def name(self) -> str:
        """The location for messages and logs, without a password."""
        return redact(self.location)

    # -- to implement -------------------------------------------------------------------
    def connect(self) -> Any:
        raise NotImplementedError

    def _lock_schema(self, cur: Any) -> None:
        """Serialize concurrent migrations (several replicas starting at once)."""

    def _begin_write(self, cur: Any) -> None:
        """Start the write transaction so the chain heads read in it cannot change under it."""

    for_update = ""  # the dialect's row lock on a SELECT of the chain head

    # -- shared --------------------------------------------------------------------------
    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def migrate(self) -> int:
        """Bring the schema to the newest version; returns it."""
        conn = self.connect()
        try:
            cur = conn.cursor()
            self._lock_schema(cur)
            cur.execute(
                "CREATE TABLE IF NOT EXISTS audit_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ns BIGINT NOT NULL)"
            )
            cur.execute("SELECT COALESCE(MAX(version), 0) FROM audit_schema")
            current = int(cur.fetchone()[0])
            version = current
            for version, name, sql in migrations():
                if version <= current:
                    continue
                for statement in statements(sql):
                    for word, replacement in self.words.items():
                        statement = statement.replace("{{" + word + "}}", replacement)
                    cur.execute(statement)
                cur.execute(
                    self.sql(
                        "INSERT INTO audit_schema (version, name, applied_at_ns) VALUES (?, ?, ?)"
                    ),
                    (version, name, time.time_ns()),
                )
            conn.commit()
            return max(version, current)
        finally:
            conn.close()

    def write(self, batch: list[Pending]) -> set[str]:
        """Insert a batch in one transaction; returns once it is committed (durable).

        A request id already present is skipped (a retried call is recorded once); a blob already
        present is kept, and its last-use time refreshed. An input the recorder believed stored
        but that is not (its blob's write failed, or retention deleted it meanwhile) is recorded
        as not captured, so no record claims evidence the store does not hold; returns those
        digests, for the recorder to forget.
        """
        cols = ", ".join(COLUMNS)
        marks = ", ".join("?" for _ in COLUMNS)
        # No ON CONFLICT: every inserted row takes a seq, so a row that is not inserted must fail
        # the transaction (the recorder then retries one by one, and the retry skips it).
        insert = self.sql(f"INSERT INTO audit_records ({cols}) VALUES ({marks})")
        insert_blob = self.sql(
            "INSERT INTO audit_blobs (digest, codec, raw_bytes, stored_bytes, data, created_at_ns, last_used_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING"
        )
        touch = self.sql("UPDATE audit_blobs SET last_used_ns = ? WHERE digest = ?")
        now = time.time_ns()
        with self._writing() as conn:
            cur = conn.cursor()
            self._begin_write(cur)
            blobs = [
                (b.digest, b.codec, b.raw_bytes, len(b.data), b.data, now, now)
                for p in batch
                for b in p.blobs
            ]
            if blobs:
                cur.executemany(insert_blob, blobs)
            touched = sorted({d for p in batch for d in p.referenced} - {b[0] for b in blobs})
            missing: set[str] = set()
            if touched:
                cur.executemany(touch, [(now, d) for d in touched])
                present: set[str] = set()
                for i in range(0, len(touched), 200):
                    chunk = touched[i : i + 200]
                    cur.execute(
                        self.sql(
                            f"SELECT digest FROM audit_blobs WHERE digest IN ({', '.join('?' for _ in chunk)})"
                        ),
                        chunk,
                    )
                    present.update(r[0] for r in cur.fetchall())
                missing = set(touched) - present
                for p in batch:
                    if missing.intersection(p.referenced):
                        uncapture(p.row, missing)
            rows = self._new_rows(cur, [p.row for p in batch])
            heads = self._chain(cur, rows, now)
            if rows:
                cur.executemany(insert, [r.values() for r in rows])
            conn.commit()
            self.last_inserted = len(rows)  # a retried request id inserts nothing
            self.last_heads = heads
            return missing

    def _new_rows(self, cur: Any, rows: list[Row]) -> list[Row]:
        """The rows whose request id is not stored yet (nor earlier in the batch). A request id
        stored for a different call (another loss, parameters, inputs or step) is a conflict:
        RequestIdConflict, so that no second call is answered ``audited`` for the first's record."""
        present: dict[str, tuple] = {}
        ids = sorted({r.request_id for r in rows})
        for i in range(0, len(ids), 200):
            chunk = ids[i : i + 200]
            cur.execute(
                self.sql(
                    f"SELECT request_id, {', '.join(IDENTITY)} FROM audit_records "
                    f"WHERE request_id IN ({', '.join('?' for _ in chunk)})"
                ),
                chunk,
            )
            present.update((r[0], identity(tuple(r[1:]))) for r in cur.fetchall())
        fresh = []
        for r in rows:
            stored = present.get(r.request_id)
            if stored is None:
                present[r.request_id] = identity(r)
                fresh.append(r)
            elif stored != identity(r):
                raise RequestIdConflict(r.request_id)
        return fresh

    def _chain(self, cur: Any, rows: list[Row], now: int) -> dict[str, tuple[int, str]]:
        """Link ``rows`` onto their runs' chains (in batch order), holding each run's head row
        locked until the commit; returns run -> (records, head) as this transaction leaves it."""
        heads: dict[str, tuple[int, str]] = {}
        for run_id in sorted({r.run_id for r in rows}):  # one lock order for every writer
            cur.execute(
                self.sql(
                    "INSERT INTO audit_chains (run_id, records, head_sha256, updated_at_ns) "
                    "VALUES (?, 0, ?, ?) ON CONFLICT (run_id) DO NOTHING"
                ),
                (run_id, GENESIS, now),
            )
            cur.execute(
                self.sql(
                    f"SELECT records, head_sha256 FROM audit_chains WHERE run_id = ?{self.for_update}"
                ),
                (run_id,),
            )
            records, head = cur.fetchone()
            heads[run_id] = (int(records), head)
        for r in rows:
            records, head = heads[r.run_id]
            r.seq, r.prev_sha256 = records + 1, head
            r.record_sha256 = r.digest()
            heads[r.run_id] = (r.seq, r.record_sha256)
        cur.executemany(
            self.sql(
                "UPDATE audit_chains SET records = ?, head_sha256 = ?, updated_at_ns = ? WHERE run_id = ?"
            ),
            [(n, h, now, run_id) for run_id, (n, h) in heads.items()],
        )
        return heads

    def add_blobs(self, blobs: list[Any]) -> None:
        """Store captured inputs outside a record write (a run's last call, see recorder.py)."""
        now = time.time_ns()
        with self._writing() as conn:
            conn.cursor().executemany(
                self.sql(
                    "INSERT INTO audit_blobs (digest, codec, raw_bytes, stored_bytes, data, created_at_ns, last_used_ns) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING"
                ),
                [(b.digest, b.codec, b.raw_bytes, len(b.data), b.data, now, now) for b in blobs],
            )
            conn.commit()

    def add_checkpoint(self, cp: StoredCheckpoint) -> None:
        with self._writing() as conn:
            conn.cursor().execute(
                self.sql(
                    "INSERT INTO audit_checkpoints (run_id, records, head_sha256, signed_at_ns, key_id, signature) "
                    "VALUES (?, ?, ?, ?, ?, ?)"
                ),
                (cp.run_id, cp.records, cp.head_sha256, cp.signed_at_ns, cp.key_id, cp.signature),
            )
            conn.commit()

    def delete_unused_blobs(self, older_than_ns: int) -> tuple[list[str], int]:
        """Retention: delete captured inputs not used since ``older_than_ns``; (digests, bytes)."""
        with self._writing() as conn:
            cur = conn.cursor()
            cur.execute(
                self.sql("SELECT digest, stored_bytes FROM audit_blobs WHERE last_used_ns < ?"),
                (older_than_ns,),
            )
            gone = cur.fetchall()
            cur.execute(
                self.sql("DELETE FROM audit_blobs WHERE last_used_ns < ?"), (older_than_ns,)
            )
            conn.commit()
        return [g[0] for g in gone], sum(int(g[1]) for g in gone)

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        """The one writer connection, under the lock; opened on first use, dropped on any failure
        (the next write opens a fresh one)."""
        with self._lock:
            if self._writer is None:
                self._writer = self.connect()
            try:
                yield self._writer
            except BaseException:
                self._drop_writer()
                raise

    def _drop_writer(self) -> None:
        conn, self._writer = self._writer, None
        try:
            conn.rollback()
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection is replaced on the next write
            pass

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    # -- reading -------------------------------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator[Any]:
        """One read connection for a whole export or verification (a PostgreSQL connection
        costs milliseconds; one per page or per record would dominate a long verify)."""
        conn = self.connect()
        try:
            yield conn
        finally:
            conn.close()

    def _query(self, text: str, params: Iterable[Any] = (), conn: Any = None) -> list[tuple]:
        own = conn is None
        if own:
            conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(self.sql(text), tuple(params))
            rows = cur.fetchall()
            conn.rollback()  # end the read transaction: never hold a snapshot between queries
            return rows
        finally:
            if own:
                conn.close()

    def stored_blob_bytes(self) -> int:
        return int(self._query("SELECT COALESCE(SUM(stored_bytes), 0) FROM audit_blobs")[0][0])

    def list_runs(self, limit: int = 0) -> list[RunSummary]:
        text = (
            "SELECT run_id, COUNT(*), MIN(step), MAX(step), MIN(recorded_at_ns), MAX(recorded_at_ns) "
            "FROM audit_records GROUP BY run_id ORDER BY MAX(recorded_at_ns) DESC, run_id"
        )
        rows = self._query(text + (f" LIMIT {int(limit)}" if limit > 0 else ""))
        losses: dict[str, list[str]] = {}
        for run_id, loss in self._query(
            "SELECT DISTINCT run_id, loss FROM audit_records ORDER BY run_id, loss"
        ):
            losses.setdefault(run_id, []).append(loss)
        sessions: dict[str, list[SessionSummary]] = {}
        for s in self._query(
            "SELECT run_id, session, COUNT(*), MIN(step), MAX(step), MIN(recorded_at_ns), MAX(recorded_at_ns) "
            "FROM audit_records GROUP BY run_id, session ORDER BY run_id, MIN(recorded_at_ns), session"
        ):
            sessions.setdefault(s[0], []).append(
                SessionSummary(s[1], *(int(x) for x in s[2:]))  # type: ignore[arg-type]
            )
        return [
            RunSummary(
                r[0],
                int(r[1]),
                int(r[2]),
                int(r[3]),
                int(r[4]),
                int(r[5]),
                tuple(losses.get(r[0], ())),
                tuple(sessions.get(r[0], ())),
            )
            for r in rows
        ]

    def _where(self, sel: Selector) -> tuple[str, list[Any]]:
        clauses, params = ["run_id = ?"], [sel.run_id]
        if sel.step_min is not None:
            clauses.append("step >= ?")
            params.append(sel.step_min)
        if sel.step_max is not None:
            clauses.append("step <= ?")
            params.append(sel.step_max)
        if sel.loss:
            clauses.append("loss = ?")
            params.append(sel.loss)
        return " AND ".join(clauses), params

    def count(self, sel: Selector, conn: Any = None) -> int:
        where, params = self._where(sel)
        return int(
            self._query(f"SELECT COUNT(*) FROM audit_records WHERE {where}", params, conn)[0][0]
        )

    def records(self, sel: Selector, conn: Any = None) -> Iterator[Row]:
        """The selected records in (step, rank, micro_batch, id) order, read page by page."""
        where, params = self._where(sel)
        names = ("id", *COLUMNS)
        cols = ", ".join(names)
        after: tuple[int, int, int, int] | None = None
        while True:
            text = f"SELECT {cols} FROM audit_records WHERE {where}"
            page_params = list(params)
            if after is not None:
                text += " AND (step, rank, micro_batch, id) > (?, ?, ?, ?)"
                page_params.extend(after)
            text += f" ORDER BY step, rank, micro_batch, id LIMIT {_PAGE}"
            rows = self._query(text, page_params, conn)
            for raw in rows:
                row = Row.from_db(dict(zip(names, raw)))
                yield row
            if len(rows) < _PAGE:
                return
            last = rows[-1]
            after = (
                last[names.index("step")],
                last[names.index("rank")],
                last[names.index("micro_batch")],
                last[0],
            )

    def chain(self, run_id: str, conn: Any = None) -> Iterator[Row]:
        """Every record of a run in chain order: (seq, id); unchained (schema 1) records first."""
        names = ("id", *COLUMNS)
        cols = ", ".join(names)
        after: tuple[int, int] = (-1, 0)
        while True:
            rows = self._query(
                f"SELECT {cols} FROM audit_records WHERE run_id = ? AND (seq, id) > (?, ?) "
                f"ORDER BY seq, id LIMIT {_PAGE}",
                (run_id, *after),
                conn,
            )
            for raw in rows:
                yield Row.from_db(dict(zip(names, raw)))
            if len(rows) < _PAGE:
                return
            after = (rows[-1][names.index("seq")], rows[-1][0])

    def chain_head(self, run_id: str, conn: Any = None) -> tuple[int, str] | None:
        """(records, head) as the head table says (None: no chained record was written)."""
        rows = self._query(
            "SELECT records, head_sha256 FROM audit_chains WHERE run_id = ?", (run_id,), conn
        )
        return (int(rows[0][0]), rows[0][1]) if rows else None

    def checkpoints(self, run_id: str, conn: Any = None) -> list[StoredCheckpoint]:
        """The run's stored checkpoints, largest first."""
        return [
            StoredCheckpoint(r[0], int(r[1]), r[2], int(r[3]), r[4], r[5])
            for r in self._query(
                "SELECT run_id, records, head_sha256, signed_at_ns, key_id, signature FROM audit_checkpoints "
                "WHERE run_id = ? ORDER BY records DESC, id DESC",
                (run_id,),
                conn,
            )
        ]

    def blobs(self, digests: Iterable[str], conn: Any = None) -> dict[str, tuple[str, bytes]]:
        """digest -> (codec, compressed bytes) for those present."""
        wanted = sorted(set(digests))
        found: dict[str, tuple[str, bytes]] = {}
        for i in range(0, len(wanted), 200):
            chunk = wanted[i : i + 200]
            marks = ", ".join("?" for _ in chunk)
            for digest, codec, data in self._query(
                f"SELECT digest, codec, data FROM audit_blobs WHERE digest IN ({marks})",
                chunk,
                conn,
            ):
                found[digest] = (codec, bytes(data))
        return found


class SQLiteStore(Store):
    words = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB"}

    def __init__(self, location: str) -> None:
        super().__init__(location)
        Path(location).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.path = str(Path(location).expanduser())

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _lock_schema(self, cur: Any) -> None:
        cur.execute("BEGIN IMMEDIATE")

    def _begin_write(self, cur: Any) -> None:
        if not cur.connection.in_transaction:
            cur.execute("BEGIN IMMEDIATE")  # the write lock now: no other writer until commit


class PostgresStore(Store):
    words = {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "blob": "BYTEA"}
    placeholder = "%s"

    def __init__(self, location: str) -> None:
        super().__init__(location)
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "--audit-db postgresql://... needs psycopg: pip install 'lossd[postgres]'"
            ) from None

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.location, connect_timeout=10)

    for_update = " FOR UPDATE"

    def _lock_schema(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(7134101)")  # any constant shared by every replica


# What makes two records the same call (a retry): everything the caller sent, not the result.
IDENTITY = ("run_id", "step", "rank", "micro_batch", "tags", "loss", "params", "call", "inputs")


def identity(row: Row | tuple) -> tuple:
    """The call a record is of: its IDENTITY fields, inputs by path, dtype, shape and digest
    (whether an input was captured depends on the sampling, not on the call)."""
    values = list(row) if isinstance(row, tuple) else [getattr(row, name) for name in IDENTITY]
    inputs = json.loads(values[-1] or "[]")
    values[-1] = tuple((i["path"], i["dtype"], tuple(i["shape"]), i["sha256"]) for i in inputs)
    return tuple(values)


class PermanentRecordError(Exception):
    """A record the store will never accept as sent: retrying the call cannot help."""


class RequestIdConflict(PermanentRecordError):
    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"request id {request_id!r} is already recorded for a different call (another loss, "
            "parameters, inputs or step); give each call its own request id"
        )
        self.request_id = request_id


class AuditStoreError(RuntimeError):
    """The audit store cannot be opened or migrated; the message names it and the cause."""


def open_store(location: str) -> Store:
    """A migrated store for a SQLite path or a ``postgresql://`` URL.

    A store that cannot be written (read-only file or directory, full disk, PostgreSQL refusing
    the connection) fails here, at start-up, with ``AuditStoreError`` naming it.
    """
    try:
        if location.startswith(("postgresql://", "postgres://")):
            store: Store = PostgresStore(location)
        else:
            store = SQLiteStore(location)
        store.migrate()
    except AuditStoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - sqlite3/psycopg/OS errors all mean the same here
        raise AuditStoreError(
            f"audit store {redact(location)} cannot be opened for writing ({type(exc).__name__}: {exc}); "
            "fix it, point --audit-db elsewhere, or run with --audit none"
        ) from exc
    return store


def redact(location: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@]*:)[^@]*@", r"\1***@", location)


def default_location(data_dir: str) -> str:
    base = (
        Path(data_dir).expanduser()
        if data_dir
        else Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "lossd"
    )
    return str(base / "audit.sqlite3")
