"""The ``lossd`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Health probes run every few seconds: answer them with their own parser, before this one
    # is built, and without importing torch (they read the settings alone).
    if argv[:1] == ["health"]:
        from .probe import main as health_main

        return health_main(argv[1:])
    if argv[:1] == ["audit"]:
        from .audit.cli import main as audit_main

        return audit_main(argv[1:])
    if argv[:1] == ["token"]:
        from .probe import token_main

        return token_main(argv[1:])
    from .config import ServerConfig

    parser = argparse.ArgumentParser(
        prog="lossd", description="lossd: upstream-exact training losses over gRPC"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "health",
        help="probe a server's gRPC health service; exit 0 when SERVING (lossd health -h)",
        add_help=False,
    )
    commands.add_parser(
        "token",
        help="make a bearer token and its --auth-tokens entry (lossd token -h)",
        add_help=False,
    )
    commands.add_parser(
        "audit",
        help="list, show, export, verify and plot the audit trail (lossd audit -h)",
        add_help=False,
    )

    serve_parser = commands.add_parser("serve", help="run the loss server")
    ServerConfig.add_arguments(serve_parser)

    losses_parser = commands.add_parser(
        "losses", help="print the loss registry, or one loss's schema"
    )
    losses_parser.add_argument(
        "name", nargs="?", help="a loss name: print its schema and an example call"
    )
    losses_parser.add_argument("--family", help="only this family (netspresso, fat, visdet)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "losses":
        from .docs import describe_loss, loss_table

        try:
            print(describe_loss(args.name) if args.name else loss_table(args.family))
        except (KeyError, ValueError) as exc:  # an unknown loss or family
            print(f"lossd losses: {exc}", file=sys.stderr)
            return 2
        return 0
    return 2


def _serve(args: argparse.Namespace) -> int:
    """``lossd serve``: exit 2 with one line naming a setting the server cannot use."""
    from .config import ServerConfig, SettingError

    try:
        config = ServerConfig.from_sources(args)
    except SettingError as exc:
        return _refused(exc)
    if config.malloc_huge_pages:
        from ._malloc import request_huge_pages

        request_huge_pages()  # before torch loads: its allocator reads the setting once
    from .app import serve  # torch: only once the settings are known to be good
    from .audit import AuditStoreError

    try:
        serve(config)
    except (AuditStoreError, SettingError) as exc:
        return _refused(exc)
    return 0


def _refused(exc: Exception) -> int:
    print(f"lossd serve: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
