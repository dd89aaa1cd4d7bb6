"""``lossd audit``: list, show, export, verify and plot the audit trail of a running server;
sign and fetch checkpoints.

Every subcommand talks to the server over ``lossd.v1.AuditService`` (never to the database), so
it works the same against SQLite and PostgreSQL and obeys the server's ``audit-read`` role. The
connection flags are the client's, with the same ``$LOSSD_*`` defaults. A checkpoint's signature
is checked here, against the public key file the caller trusts, never by the server.

Exit codes: 0 success; 1 ``verify`` failed (each failing record is named: run, seq, step, record
id and request id; chain findings and why nothing was recomputed are printed too), or the
selection matched no records (the same message from show, export, verify and plot);
2 usage, connection or server errors.
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

from .signing import Checkpoint, checkpoint_message, checkpoint_of, load_public_key

FAILING = {
    pb.VERIFY_STATUS_DEVIATION,
    pb.VERIFY_STATUS_INPUT_MISMATCH,
    pb.VERIFY_STATUS_RECORD_ALTERED,
    pb.VERIFY_STATUS_ERROR,
    pb.VERIFY_STATUS_CHAIN_BROKEN,
}
NO_RECORDS = 1  # the exit code of show, export, verify and plot when nothing matched


def no_records(args: argparse.Namespace) -> int:
    print(
        f"lossd audit {args.command}: no records for run {args.run!r} with that selection",
        file=sys.stderr,
    )
    return NO_RECORDS


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
    ver.add_argument(
        "--checkpoint",
        help="a checkpoint file (lossd audit checkpoint): the stored run must still extend it",
    )
    ver.add_argument(
        "--public-key",
        help="the server's public key (lossd audit public-key) that must have signed --checkpoint",
    )

    cp = sub.add_parser(
        "checkpoint",
        parents=[conn],
        help="have the server check a run's chain and sign its head; prints the checkpoint (JSON)",
    )
    cp.add_argument("run", help="run id")
    cp.add_argument("-o", "--output", help="file to write (default: stdout)")

    key = sub.add_parser(
        "public-key", parents=[conn], help="print the server's checkpoint signing key (PEM)"
    )
    key.add_argument("-o", "--output", help="file to write (default: stdout)")

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


def _known(value: int | None) -> str:
    """A step, rank or micro-batch, or "-" when the caller did not give it (unset, or the
    legacy -1)."""
    return "-" if value is None or value < 0 else str(value)


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
                        "sessions": [
                            {
                                "session": s.session,
                                "records": s.records,
                                "first_step": s.first_step,
                                "last_step": s.last_step,
                                "first_time_unix_ns": s.first_time_unix_ns,
                                "last_time_unix_ns": s.last_time_unix_ns,
                            }
                            for s in r.sessions
                        ],
                    }
                )
            )
        return 0
    if not runs:
        print("no audited runs", file=sys.stderr)
        return 0
    width = max(6, *(len(r.run_id or "(none)") for r in runs))
    print(
        f"{'RUN':<{width}}  {'RECORDS':>8}  {'STEPS':<15}  {'LAST WRITTEN':<19}  {'SESSIONS':>8}  LOSSES"
    )
    for r in runs:
        steps = f"{r.first_step}..{r.last_step}"
        print(
            f"{r.run_id or '(none)':<{width}}  {r.records:>8}  {steps:<15}  {_time(r.last_time_unix_ns):<19}  "
            f"{len(r.sessions):>8}  {','.join(r.losses)}"
        )
        if len(r.sessions) > 1:  # a reused run id: say which attempt wrote what
            for s in r.sessions:
                print(
                    f"{'':<{width}}  {s.records:>8}  {f'{s.first_step}..{s.last_step}':<15}  "
                    f"{_time(s.last_time_unix_ns):<19}  session {s.session or '(unnamed)'}"
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
            f"{_known(record['step']):>6} {_known(record['rank']):>4} {_known(record['micro_batch']):>3}  {record['loss']:<20} {_num(record['value']):>12}  "
            f"{record['device']:<7} {record['dtype']:<8} {record['request_id']}{flag}{'  ' + comps if comps else ''}"
        )
    return 0 if count else no_records(args)


def cmd_export(client: AuditClient, args: argparse.Namespace) -> int:
    progress = None if args.quiet else Progress("exported", sys.stderr)
    target = open(args.output, "w", newline="") if args.output else nullcontext(sys.stdout)  # noqa: SIM115
    with target as out:
        count = export(
            client, args.run, out, args.format, steps=args.step, loss=args.loss, progress=progress
        )
    if count == 0:
        return no_records(args)
    print(
        f"{count} records of run {args.run!r} exported{' to ' + args.output if args.output else ''}",
        file=sys.stderr,
    )
    return 0


def _given_checkpoint(args: argparse.Namespace) -> pb.AuditCheckpoint | None | str:
    """The --checkpoint, its signature checked against --public-key; a str says why it fails."""
    if not args.checkpoint:
        return None
    with open(args.checkpoint) as f:
        cp = Checkpoint.from_json(f.read(), args.checkpoint)
    public = load_public_key(args.public_key)
    from .signing import key_id

    if cp.run_id != args.run:
        return f"checkpoint {args.checkpoint} is for run {cp.run_id!r}, not {args.run!r}"
    if not cp.verifies(public):
        return (
            f"checkpoint {args.checkpoint} is not signed by the key in {args.public_key} "
            f"(key {key_id(public)}; the checkpoint names key {cp.key_id}): it proves nothing"
        )
    return checkpoint_message(cp)


def cmd_verify(client: AuditClient, args: argparse.Namespace) -> int:
    if bool(args.checkpoint) != bool(args.public_key):
        print("lossd audit verify: --checkpoint and --public-key go together", file=sys.stderr)
        return 2
    given = _given_checkpoint(args)
    if isinstance(given, str):
        print(f"FAIL checkpoint: {given}")
        print(f"verify FAILED for run {args.run!r}: {given}", file=sys.stderr)
        return 1
    progress = None if args.quiet else Progress("verified", sys.stderr, every=100)
    counts: dict[str, int] = {}
    failures: list[str] = []
    sampled_missing = 0
    chain = pb.AuditChainReport()
    for message in client.verify_chain(
        args.run, args.step, args.loss, args.tolerance, checkpoint=given
    ):
        if message.HasField("chain"):
            chain = message.chain
            continue
        r = message.result
        name = status_name(r.status)
        counts[name] = counts.get(name, 0) + 1
        not_captured = r.status == pb.VERIFY_STATUS_NOT_CAPTURED
        sampled_missing += not_captured and r.sampled
        failed = r.status in FAILING or (args.require_captured and not_captured)
        devs = f"dev float64 {_dev(r.max_rel_dev_float64)}, device {_dev(r.max_rel_dev_device)}, tol {r.tolerance:g}"
        line = f"{name:<14} run {args.run} seq {r.seq} step {r.step} record {r.record_id} request {r.request_id} ({r.loss}): {devs}"
        if r.message:
            line += f" - {r.message}"
        if failed:
            failures.append(line)
            print("FAIL " + line)
        elif not args.quiet:
            print("ok   " + line)
        if progress is not None and message.total:
            progress.update(message.done, message.total)
    if progress is not None:
        progress.finish()
    for problem in chain.problems:
        print(f"FAIL chain: {problem}")
    if not counts and not chain.problems:
        return no_records(args)
    verified = counts.get("OK", 0)
    failed_n = len(failures)
    not_recomputable = counts.get("NOT_CAPTURED", 0)
    summary = (
        f"{sum(counts.values())} records: {verified} verified, {failed_n} failed, "
        f"{not_recomputable} not recomputable; "
        + (
            f"chain of {chain.records} records intact"
            if not chain.broken_links
            else f"chain up to seq {chain.records} with {chain.broken_links} broken links"
        )
        + (
            f", signed up to seq {chain.signed_records}"
            if chain.signed_records
            else ("" if chain.problems else ", not yet signed")
        )
        + (", extends the given checkpoint" if chain.checkpoint_extended else "")
        + (
            f"; {chain.unchained_records} records from before the chain"
            if chain.unchained_records
            else ""
        )
    )
    reasons = []
    if failures:
        reasons.append(f"{failed_n} of {sum(counts.values())} records failed")
    reasons.extend(chain.problems)
    if verified == 0 and counts:
        reasons.append(
            "nothing was recomputed: none of the selected records has captured inputs "
            "(recorded with --audit-capture none, or none of them in the sample); "
            "only their integrity and the chain were checked"
        )
    if sampled_missing:
        reasons.append(
            f"{sampled_missing} records chosen for recomputation (the capture sample) could not be "
            "recomputed: their inputs were not stored (--audit-capture-max-mb reached)"
        )
    if reasons:
        print(
            f"verify FAILED for run {args.run!r}: {'; '.join(reasons)} ({summary})",
            file=sys.stderr,
        )
        return 1
    print(f"verify passed for run {args.run!r}: {summary}", file=sys.stderr)
    return 0


def _dev(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def cmd_plot(client: AuditClient, args: argparse.Namespace) -> int:
    records = list(client.records(args.run, args.step, args.loss))
    if not records:
        return no_records(args)
    path = plot(records, args.output, args.title)
    steps = sorted({r["step"] for r in records if r["step"] is not None}) or ["-"]
    print(f"wrote {path} ({len(records)} records, steps {steps[0]}..{steps[-1]})", file=sys.stderr)
    return 0


def cmd_checkpoint(client: AuditClient, args: argparse.Namespace) -> int:
    message = client.checkpoint(args.run)
    cp = checkpoint_of(message)
    _write(args.output, cp.to_json() + "\n")
    print(
        f"checkpoint of run {cp.run_id!r}: {cp.records} records, head {cp.head_sha256[:16]}..., "
        f"signed by key {cp.key_id} at {_time(cp.time_unix_ns)}"
        + (f"; written to {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    return 0


def cmd_public_key(client: AuditClient, args: argparse.Namespace) -> int:
    key = client.public_key()
    _write(args.output, key.public_key_pem)
    print(f"audit signing key {key.key_id}", file=sys.stderr)
    return 0


def _write(path: str | None, text: str) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


COMMANDS = {
    "runs": cmd_runs,
    "show": cmd_show,
    "export": cmd_export,
    "verify": cmd_verify,
    "plot": cmd_plot,
    "checkpoint": cmd_checkpoint,
    "public-key": cmd_public_key,
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
    ) as exc:  # matplotlib missing, unwritable -o, bad checkpoint or key file
        print(f"lossd audit {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
