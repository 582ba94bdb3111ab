"""How command-line tools find the database without a password ever appearing on a command line.

``--dsn`` (or ``TELEMETRY_DSN``) names host, port, database and user; the password comes from
``--password-file`` (or ``TELEMETRY_DB_PASSWORD_FILE``), or from libpq's own ``PGPASSFILE``/``~/.pgpass``.
A DSN that carries a password is refused: it would sit in shell history and ``ps`` output.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ingest.db import PsycopgSession


class ConfigError(Exception):
    """One-line, operator-facing configuration problem."""


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("database")
    group.add_argument(
        "--dsn",
        default=os.environ.get("TELEMETRY_DSN"),
        help="libpq connection string or URI without a password, e.g. 'host=127.0.0.1 dbname=telemetry "
        "user=telemetry_admin' (default: $TELEMETRY_DSN)",
    )
    group.add_argument(
        "--password-file",
        type=Path,
        default=os.environ.get("TELEMETRY_DB_PASSWORD_FILE"),
        help="file holding the database password (default: $TELEMETRY_DB_PASSWORD_FILE; "
        "otherwise libpq's PGPASSFILE / ~/.pgpass)",
    )


def build_conninfo(dsn: str | None, password_file: Path | None) -> str:
    if not dsn:
        raise ConfigError("no database given: pass --dsn or set TELEMETRY_DSN")
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid --dsn: {str(exc).splitlines()[0]}") from None
    if params.get("password"):
        raise ConfigError("the DSN contains a password; put it in a file and pass --password-file instead")
    if password_file is not None:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read password file {password_file}: {exc.strerror}") from None
        if not password:
            raise ConfigError(f"password file {password_file} is empty")
        params["password"] = password
    params.setdefault("connect_timeout", "10")
    params.setdefault("application_name", "telemetry-platform")
    return make_conninfo("", **params)


def connect(dsn: str | None, password_file: Path | None) -> PsycopgSession:
    conninfo = build_conninfo(dsn, password_file)
    try:
        return PsycopgSession.connect(conninfo)
    except psycopg.OperationalError as exc:
        # libpq's message is multi-line; its first line names the problem (refused, auth failed, ...).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
        raise ConfigError(f"cannot connect to the database: {first}") from None


def connect_from_args(args: argparse.Namespace) -> PsycopgSession:
    return connect(args.dsn, args.password_file)
