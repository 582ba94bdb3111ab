"""db_connections_exhausted: who holds the connections, and idle-in-transaction sessions to end."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg

from ingest import dbconfig
from scripts import _common as common
from scripts import healthcheck as hc
from scripts.runbook._base import Context, Diagnosis, Finding, Fix, main


def diagnose(ctx: Context) -> Diagnosis:
    d = Diagnosis()
    results = ctx.checks("database")
    d.add(results)
    if not results:
        d.cause = "no database configured (database.dsn)"
        return d
    if results[0].status == hc.CRIT and "unreachable" in results[0].detail:
        d.cause = "the server refuses connections: it is down, or every slot is taken (FATAL: too many clients)"
        d.next_command = "systemctl status postgresql --no-pager; tail -n 50 /var/log/postgresql/*.log"
        return d
    db = common.section(ctx.config, "database")
    conninfo = dbconfig.build_conninfo(db.get("dsn"), Path(db["password_file"]) if db.get("password_file") else None)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT usename, application_name, state, count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 10"
        ).fetchall()
        stuck = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
            " AND state_change < now() - interval '10 minutes'"
        ).fetchone()
    for user, app, state, n in rows:
        d.checked.append(Finding(f"clients:{user}/{app or '-'}", hc.OK, f"{n} {state}"))
    stuck_n = int(stuck[0]) if stuck else 0
    if stuck_n:
        d.checked.append(Finding("idle_in_transaction", hc.WARN, f"{stuck_n} sessions idle in transaction > 10 min"))
        d.fixes.append(
            Fix(
                f"end {stuck_n} sessions idle in transaction > 10 min (their open transactions roll back)",
                [
                    "psql",
                    conninfo_without_password(conninfo),
                    "-c",
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE state = 'idle in transaction'"
                    " AND state_change < now() - interval '10 minutes'",
                ],
            )
        )
    if d.faults:
        d.cause = "connections are nearly exhausted: a client leaks connections or sessions hang in transactions"
        d.next_command = (
            'psql -c "SELECT pid, usename, application_name, state, state_change FROM pg_stat_activity'
            ' ORDER BY state_change"'
        )
    return d


def conninfo_without_password(conninfo: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **params)


if __name__ == "__main__":
    sys.exit(main("db_connections_exhausted", "Database connections exhausted.", diagnose))
