"""Server settings: one frozen object, read once at start-up and passed down.

Each setting comes, in increasing priority, from its default, a YAML config file
(``--config``), an environment variable ``LOSSD_<NAME>`` and a command-line flag ``--<name>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lossd.client.wire.limits import DecodeLimits

_MB = 1 << 20


class SettingError(ValueError):
    """A setting has a value the server cannot use; ``lossd serve`` prints it and exits 2."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to bind; 127.0.0.1 unless you mean to serve a network"},
    )
    port: int = field(
        default=50051, metadata={"help": "port to bind; 0 picks a free one and prints it"}
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when torch sees it), cpu, cuda or cuda:N"}
    )
    workers: int = field(
        default=4,
        metadata={
            "help": "loss evaluations that run at once (torch releases the GIL in kernels); other admitted calls wait for a slot within their deadline"
        },
    )
    torch_threads: int = field(
        default=1,
        metadata={
            "help": "torch intra-op threads per evaluation (up to --workers run at once); 0 keeps torch's default (one per core), worth it only for one large call at a time on a many-core CPU (bench/RESULTS.md)"
        },
    )
    trim_memory_idle_s: float = field(
        default=2.0,
        metadata={
            "help": "after 64 MiB or more of requests, once no evaluation has finished for this many seconds, return freed memory to the OS (glibc malloc_trim); 0 never (server/_malloc.py)"
        },
    )
    malloc_mmap_threshold_kb: int = field(
        default=0,
        metadata={
            "help": "fix glibc's mmap threshold at this many KiB (1..32768) so large buffers are unmapped when freed: lower peak RSS under mixed sizes, slower large calls (bench/RESULTS.md); 0 keeps glibc's dynamic threshold"
        },
    )
    max_message_mb: int = field(
        default=256, metadata={"help": "largest request or response, in MiB (both directions)"}
    )
    max_concurrent_rpcs: int = field(
        default=64, metadata={"help": "RPCs in flight before new ones get RESOURCE_EXHAUSTED"}
    )
    max_rank: int = field(default=8, metadata={"help": "largest tensor rank accepted"})
    max_elements: int = field(
        default=1 << 28, metadata={"help": "largest tensor accepted, in elements"}
    )
    max_total_elements: int = field(
        default=1 << 29, metadata={"help": "most tensor elements in one request"}
    )
    max_depth: int = field(
        default=16, metadata={"help": "deepest nesting of lists/tuples/dicts in a request"}
    )
    max_items: int = field(
        default=100_000,
        metadata={"help": "most values (tensors, numbers, containers) in one request"},
    )
    max_string_bytes: int = field(
        default=4096, metadata={"help": "longest string or dict key in a request"}
    )
    reflection: bool = field(default=True, metadata={"help": "serve gRPC server reflection"})
    grace_seconds: float = field(
        default=10.0, metadata={"help": "how long in-flight calls may finish on SIGTERM"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    metrics_port: int = field(
        default=-1,
        metadata={
            "help": "port for Prometheus /metrics over HTTP; -1 disables it, 0 picks a free one and prints it"
        },
    )
    metrics_host: str = field(
        default="", metadata={"help": "address for /metrics; empty: the same as --host"}
    )
    tls_cert: str = field(
        default="",
        metadata={"help": "PEM certificate chain of the server; with --tls-key, serves TLS"},
    )
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(
        default="",
        metadata={
            "help": "PEM CA bundle; clients must present a certificate it signed (mutual TLS)"
        },
    )
    tls_client_roles: str = field(
        default="",
        metadata={
            "help": "YAML/JSON file mapping client-certificate common names to roles (with --tls-client-ca); a certificate not listed gets PERMISSION_DENIED. Without it (and without --auth-tokens) every certificate the CA signed gets every role"
        },
    )
    auth_tokens: str = field(
        default="",
        metadata={
            "help": "YAML/JSON file mapping bearer tokens to {principal, roles}; every call but health and reflection then needs one"
        },
    )
    allow_insecure: bool = field(
        default=False,
        metadata={
            "help": "acknowledge serving a non-loopback address without TLS or tokens (e.g. behind an mTLS mesh); silences the start-up warning"
        },
    )
    data_dir: str = field(
        default="",
        metadata={
            "help": "directory for server state (the SQLite audit trail); empty: $XDG_DATA_HOME/lossd or ~/.local/share/lossd"
        },
    )
    audit: str = field(
        default="runs",
        metadata={"help": "which calls are audited: none, runs (calls with a run id) or all"},
    )
    audit_db: str = field(
        default="",
        metadata={
            "help": "audit store: a SQLite file path or a postgresql:// URL; empty: <data-dir>/audit.sqlite3"
        },
    )
    audit_capture: str = field(
        default="none",
        metadata={"help": "store the input tensors of audited calls (for verify): none or inputs"},
    )
    audit_capture_max_mb: int = field(
        default=1024,
        metadata={
            "help": "cap on captured inputs (compressed MiB); past it inputs are recorded by digest only"
        },
    )
    audit_retention_days: float = field(
        default=0.0,
        metadata={
            "help": "delete captured inputs unused for this many days; 0 keeps them (records are never deleted)"
        },
    )
    audit_queue_size: int = field(
        default=4096, metadata={"help": "audit records waiting for the writer before calls block"}
    )
    audit_queue_timeout_s: float = field(
        default=5.0,
        metadata={"help": "how long an audited call waits for queue space, then fails UNAVAILABLE"},
    )
    audit_write_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "how long an audited call waits for its record to be committed, then fails UNAVAILABLE"
        },
    )

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * _MB

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_rank=self.max_rank,
            max_elements=self.max_elements,
            max_total_elements=self.max_total_elements,
            max_depth=self.max_depth,
            max_items=self.max_items,
            max_string_bytes=self.max_string_bytes,
        )

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line per setting, for the start-up log."""

        def shown(name: str) -> Any:
            value = getattr(self, name)
            # A postgresql:// URL may carry a password: never print it.
            return (
                re.sub(r"^(postgres(?:ql)?://[^:/@]*:)[^@]*@", r"\1***@", value)
                if name == "audit_db"
                else value
            )

        return "\n".join(f"  {f.name} = {shown(f.name)!r}" for f in fields(self))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--config", type=Path, help="YAML file of settings (keys as the flags, with _)"
        )
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                parser.add_argument(
                    flag,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=f.metadata.get("help"),
                )
            else:
                parser.add_argument(
                    flag,
                    type=_caster(f),
                    default=None,
                    help=f"{f.metadata.get('help')} (default {f.default})",
                )

    @classmethod
    def from_sources(
        cls,
        args: argparse.Namespace | None = None,
        env: Mapping[str, str] | None = None,
        file: Path | None = None,
    ) -> ServerConfig:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        file = (
            file
            or (getattr(args, "config", None) if args is not None else None)
            or (Path(env["LOSSD_CONFIG"]) if env.get("LOSSD_CONFIG") else None)
        )
        if file is not None:
            loaded = yaml.safe_load(Path(file).read_text()) or {}
            if not isinstance(loaded, Mapping):
                raise ValueError(f"{file}: expected a mapping of settings")
            names = {f.name for f in fields(cls)}
            for key, value in loaded.items():
                key = str(key).replace("-", "_")
                if key not in names:
                    raise ValueError(f"{file}: unknown setting {key!r}")
                values[key] = value
        for f in fields(cls):
            raw = env.get(f"LOSSD_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _caster(f)(raw)
            if args is not None and getattr(args, f.name, None) is not None:
                values[f.name] = getattr(args, f.name)
        return cls(**values)


def _caster(f: dataclasses.Field) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        return lambda raw: (
            raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
        )
    return {"int": int, "float": float}.get(kind, str)


def parse(argv: Sequence[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    return ServerConfig.from_sources(parser.parse_args(argv))
