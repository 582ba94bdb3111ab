"""boot_check against real services: PostgreSQL 15 and Mosquitto 2 from the fixtures, an ingest /healthz
stub; the restart action is injected (a test has no systemctl), and brings a stopped service back
the way systemd would."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts import boot_check
from tests.support.mosquitto import MosquittoBroker, MosquittoFactory
from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
SYS_ACL = "user admin\ntopic readwrite #\ntopic read $SYS/#\n"
UNITS = {"database": "postgresql@15-main.service", "broker": "mosquitto.service", "ingest": "telemetry-ingest.service"}


class Stub:
    """HTTP on 127.0.0.1: GET /healthz answers 200 or 503; POSTs (alerts) are recorded."""

    def __init__(self) -> None:
        self.healthy = True
        self.posts: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"ok": stub.healthy}).encode()
                self.send_response(200 if stub.healthy else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                stub.posts.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0")))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    yield s
    s.close()


class Restarts:
    """The injected restart: records the unit, then runs what systemd would have done (if anything)."""

    def __init__(self, actions: dict[str, Any] | None = None, error: str | None = None) -> None:
        self.calls: list[str] = []
        self.actions = actions or {}
        self.error = error

    def __call__(self, unit: str) -> str | None:
        self.calls.append(unit)
        if unit in self.actions:
            self.actions[unit]()
        return self.error


def write_config(
    tmp_path: Path,
    pg: PostgresServer,
    broker: MosquittoBroker,
    stub: Stub,
    *,
    account: bool = True,
    restarts: int = 2,
) -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "db.pw").write_text(pg.password + "\n")
    (secrets / "mqtt.pw").write_text(broker.admin_password + "\n")
    broker_component: dict[str, Any] = {"name": "broker", "unit": UNITS["broker"]}
    health: dict[str, Any] = {"ingest": {"url": stub.url + "/healthz", "timeout": 2}}
    if account:
        health["broker"] = {
            "kind": "mosquitto",
            "host": "127.0.0.1",
            "port": broker.plain_port,
            "tls": False,
            "username": broker.admin_username,
            "password_file": str(secrets / "mqtt.pw"),
            "timeout": 3,
        }
    else:
        broker_component["probe"] = {"host": "127.0.0.1", "port": broker.plain_port}
    config = {
        "database": {
            "dsn": f"host=127.0.0.1 port={pg.port} dbname=postgres user=postgres connect_timeout=2",
            "password_file": str(secrets / "db.pw"),
        },
        "alerts": {"webhook": stub.url + "/alert"},
        "health": health,
        "boot_check": {
            "log_file": str(tmp_path / "log" / "boot-check.log"),
            "wait_seconds": 4,
            "interval_seconds": 0.2,
            "restarts": restarts,
            "components": [
                {"name": "database", "unit": UNITS["database"]},
                broker_component,
                {"name": "ingest", "unit": UNITS["ingest"]},
            ],
        },
    }
    path = tmp_path / "ops.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, restart: Restarts, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = boot_check.main(["--config", str(config), "--json", *extra], restart=restart)
    out = json.loads(capsys.readouterr().out)
    return code, {c["name"]: c for c in out["components"]}


def test_all_healthy_restarts_nothing(
    tmp_path: Path,
    pg_server: PostgresServer,
    mosquitto_factory: MosquittoFactory,
    stub: Stub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = mosquitto_factory(acl=SYS_ACL)
    config = write_config(tmp_path, pg_server, broker, stub)
    restart = Restarts()
    code, components = run(config, restart, capsys=capsys)
    assert code == 0 and restart.calls == []
    assert list(components) == ["database", "broker", "ingest"]
    assert all(c["healthy"] and c["restarts"] == 0 for c in components.values())
    assert "answered" in components["broker"]["detail"]  # the $SYS round trip, not a port probe
    log = (tmp_path / "log" / "boot-check.log").read_text()
    assert "boot check: all healthy (3 components, 0 restarts)" in log
    assert "broker (mosquitto.service): healthy" in log and stub.posts == []


def test_stopped_broker_is_restarted_and_checked_again(
    tmp_path: Path,
    pg_server: PostgresServer,
    mosquitto_factory: MosquittoFactory,
    stub: Stub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = mosquitto_factory(acl=SYS_ACL)
    config = write_config(tmp_path, pg_server, broker, stub)
    broker.stop()
    restart = Restarts({UNITS["broker"]: broker.start})
    code, components = run(config, restart, capsys=capsys)
    assert code == 0, components
    assert restart.calls == [UNITS["broker"]]
    assert components["broker"]["healthy"] and components["broker"]["restarts"] == 1
    assert components["database"]["restarts"] == 0 and components["ingest"]["restarts"] == 0
    log = (tmp_path / "log" / "boot-check.log").read_text()
    assert "restarting mosquitto.service (1/2)" in log
    assert "broker (mosquitto.service): healthy after 1 restart" in log
    assert stub.posts == []


def test_stopped_database_is_restarted_first(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    stub: Stub,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    pg = PostgresServer(tmp_path / "pg")
    request.addfinalizer(pg.close)
    pg.start()
    broker = mosquitto_factory(acl=SYS_ACL)
    config = write_config(tmp_path, pg, broker, stub)
    pg.stop()
    restart = Restarts({UNITS["database"]: pg.start})
    code, components = run(config, restart, capsys=capsys)
    assert code == 0, components
    assert restart.calls == [UNITS["database"]]
    assert components["database"]["healthy"] and components["database"]["restarts"] == 1
    assert "connections" in components["database"]["detail"]


def test_unrecoverable_component_gets_bounded_restarts_and_one_alert(
    tmp_path: Path,
    pg_server: PostgresServer,
    mosquitto_factory: MosquittoFactory,
    stub: Stub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = mosquitto_factory(acl=SYS_ACL)
    config = write_config(tmp_path, pg_server, broker, stub, restarts=2)
    stub.healthy = False
    restart = Restarts()
    code, components = run(config, restart, "--wait-seconds", "1", capsys=capsys)
    assert code == 1
    assert restart.calls == [UNITS["ingest"]] * 2  # bounded: exactly `restarts` attempts
    assert not components["ingest"]["healthy"] and components["ingest"]["restarts"] == 2
    assert "HTTP 503" in components["ingest"]["detail"]
    assert components["database"]["healthy"] and components["broker"]["healthy"]
    alerts = [p for p in stub.posts if p.get("check") == "boot_check"]
    assert len(alerts) == 1 and "ingest" in alerts[0]["detail"] and alerts[0]["status"] == "critical"
    log = (tmp_path / "log" / "boot-check.log").read_text()
    assert "boot check: UNHEALTHY: ingest (3 components, 2 restarts)" in log


def test_failing_restart_is_reported(
    tmp_path: Path,
    pg_server: PostgresServer,
    mosquitto_factory: MosquittoFactory,
    stub: Stub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = mosquitto_factory(acl=SYS_ACL)
    config = write_config(tmp_path, pg_server, broker, stub, restarts=1)
    stub.healthy = False
    restart = Restarts(error="Failed to restart telemetry-ingest.service: Unit telemetry-ingest.service not found.")
    code, components = run(config, restart, "--wait-seconds", "0.5", "--no-alerts", capsys=capsys)
    assert code == 1 and components["ingest"]["restart_errors"] == [restart.error]
    assert stub.posts == []  # --no-alerts


def test_mosquitto_without_health_account_is_probed_for_a_connack(
    tmp_path: Path,
    pg_server: PostgresServer,
    mosquitto_factory: MosquittoFactory,
    stub: Stub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = mosquitto_factory()
    config = write_config(tmp_path, pg_server, broker, stub, account=False)
    code, components = run(config, Restarts(), capsys=capsys)
    assert code == 0
    # anonymous clients are refused, and that answer is what proves the broker serves MQTT
    assert "CONNACK (not authorised)" in components["broker"]["detail"]
    probe = {"host": "127.0.0.1", "port": broker.plain_port, "timeout": 2}
    broker.stop()
    down = boot_check.probe_mqtt(probe)
    assert down.status == "critical" and "unreachable" in down.detail
    not_mqtt = boot_check.probe_mqtt({"host": "127.0.0.1", "port": stub.port, "timeout": 2})
    assert not_mqtt.status == "critical" and "no CONNACK" in not_mqtt.detail


def test_runs_as_a_script_without_restarts(
    tmp_path: Path, pg_server: PostgresServer, mosquitto_factory: MosquittoFactory, stub: Stub
) -> None:
    """The entry point the unit runs, as a process; --no-restart looks only."""
    broker = mosquitto_factory(acl=SYS_ACL)
    config = write_config(tmp_path, pg_server, broker, stub)
    stub.healthy = False
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "boot_check.py"), "--config", str(config), "--no-restart",
         "--no-alerts", "--wait-seconds", "0.5"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("database (postgresql@15-main.service): healthy")
    assert lines[2].startswith("ingest (telemetry-ingest.service): UNHEALTHY")
    assert lines[-1] == "boot check: UNHEALTHY: ingest (3 components, 0 restarts)"


def test_configuration_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ops.yml"
    config.write_text(yaml.safe_dump({"boot_check": {"components": [{"name": "broker", "unit": "x.service"}]}}))
    assert boot_check.main(["--config", str(config)], restart=Restarts()) == 2
    assert "health.broker" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"boot_check": {"components": [{"name": "cache", "unit": "x.service"}]}}))
    assert boot_check.main(["--config", str(config)], restart=Restarts()) == 2
