"""Per-call CPU of small calls (``python -m bench --cpu``): what lossd itself costs each side.

For each small call (<= 64 KB), sequential calls from this process, in blocks:

- ``lossd``: ``RemoteLoss`` forward + ``.backward()`` (unary ``Compute``) against ``lossd serve``;
- ``echo``: the trivial handler's unary echo of the same bytes (bench/floor.py), the gRPC floor;
- ``local``: the server's engine on the same inputs in this process (the loss's own compute);
- ``before``: ``lossd`` as it was before issue 14's work (bench/before.py), its server and its
  client, in the same rounds; what the halving target compares with.

Client CPU is ``time.process_time()`` over a block (every thread of this process, gRPC's own
included) / calls; server CPU is the server process's utime + stime from /proc over the same
block / calls. CPU time, not wall-clock: on the shared 2-core box other jobs move wall times by
up to 2x, CPU time much less. Each cell is the median of ``ROUNDS`` blocks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.support.serverproc import cpu_seconds

from . import before, workloads
from .floor import FloorClient
from .measure import local_cell
from .report import render_machine, render_targets
from .servers import floor_server, lossd_server

ROUNDS = 3

# Client own and server own, ms per call, measured by this module at 901838b before any of the
# issue's work (2026-12-01 12:21 UTC, an Intel 2-core box, load average 1.6; bench/RESULTS.md,
# "Per-call CPU of small calls", **Before**). The halving target uses these only when a run cannot
# measure the before tree itself (a clone without that commit); the section then says so.
OWN_BEFORE = {
    ("cross_entropy", "64x10 f32"): (0.955, 1.260),
    ("cross_entropy", "16x16 f32"): (0.983, 1.280),
    ("cross_entropy", "163x100 f32"): (0.824, 1.180),
    ("FocalLoss", "3x80 f32"): (0.981, 1.600),
    ("GIoULoss", "32x4 f32 x2"): (0.841, 2.000),
}


def _cross_entropy_64x10() -> workloads.Workload:
    """The issue's 64x10 cross_entropy (2.5 KB of logits)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=gen).requires_grad_()
    target = torch.randint(0, 10, (64,), generator=gen)
    return workloads.Workload("cross_entropy", 3 << 10, [logits, target], {}, {}, "64x10 f32")


def cases() -> list[workloads.Workload]:
    kb = 1 << 10
    return [
        _cross_entropy_64x10(),
        workloads.build("cross_entropy", kb),  # 16x16
        workloads.build("cross_entropy", 64 * kb),
        workloads.build("FocalLoss", kb),  # 3x80
        workloads.build("GIoULoss", kb),  # 32x4
    ]


def _block(fn: Callable[[], Any], pid: int | None, calls: int) -> tuple[float, float]:
    """(client ms, server ms) per call over ``calls`` calls of ``fn`` (no server: 0)."""
    server0, client0 = cpu_seconds(pid) if pid else 0.0, time.process_time()
    for _ in range(calls):
        fn()
    client = time.process_time() - client0
    server = cpu_seconds(pid) - server0 if pid else 0.0
    return 1e3 * client / calls, 1e3 * server / calls


