"""Every runbook runs read-only against the test services, and names an injected fault: broker down,
database refusing connections, disk usage over its threshold (injected reading)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.mosquitto import MosquittoBroker, MosquittoFactory
from tests.support.pki import PkiFiles
from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = [
    "devices_cannot_connect",
    "data_not_stored",
    "db_connections_exhausted",
    "disk_full",
    "cert_renewal_failed",
    "high_memory",
]
SYS_ACL = "user admin\ntopic readwrite #\ntopic read $SYS/#\n"


def write_config(tmp_path: Path, broker: MosquittoBroker, pg: PostgresServer, pki: PkiFiles, db_port: int) -> Path:
    (tmp_path / "mqtt.pw").write_text(broker.admin_password)
    (tmp_path / "db.pw").write_text(pg.password)
    config = {
        "database": {
            "dsn": f"host=127.0.0.1 port={db_port} dbname=postgres user=postgres",
            "password_file": str(tmp_path / "db.pw"),
        },
        "health": {
            "broker": {
                "kind": "mosquitto",
                "port": broker.tls_port,
                "ca_file": str(pki.ca_cert),
                "username": broker.admin_username,
                "password_file": str(tmp_path / "mqtt.pw"),
            },
            "certificates": {"paths": [str(pki.server_cert)]},
            "disk": {"paths": ["/"]},
        },
        "runbook": {"log_file": str(tmp_path / "runbook.log")},
    }
    path = tmp_path / "ops.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def runbook(name: str, config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "runbook" / f"{name}.py"), "--config", str(config), "--json",
         "--reading", "disk:/=40", "--reading", "memory=30", *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
def services(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pg_server: PostgresServer, pki: PkiFiles
) -> tuple[MosquittoBroker, Path]:
    broker = mosquitto_factory(acl=SYS_ACL)
    return broker, write_config(tmp_path, broker, pg_server, pki, pg_server.port)


def test_every_runbook_is_green_and_read_only_on_healthy_services(services: tuple[MosquittoBroker, Path]) -> None:
    _, config = services
    for name in RUNBOOKS:
        code, out = runbook(name, config)
        assert code == 0, (name, out)
        assert out["checked"], name  # it says what it checked
        assert out["faults"] == [] and out["fixes_run"] == []


def test_broker_down_is_named(services: tuple[MosquittoBroker, Path]) -> None:
    broker, config = services
    broker.stop()
    code, out = runbook("devices_cannot_connect", config)
    assert code == 1
    assert [f["check"] for f in out["faults"]] == ["broker"]
    assert "broker is down" in out["cause"] and "mosquitto" in out["next_command"]
    code, out = runbook("data_not_stored", config)
    assert code == 1 and "broker is down" in out["cause"]
    # read-only: without --fix nothing ran, even though a fix is offered
    assert out["fixes_run"] == []


def test_database_refusing_connections_is_named(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pg_server: PostgresServer, pki: PkiFiles
) -> None:
    broker = mosquitto_factory(acl=SYS_ACL)
    config = write_config(tmp_path, broker, pg_server, pki, db_port=1)  # nothing listens on port 1
    for name, phrase in (
        ("db_connections_exhausted", "refuses connections"),
        ("data_not_stored", "database is unreachable"),
        ("devices_cannot_connect", "database is unreachable"),
    ):
        code, out = runbook(name, config)
        assert code == 1, name
        assert "database" in [f["check"] for f in out["faults"]]
        assert phrase in out["cause"], (name, out["cause"])


def test_disk_threshold_is_named(services: tuple[MosquittoBroker, Path]) -> None:
    _, config = services
    code, out = runbook("disk_full", config, "--reading", "disk:/=91")
    assert code == 1
    assert out["faults"] == [{"check": "disk:/", "status": "critical", "detail": "/ 91% used"}]
    assert "/ is above its threshold" in out["cause"] and out["next_command"].startswith("du -xh")
    code, out = runbook("high_memory", config, "--reading", "memory=70")
    assert code == 1 and out["faults"][0]["check"] == "memory"
