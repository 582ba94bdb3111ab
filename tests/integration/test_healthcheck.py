"""healthcheck against real services: Mosquitto ($SYS round trip over TLS), PostgreSQL, an ingest
/healthz stub, the test PKI's certificate, a backup directory; alerts to a webhook receiver."""

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

from scripts._common import utcnow
from tests.support.mosquitto import MosquittoBroker, MosquittoFactory
from tests.support.pki import PkiFiles
from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
SYS_ACL = "user admin\ntopic readwrite #\ntopic read $SYS/#\n"


class Receiver:
    """An HTTP server on 127.0.0.1 that records what is POSTed to it, and answers GET /healthz."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.healthy = True
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                receiver.posts.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def do_GET(self) -> None:
                body = json.dumps({"ok": receiver.healthy}).encode()
                self.send_response(200 if receiver.healthy else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def health_config(
    tmp_path: Path, broker: MosquittoBroker, pg_server: PostgresServer, pki: PkiFiles, receiver: Receiver
) -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "mqtt.pw").write_text(broker.admin_password)
    (secrets / "db.pw").write_text(pg_server.password)
    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / f"telemetry-{utcnow():%Y%m%dT%H%M%SZ}.tpbk").write_bytes(b"x")
    config = {
        "database": {
            "dsn": f"host=127.0.0.1 port={pg_server.port} dbname=postgres user=postgres",
            "password_file": str(secrets / "db.pw"),
        },
        "backup": {"dir": str(backups)},
        "alerts": {"webhook": receiver.url + "/alert"},
        "health": {
            "state_file": str(tmp_path / "state" / "health.json"),
            "log_file": str(tmp_path / "health.log"),
            "cooldown_seconds": 3600,
            "broker": {
                "kind": "mosquitto",
                "host": "127.0.0.1",
                "port": broker.tls_port,
                "ca_file": str(pki.ca_cert),
                "username": broker.admin_username,
                "password_file": str(secrets / "mqtt.pw"),
                "timeout": 5,
            },
            "ingest": {"url": receiver.url + "/healthz"},
            "certificates": {"paths": [str(pki.server_cert)]},
            "disk": {"paths": ["/"]},
        },
    }
    path = tmp_path / "ops.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def healthcheck(config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    # Disk and memory readings are injected: the host running the tests may be busy or full.
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "healthcheck.py"), "--config", str(config), "--json",
         "--reading", "disk:/=40", "--reading", "memory=30", *extra],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_green_then_broker_down_alerts_once_then_recovers(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    pg_server: PostgresServer,
    pki: PkiFiles,
    receiver: Receiver,
) -> None:
    broker = mosquitto_factory(acl=SYS_ACL)
    config = health_config(tmp_path, broker, pg_server, pki, receiver)

    code, out = healthcheck(config)
    statuses = {c["name"]: c["status"] for c in out["checks"]}
    assert code == 0, out
    assert statuses == {
        "broker": "ok",
        "database": "ok",
        "ingest": "ok",
        f"cert:{pki.server_cert}": "ok",
        "disk:/": "ok",
        "memory": "ok",
        "backup": "ok",
    }
    assert receiver.posts == []

    broker.stop()
    code, out = healthcheck(config)
    assert code == 1
    assert [p["check"] for p in receiver.posts] == ["broker"]
    assert receiver.posts[0]["kind"] == "alert" and receiver.posts[0]["status"] == "critical"

    code, out = healthcheck(config)  # within the cooldown: still down, nothing sent
    assert code == 1 and len(receiver.posts) == 1 and out["notifications"] == []

    broker.start()
    code, out = healthcheck(config)
    assert code == 0
    assert len(receiver.posts) == 2
    assert receiver.posts[1]["kind"] == "recovery" and receiver.posts[1]["check"] == "broker"

    code, out = healthcheck(config)  # healthy and already recovered: silence
    assert code == 0 and len(receiver.posts) == 2
    assert "broker" in (tmp_path / "health.log").read_text()


def test_thresholds_and_unhealthy_ingest(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    pg_server: PostgresServer,
    pki: PkiFiles,
    receiver: Receiver,
) -> None:
    broker = mosquitto_factory(acl=SYS_ACL)
    config = health_config(tmp_path, broker, pg_server, pki, receiver)
    receiver.healthy = False
    code, out = healthcheck(config, "--no-alerts", "--reading", "disk:/=75")
    statuses = {c["name"]: c["status"] for c in out["checks"]}
    assert statuses["ingest"] == "critical" and statuses["disk:/"] == "warning" and code == 1
    receiver.healthy = True
    code, out = healthcheck(config, "--no-alerts", "--reading", "disk:/=75", "--reading", "memory=61")
    assert code == 4  # warnings only
    assert receiver.posts == []  # --no-alerts


def test_database_refusing_connections_is_critical(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: PkiFiles, receiver: Receiver, pg_server: PostgresServer
) -> None:
    broker = mosquitto_factory(acl=SYS_ACL)
    config = health_config(tmp_path, broker, pg_server, pki, receiver)
    cfg = yaml.safe_load(config.read_text())
    cfg["database"]["dsn"] = cfg["database"]["dsn"].replace(f"port={pg_server.port}", "port=1")
    config.write_text(yaml.safe_dump(cfg))
    code, out = healthcheck(config, "--check", "database")
    assert code == 1
    assert out["checks"][0]["status"] == "critical" and "unreachable" in out["checks"][0]["detail"]
    assert [p["check"] for p in receiver.posts] == ["database"]
