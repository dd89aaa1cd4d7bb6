"""Builds and runs the lossd gRPC server: ``create_server`` for tests, ``serve`` for the CLI."""

from __future__ import annotations

import faulthandler
import ipaddress
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import reflection
from ._malloc import (
    HUGE_PAGES_ENV,
    IdleTrimmer,
    huge_pages_in_use,
    reuse_large_buffers,
    set_mmap_threshold,
)
from .audit import AuditRecorder, audit_signer, recorder_from_config, store_from_config
from .audit.service import AUDIT_SERVICE_NAME, AuditServicer, audit_method_handlers
from .budget import MemoryBudget
from .bulk import BulkListener
from .config import ServerConfig, SettingError
from .engine import Engine
from .limits import (
    PROBE_RESERVE,
    PROBE_STREAMS,
    AdmissionInterceptor,
    DeadlineInterceptor,
    deadline_guard,
)
from .metrics import Metrics
from .security import (
    AuthInterceptor,
    TokenTable,
    certificate_roles,
    exposure_notes,
    server_credentials,
)
from .service import SERVICE_NAME, LossServicer, method_handlers
from .unix import UnixListener, check_path
from .unix import bind as bind_unix
from .version import __version__

log = logging.getLogger("lossd")


ANSWER_GRACE_S = 1.0


@dataclass
class RunningServer:
    """A started server and the handles a caller needs to stop it."""

    server: grpc.Server
    port: int
    config: ServerConfig
    engine: Engine
    health: health.HealthServicer
    metrics: Metrics | None = None
    metrics_port: int | None = None  # the bound /metrics port, None when not served
    metrics_http: Any = None
    audit: AuditRecorder | None = None  # None with --audit none
    audit_store: Any = (
        None  # what AuditService reads (the recorder's store, or --audit-db with --audit none)
    )
    admission: AdmissionInterceptor | None = None
    trimmer: IdleTrimmer | None = None
    audit_signer: Any = None  # the checkpoint signing key (audit.signing.Signer), with a store
    servicer: LossServicer | None = None
    unix: UnixListener | None = None  # the --unix socket, None without one
    bulk: BulkListener | None = None  # the --bulk-port socket, None without one

    @property
    def address(self) -> str:
        """The TCP address, or with --port -1 the ``unix:PATH`` one."""
        if self.port < 0 and self.unix is not None:
            return self.unix.address
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def addresses(self) -> list[str]:
        """Every address it listens on: TCP (unless --port -1), then the Unix socket."""
        tcp = [] if self.port < 0 else [self.address]
        return tcp + ([self.unix.address] if self.unix is not None else [])

    def stop(self, grace: float | None = None) -> None:
        """Drain: health goes NOT_SERVING, new calls are refused, in-flight calls finish."""
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        if self.admission is not None:
            # Before gRPC's own shutdown, which would cancel calls that arrived but were not yet
            # handed to a thread: here they are still taken, and refused UNAVAILABLE (retried).
            self.admission.drain(grace)
        if self.servicer is not None:
            self.servicer.wait_idle(deadline - time.monotonic())  # evaluations in flight
            if self.admission is not None:
                # Their answers, until gRPC has sent them (within the grace): a fixed second cut
                # off a 13 MB answer on a busy machine whose record was already committed.
                self.admission.wait_answered(deadline - time.monotonic())
            # What is left are probe streams (and answers past the grace): a second, then the
            # rest ends, rather than at the end of the grace.
            self.server.stop(min(max(deadline - time.monotonic(), 0.0), ANSWER_GRACE_S)).wait()
        else:
            self.server.stop(max(deadline - time.monotonic(), 0.0)).wait()
        if self.unix is not None:
            self.unix.remove()
        if self.bulk is not None:
            self.bulk.close()
        # After the drain: calls in flight have had their records committed; flush the rest.
        self.close_audit()
        if self.trimmer is not None:
            self.trimmer.close()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()

    def close_audit(self) -> None:
        if self.audit is not None:
            self.audit.close()
        elif self.audit_store is not None:
            self.audit_store.close()


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    # Both directions bounded, on both sides (a limit raised on one side only is the most
    # common complaint against model servers).
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _bulk_listener(config: ServerConfig, credentials: Any) -> BulkListener | None:
    if config.bulk_port < 0:
        return None
    if credentials is not None:
        raise SettingError(
            "--bulk-port carries tensors in the clear: it cannot be combined with TLS (drop "
            "--bulk-port; chunked calls then send their data frames over TLS)"
        )
    try:
        return BulkListener(config.host, config.bulk_port, config.stream_idle_timeout_s)
    except OSError as exc:
        raise SettingError(
            f"--bulk-port {config.bulk_port}: cannot bind {config.host}:{config.bulk_port}: "
            f"{exc.strerror or exc}"
        ) from None


