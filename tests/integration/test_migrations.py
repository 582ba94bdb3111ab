"""The migration runner against the real PostgreSQL: idempotent, atomic, and strict about history."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from ingest.cli import main as ingest_main
from ingest.db import PsycopgSession
from ingest.migrate import MIGRATIONS_DIR, MigrationError, load_migrations, migrate, status
from tests.support.postgres import PostgresServer


def tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").fetchall()
    return {r[0] for r in rows}


def test_fresh_database_gets_every_table_and_a_second_run_is_a_no_op(pg_dsn: str) -> None:
    session = PsycopgSession.connect(pg_dsn)
    first = migrate(session)
    second = migrate(session)
    session.close()

    assert first.applied == ["0001_core", "0002_roles", "0003_hourly (plain)"]
    assert first.timescaledb is False
    assert second.applied == [] and second.already_applied == 3
    assert {
        "devices",
        "device_credentials",
        "device_acl",
        "metrics",
        "telemetry",
        "rejected_messages",
        "telemetry_hourly",
        "telemetry_named",
        "schema_migrations",
    } <= tables(pg_dsn)


def test_plain_schema_answers_the_hourly_query(migrated_dsn: str) -> None:
    with psycopg.connect(migrated_dsn) as conn:
        conn.execute("INSERT INTO devices (device_id) VALUES ('d1')")
        conn.execute("INSERT INTO metrics (name) VALUES ('temp')")
        conn.execute(
            "INSERT INTO telemetry SELECT '2026-01-01 10:00:00+00'::timestamptz + make_interval(mins => i), "
            "1, 1, i FROM generate_series(0, 119) i"
        )
        rows = conn.execute(
            "SELECT bucket, avg, samples FROM telemetry_hourly WHERE device = 1 ORDER BY bucket"
        ).fetchall()
        dup = conn.execute("INSERT INTO telemetry VALUES ('2026-01-01 10:00:00+00', 1, 1, 99) ON CONFLICT DO NOTHING")
        assert dup.rowcount == 0, "the unique key (device, metric, time) must dedupe redeliveries"
    assert [(r[1], r[2]) for r in rows] == [(29.5, 60), (89.5, 60)]


def test_cli_runs_twice_and_reports_changes_as_json(pg_server: PostgresServer, pg_dsn: str, tmp_path: Path) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"]
    pw_file = tmp_path / "pw"
    pw_file.write_text(pg_server.password + "\n")
    dsn = pg_server.dsn(str(dbname), user="postgres", password=None)
    cmd = [str(Path(sys.executable).with_name("ingest")), "migrate", "--dsn", dsn, "--password-file", str(pw_file)]
    runs = [subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first["changed"] is True and len(first["applied"]) == 3
    assert second == {"applied": [], "already_applied": 3, "timescaledb": False, "changed": False}


def test_cli_refuses_password_in_dsn_and_reports_unreachable_db(capsys: pytest.CaptureFixture[str]) -> None:
    assert ingest_main(["migrate", "--dsn", "postgresql://u:hunter2@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err
    assert "contains a password" in err and "hunter2" not in err
    assert ingest_main(["migrate", "--dsn", "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to the database" in err and err.count("\n") == 1


def copy_migrations(tmp_path: Path, upto: int) -> Path:
    target = tmp_path / "migrations"
    target.mkdir()
    for path in MIGRATIONS_DIR.glob("*.sql"):
        if int(path.name[:4]) <= upto:
            shutil.copy(path, target / path.name)
    return target


def test_editing_an_applied_migration_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    directory = copy_migrations(tmp_path, upto=1)
    session = PsycopgSession.connect(pg_dsn)
    migrate(session, directory=directory)
    core = directory / "0001_core.sql"
    core.write_text(core.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="0001_core changed after it was applied"):
        migrate(session, directory=directory)
    session.close()


def test_failing_migration_leaves_nothing_behind_and_can_be_fixed(pg_dsn: str, tmp_path: Path) -> None:
    directory = copy_migrations(tmp_path, upto=1)
    bad = directory / "0002_bad.sql"
    bad.write_text("CREATE TABLE half (x int);\nINSERT INTO no_such_table VALUES (1);\n")
    session = PsycopgSession.connect(pg_dsn)
    with pytest.raises(psycopg.errors.UndefinedTable):
        migrate(session, directory=directory)
    assert "half" not in tables(pg_dsn), "the first statement must have been rolled back"
    assert [v for v, *_ in status(session)] == [1]

    bad.write_text("CREATE TABLE half (x int);\n")
    assert migrate(session, directory=directory).applied == ["0002_bad"]
    session.close()


def test_interrupted_non_transactional_migration_blocks_further_runs(pg_dsn: str, tmp_path: Path) -> None:
    directory = copy_migrations(tmp_path, upto=1)
    (directory / "0002_index.sql").write_text(
        "-- migrate: no-transaction\nCREATE INDEX CONCURRENTLY missing_idx ON no_such_table (x);\n"
    )
    session = PsycopgSession.connect(pg_dsn)
    with pytest.raises(psycopg.errors.UndefinedTable):
        migrate(session, directory=directory)
    with pytest.raises(MigrationError, match="0002_index was interrupted half-way"):
        migrate(session, directory=directory)
    session.close()


def test_unknown_applied_version_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    session = PsycopgSession.connect(pg_dsn)
    migrate(session)
    with pytest.raises(MigrationError, match="does not know"):
        migrate(session, directory=copy_migrations(tmp_path, upto=2))
    session.close()


def test_timescaledb_required_but_missing_is_a_clear_error(pg_dsn: str) -> None:
    session = PsycopgSession.connect(pg_dsn)
    with pytest.raises(MigrationError, match="extension is not available"):
        migrate(session, timescaledb="on")
    assert status(session) == []
    session.close()


def test_concurrent_runs_apply_each_migration_once(pg_dsn: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        session = PsycopgSession.connect(pg_dsn)
        try:
            results.append(migrate(session).applied)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(len(r) for r in results) == [0, 0, 3]


def test_migration_files_are_well_formed() -> None:
    found = load_migrations()
    assert list(found) == sorted(found) == list(range(1, len(found) + 1)), "versions are consecutive"
    assert set(found[3]) == {"timescaledb", "plain"}
