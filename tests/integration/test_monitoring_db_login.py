"""The postgres exporter's database login, as the database roles create it, on a real PostgreSQL 15.

The SQL and pg_hba.conf are the files the fake deploy renders (lab: apt PostgreSQL; prod: TimescaleDB),
applied to a private cluster: the login is in pg_monitor, reads statistics but no data; on the apt
backend it gets in only by peer authentication as OS user ``prometheus`` (what Debian's exporter runs
as), never with a password over TCP; on TimescaleDB with ``db_monitor_password`` over TCP.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ingest.db import PsycopgSession
from ingest.migrate import migrate
from roles._database import MONITOR_GROUP, MONITOR_LOGIN
from roles.database_postgresql import database_postgresql
from roles.database_timescaledb import database_timescaledb
from roles.secrets import decrypt_file
from tests.support.deploy_fake import REPO, TEST_VAULT_DIR, TEST_VAULT_PASSWORD, run_deploys
from tests.support.postgres import SERVICE_USER, PostgresServer

pytestmark = pytest.mark.integration

LAB_SQL = "/etc/telemetry/database-roles.sql"
LAB_HBA = "/etc/postgresql/15/main/pg_hba.conf"
PROD_SQL = "/srv/telemetry/timescaledb/roles.sql"


def _exporter_user() -> str | None:
    try:
        pwd.getpwnam(MONITOR_LOGIN)
    except KeyError:
        return None
    return MONITOR_LOGIN if os.geteuid() == 0 else None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A cluster of its own (its pg_hba.conf gets replaced), with a socket directory other OS users
    may enter, as /run/postgresql is on a host."""
    sock = Path(tempfile.mkdtemp(prefix="pgmon-"))
    sock.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(sock, SERVICE_USER, SERVICE_USER)
    srv = PostgresServer(tmp_path / "pg", settings={"unix_socket_directories": f"'{sock}'"})
    try:
        srv.start()
        srv.socket = sock  # type: ignore[attr-defined]
        yield srv
    finally:
        srv.close()
        shutil.rmtree(sock, ignore_errors=True)


def apply_sql(srv: PostgresServer, sql_text: str, tmp_path: Path) -> None:
    path = tmp_path / "roles.sql"
    path.write_text(sql_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        ["psql", "-X", "-q", "-d", srv.admin_dsn, "-f", str(path)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr


def deploy_database(srv: PostgresServer, sql_text: str, tmp_path: Path) -> None:
    """What run_sql_and_migrations does: logins, migrations, logins again (grants)."""
    apply_sql(srv, sql_text, tmp_path)
    session = PsycopgSession.connect(srv.dsn("telemetry"))
    try:
        migrate(session)
    finally:
        session.close()
    apply_sql(srv, sql_text, tmp_path)


def install_hba(srv: PostgresServer, text: str) -> None:
    path = srv.datadir / "pg_hba.conf"
    owner = srv.datadir.stat()
    path.write_text(text)
    os.chown(path, owner.st_uid, owner.st_gid)
    with psycopg.connect(srv.admin_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_reload_conf()").fetchone() == (True,)
        errors = conn.execute("SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL").fetchall()
    assert errors == []


def psql_as(os_user: str, srv: PostgresServer, query: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-h", str(srv.socket), "-p", str(srv.port),  # type: ignore[attr-defined]
         "-U", MONITOR_LOGIN, "-d", "telemetry", "-c", query],
        user=os_user, group=pwd.getpwnam(os_user).pw_gid, extra_groups=[], cwd="/", env=env,
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_timescaledb_login_uses_its_password_and_reads_statistics_only(server: PostgresServer, tmp_path: Path) -> None:
    (prod,) = run_deploys("prod", [database_timescaledb]).values()
    deploy_database(server, prod.files[PROD_SQL], tmp_path)
    password = decrypt_file(REPO / TEST_VAULT_DIR / "all.vault.yml", TEST_VAULT_PASSWORD.read_bytes().strip())[
        "db_monitor_password"
    ]
    dsn = server.dsn("telemetry", user=MONITOR_LOGIN, password=password)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_has_role(%s, 'member')", [MONITOR_GROUP]).fetchone() == (True,)
        # pg_read_all_stats (in pg_monitor): other sessions' queries are visible, not "<insufficient privilege>"
        conn.execute("SELECT count(*) FROM pg_stat_database").fetchone()
        for statement in ("SELECT * FROM device_credentials", "SELECT * FROM telemetry", "CREATE TABLE x (i int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(server.dsn("telemetry", user=MONITOR_LOGIN, password="wrong"), connect_timeout=5).close()


@pytest.mark.skipif(_exporter_user() is None, reason="needs root and the OS user prometheus (package prometheus)")
def test_apt_login_is_peer_only(server: PostgresServer, tmp_path: Path) -> None:
    (prod,) = run_deploys("prod", [database_timescaledb]).values()
    (lab,) = run_deploys("lab", [database_postgresql]).values()
    install_hba(server, lab.files[LAB_HBA])
    # A host that had a password before (or a hand-made one) loses it: the lab SQL converges to none.
    deploy_database(server, prod.files[PROD_SQL], tmp_path)
    deploy_database(server, lab.files[LAB_SQL], tmp_path)

    ok = psql_as(MONITOR_LOGIN, server, "SELECT current_user, pg_has_role('pg_monitor', 'member')")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{MONITOR_LOGIN}|t"
    denied = psql_as(MONITOR_LOGIN, server, "SELECT count(*) FROM device_credentials")
    assert denied.returncode != 0 and "permission denied" in denied.stderr

    # Another OS user cannot borrow the login over the socket...
    other = psql_as("nobody", server, "SELECT 1")
    assert other.returncode != 0 and "Peer authentication failed" in other.stderr
    # ...and there is no password to use over TCP.
    with psycopg.connect(server.admin_dsn) as conn:
        assert conn.execute(
            "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = %s", [MONITOR_LOGIN]
        ).fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(server.dsn("telemetry", user=MONITOR_LOGIN, password="anything"), connect_timeout=5).close()
