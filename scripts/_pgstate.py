"""What the backup records about the database, and what the drill compares: versions, and per-table
row counts and checksums taken in the very snapshot ``pg_dump`` dumps.

The checksum of a table is the sum of the first 64 bits of md5(row::text) over its rows: order-
independent (a restore may return rows in any order), computed in one streaming pass with constant
memory (``sum(bigint)`` is numeric in PostgreSQL, it cannot overflow), and sensitive to any value
change. Text forms depend on session settings, so both sides pin them (:data:`STABLE_SETTINGS`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

STABLE_SETTINGS = (
    "SET TimeZone = 'UTC'",
    "SET DateStyle = 'ISO, YMD'",
    "SET IntervalStyle = 'postgres'",
    "SET extra_float_digits = 1",
    "SET bytea_output = 'hex'",
    "SET statement_timeout = 0",
)

# Tables whose rows belong to the extension, or are reached through a parent (partitions, hypertable
# chunks): counting them too would count rows twice or compare TimescaleDB's own catalogue.
_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%'
  AND n.nspname NOT LIKE '\\_timescaledb%'
  AND n.nspname NOT LIKE 'timescaledb\\_%'
  AND NOT EXISTS (SELECT FROM pg_inherits i WHERE i.inhrelid = c.oid)
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""


def pin_settings(conn: psycopg.Connection[Any]) -> None:
    for statement in STABLE_SETTINGS:
        conn.execute(statement)


def table_stats(conn: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    """``{"schema.table": {"rows": n, "checksum": "..."}}`` for every user table."""
    stats: dict[str, dict[str, Any]] = {}
    for schema, table in conn.execute(_TABLES).fetchall():
        query = sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || left(md5(t::text), 16))::bit(64)::bigint), 0)::text FROM {}.{} t"
        ).format(sql.Identifier(schema), sql.Identifier(table))
        row = conn.execute(query).fetchone()
        assert row is not None
        stats[f"{schema}.{table}"] = {"rows": int(row[0]), "checksum": str(row[1])}
    return stats


def versions(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int, current_database(),"
        " (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb')"
    ).fetchone()
    assert row is not None
    return {
        "postgresql": row[0],
        "postgresql_num": row[1],
        "postgresql_major": row[1] // 10000,
        "database": row[2],
        "timescaledb": row[3],
    }


def compare(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]]) -> list[str]:
    """Human-readable differences; empty when the restore matches the manifest."""
    problems = []
    for name in sorted(set(expected) | set(actual)):
        want, got = expected.get(name), actual.get(name)
        if want is None:
            problems.append(f"{name}: present after restore but not in the backup")
        elif got is None:
            problems.append(f"{name}: missing after restore")
        elif want["rows"] != got["rows"]:
            problems.append(f"{name}: {got['rows']} rows restored, {want['rows']} backed up")
        elif want["checksum"] != got["checksum"]:
            problems.append(f"{name}: row checksum differs ({got['checksum']} != {want['checksum']})")
    return problems


def tool_invocation(conninfo: str, dbname: str | None = None) -> tuple[str, dict[str, str]]:
    """A conninfo for pg_dump/pg_restore's ``--dbname`` without the password, plus an environment that
    carries it (PGPASSWORD is not visible in ``ps``, a command-line password would be)."""
    params = conninfo_to_dict(conninfo)
    password = params.pop("password", None)
    if dbname is not None:
        params["dbname"] = dbname
    env = dict(os.environ)  # keeps PGPASSFILE/PGSSLROOTCERT an operator may rely on
    if password:
        env["PGPASSWORD"] = str(password)
    return make_conninfo("", **params), env


def pg_tool(name: str, bindir: str | None) -> str:
    if bindir:
        return str(Path(bindir) / name)
    return name
