"""``ingest``: the ingest service's command line. Subcommands register themselves in ``COMMANDS``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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


def _cmd_run(args: argparse.Namespace) -> int:
    from ingest import config
    from ingest.service import run

    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"ingest run: config error: {problem}", file=sys.stderr)
        return 2
    return run(cfg)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from ingest import config

    if args.explain:
        print(config.explain())
        return 0
    if args.config is None:
        print("ingest check-config: error: --config is required (or set INGEST_CONFIG)", file=sys.stderr)
        return 2
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"{args.config}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        print("Run `ingest check-config --explain` for every key, its type and default.", file=sys.stderr)
        return 2
    m = cfg.mqtt
    print(f"{args.config}: ok")
    print(
        f"  broker   {'mqtts' if m.tls else 'mqtt'}://{m.host}:{m.port} as {m.username}, MQTT {m.protocol}, "
        f"client id {m.client_id} (persistent session)"
    )
    print(f"  topics   {', '.join(m.topics())}")
    print(
        f"  batches  {cfg.ingest.batch_max_messages} messages / {cfg.ingest.batch_max_wait_ms} ms; broker "
        f"in-flight window should be >= {2 * cfg.ingest.batch_max_messages}"
    )
    print(
        f"  http     {cfg.http.host}:{cfg.http.port} (/healthz, /metrics"
        f"{', POST /v1/devices/register' if cfg.api.enabled else ''})"
    )
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

    config_default = os.environ.get("INGEST_CONFIG")
    p = sub.add_parser(
        "run",
        help="run the ingest service (MQTT -> database, HTTP health/metrics/registration)",
        description="Subscribe to devices/+/{telemetry,status,heartbeat} with QoS 1 and a persistent session, "
        "write batches to the database, acknowledge after commit. SIGTERM flushes and exits 0.",
    )
    p.add_argument(
        "--config",
        type=Path,
        required=config_default is None,
        default=config_default,
        help="TOML configuration file (default: $INGEST_CONFIG); see `ingest check-config --explain`",
    )
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser(
        "check-config",
        help="validate a configuration file and explain every problem",
        description="Parse and validate the TOML configuration (types, ranges, unknown keys, readable secret "
        "files with safe modes) without connecting anywhere. Exit 0 when valid, 2 otherwise.",
    )
    p.add_argument("--config", type=Path, default=config_default, help="TOML configuration file")
    p.add_argument("--explain", action="store_true", help="print every key with its type, default and meaning")
    p.set_defaults(handler=_cmd_check_config)
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
