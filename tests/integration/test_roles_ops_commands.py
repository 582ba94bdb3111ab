"""The shell the ops role runs on hosts, run for real: the superuser login fact and password pipe
against PostgreSQL 15, and the Mosquitto health account (provision ensure-service + export) against a
migrated database and Mosquitto 2, ending in the health check's own $SYS round trip."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import roles.ops
from roles.ops import MqttHealthAccount, PostgresPasswordLogin, ops
from scripts import healthcheck as hc
from tests.support.deploy_fake import LIVE_HOST, HostResult, run_deploys
from tests.support.mosquitto import MosquittoFactory
from tests.support.postgres import PostgresServer

PROVISION = str(Path(sys.executable).parent / "provision")


def sh(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, check=False)


def op_command(r: HostResult, name: str) -> str:
    (op,) = [o for o in r.ops if name in o.name]
    (command,) = op.commands
    return command


def test_superuser_login_fact_and_password_pipe(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    pg = PostgresServer(tmp_path / "pg")
    request.addfinalizer(pg.close)
    pg.start()
    password_file = tmp_path / "db-superuser.password"
    fact = PostgresPasswordLogin()

    def login() -> bool:
        proc = sh(fact.command("127.0.0.1", pg.port, str(password_file)))
        return fact.process(proc.stdout.splitlines())

    assert not login()  # no file yet
    password_file.write_text(pg.password + "\n")
    assert login()
    # The role's pipe with a new vault password: printf builds the statement, psql runs it (here over
    # TCP as the superuser instead of runuser + the socket of a Debian cluster).
    new = "Vault.p4ss-word~with+allowed/chars=@%"
    password_file.write_text(new + "\n")
    assert not login()
    (r,) = run_deploys("lab", [ops], responses=LIVE_HOST).values()
    pipe = op_command(r, "postgres password").replace(roles.ops.DB_PASSWORD_FILE, str(password_file))
    printf, _, runuser = pipe.partition(" | ")
    assert runuser.startswith("runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p 5432 -d postgres")
    proc = sh(f"{printf} | PGPASSWORD='{pg.password}' psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p {pg.port} "
              "-U postgres -d postgres")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert new not in proc.stdout + proc.stderr
    assert login()


def test_mosquitto_health_account_end_to_end(
    tmp_path: Path,
    migrated_dsn: str,
    pg_server: PostgresServer,
    mosquitto_factory: MosquittoFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = mosquitto_factory()
    dbname = str(psycopg.conninfo.conninfo_to_dict(migrated_dsn)["dbname"])
    db_password = tmp_path / "db-superuser.password"
    db_password.write_text(pg_server.password + "\n")
    account_password = tmp_path / "mqtt-health.password"
    monkeypatch.setattr(roles.ops, "DB_PASSWORD_FILE", str(db_password))
    monkeypatch.setattr(roles.ops, "MQTT_HEALTH_PASSWORD_FILE", str(account_password))
    (r,) = run_deploys(
        "lab",
        [ops],
        responses=LIVE_HOST,
        override={
            "provision_bin": PROVISION,
            "database_port": pg_server.port,
            "database_name": dbname,
            "mosquitto_passwd_file": str(broker.password_path),
            "mosquitto_acl_file": str(broker.acl_path),
        },
    ).values()

    # 1. the password, generated on the host: 64 hex characters, readable by root only
    proc = sh(op_command(r, "password of the MQTT health account"))
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"[0-9a-f]{64}", account_password.read_text())
    assert account_password.stat().st_mode & 0o777 == 0o600

    # 2. the account, Mosquitto's files exported from the database, then the reload (SIGHUP here)
    fact = MqttHealthAccount()
    dsn = f"host=127.0.0.1 port={pg_server.port} dbname={dbname} user=postgres"
    check = fact.command(PROVISION, "healthcheck", str(account_password), "sha256:prefix", dsn)
    assert fact.process(sh(check).stdout.splitlines()) == "update"
    command = op_command(r, "MQTT health account (provision")
    assert command.endswith("&& systemctl reload mosquitto.service; else echo 'ops: " + PROVISION + " not installed "
                            "yet: MQTT health account deferred' >&2; fi")  # fmt: skip
    proc = sh(command.replace("systemctl reload mosquitto.service", "true"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broker.reload()
    assert "user healthcheck\ntopic read $SYS/broker/uptime\n" in broker.acl_path.read_text()
    assert fact.process(sh(check).stdout.splitlines()) == "current"  # the next deploy does nothing

    # 3. what ops.yml tells the health check works: a $SYS round trip on the loopback listener
    result = hc.check_mosquitto(
        {
            "host": "127.0.0.1",
            "port": broker.plain_port,
            "tls": False,
            "username": "healthcheck",
            "password_file": str(account_password),
            "timeout": 15,
        }
    )
    assert result.status == hc.OK, result.detail
