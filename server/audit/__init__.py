"""The audit trail: one record per audited evaluation, stored in SQLite or PostgreSQL.

- ``records``: building a record (canonical params, input digests, values, ...);
- ``capture``: optional content-addressed, compressed input capture;
- ``store``: the storage interface, its two backends and the versioned migrations;
- ``recorder``: the ``after_compute`` hook, bounded queue and single writer thread;
- ``verify``: integrity checks and recomputation; ``service``: the AuditService RPCs.
"""

from .recorder import AuditRecorder
from .store import AuditStoreError, Selector, Store, default_location, open_store

__all__ = [
    "AuditRecorder",
    "AuditStoreError",
    "Selector",
    "Store",
    "default_location",
    "open_store",
    "recorder_from_config",
    "store_from_config",
]


def recorder_from_config(config):  # noqa: ANN001, ANN201 - ServerConfig -> AuditRecorder | None
    """The recorder a server's settings ask for (None with ``--audit none``); opens and migrates
    the store, so a bad ``--audit-db`` fails at start-up, not at the first audited call."""
    if config.audit == "none":
        return None
    store = open_store(config.audit_db or default_location(config.data_dir))
    return AuditRecorder(
        store,
        mode=config.audit,
        capture=config.audit_capture,
        capture_max_mb=config.audit_capture_max_mb,
        retention_days=config.audit_retention_days,
        queue_size=config.audit_queue_size,
        queue_timeout_s=config.audit_queue_timeout_s,
        write_timeout_s=config.audit_write_timeout_s,
    )


def store_from_config(config, recorder):  # noqa: ANN001, ANN201 - (ServerConfig, AuditRecorder | None) -> Store | None
    """The store AuditService reads: the recorder's, or with ``--audit none`` the one named by an
    explicit ``--audit-db`` (a read-only replica serving a shared PostgreSQL trail); else None."""
    if recorder is not None:
        return recorder.store
    return open_store(config.audit_db) if config.audit_db else None
