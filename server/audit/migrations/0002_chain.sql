-- lossd audit trail, schema version 2: the per-run hash chain, the attempt (session) of each
-- record, why its inputs were captured, and the signed checkpoints of chain heads.
-- Records written before this version keep seq 0 and are reported as not chained.

ALTER TABLE audit_records ADD COLUMN session TEXT NOT NULL DEFAULT '';

ALTER TABLE audit_records ADD COLUMN capture TEXT NOT NULL DEFAULT '';

ALTER TABLE audit_records ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;

ALTER TABLE audit_records ADD COLUMN prev_sha256 TEXT NOT NULL DEFAULT '';

CREATE UNIQUE INDEX audit_records_run_seq ON audit_records (run_id, seq) WHERE seq > 0;

CREATE TABLE audit_chains (
    run_id TEXT PRIMARY KEY,
    records BIGINT NOT NULL,
    head_sha256 TEXT NOT NULL,
    updated_at_ns BIGINT NOT NULL
);

CREATE TABLE audit_checkpoints (
    id {{id}},
    run_id TEXT NOT NULL,
    records BIGINT NOT NULL,
    head_sha256 TEXT NOT NULL,
    signed_at_ns BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);

CREATE INDEX audit_checkpoints_run ON audit_checkpoints (run_id, records, id);
