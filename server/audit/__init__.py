"""The audit trail: one record per audited evaluation, stored in SQLite or PostgreSQL.

- ``records``: building a record (canonical params, input digests, values, ...);
- ``capture``: content-addressed, compressed input capture (of the sampled calls by default);
- ``store``: the storage interface, its two backends, the versioned migrations, the chain append;
- ``recorder``: the ``after_compute`` hook, bounded queue, single writer thread, capture sample
  and periodic checkpoints;
- ``chain``: walking a run's hash chain; ``signing``: the Ed25519 checkpoint key;
- ``verify``: integrity checks and recomputation; ``service``: the AuditService RPCs.
"""

from pathlib import Path

from .recorder import AuditRecorder
from .store import AuditStoreError, Selector, Store, default_location, open_store

__all__ = [
    "AuditRecorder",
    "AuditStoreError",
    "audit_signer",
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
    signer = signer_from_config(config)
    return AuditRecorder(
        store,
        mode=config.audit,
        capture=config.audit_capture,
        capture_max_mb=config.audit_capture_max_mb,
        retention_days=config.audit_retention_days,
        queue_size=config.audit_queue_size,
        queue_timeout_s=config.audit_queue_timeout_s,
        write_timeout_s=config.audit_write_timeout_s,
        signer=signer,
        checkpoint_s=config.audit_checkpoint_s,
    )


def signer_from_config(config):  # noqa: ANN001, ANN201 - ServerConfig -> Signer
    """The checkpoint signing key: ``--audit-signing-key``, else ``<data-dir>/audit-signing.key``
    (generated, mode 0600, at first start)."""
    from .signing import KEY_FILE, Signer

    path = config.audit_signing_key or str(
        Path(default_location(config.data_dir)).parent / KEY_FILE
    )
    return Signer.load_or_create(path)


def store_from_config(config, recorder):  # noqa: ANN001, ANN201 - (ServerConfig, AuditRecorder | None) -> Store | None
    """The store AuditService reads: the recorder's, or with ``--audit none`` the one named by an
    explicit ``--audit-db`` (a read-only replica serving a shared PostgreSQL trail); else None."""
    if recorder is not None:
        return recorder.store
    return open_store(config.audit_db) if config.audit_db else None


def audit_signer(config, recorder):  # noqa: ANN001, ANN201 - (ServerConfig, AuditRecorder | None) -> Signer | None
    """The key AuditService signs checkpoints with and serves: the recorder's, or with ``--audit
    none`` and an ``--audit-db`` the one ``signer_from_config`` names."""
    if recorder is not None:
        return recorder.signer
    return signer_from_config(config) if config.audit_db else None
