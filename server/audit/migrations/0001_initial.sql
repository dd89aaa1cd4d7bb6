-- lossd audit trail, schema version 1. The same file creates the schema on SQLite and on
-- PostgreSQL: {{id}} and {{blob}} are the only dialect-specific words (see store.py).
-- Statements are separated by a semicolon at the end of a line.

CREATE TABLE audit_records (
    id {{id}},
    request_id TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL,
    step BIGINT NOT NULL,
    rank INTEGER NOT NULL,
    micro_batch INTEGER NOT NULL,
    tags TEXT NOT NULL,
    recorded_at_ns BIGINT NOT NULL,
    peer TEXT NOT NULL,
    principal TEXT NOT NULL,
    loss TEXT NOT NULL,
    params TEXT NOT NULL,
    call TEXT NOT NULL,
    lossd_version TEXT NOT NULL,
    torch_version TEXT NOT NULL,
    device TEXT NOT NULL,
    dtype TEXT NOT NULL,
    inputs TEXT NOT NULL,
    value TEXT NOT NULL,
    components TEXT NOT NULL,
    grad_norms TEXT NOT NULL,
    non_finite BOOLEAN NOT NULL,
    decode_ns BIGINT NOT NULL,
    compute_ns BIGINT NOT NULL,
    encode_ns BIGINT NOT NULL,
    captured BOOLEAN NOT NULL,
    record_sha256 TEXT NOT NULL
);

CREATE INDEX audit_records_run_step ON audit_records (run_id, step, rank, micro_batch, id);

CREATE TABLE audit_blobs (
    digest TEXT PRIMARY KEY,
    codec TEXT NOT NULL,
    raw_bytes BIGINT NOT NULL,
    stored_bytes BIGINT NOT NULL,
    data {{blob}} NOT NULL,
    created_at_ns BIGINT NOT NULL,
    last_used_ns BIGINT NOT NULL
);

CREATE INDEX audit_blobs_last_used ON audit_blobs (last_used_ns);
