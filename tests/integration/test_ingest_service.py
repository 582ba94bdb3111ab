"""The ingest service end to end: real PostgreSQL, real Mosquitto, the service as a subprocess."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.support.ingest_proc import IngestEnv, IngestEnvFactory, IngestProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEVICES = [f"dev{i:03d}" for i in range(20)]
BATCH = 2000


@pytest.fixture
def env(ingest_env: IngestEnvFactory) -> IngestEnv:
    # In-flight window 2 x batch and an unbounded queue: what the README asks of production brokers.
    return ingest_env(DEVICES, max_inflight_messages=2 * BATCH, max_queued_messages=0)


@pytest.fixture(params=["3.1.1", "5"])
def ingest(env: IngestEnv, request: pytest.FixtureRequest) -> Iterator[IngestProcess]:
    # MQTT 5 takes paho's own decoder and the session expiry / Receive Maximum properties.
    proc = env.process(ingest={"batch_max_messages": BATCH, "batch_max_wait_ms": 50}, mqtt={"protocol": request.param})
    yield proc
    proc.kill()


def _messages(n: int, t0_ms: int, start: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for i in range(start, start + n):
        dev = DEVICES[i % len(DEVICES)]
        payload = {"ts": t0_ms + i, "temp": round(20 + (i % 100) / 10, 1), "seq": i}
        out.append((f"devices/{dev}/telemetry", json.dumps(payload).encode()))
    return out


def test_messages_published_while_stopped_all_land_after_start(env: IngestEnv, ingest: IngestProcess) -> None:
    # First start creates the persistent session and its subscriptions; then the service is stopped.
    ingest.start()
    assert ingest.stop() == 0
    t0 = int(time.time() * 1000) - 60_000
    n = 5000
    with env.publisher() as pub:
        assert pub.publish_many(_messages(n, t0)) == n
    assert env.count() == 0
    ingest.start()
    assert env.wait_count(2 * n, timeout=30) == 2 * n
    # Content: each message's seq and temp are there, at its own timestamp and device.
    rows = env.query(
        "SELECT d.device_id, (extract(epoch FROM t.time) * 1000)::bigint, m.name, t.value "
        "FROM telemetry t JOIN devices d ON d.id = t.device JOIN metrics m ON m.id = t.metric"
    )
    got = {(dev, ms, name): value for dev, ms, name, value in rows}
    for i in range(n):
        dev, ms = DEVICES[i % len(DEVICES)], t0 + i
        assert got[(dev, ms, "seq")] == i
        assert got[(dev, ms, "temp")] == round(20 + (i % 100) / 10, 1)
    assert env.count("SELECT count(*) FROM rejected_messages") == 0
    assert ingest.stop() == 0
