"""``lossd audit``: list, show, export, verify and plot the audit trail of a running server.

Every subcommand talks to the server over ``lossd.v1.AuditService`` (never to the database), so
it works the same against SQLite and PostgreSQL and obeys the server's ``audit-read`` role. The
connection flags are the client's, with the same ``$LOSSD_*`` defaults.

Exit codes: 0 success; 1 ``verify`` found a failing record (each one is named: run, step,
record id and request id); 2 usage, connection or server errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from lossd.client._proto import lossd_pb2 as pb
from lossd.client.audit import AuditClient, Progress, export, parse_steps, plot
from lossd.client.errors import LossdError

FAILING = {
    pb.VERIFY_STATUS_DEVIATION,
    pb.VERIFY_STATUS_INPUT_MISMATCH,
    pb.VERIFY_STATUS_RECORD_ALTERED,
    pb.VERIFY_STATUS_ERROR,
}


def status_name(status: int) -> str:
    return pb.VerifyStatus.Name(status).removeprefix("VERIFY_STATUS_")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lossd audit",
        description="Read and re-verify a lossd server's audit trail (AuditService).",
    )
    conn = argparse.ArgumentParser(add_help=False)
    g = conn.add_argument_group("connection (defaults: $LOSSD_ENDPOINT, $LOSSD_TOKEN, $LOSSD_TLS*)")
    g.add_argument(
        "--endpoint", help="host:port of the server (default $LOSSD_ENDPOINT, else 127.0.0.1:50051)"
    )
    g.add_argument("--token", help="bearer token with the audit-read role (default $LOSSD_TOKEN)")
    g.add_argument(
        "--tls", action="store_true", default=None, help="use TLS (implied by --tls-ca/--tls-cert)"
    )
    g.add_argument("--tls-ca", help="PEM roots that signed the server certificate")
    g.add_argument("--tls-cert", help="client certificate chain (mutual TLS)")
    g.add_argument("--tls-key", help="private key of --tls-cert")
    g.add_argument("--tls-server-name", help="name to check the server certificate against")
    g.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="deadline of each RPC in seconds (default: none)",
    )

    select = argparse.ArgumentParser(add_help=False)
    select.add_argument("run", help="run id")
    select.add_argument(
        "--step", help="steps A:B (inclusive; A: or :B for open ends; A for one step)"
    )
    select.add_argument("--loss", help="only this loss")

    sub = p.add_subparsers(dest="command", required=True)
    runs = sub.add_parser(
        "runs", parents=[conn], help="list the runs in the trail, most recent first"
    )
    runs.add_argument("--limit", type=int, default=0, help="at most this many runs (0: all)")
    runs.add_argument("--json", action="store_true", help="one JSON object per line")

    show = sub.add_parser(
        "show", parents=[select, conn], help="print a run's records, one line each"
    )
    show.add_argument("--json", action="store_true", help="the full records as JSON lines")

    exp = sub.add_parser(
        "export", parents=[select, conn], help="export a run's records as JSON lines or CSV"
    )
    exp.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    exp.add_argument("-o", "--output", help="file to write (default: stdout)")
    exp.add_argument("--quiet", action="store_true", help="no progress on stderr")

    ver = sub.add_parser(
        "verify", parents=[select, conn], help="recompute a run's records on the server and compare"
    )
    ver.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest accepted relative deviation (0: by dtype: float64 1e-9, float32 1e-4, float16/bfloat16 1e-2)",
    )
    ver.add_argument(
        "--require-captured",
        action="store_true",
        help="count records without captured inputs as failures",
    )
    ver.add_argument("--quiet", action="store_true", help="only failures and the summary")

    pl = sub.add_parser(
        "plot",
        parents=[select, conn],
        help="plot loss and component curves per step (needs matplotlib: lossd[plot])",
    )
    pl.add_argument(
        "-o", "--output", required=True, help="image file to write (PNG, SVG, PDF: by extension)"
    )
    pl.add_argument("--title", help="figure title")
    return p


def _client(args: argparse.Namespace) -> AuditClient:
    return AuditClient(
        args.endpoint,
        timeout=args.timeout,
        token=args.token,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
    )


def _time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) if ns else "-"


def _num(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def cmd_runs(client: AuditClient, args: argparse.Namespace) -> int:
    runs = client.list_runs(args.limit)
    if args.json:
        for r in runs:
            print(
                json.dumps(
                    {
                        "run_id": r.run_id,
                        "records": r.records,
                        "first_step": r.first_step,
                        "last_step": r.last_step,
                        "first_time_unix_ns": r.first_time_unix_ns,
                        "last_time_unix_ns": r.last_time_unix_ns,
                        "losses": list(r.losses),
                    }
                )
            )
        return 0
    if not runs:
        print("no audited runs", file=sys.stderr)
        return 0
    width = max(6, *(len(r.run_id or "(none)") for r in runs))
    print(f"{'RUN':<{width}}  {'RECORDS':>8}  {'STEPS':<15}  {'LAST WRITTEN':<19}  LOSSES")
    for r in runs:
        steps = f"{r.first_step}..{r.last_step}"
        print(
            f"{r.run_id or '(none)':<{width}}  {r.records:>8}  {steps:<15}  {_time(r.last_time_unix_ns):<19}  {','.join(r.losses)}"
        )
    return 0


def cmd_show(client: AuditClient, args: argparse.Namespace) -> int:
    count = 0
    for record in client.records(args.run, args.step, args.loss):
        count += 1
        if args.json:
            print(json.dumps(record, default=str))
            continue
        if count == 1:
            print(
                f"{'STEP':>6} {'RANK':>4} {'MB':>3}  {'LOSS':<20} {'VALUE':>12}  {'DEVICE':<7} {'DTYPE':<8} REQUEST ID / COMPONENTS"
            )
        comps = " ".join(f"{k}={_num(v)}" for k, v in record["components"].items())
        flag = " NON-FINITE" if record["non_finite"] else ""
        print(
            f"{record['step']:>6} {record['rank']:>4} {record['micro_batch']:>3}  {record['loss']:<20} {_num(record['value']):>12}  "
            f"{record['device']:<7} {record['dtype']:<8} {record['request_id']}{flag}{'  ' + comps if comps else ''}"
        )
    if count == 0:
        print(f"no records for run {args.run!r} with that selection", file=sys.stderr)
    return 0


def cmd_export(client: AuditClient, args: argparse.Namespace) -> int:
    progress = None if args.quiet else Progress("exported", sys.stderr)
    target = open(args.output, "w", newline="") if args.output else nullcontext(sys.stdout)  # noqa: SIM115
    with target as out:
        count = export(
            client, args.run, out, args.format, steps=args.step, loss=args.loss, progress=progress
        )
    print(
        f"{count} records of run {args.run!r} exported{' to ' + args.output if args.output else ''}",
        file=sys.stderr,
    )
    return 0


def cmd_verify(client: AuditClient, args: argparse.Namespace) -> int:
    progress = None if args.quiet else Progress("verified", sys.stderr, every=100)
    counts: dict[str, int] = {}
    failures: list[str] = []
    total = 0
    for message in client.verify(args.run, args.step, args.loss, args.tolerance):
        r = message.result
        total = message.total
        name = status_name(r.status)
        counts[name] = counts.get(name, 0) + 1
        failed = r.status in FAILING or (
            args.require_captured and r.status == pb.VERIFY_STATUS_NOT_CAPTURED
        )
        devs = f"dev float64 {_dev(r.max_rel_dev_float64)}, device {_dev(r.max_rel_dev_device)}, tol {r.tolerance:g}"
        line = f"{name:<14} run {args.run} step {r.step} record {r.record_id} request {r.request_id} ({r.loss}): {devs}"
        if r.message:
            line += f" - {r.message}"
        if failed:
            failures.append(line)
            print("FAIL " + line)
        elif not args.quiet:
            print("ok   " + line)
        if progress is not None:
            progress.update(message.done, message.total)
    if progress is not None:
        progress.finish()
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if total == 0 and not counts:
        print(f"no records for run {args.run!r} with that selection", file=sys.stderr)
        return 1
    if failures:
        print(
            f"verify FAILED for run {args.run!r}: {len(failures)} of {sum(counts.values())} records failed ({summary})",
            file=sys.stderr,
        )
        return 1
    print(
        f"verify passed for run {args.run!r}: {sum(counts.values())} records ({summary})",
        file=sys.stderr,
    )
    return 0


def _dev(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def cmd_plot(client: AuditClient, args: argparse.Namespace) -> int:
    records = list(client.records(args.run, args.step, args.loss))
    if not records:
        print(
            f"lossd audit plot: no records for run {args.run!r} with that selection",
            file=sys.stderr,
        )
        return 2
    path = plot(records, args.output, args.title)
    steps = sorted({r["step"] for r in records})
    print(f"wrote {path} ({len(records)} records, steps {steps[0]}..{steps[-1]})", file=sys.stderr)
    return 0


COMMANDS = {
    "runs": cmd_runs,
    "show": cmd_show,
    "export": cmd_export,
    "verify": cmd_verify,
    "plot": cmd_plot,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        parse_steps(getattr(args, "step", None))
    except ValueError as exc:
        print(f"lossd audit: {exc}", file=sys.stderr)
        return 2
    try:
        with _client(args) as client:
            return COMMANDS[args.command](client, args)
    except LossdError as exc:
        hint = ""
        if exc.code.name == "UNIMPLEMENTED":
            hint = " (this server keeps no audit trail: it runs --audit none without --audit-db)"
        print(f"lossd audit {args.command}: {exc}{hint}", file=sys.stderr)
        return 2
    except (
        RuntimeError,
        OSError,
        ValueError,
    ) as exc:  # matplotlib missing, unwritable -o, bad file
        print(f"lossd audit {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