def create_server(config: ServerConfig) -> RunningServer:
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)  # process-wide: every handler thread shares it
    # Process-wide too. A fixed threshold is asked for so that large buffers are unmapped when
    # freed, which keeping them in the arenas would undo.
    if config.malloc_mmap_threshold_kb:
        set_mmap_threshold(config.malloc_mmap_threshold_kb)
    elif config.malloc_reuse_large:
        reuse_large_buffers()
    trimmer = IdleTrimmer(config.trim_memory_idle_s)  # its thread starts with the server
    engine = Engine(config.device)
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    tokens = TokenTable.load(config.auth_tokens) if config.auth_tokens else None
    cert_roles = certificate_roles(config)
    # Opens and migrates the store now: a bad --audit-db fails at start-up, not at the first call.
    recorder = recorder_from_config(config)
    audit_store = store_from_config(config, recorder)
    signer = audit_signer(config, recorder) if audit_store is not None else None
    metrics = Metrics(
        device=str(engine.device), audit_stats=recorder.stats if recorder is not None else None
    )
    # deadline_guard first: a result the caller no longer waits for is neither sent nor audited.
    hooks = [deadline_guard, metrics.after_compute]
    if trimmer.enabled:
        hooks.append(trimmer.after_compute)
    if recorder is not None:
        hooks.append(
            recorder.after_compute
        )  # last: it answers `audited` once the record is committed
    bulk_listener = _bulk_listener(config, credentials)
    servicer = LossServicer(
        engine,
        config.limits,
        after_compute=hooks,
        max_chunked_bytes=config.max_message_bytes,  # the same one knob bounds chunked requests
        max_evaluations=config.workers,  # --workers bounds concurrent evaluations...
        budget=MemoryBudget(config.memory_budget_bytes),  # ...and --memory-budget-mb their memory
        stream_idle_timeout_s=config.stream_idle_timeout_s,
        stream_send_timeout_s=config.stream_send_timeout_s,
        shm_mode=config.shm,  # the co-located shared-memory path (server/shm.py)
        shm_max_bytes=config.shm_max_mb << 20,
        bulk_listener=bulk_listener,
    )
    admission = AdmissionInterceptor(config.max_concurrent_rpcs)
    server = grpc.server(
        # ...not RPCs: a chunked upload holds its thread while its bytes arrive, so with one thread
        # per worker a few slow uploads would starve every other call. One thread per admitted
        # RPC; past --max-concurrent-rpcs calls are refused RESOURCE_EXHAUSTED, never left hanging.
        # PROBE_STREAMS + PROBE_RESERVE more slots and threads than that, for health checks and
        # reflection, which AdmissionInterceptor leaves outside the limit (capping their streams).
        futures.ThreadPoolExecutor(
            max_workers=max(
                config.workers, config.max_concurrent_rpcs + PROBE_STREAMS + PROBE_RESERVE
            ),
            thread_name_prefix="lossd",
        ),
        # Metrics outermost, so refusals by the others are counted too.
        # Authentication before admission: an unauthenticated call is refused holding no slot.
        interceptors=[
            metrics.interceptor(),
            AuthInterceptor(tokens, cert_roles, tls=credentials is not None),
            admission,
            DeadlineInterceptor(),
        ],
        # No SO_REUSEPORT unless asked: a second server on a used port would silently split the
        # calls (and the audit trail) with the first.
        options=[
            *channel_options(config.max_message_bytes),
            ("grpc.so_reuseport", int(config.reuse_port)),
        ],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs + PROBE_STREAMS + PROBE_RESERVE,
    )
    server.add_generic_rpc_handlers((method_handlers(servicer),))
    services = [SERVICE_NAME]
    if audit_store is not None:
        # Gated by AuthInterceptor with the audit-read role (security.SERVICE_ROLES).
        server.add_generic_rpc_handlers(
            (audit_method_handlers(AuditServicer(audit_store, signer, recorder, servicer.bounded)),)
        )
        services.append(AUDIT_SERVICE_NAME)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable(
            server, (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        )

    def add_port(address: str) -> int:
        try:
            if credentials is not None:
                return server.add_secure_port(address, credentials)
            return server.add_insecure_port(address)
        except RuntimeError:  # grpc raises "Failed to bind" where older versions returned 0
            return 0

    def give_up() -> None:
        server.stop(0)
        if bulk_listener is not None:
            bulk_listener.close()
        if recorder is not None:
            recorder.close()

    port = -1
    if config.port >= 0:
        host = config.host
        port = add_port(f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}")
        if port == 0:
            give_up()
            raise SettingError(
                f"--port {config.port}: cannot bind {host}:{config.port}: it is in use (another "
                "lossd serve?) or not an address of this machine; stop the other server, pick "
                "another --port (0: any free one), or share it on purpose with --reuse-port"
            )
    unix = None
    if config.unix:
        try:
            unix = bind_unix(check_path(config.unix), add_port)
        except BaseException:
            give_up()
            raise
    server.start()
    metrics_http = metrics_port = None
    if config.metrics_port >= 0:
        try:
            metrics_http, metrics_port = metrics.serve_http(
                config.metrics_host or config.host, config.metrics_port
            )
        except OSError as exc:
            give_up()
            if unix is not None:
                unix.remove()
            raise SettingError(
                f"--metrics-port {config.metrics_port}: cannot serve /metrics on "
                f"{config.metrics_host or config.host}: {exc.strerror or exc}"
            ) from None
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server, port, config, engine, health_servicer, metrics, metrics_port, metrics_http, recorder, audit_store, admission,
        trimmer=trimmer.start(), audit_signer=signer, servicer=servicer, unix=unix, bulk=bulk_listener,
    )  # fmt: skip


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    secured = bool(config.tls_cert or config.auth_tokens)
    tcp_exposed = config.port >= 0 and not is_loopback(config.host)
    if tcp_exposed and not secured and not config.allow_insecure:
        log.warning(
            "\n"
            + "!" * 78
            + "\n!! lossd is listening on %s WITHOUT TLS or authentication: anyone who can\n"
            "!! reach this address can use it. Bind 127.0.0.1, or enable TLS and tokens\n"
            "!! (--tls-cert/--tls-key, --auth-tokens; see README section Deployment).\n" + "!" * 78,
            config.host,
        )
    elif tcp_exposed:
        for line in exposure_notes(config):
            log.warning("%s", line)
    metrics_host = config.metrics_host or config.host
    if config.metrics_port >= 0 and not is_loopback(metrics_host):
        log.warning(
            "/metrics is served on %s, beyond loopback, without authentication: anyone who can "
            "reach it reads this server's load and loss names; bind --metrics-host 127.0.0.1 "
            "unless a scraper on another machine needs it",
            metrics_host,
        )
    running = create_server(config)
    log.info(
        "lossd %s (torch %s) on %s, device %s; settings:\n%s",
        __version__,
        torch.__version__,
        " and ".join(running.addresses),
        running.engine.device,
        config.describe(),
    )
    if config.malloc_huge_pages and huge_pages_in_use():
        log.info("tensors of 2 MiB and more are backed by transparent huge pages")
    elif config.malloc_huge_pages:
        log.info(
            "--malloc-huge-pages has no effect: torch loaded without %s=1 (lossd serve sets it "
            "unless it is set already; a process embedding the server sets it before importing "
            "torch), or the kernel's transparent huge pages are off",
            HUGE_PAGES_ENV,
        )
    if running.audit is not None:
        log.info(
            "audit trail: %s calls recorded in %s (capture %s)",
            config.audit,
            running.audit.store.name,
            config.audit_capture,
        )
    # The bound addresses on stdout, each alone on its line, so scripts and tests can read them
    # (TCP first, then the Unix socket).
    for address in running.addresses:
        print(f"lossd listening on {address}", flush=True)
    if running.metrics_port is not None:
        metrics_host = config.metrics_host or config.host
        shown = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
        print(f"lossd metrics on http://{shown}:{running.metrics_port}/metrics", flush=True)
    if running.bulk is not None:
        print(f"lossd bulk data port {running.bulk.port}", flush=True)
    if running.audit_signer is not None:
        # Whoever keeps checkpoints needs this key to check them (also: lossd audit public-key).
        print(f"lossd {running.audit_signer.describe()}", flush=True)

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info(
            "%s received: draining (up to %.1f s)",
            signal.Signals(signum).name,
            config.grace_seconds,
        )
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(
            signal.SIGUSR1, all_threads=True
        )  # `kill -USR1`: every thread's stack on stderr
    # Wait in slices: the kernel may deliver SIGTERM to one of gRPC's threads, and CPython runs
    # the Python handler only when the main thread returns to bytecode, which an untimed wait never does.
    while not stopping.wait(0.2):
        pass
    running.stop()
    log.info("stopped")
