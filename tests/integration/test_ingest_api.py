"""POST /v1/devices/register: HMAC-signed self-registration through the running service."""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from ingest.registration import signed_headers
from ingest.schema import ROLE_PROVISIONER
from tests.support.ingest_proc import IngestEnv, IngestEnvFactory, IngestProcess
from tests.support.mosquitto import MqttProbe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KEY = secrets.token_hex(32)
PATH = "/v1/devices/register"


@pytest.fixture
def env(ingest_env: IngestEnvFactory) -> IngestEnv:
    return ingest_env(["existing1"])


@pytest.fixture
def ingest(env: IngestEnv, role_dsn: Callable[[str], str]) -> Iterator[IngestProcess]:
    # The API provisions as a telemetry_provisioner login; the ingest path keeps its own least privilege.
    proc = env.process(api_key=KEY, api_dsn=role_dsn(ROLE_PROVISIONER), api={"replay_window_s": 60})
    proc.start()
    yield proc
    proc.kill()


def post(proc: IngestProcess, body: bytes, headers: dict[str, str], path: str = PATH) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(proc.http_base + path, data=body, method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _devices(env: IngestEnv) -> int:
    return env.count("SELECT count(*) FROM devices") + env.count("SELECT count(*) FROM device_credentials")


def test_valid_signature_provisions_a_device_that_can_connect(env: IngestEnv, ingest: IngestProcess) -> None:
    body = json.dumps({"device_id": "newdev01", "name": "greenhouse"}).encode()
    status, out = post(ingest, body, signed_headers(KEY.encode(), "POST", PATH, body))
    assert status == 201, out
    assert out["device_id"] == out["username"] == "newdev01" and len(out["password"]) >= 16
    assert env.query("SELECT name, type FROM devices WHERE device_id = 'newdev01'") == [("greenhouse", "generic")]
    # The deploy renders Mosquitto's files from the database; then the device can log in and publish.
    env.sync_broker_accounts()
    probe = MqttProbe(
        env.broker, "newdev01", out["password"], tls=True, protocol=MQTTProtocolVersion.MQTTv311, client_id="newdev01"
    )
    assert not probe.connect().is_failure
    probe.close()
    # Registering the same id again is a conflict, not a second account.
    body2 = json.dumps({"device_id": "newdev01"}).encode()
    assert post(ingest, body2, signed_headers(KEY.encode(), "POST", PATH, body2))[0] == 409


@pytest.mark.parametrize("attack", ["tampered_body", "wrong_key", "stale_timestamp", "future_timestamp",
                                    "replay", "no_signature", "other_path"])  # fmt: skip
def test_bad_or_replayed_signatures_get_401_and_write_nothing(
    env: IngestEnv, ingest: IngestProcess, attack: str
) -> None:
    body = json.dumps({"device_id": "evil01"}).encode()
    key = KEY.encode()
    headers = signed_headers(key, "POST", PATH, body)
    if attack == "replay":
        assert post(ingest, body, headers)[0] == 201  # the original request
        body_before = _devices(env)
        status, out = post(ingest, body, headers)  # the same bytes again
        assert (status, out) == (401, {"error": "unauthorized"})
        assert _devices(env) == body_before
        return
    before = _devices(env)
    if attack == "tampered_body":
        body = json.dumps({"device_id": "evil02"}).encode()
    elif attack == "wrong_key":
        headers = signed_headers(secrets.token_bytes(32), "POST", PATH, body)
    elif attack == "stale_timestamp":
        headers = signed_headers(key, "POST", PATH, body, now=time.time() - 120)
    elif attack == "future_timestamp":
        headers = signed_headers(key, "POST", PATH, body, now=time.time() + 120)
    elif attack == "no_signature":
        headers = {k: v for k, v in headers.items() if k != "X-Signature"}
    elif attack == "other_path":
        headers = signed_headers(key, "POST", "/v1/devices/register?x=1", body)
    status, out = post(ingest, body, headers)
    assert (status, out) == (401, {"error": "unauthorized"})
    assert _devices(env) == before
    assert env.count("SELECT count(*) FROM devices WHERE device_id LIKE 'evil%%'") == 0


def test_health_and_metrics_endpoints(ingest: IngestProcess) -> None:
    status, body = ingest.health()
    assert status == 200 and body["ok"] is True
    assert body["mqtt"]["connected"] is True and body["database"]["connected"] is True
    text = ingest.metrics_text()
    assert 'ingest_up{peer="mqtt"} 1.0' in text and 'ingest_up{peer="database"} 1.0' in text