def cpu(opts: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    floor_proc = floor_server(opts).start()
    lossd_proc = lossd_server(opts, workdir).start()
    then = _before_server(opts, workdir)
    floor = FloorClient(floor_proc.address)
    rows = []
    try:
        for index, w in enumerate(cases()):
            rows.append(_row(w, index, opts, floor, floor_proc.pid, lossd_proc, then))
            print(_line(rows[-1]), flush=True)
    finally:
        floor.close()
        for proc in (floor_proc, lossd_proc, then and then[0]):
            if proc:
                proc.stop()
    return rows


def _before_server(opts: argparse.Namespace, workdir: Path) -> tuple[Any, Path] | None:
    """The started ``lossd serve`` at ``before.BEFORE`` and its shim, or None (said why)."""
    try:
        shim = before.checkout(workdir)
        return lossd_server(opts, workdir / "before", env=before.environment(shim)).start(), shim
    except (before.BeforeUnavailable, RuntimeError) as exc:
        print(f"cpu: no before column, the recorded figures stand in: {exc}", flush=True)
        return None


def remote_call(w: workloads.Workload, endpoint: str) -> tuple[Callable[[], None], Any]:
    """One measured call of ``w`` (``RemoteLoss`` forward + backward over unary ``Compute``, the
    inputs' gradients cleared first) and the module, to close; whichever ``lossd`` imports."""
    from lossd.client import RemoteLoss

    module = RemoteLoss(w.loss, endpoint=endpoint, transport="unary", **w.params)

    def remote() -> None:
        w.fresh()
        module(*w.args, **w.kwargs).backward()

    return remote, module


def _row(
    w: workloads.Workload,
    index: int,
    opts: argparse.Namespace,
    floor: FloorClient,
    floor_pid: int,
    lossd: Any,
    then: tuple[Any, Path] | None,
) -> dict[str, Any]:
    payload = os.urandom(w.request_bytes)
    remote, module = remote_call(w, lossd.address)

    cells = {
        "echo": (lambda: floor.echo(payload, w.grad_bytes), floor_pid),
        "local": (local_cell(w, opts), None),
        "lossd": (remote, lossd.pid),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cells}
    old = None
    try:
        for fn, _ in cells.values():
            for _ in range(before.WARM_UP_CALLS):  # connection, DescribeLoss, first-call costs
                fn()
        if then is not None:  # warmed up as it starts
            server, shim = then
            try:
                old = before.BeforeClient(shim, server.address, index, opts.cpu_calls)
                samples["before"] = []
            except before.BeforeUnavailable as exc:
                print(f"cpu: {w.loss} {w.shape} without a before column: {exc}", flush=True)
        for _ in range(ROUNDS):
            for name, (fn, pid) in cells.items():
                samples[name].append(_block(fn, pid, opts.cpu_calls))
            if old is not None:
                samples["before"].append(_before_block(old, server.pid))
    finally:
        module.close()
        if old is not None:
            old.close()
    row: dict[str, Any] = {"loss": w.loss, "shape": w.shape, "calls": opts.cpu_calls}
    for name, values in samples.items():
        row[name] = {
            "client_ms": statistics.median(c for c, _ in values),
            "server_ms": statistics.median(s for _, s in values),
        }
    return row


def _before_block(client: before.BeforeClient, pid: int) -> tuple[float, float]:
    """(client ms, server ms) per call of a block of the before tree's calls."""
    server0 = cpu_seconds(pid)
    client_ms = client.block()
    return client_ms, 1e3 * (cpu_seconds(pid) - server0) / client.calls


def _line(row: dict[str, Any]) -> str:
    echo, lossd = row["echo"], row["lossd"]
    then = row.get("before")
    return (
        f"cpu {row['loss']:>14} {row['shape']:>12}  local {row['local']['client_ms']:.3f}  "
        f"client ms echo {echo['client_ms']:.3f} lossd {lossd['client_ms']:.3f}  "
        f"server ms echo {echo['server_ms']:.3f} lossd {lossd['server_ms']:.3f}"
        + (
            f"  before client {then['client_ms']:.3f} server {then['server_ms']:.3f}"
            if then
            else ""
        )
    )


def own(row: dict[str, Any], cell: str = "lossd") -> tuple[float, float]:
    """(client, server) ms per call that ``cell`` (lossd, or lossd before) adds to the echo of
    the same bytes."""
    echo, lossd = row["echo"], row[cell]
    return lossd["client_ms"] - echo["client_ms"], lossd["server_ms"] - echo["server_ms"]


def own_before(row: dict[str, Any]) -> tuple[tuple[float, float], str] | None:
    """The before figures the halving target compares ``row`` with, and where they come from:
    this run's before column, else the recorded ``OWN_BEFORE`` (None: neither has the row)."""
    if "before" in row:
        return own(row, "before"), f"{before.BEFORE} in this run"
    recorded = OWN_BEFORE.get((row["loss"], row["shape"]))
    return (recorded, f"{before.BEFORE}, recorded on another machine") if recorded else None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Own CPU per call at most half of the same before issue 14, each side (``own_before``)."""
    found = []
    for row in rows:
        then = own_before(row)
        if then is None:
            continue
        figures, source = then
        for side, now, was in zip(("client", "server"), own(row), figures, strict=True):
            found.append(
                {
                    "target": f"{row['loss']} {row['shape']}: {side} own CPU per call <= 0.5 x "
                    f"before ({was:.3f} ms at {source}), as a fraction of it",
                    "value": now / was,
                    "met": now <= 0.5 * was,
                    "group": "per-call CPU halved",
                }
            )
    return found


def render(result: dict[str, Any]) -> str:
    """The per-call CPU section."""
    rows = result["cpu"]
    measured = [row for row in rows if "before" in row]
    if len(measured) == len(rows) and rows:
        source = (
            f"`before` is lossd at {before.BEFORE}, before issue 14's work, its server and client "
            "measured in the same rounds (bench/before.py)."
        )
    else:
        source = (
            f"`before` is lossd at {before.BEFORE}, measured in the same rounds (bench/before.py); "
            f"{len(rows) - len(measured)} of {len(rows)} rows could not measure it (the run's output "
            f"says why), and their halving target uses the figures recorded at {before.BEFORE} on "
            "another machine (bench/cpu.py `OWN_BEFORE`)."
        )
    lines = [
        f"`{result['command']}` ({result['started']}). " + render_machine(result),
        f"CPU ms per call, median of {ROUNDS} blocks of {rows[0]['calls'] if rows else 0} "
        "sequential calls (bench/cpu.py says how each is measured). `own` = lossd - echo: what lossd "
        "adds to a bare gRPC call of the same bytes (on the server, the loss's own compute included: "
        "`local` is the engine's evaluation in this process, for reference). " + source,
        "",
        "| loss | input | local | client: echo / lossd / own | server: echo / lossd / own "
        "| before: client / server | before own: client / server |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        echo, lossd, local = row["echo"], row["lossd"], row["local"]["client_ms"]
        client, server = own(row)
        line = (
            f"| {row['loss']} | {row['shape']} | {local:.3f} | {echo['client_ms']:.3f} / "
            f"{lossd['client_ms']:.3f} / {client:.3f} | {echo['server_ms']:.3f} / "
            f"{lossd['server_ms']:.3f} / {server:.3f} |"
        )
        if "before" in row:
            then, (then_client, then_server) = row["before"], own(row, "before")
            line += (
                f" {then['client_ms']:.3f} / {then['server_ms']:.3f} |"
                f" {then_client:.3f} / {then_server:.3f} |"
            )
        else:
            line += " – | – |"
        lines.append(line)
    return "\n".join(lines + render_targets(targets(rows)))
