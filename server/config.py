"""Server settings: one frozen, validated object, read once at start-up and passed down.

Each setting comes, in increasing priority, from its default, a YAML config file (``--config``
or ``LOSSD_CONFIG``), an environment variable ``LOSSD_<NAME>`` and a command-line flag
``--<name>``. Every value, whatever its source, goes through one check: its type, bounds and
choices, declared beside it below. A value that fails is a ``SettingError`` naming the setting
and where it came from, which ``lossd serve`` and ``lossd health`` print as one line before
exiting 2.

This module imports neither torch nor gRPC, so ``lossd health`` reads the same settings in a
fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lossd.client.wire.limits import DecodeLimits

_MB = 1 << 20
AUDIT_MODES = ("none", "runs", "all")
# --audit-capture: all (inputs, its old name), none, sample (1 in 100) or sample:N.
AUDIT_CAPTURE = r"all|inputs|none|sample(:[1-9]\d*)?"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_THRESHOLD_KB = 32 << 10  # glibc refuses more than HEAP_MAX_SIZE / 2 on 64-bit
# sun_path holds 108 bytes with its NUL; the socket is bound under a sibling directory first
# (.lossd-XXXXXXXX/s, server/unix.py), which must fit too.
MAX_UNIX_PATH = 107 - len("/.lossd-XXXXXXXX/s")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingError(ValueError):
    """A setting has a value the server cannot use; ``lossd serve`` prints it and exits 2."""


def _setting(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    note: str = "",
    choices: Sequence[str] = (),
    pattern: str = "",
    expected: str = "",
) -> Any:
    """A field with its help and its rules: ``min``/``max`` bounds (``note`` says what they
    mean), ``choices``, or a regular expression ``pattern`` the whole value matches (``expected``
    says it in words)."""
    rules = dict(min=min, max=max, note=note, choices=tuple(choices), pattern=pattern)
    return field(default=default, metadata={"help": help, "expected": expected, **rules})


def _extra_port(help: str, note: str) -> Any:
    """A port besides --port, off (-1) by default; 0 picks a free one."""
    return _setting(-1, help, min=-1, max=65535, note=note)


@dataclass(frozen=True)
class ServerConfig:
    host: str = _setting(
        "127.0.0.1", "address to bind; 127.0.0.1 unless you mean to serve a network"
    )
    port: int = _setting(
        50051,
        "port to bind; 0 picks a free one and prints it; -1 serves no TCP port (only --unix)",
        min=-1,
        max=65535,
        note="(-1: no TCP port, only --unix)",
    )
    unix: str = _setting(
        "",
        "also serve on this Unix-domain socket (clients: endpoint='unix:PATH'); created mode 0600, removed at a clean exit, a stale one (no server answering) replaced, a live one refused; with --port -1 the only listener",
    )
    reuse_port: bool = _setting(
        False,
        "share --port with other processes bound with SO_REUSEPORT (calls, and their audit records, are split between them); off, a port already in use stops lossd serve",
    )
    device: str = _setting(
        "auto",
        "auto (CUDA when torch sees it), cpu, cuda or cuda:N",
        pattern=r"auto|cpu|cuda(:\d+)?",
        expected="auto, cpu, cuda or cuda:N",
    )
    workers: int = _setting(
        4,
        "loss evaluations that run at once (torch releases the GIL in kernels); other admitted calls wait for a slot within their deadline",
        min=1,
    )
    torch_threads: int = _setting(
        1,
        "torch intra-op threads per evaluation (up to --workers run at once); 0 keeps torch's default (one per core), worth it only for one large call at a time on a many-core CPU (bench/RESULTS.md)",
        min=0,
        note="(0 keeps torch's default)",
    )
    trim_memory_idle_s: float = _setting(
        2.0,
        "after 64 MiB or more of requests, once no evaluation has finished for this many seconds, return freed memory to the OS (glibc malloc_trim); 0 never (server/_malloc.py)",
        min=0,
        note="(0 never trims)",
    )
    malloc_mmap_threshold_kb: int = _setting(
        0,
        "fix glibc's mmap threshold at this many KiB (1..32768) so large buffers are unmapped when freed: lower peak RSS under mixed sizes, slower large calls (bench/RESULTS.md); 0 keeps glibc's dynamic threshold",
        min=0,
        max=MAX_THRESHOLD_KB,
        note="(KiB)",
    )
    malloc_reuse_large: bool = _setting(
        True,
        "serve buffers above glibc's 32 MiB mmap ceiling, up to a thread arena's 64 MiB, from its arenas too (M_MMAP_MAX=0), so a large evaluation reuses the pages the last one freed instead of faulting in fresh ones (a 64 MB cross_entropy about 2 x faster, bench/RESULTS.md); the idle trim gives them back; a fixed --malloc-mmap-threshold-kb turns it off",
    )
    malloc_huge_pages: bool = _setting(
        True,
        "back the server's tensors of 2 MiB and more with transparent huge pages (torch's THP_MEM_ALLOC_ENABLE, which lossd serve sets before torch loads; the kernel's THP mode must be madvise or always): a large evaluation takes up to 512 x fewer page faults (a 256 MB cross_entropy in about 40 % less time, bench/RESULTS.md); where memory is fragmented, the kernel's THP defrag setting decides whether a fault waits for compaction",
    )
    max_message_mb: int = _setting(
        256,
        "largest request or response, in MiB (both directions)",
        min=1,
        max=2047,
        note="(MiB; gRPC's limit is 2 GiB)",
    )
    max_concurrent_rpcs: int = _setting(
        64, "RPCs in flight before new ones get RESOURCE_EXHAUSTED", min=1
    )
    memory_budget_mb: int = _setting(
        0,
        "memory all requests together may use (decoded inputs and each evaluation's estimated working set), reserved before they allocate; a call that cannot fit is refused RESOURCE_EXHAUSTED, one that could fit later waits within its deadline; 0: half the machine's (or cgroup's) memory",
        min=0,
        note="(MiB; 0: half the machine's memory)",
    )
    stream_idle_timeout_s: float = _setting(
        30.0,
        "a ComputeChunked stream whose header or next data frame does not arrive within this many seconds is cancelled, releasing its slot and memory; 0 never",
        min=0,
        note="(0 never)",
    )
    stream_send_timeout_s: float = _setting(
        60.0,
        "a stream whose caller does not read the next answer message within this many seconds is cancelled, releasing its slot and memory; 0 never",
        min=0,
        note="(0 never)",
    )
    shm: str = _setting(
        "loopback",
        "co-located shared memory for ComputeChunked (memfds, server/shm.py): loopback accepts it over the --unix socket and loopback TCP from a caller on this host in the server's pid and user namespace (checked from its lossd-shm-host identity), unix over the socket only, none never; a call it does not accept falls back to sending the data",
        choices=("unix", "loopback", "none"),
    )
    shm_max_mb: int = _setting(
        1024,
        "largest shared-memory region (inputs, or room for the answer) a caller may hand over, in MiB; larger ones fall back to sending the data",
        min=1,
        note="(MiB)",
    )
    bulk_port: int = _extra_port(
        "a second TCP port (on --host) that carries ComputeChunked's tensor bytes on plain connections instead of gRPC data frames (server/bulk.py; 2-3x faster on loopback); clients learn it from their first chunked call and fall back to data frames on any doubt; -1 off, 0 a free one; plaintext, so not with TLS",
        "(-1 off)",
    )
    max_rank: int = _setting(8, "largest tensor rank accepted", min=0)
    max_elements: int = _setting(1 << 28, "largest tensor accepted, in elements", min=0)
    max_total_elements: int = _setting(1 << 29, "most tensor elements in one request", min=0)
    max_depth: int = _setting(16, "deepest nesting of lists/tuples/dicts in a request", min=0)
    max_items: int = _setting(
        100_000, "most values (tensors, numbers, containers) in one request", min=0
    )
    max_string_bytes: int = _setting(4096, "longest string or dict key in a request", min=0)
    reflection: bool = _setting(True, "serve gRPC server reflection")
    grace_seconds: float = _setting(10.0, "how long in-flight calls may finish on SIGTERM", min=0)
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR", choices=LOG_LEVELS)
    metrics_port: int = _extra_port(
        "port for Prometheus /metrics over HTTP; -1 disables it, 0 picks a free one and prints it",
        "(-1 disables it)",
    )
    metrics_host: str = _setting("", "address for /metrics; empty: the same as --host")
    tls_cert: str = _setting("", "PEM certificate chain of the server; with --tls-key, serves TLS")
    tls_key: str = _setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = _setting(
        "", "PEM CA bundle; clients must present a certificate it signed (mutual TLS)"
    )
    tls_client_roles: str = _setting(
        "",
        "YAML/JSON file mapping client-certificate common names to roles (with --tls-client-ca); a certificate not listed gets PERMISSION_DENIED. Without it (and without --auth-tokens) every certificate the CA signed gets every role",
    )
    auth_tokens: str = _setting(
        "",
        "YAML/JSON file mapping bearer tokens to {principal, roles}; every call but health and reflection then needs one",
    )
    allow_insecure: bool = _setting(
        False,
        "acknowledge serving a non-loopback address without TLS or tokens (e.g. behind an mTLS mesh); silences the start-up warning",
    )
    data_dir: str = _setting(
        "",
        "directory for server state (the SQLite audit trail); empty: $XDG_DATA_HOME/lossd or ~/.local/share/lossd",
    )
    audit: str = _setting(
        "runs",
        "which calls are audited: none, runs (calls with a run id) or all",
        choices=AUDIT_MODES,
    )
    audit_db: str = _setting(
        "",
        "audit store: a SQLite file path or a postgresql:// URL; empty: <data-dir>/audit.sqlite3",
    )
    audit_capture: str = _setting(
        "sample:100",
        "which audited calls keep their input tensors, so verify can recompute them: all, none, or sample:N (each attempt's first call and 1 in N, chosen by a keyed hash of the request id)",
        pattern=AUDIT_CAPTURE,
        expected="all, none or sample:N (N >= 1)",
    )
    audit_capture_max_mb: int = _setting(
        1024,
        "cap on captured inputs (compressed MiB); past it inputs are recorded by digest only",
        min=0,
    )
    audit_retention_days: float = _setting(
        0.0,
        "delete captured inputs unused for this many days; 0 keeps them (records are never deleted)",
        min=0,
        note="(0 keeps them)",
    )
    audit_queue_size: int = _setting(
        4096, "audit records waiting for the writer before calls block", min=1
    )
    audit_queue_timeout_s: float = _setting(
        5.0, "how long an audited call waits for queue space, then fails UNAVAILABLE", min=0
    )
    audit_signing_key: str = _setting(
        "",
        "Ed25519 key (PKCS#8 PEM) that signs audit checkpoints; empty: <data-dir>/audit-signing.key, generated (mode 0600) at first start",
    )
    audit_checkpoint_s: float = _setting(
        10.0,
        "how often the heads of runs written since the last checkpoint are signed (also when idle and at shutdown)",
        min=0.01,
    )
    audit_write_timeout_s: float = _setting(
        30.0,
        "how long an audited call waits for its record to be committed, then fails UNAVAILABLE",
        min=0,
    )

    def __post_init__(self) -> None:
        # The one validation pass; from_sources has already checked each value under the name
        # of its source, so this names the flag (a ServerConfig built in code has no other).
        for f in fields(self):
            object.__setattr__(self, f.name, check(f, getattr(self, f.name), _flag(f)))
        if self.port == -1 and not self.unix:
            raise SettingError("--port -1 (no TCP port) needs --unix PATH")
        if self.unix and len(os.fsencode(os.path.abspath(self.unix))) > MAX_UNIX_PATH:
            raise SettingError(
                f"--unix {self.unix}: a socket path has at most {MAX_UNIX_PATH} bytes (the kernel's sun_path)"
            )

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * _MB

    @property
    def memory_budget_bytes(self) -> int:
        from lossd.server.budget import default_budget_mb

        return (self.memory_budget_mb or default_budget_mb()) * _MB

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
            text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help strings
            if f.type == "bool":
                parser.add_argument(
                    _flag(f), action=argparse.BooleanOptionalAction, default=None, help=text
                )
            else:  # taken as text: check() converts it and names the flag when it cannot
                parser.add_argument(_flag(f), default=None, help=f"{text} (default {f.default})")

    @classmethod
    def from_sources(
        cls,
        args: argparse.Namespace | None = None,
        env: Mapping[str, str] | None = None,
        file: Path | None = None,
    ) -> ServerConfig:
        """The settings from a config file, the environment and parsed flags (in increasing
        priority); every value given is checked, so a bad one is an error even where a
        higher-priority source overrides it."""
        env = os.environ if env is None else env
        by_name = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in _file_settings(args, env, file, by_name).items():
            values[name] = value
        for f in by_name.values():
            raw = env.get(f"LOSSD_{f.name.upper()}")
            if raw is not None:
                values[f.name] = check(f, raw, f"LOSSD_{f.name.upper()}")
            flagged = getattr(args, f.name, None) if args is not None else None
            if flagged is not None:
                values[f.name] = check(f, flagged, _flag(f))
        return cls(**values)


def check(f: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` as setting ``f`` holds it (text converted to its type), or a SettingError
    naming ``where`` it came from and what was expected."""
    rules = f.metadata
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    text = value.strip() if isinstance(value, str) else None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise SettingError(f"{where}: expected true or false, got {value!r}")
    if kind in ("int", "float"):
        number = _number(kind, value if text is None else text)
        if number is None:
            article = "an integer" if kind == "int" else "a number"
            raise SettingError(f"{where}: expected {article}, got {value!r}")
        lo, hi = rules.get("min"), rules.get("max")
        if (lo is not None and not number >= lo) or (hi is not None and not number <= hi):
            span = f"{lo}..{hi}" if lo is not None and hi is not None else f">= {lo}"
            note = f" {rules['note']}" if rules.get("note") else ""
            raise SettingError(f"{where}: expected {span}{note}, got {number}")
        return number
    if not isinstance(value, str):
        raise SettingError(f"{where}: expected a string, got {value!r}")
    if rules.get("choices") and value not in rules["choices"]:
        raise SettingError(f"{where}: expected one of {', '.join(rules['choices'])}, got {value!r}")
    if rules.get("pattern") and not re.fullmatch(rules["pattern"], value):
        raise SettingError(f"{where}: expected {rules['expected']}, got {value!r}")
    return value


