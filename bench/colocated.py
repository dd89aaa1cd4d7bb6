"""Co-located rows (``python -m bench --colocated``): the same host, over a Unix-domain socket.

Columns, measured interleaved call by call as the main table's (bench/measure.py):
``echo_unix`` (the trivial handler's unary echo of the same bytes over a Unix socket), ``local``
(the server's engine in this process), ``unix`` (``RemoteLoss`` over the socket, transport
``auto``, shared memory off: unary below 4 MiB, chunked data frames above) and ``shm`` (the same
with shared memory on, the default for ``unix:`` endpoints: from 1 MB the call is forced chunked,
so its tensors travel in memfds). Ratios: ``unix / (echo_unix + local)`` for small calls (issue 14:
<= 1.2 x) and ``shm / local`` for large ones (<= 1.3 x).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from . import workloads
from .floor import FloorClient
from .measure import KB, MB, local_cell, remote_cell, stats
from .report import ms_text, size_text
from .servers import START_TIMEOUT_S, floor_server, lossd_server

SMALL = 64 * KB
LARGE = 64 * MB


def colocated(
    opts: argparse.Namespace, workdir: Path, losses: list[str], sizes: list[int]
) -> list[dict[str, Any]]:
    floor_sock, lossd_sock = workdir / "floor.sock", workdir / "lossd.sock"
    floor_proc = floor_server(opts)
    floor_proc.argv = [*floor_proc.argv, "--unix", str(floor_sock)]
    lossd_proc = lossd_server(opts, workdir)
    lossd_proc.argv = [*lossd_proc.argv, "--port", "-1", "--unix", str(lossd_sock)]
    lossd_proc.timeout = START_TIMEOUT_S
    floor_proc.start()
    lossd_proc.start()
    rows = []
    try:
        floor = FloorClient(f"unix:{floor_sock}")
        for loss in losses:
            for size in sizes:
                cap = (workloads.QUICK_MAX_SIZE if opts.quick else workloads.MAX_SIZE).get(loss)
                if cap is not None and size > cap:
                    continue
                row = _row(workloads.build(loss, size), floor, f"unix:{lossd_sock}", opts)
                rows.append(row)
                print(
                    f"{loss:>14} {size_text(size):>7}  echo_unix {ms_text(row.get('echo_unix'))}  "
                    f"local {ms_text(row.get('local'))}  unix {ms_text(row.get('unix'))}  shm {ms_text(row.get('shm'))}",
                    flush=True,
                )
        floor.close()
    finally:
        floor_proc.stop()
        lossd_proc.stop()
    return rows


def _row(
    w: workloads.Workload, floor: FloorClient, address: str, opts: argparse.Namespace
) -> dict[str, Any]:
    import numpy as np

    from lossd.client import RemoteLoss

    row: dict[str, Any] = {"loss": w.loss, "size": w.size, "shape": w.shape,
                           "request_bytes": w.request_bytes, "grad_bytes": w.grad_bytes}  # fmt: skip
    payload = np.random.bytes(w.request_bytes)
    modules = {
        "unix": RemoteLoss(
            w.loss, endpoint=address, max_message_mb=opts.max_message_mb, shm=False, **w.params
        )
    }
    if w.size >= 1 * MB:
        modules["shm"] = RemoteLoss(w.loss, endpoint=address, max_message_mb=opts.max_message_mb, transport="chunked", **w.params)  # fmt: skip
    cells = {"echo_unix": lambda: floor.echo(payload, w.grad_bytes),
             "local": local_cell(w, opts)}  # fmt: skip
    for name, module in modules.items():
        cells[name] = remote_cell(w, module)
    times: dict[str, list[float]] = {name: [] for name in cells}
    try:
        for fn in cells.values():
            fn()  # warm-up
        # At least 5 calls a cell: the shm / local target is a ratio of medians, and 3 calls under
        # load swung it by 0.5 between runs.
        min_n = 5
        deadline = time.perf_counter() + opts.budget * len(cells)
        rounds = 0
        while rounds < opts.max_n and (rounds < min_n or time.perf_counter() < deadline):
            for name, fn in cells.items():
                t0 = time.perf_counter_ns()
                inner = fn()
                times[name].append(
                    (inner if name == "local" else time.perf_counter_ns() - t0) / 1e9
                )
            rounds += 1
        if "shm" in modules:
            row["shm_used"] = modules["shm"].transport.shm
    finally:
        for module in modules.values():
            module.close()
    for name, values in times.items():
        row[name] = stats(values)
    return row


def render(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The co-located table and its targets."""
    cols = ["loss", "payload", "req MB", "echo_unix p50", "local p50", "unix p50/p99", "shm p50/p99",
            "unix / (echo_unix + local)", "shm / local", "shm MB/s"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    found = []
    for row in rows:
        echo, local = row["echo_unix"]["p50"], row["local"]["p50"]
        small = row["unix"]["p50"] / (echo + local)
        shm = row.get("shm")
        shm_ratio = f"{shm['p50'] / local:.2f}" if shm else "–"
        mbs = f"{(row['request_bytes'] + row['grad_bytes']) / shm['p50'] / MB:.0f}" if shm else "–"
        both = lambda c: f"{ms_text(c)} / {ms_text(c, 'p99')}" if c else "–"  # noqa: E731
        lines.append("| " + " | ".join([row["loss"], size_text(row["size"]), f"{row['request_bytes'] / MB:.3f}",
                     ms_text(row["echo_unix"]), ms_text(row["local"]), both(row["unix"]), both(shm),
                     f"{small:.2f}", shm_ratio, mbs]) + " |")  # fmt: skip
        name = f"{row['loss']} {size_text(row['size'])}"
        if row["size"] <= SMALL:
            found.append({"target": f"{name} over a Unix socket <= 1.2 x (unix echo + local)", "value": small, "met": small <= 1.2, "group": "small calls over a Unix socket"})  # fmt: skip
        if row["size"] >= LARGE and shm:
            r = shm["p50"] / local
            found.append({"target": f"{name} through shared memory <= 1.3 x local", "value": r, "met": r <= 1.3, "group": "co-located large calls"})  # fmt: skip
    return "\n".join(lines), found


def memory_peak(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The server's peak RSS for one ``--memory-mb`` cross_entropy request through shared memory
    (``--memory``), split, from /proc/PID/status sampled every 2 ms, into the server's own
    memory (RssAnon) and the caller's regions mapped into it (RssShmem: the same pages as the
    client's, no copy of them)."""
    import threading

    from lossd.client import RemoteLoss

    sock = workdir / "lossd-memory.sock"
    proc = lossd_server(opts, workdir)
    proc.argv = [*proc.argv, "--port", "-1", "--unix", str(sock)]
    proc.timeout = START_TIMEOUT_S
    proc.start()
    try:
        small = workloads.build("cross_entropy", 1 * KB)
        with RemoteLoss("cross_entropy", endpoint=f"unix:{sock}") as module:
            for _ in range(50):  # torch's and grpc's lazy start-up, out of the baseline
                small.fresh()
                module(*small.args).backward()
        big = workloads.build("cross_entropy", opts.memory_mb * MB)
        base, peak = _status(proc.pid), {"RssAnon": 0, "RssShmem": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                now = _status(proc.pid)
                for key in peak:
                    peak[key] = max(peak[key], now[key])

        sampler = threading.Thread(target=sample, daemon=True)
        with RemoteLoss(
            "cross_entropy", endpoint=f"unix:{sock}", max_message_mb=opts.max_message_mb
        ) as module:
            sampler.start()
            t0 = time.perf_counter()
            module(*big.args).backward()
            seconds = time.perf_counter() - t0
            done.set()
            sampler.join()
            used = module.transport.shm
        after = _status(proc.pid)
    finally:
        proc.stop()
    req = big.request_bytes
    return {
        "request_bytes": req,
        "shm_used": used,
        "seconds": seconds,
        "rss_before": base["VmRSS"],
        "hwm_after": after["VmHWM"],
        "raise": after["VmHWM"] - base["VmRSS"],
        "ratio": (after["VmHWM"] - base["VmRSS"]) / req,
        "anon_ratio": (peak["RssAnon"] - base["RssAnon"]) / req,
        "shmem_ratio": (peak["RssShmem"] - base["RssShmem"]) / req,
    }


def memory_target(peak: dict[str, Any]) -> dict[str, Any]:
    r = peak["ratio"]
    return {"target": f"peak RSS raise for one {peak['request_bytes'] >> 20} MB request co-located (shared memory) <= 3.2x (issue 14)", "value": r, "met": r <= 3.2, "group": "peak RSS"}  # fmt: skip


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssShmem of a process, bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
            values[key] = int(rest.split()[0]) << 10
    return values
