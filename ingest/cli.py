"""``ingest``: the ingest service's command line. Subcommands register themselves in ``COMMANDS``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from ingest import migrate as migrations
from ingest.dbconfig import ConfigError, add_db_arguments, connect_from_args

Handler = Callable[[argparse.Namespace], int]


def _cmd_migrate(args: argparse.Namespace) -> int:
    session = connect_from_args(args)
    try:
        if args.status:
            rows = migrations.status(session)
            if args.json:
                print(json.dumps([{"version": v, "name": n, "variant": var, "state": s} for v, n, var, s in rows]))
            else:
                for v, n, var, s in rows:
                    print(f"{v:04d}_{n}{' (' + var + ')' if var else ''}: {s}")
            return 0
        result = migrations.migrate(session, timescaledb=args.timescaledb, log=lambda m: print(m, file=sys.stderr))
    finally:
        session.close()
    summary = {
        "applied": result.applied,
        "already_applied": result.already_applied,
        "timescaledb": result.timescaledb,
        "changed": bool(result.applied),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        what = ", ".join(result.applied) if result.applied else "nothing to do"
        backend = "TimescaleDB" if result.timescaledb else "plain PostgreSQL"
        print(f"migrations: {what} ({result.already_applied} already applied; {backend} schema)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest",
        description="Telemetry ingest service: MQTT to the database, plus its schema migrations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "migrate",
        help="apply pending database migrations (safe to run twice)",
        description="Apply the ordered schema migrations. Each runs in one transaction with its "
        "bookkeeping row; an interrupted or edited migration stops the run with an explanation. "
        "Uses the TimescaleDB variants when the extension is available.",
    )
    add_db_arguments(p)
    p.add_argument(
        "--timescaledb",
        choices=["auto", "on", "off"],
        default="auto",
        help="use the TimescaleDB schema: auto (when the extension is available), on (require it), off",
    )
    p.add_argument("--status", action="store_true", help="list recorded migrations and exit")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_cmd_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (ConfigError, migrations.MigrationError) as exc:
        print(f"ingest {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