def _number(kind: str, value: Any) -> int | float | None:
    if isinstance(value, bool):  # YAML's true is not a port number
        return None
    if isinstance(value, int if kind == "int" else (int, float)):
        return value if kind == "int" else float(value)
    if not isinstance(value, str):
        return None
    try:
        return int(value) if kind == "int" else float(value)
    except ValueError:
        return None


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _file_settings(
    args: argparse.Namespace | None,
    env: Mapping[str, str],
    file: Path | None,
    by_name: Mapping[str, dataclasses.Field],
) -> dict[str, Any]:
    """The checked settings of the YAML config file, if one is given (``file``, ``--config`` or
    ``LOSSD_CONFIG``): a missing file, bad YAML or an unknown key is a SettingError."""
    given = getattr(args, "config", None) if args is not None else None
    if file is not None:
        where, path = "config file", file
    elif given is not None:
        where, path = "--config", given
    elif env.get("LOSSD_CONFIG"):
        where, path = "LOSSD_CONFIG", Path(env["LOSSD_CONFIG"])
    else:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise SettingError(f"{where} {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise SettingError(f"{path}: not valid YAML: {problem}{at}") from None
    if not isinstance(loaded, Mapping):
        raise SettingError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    values = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingError(f"{path}: unknown setting {key!r}{hint}")
        values[name] = check(by_name[name], value, f"{path}: {key}")
    return values


def parse(argv: Sequence[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    return ServerConfig.from_sources(parser.parse_args(argv))
