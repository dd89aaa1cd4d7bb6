"""The harness: servers in subprocesses, this process as the client, every column in one run.

``python -m bench`` parses the options and runs the parts asked for: process control is
bench/servers.py, the measurements bench/measure.py (which says what each column is), the
targets and Markdown bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import workloads
from .bulk import FULL_SIZES as BULK_FULL_SIZES
from .bulk import QUICK_SIZES as BULK_QUICK_SIZES
from .bulk import bulk
from .bulk import render as render_bulk
from .colocated import colocated
from .colocated import render as render_colocated
from .cpu import cpu
from .cpu import render as render_cpu
from .cpu import targets as cpu_targets
from .floor import FloorClient
from .measure import (
    KB,
    MB,
    ClientPool,
    concurrency,
    huge,
    machine,
    memory,
    remote_transports,
    run_row,
    torch_threads_of,
)
from .report import (
    SECTION_TITLES,
    best_remote,
    ms_text,
    render_machine,
    render_sections,
    render_summary,
    render_targets,
    size_text,
    targets,
    write_results,
)
from .servers import floor_server, lossd_server

HERE = Path(__file__).resolve().parent
QUICK_SIZES = [1 * KB, 64 * KB, 1 * MB, 64 * MB]
FULL_SIZES = [1 * KB, 16 * KB, 64 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB]
LOSSES = ["cross_entropy", "FocalLoss", "GIoULoss", "yolox_loss", "yolov9_loss", "detr_loss"]

# The parts of a run, each selected by its own flag (none named: the mode's default set).
PARTS = {
    "rows": "run the latency/bandwidth table (the default when no part is named)",
    "concurrency": "run the server-design comparison (threads/processes/asyncio)",
    "memory": "run the server memory measurement",
    "huge": "one --huge-mb request (1 GiB) with defaults but --max-message-mb",
    "colocated": "the co-located rows: a Unix-socket echo, local, lossd over a Unix socket, and through shared memory (bench/colocated.py)",
    "cpu": "per-call CPU of small calls, client and server, lossd vs a bare echo (bench/cpu.py)",
    "bulk": "the cross-host bulk rows: lossd's chunked gRPC against a bare gRPC echo of its framing and Arrow Flight (bench/bulk.py)",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 KB..64 MB, short budgets, fewer calls (under 2 minutes)",
    )
    for part, what in PARTS.items():
        p.add_argument(f"--{part}", action="store_true", help=what)
    p.add_argument("--huge-mb", type=int, default=1024)
    p.add_argument(
        "--cpu-calls",
        type=int,
        default=None,
        help="calls per block of --cpu (500; 200 with --quick)",
    )
    p.add_argument(
        "--write-results",
        action="store_true",
        help="update the measured sections of bench/RESULTS.md",
    )
    p.add_argument(
        "--device", default="cpu", help="server device (and of the local column): cpu, cuda, cuda:N"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="lossd --workers (concurrent evaluations); the floor gets the same pool",
    )
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--sizes", default="", help="comma-separated sizes in KB (overrides the mode's)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per cell before stopping (min calls still run)",
    )
    p.add_argument("--max-n", type=int, default=None)
    p.add_argument(
        "--max-message-mb",
        type=int,
        default=1100,
        help="both servers' --max-message-mb (the one flag for >= 1 GiB)",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        default=256,
        help="size of the request for the peak-RSS measurement",
    )
    p.add_argument(
        "--drift-calls",
        type=int,
        default=None,
        help="small calls for the RSS drift (default 10000; 1000 with --quick)",
    )
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--throughput-seconds", type=float, default=None)
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `lossd serve` (repeatable)",
    )
    p.add_argument("--no-write", action="store_true", help="write no JSON to bench/results/")
    opts = p.parse_args(argv)
    opts.budget = opts.budget if opts.budget is not None else (0.2 if opts.quick else 2.0)
    opts.max_n = opts.max_n or (150 if opts.quick else 2000)
    opts.throughput_seconds = opts.throughput_seconds or (2.0 if opts.quick else 8.0)
    opts.drift_calls = opts.drift_calls or (1000 if opts.quick else 10_000)
    opts.cpu_calls = opts.cpu_calls or (200 if opts.quick else 500)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if torch_threads_of(opts.server_arg) > 0:
        torch.set_num_threads(
            torch_threads_of(opts.server_arg)
        )  # the local column matches the server
    import lossd.server.losses  # noqa: F401 - registers every loss
    from lossd.server import registry

    named = {part for part in PARTS if getattr(opts, part)}
    parts = named or (
        {"rows", "memory", "colocated", "cpu", "bulk"}
        if opts.quick
        else {"rows", "concurrency", "memory", "colocated", "cpu", "bulk"}
    )
    sizes = (
        [int(s) * KB for s in opts.sizes.split(",")]
        if opts.sizes
        else (QUICK_SIZES if opts.quick else FULL_SIZES)
    )
    known = {s.name for s in registry.all_specs(None)}
    notes = [
        f"{name} is not registered on this server yet: skipped"
        for name in opts.losses.split(",")
        if name not in known
    ]
    losses = [name for name in opts.losses.split(",") if name in known]
    transports = remote_transports()
    if transports == ["unary"]:
        notes.append("this client has the unary transport only")
    machine_info = machine(opts.device)
    machine_info["load"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    result: dict[str, Any] = {
        "mode": "quick" if opts.quick else "full",
        "machine": machine_info,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {
            "workers": opts.workers,
            "clients": opts.clients,
            "max_message_mb": opts.max_message_mb,
            "throughput_seconds": opts.throughput_seconds,
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": notes,
    }
    t_start = time.perf_counter()
    torch.manual_seed(0)
    pool = None  # started after the rows: spawned clients importing torch would load the machine
    try:
        with tempfile.TemporaryDirectory(prefix="lossd-bench-") as tmp:
            workdir = Path(tmp)
            if "rows" in parts:
                result["rows"] = []
                pool = run_rows(opts, workdir, result, losses, sizes, transports)
            if "concurrency" in parts:
                pool = pool or ClientPool(opts.clients)
                result["concurrency"] = concurrency(opts, workdir, pool)
            if "memory" in parts:
                result["memory"] = memory(opts, workdir)
            if "huge" in parts:
                result["huge"] = huge(opts, workdir)
            if "colocated" in parts:
                result["colocated"] = colocated(opts, workdir, losses[:1], sizes)
            if "cpu" in parts:
                result["cpu"] = cpu(opts, workdir)
            if "bulk" in parts:
                bulk_sizes = BULK_QUICK_SIZES if opts.quick else BULK_FULL_SIZES
                result["bulk"] = bulk(opts, workdir, bulk_sizes)
    finally:
        if pool is not None:
            pool.close()
    result["seconds"] = time.perf_counter() - t_start
    result["targets"] = targets(result)
    sections = render_sections(result)
    extra = {
        "colocated": (
            render_colocated,
            "Same host, over Unix-domain sockets (bench/colocated.py says what each column is); "
            "times in ms.",
        ),
        "bulk": (
            render_bulk,
            "Loopback TCP, `mse` calls (bench/bulk.py says what each column is); times in ms, "
            "p50, with MB/s of request + gradient bytes.",
        ),
    }
    for name, (render, blurb) in extra.items():
        if name not in result:
            continue
        body, found = render(result[name])
        result["targets"] += found
        sections[name] = "\n".join(
            [
                f"`{result['command']}` ({result['started']}). " + render_machine(result),
                blurb,
                "",
                body,
                *render_targets(found),
            ]
        )
    if "cpu" in result:
        result["targets"] += cpu_targets(result["cpu"])
        sections["cpu"] = render_cpu(result)
    sections["summary"] = render_summary(result)
    print()
    for name, body in sections.items():
        print(f"## {SECTION_TITLES[name]}\n\n{body}\n")
    print(f"({result['seconds']:.0f} s)")
    if not opts.no_write:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = (
            results
            / f"{stamp}-{result['mode']}-{'-'.join(sorted(parts))}-{opts.device.replace(':', '')}.json"
        )
        path.write_text(json.dumps(result, indent=1))
        print(f"JSON: {path.relative_to(HERE.parent)}")
    if opts.write_results:
        out = HERE / (
            "RESULTS.md" if opts.device == "cpu" else f"RESULTS-{opts.device.replace(':', '')}.md"
        )
        write_results(sections, out)
        print(f"updated {out.relative_to(HERE.parent)}")
    return 0


def run_rows(
    opts: argparse.Namespace,
    workdir: Path,
    result: dict[str, Any],
    losses: list[str],
    sizes: list[int],
    transports: list[str],
) -> ClientPool:
    """The side-by-side table, then throughput of the default servers (same run, same servers);
    returns the client pool it started for the throughput, for reuse."""
    floor_proc = floor_server(opts).start()
    lossd_proc = lossd_server(opts, workdir).start()
    try:
        floor = FloorClient(floor_proc.address)
        for loss in losses:
            for size in sizes:
                cap = (
                    workloads.QUICK_MAX_SIZE.get(loss)
                    if opts.quick
                    else workloads.MAX_SIZE.get(loss)
                )
                if cap is not None and size > cap:
                    continue
                w = workloads.build(loss, size)
                row = run_row(w, floor, lossd_proc.address, opts, transports)
                result["rows"].append(row)
                best = best_remote(row)
                print(
                    f"{loss:>14} {size_text(size):>7}  echo {ms_text(row.get('echo'))}  local {ms_text(row.get('local'))}  "
                    + "  ".join(f"{t} {ms_text(row.get(t))}" for t in transports if t in row)
                    + (f"  best {best[0]}" if best else ""),
                    flush=True,
                )
                del w
        floor.close()
        caps = workloads.QUICK_MAX_SIZE if opts.quick else workloads.MAX_SIZE
        skipped = [
            f"{loss} above {size_text(caps[loss])}"
            for loss in losses
            if loss in caps and max(sizes) > caps[loss]
        ]
        if skipped:
            result["notes"].append(
                "not measured in this mode (compute, not transport, would dominate or take minutes): "
                + ", ".join(skipped)
            )
        pool = ClientPool(opts.clients)
        result["throughput"] = {}
        for transport in ("unary",):
            floor_cell = pool.rps(
                floor_proc.address,
                "floor",
                opts.throughput_seconds,
                transport,
                [floor_proc.pid],
            )
            lossd_cell = pool.rps(
                lossd_proc.address,
                "lossd",
                opts.throughput_seconds,
                transport,
                [lossd_proc.pid],
            )
            floor_rps, lossd_rps = floor_cell["rps"], lossd_cell["rps"]
            result["throughput"][transport] = {
                "floor_rps": floor_rps,
                "lossd_rps": lossd_rps,
                "floor": floor_cell,
                "lossd": lossd_cell,
            }
            print(
                f"throughput {transport}: trivial {floor_rps:.0f}/s, lossd {lossd_rps:.0f}/s",
                flush=True,
            )
    finally:
        floor_proc.stop()
        lossd_proc.stop()
    return pool
