"""Faults: kill -9 mid-stream, database restart, broker restart, SIGTERM, shared subscriptions."""

from __future__ import annotations

import json
import re
import threading
import time

import psycopg
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from tests.support.ingest_proc import IngestEnv, IngestEnvFactory
from tests.support.mosquitto import MqttProbe
from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DEVICES = [f"dev{i:03d}" for i in range(50)]
BATCH = 2000


@pytest.fixture
def env(ingest_env: IngestEnvFactory) -> IngestEnv:
    # In-flight window 2 x batch and an unbounded queue: what the README asks of production brokers.
    return ingest_env(DEVICES, max_inflight_messages=2 * BATCH, max_queued_messages=0)


def _stream(n: int, t0_ms: int) -> list[tuple[str, bytes]]:
    # One field per message: rows == messages, and `seq` identifies every message.
    return [
        (f"devices/{DEVICES[i % len(DEVICES)]}/telemetry", b'{"ts":%d,"seq":%d}' % (t0_ms + i // len(DEVICES), i))
        for i in range(n)
    ]


class Publisher(threading.Thread):
    """Publishes in the background (QoS 1, acknowledged by the broker) so faults hit mid-stream."""

    def __init__(self, env: IngestEnv, messages: list[tuple[str, bytes]], chunk: int = 1000) -> None:
        super().__init__(daemon=True)
        self.env, self.messages, self.chunk = env, messages, chunk
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.env.publisher(window=1000) as pub:
                for i in range(0, len(self.messages), self.chunk):
                    self.sent += pub.publish_many(self.messages[i : i + self.chunk])
                    time.sleep(0.005)
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = 60) -> None:
        self.join(timeout)
        assert not self.is_alive(), "publisher did not finish"
        assert self.error is None, self.error
        assert self.sent == len(self.messages)


def _assert_exactly_once(env: IngestEnv, n: int) -> None:
    rows = env.query("SELECT value::bigint, count(*) FROM telemetry GROUP BY 1 HAVING count(*) > 1")
    assert rows == [], f"duplicated seq values: {rows[:5]}"
    seqs = {int(r[0]) for r in env.query("SELECT value FROM telemetry")}
    missing = set(range(n)) - seqs
    assert not missing, f"{len(missing)} messages lost, e.g. {sorted(missing)[:5]}"
    assert len(seqs) == n


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_kill_9_mid_stream_then_restart_every_message_exactly_once(env: IngestEnv) -> None:
    n = 50_000
    proc = env.process(ingest={"batch_max_messages": BATCH})
    proc.start()
    pub = Publisher(env, _stream(n, int(time.time() * 1000) - 3_600_000))
    pub.start()
    try:
        assert env.wait_count(10_000, timeout=60) >= 10_000
        proc.kill()  # SIGKILL: whatever was received but not committed was never acknowledged
        at_kill = env.count()
        assert at_kill < n, "the stream was over before the kill; the test proves nothing"
        pub.finish()
        proc.start()
        assert env.wait_count(n, timeout=60) == n, proc.log_tail()
        time.sleep(0.5)  # a late duplicate would show up now
        _assert_exactly_once(env, n)
    finally:
        proc.kill()


def test_database_restart_mid_stream_no_loss_no_duplicates_health_red_then_green(
    env: IngestEnv, pg_server: PostgresServer
) -> None:
    n = 30_000
    proc = env.process(ingest={"batch_max_messages": BATCH})
    proc.start()
    pub = Publisher(env, _stream(n, int(time.time() * 1000) - 3_600_000))
    try:
        pub.start()
        assert env.wait_count(5_000, timeout=60) >= 5_000
        pg_server.stop()
        try:
            body = proc.wait_healthy(timeout=20, healthy=False)
            assert body["database"]["connected"] is False
            time.sleep(1.0)  # messages keep arriving meanwhile: buffered, not acknowledged
        finally:
            pg_server.start()  # session-scoped server: always bring it back for the other tests
        proc.wait_healthy(timeout=30)
        pub.finish()
        assert env.wait_count(n, timeout=60) == n, proc.log_tail()
        time.sleep(0.5)
        _assert_exactly_once(env, n)
        metrics = proc.metrics_text()
        assert _metric(metrics, 'ingest_reconnects_total{peer="database"}') >= 1
        assert _metric(metrics, "ingest_database_errors_total") >= 1
    finally:
        proc.kill()
        if not pg_server.running:
            pg_server.start()


def test_broker_restart_mid_stream_reconnects_resubscribes_no_loss(env: IngestEnv) -> None:
    n = 20_000
    proc = env.process(ingest={"batch_max_messages": BATCH})
    proc.start()
    messages = _stream(n, int(time.time() * 1000) - 3_600_000)
    try:
        with env.publisher() as pub:
            pub.publish_many(messages[: n // 2])
        env.broker.restart()  # SIGTERM: Mosquitto saves its persistence file (sessions, queues)
        proc.wait_healthy(timeout=30, healthy=True)
        with env.publisher() as pub:
            pub.publish_many(messages[n // 2 :])
        assert env.wait_count(n, timeout=60) == n, proc.log_tail()
        _assert_exactly_once(env, n)
        assert _metric(proc.metrics_text(), 'ingest_reconnects_total{peer="mqtt"}') >= 1
    finally:
        proc.kill()


def test_sigterm_flushes_commits_acks_and_exits_0_within_bound(env: IngestEnv) -> None:
    n = 21_000  # 10 full batches + a partial one
    # A long batch wait: at SIGTERM a partial batch is certainly waiting in memory.
    proc = env.process(ingest={"batch_max_messages": BATCH, "batch_max_wait_ms": 30_000, "shutdown_timeout_s": 10})
    proc.start()
    try:
        messages = _stream(n, int(time.time() * 1000) - 3_600_000)
        full = n - n % BATCH
        with env.publisher() as pub:
            for i in range(0, full, BATCH):  # one full batch at a time: each commits on its size
                pub.publish_many(messages[i : i + BATCH])
                assert env.wait_count(i + BATCH, timeout=10) == i + BATCH
            pub.publish_many(messages[full:])  # a partial batch: waits for its 30 s timer
        time.sleep(0.5)
        assert env.count() == full, "the partial batch should still wait for its timer"
        t0 = time.monotonic()
        assert proc.stop(timeout=15) == 0
        assert time.monotonic() - t0 < 10
        assert env.count() == n, "SIGTERM did not flush the partial batch"
        assert "all received messages committed and acknowledged" in proc.log_path.read_text()
        # Acknowledged before exit: nothing is redelivered on the next start.
        proc.start()
        time.sleep(1.5)
        assert _metric(proc.metrics_text(), "ingest_messages_committed_total") == 0
        assert env.count() == n
    finally:
        proc.kill()


def test_two_workers_on_a_shared_subscription_split_the_load_exactly_once(env: IngestEnv) -> None:
    n = 20_000
    workers = [env.process(f"worker{i}", mqtt={"shared_group": "ingest"}) for i in range(2)]
    try:
        for w in workers:
            w.start()
        with env.publisher() as pub:
            pub.publish_many(_stream(n, int(time.time() * 1000) - 3_600_000))
        assert env.wait_count(n, timeout=60) == n
        _assert_exactly_once(env, n)
        shares = [_metric(w.metrics_text(), "ingest_messages_committed_total") for w in workers]
        assert sum(shares) == n
        assert min(shares) > n * 0.3, f"load not shared: {shares}"
    finally:
        for w in workers:
            w.kill()


def _probe(env: IngestEnv, client_id: str, clean: bool) -> MqttProbe:
    probe = MqttProbe(
        env.broker, tls=False, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv311, clean_start=clean
    )
    probe.client.max_inflight_messages_set(100)
    assert not probe.connect().is_failure
    return probe


def test_mosquitto_shared_subscription_keeps_stale_offline_members(env: IngestEnv) -> None:
    """The documented pitfall (Mosquitto 2.0): a persistent-session member that goes offline stays in
    the share group's round-robin; its share of the messages waits in its session until it returns.
    A clean-session member leaves the group when it disconnects."""
    topic = "devices/dev000/telemetry"
    a = _probe(env, "share-a", clean=False)
    b = _probe(env, "share-b", clean=False)
    c = _probe(env, "share-c", clean=True)
    for p in (a, b, c):
        assert not p.subscribe("$share/g/devices/+/telemetry", 1)[0].is_failure
    b.close()  # persistent session: stays a member while offline
    c.close()  # clean session: gone
    time.sleep(0.2)
    with env.publisher() as pub:
        pub.publish_many([(topic, json.dumps({"n": i}).encode()) for i in range(40)])
    got_a = a.received(timeout=2.0)
    time.sleep(0.5)
    got_a += a.received()
    # The stale member b took about half: they are NOT delivered to the live member a.
    assert 10 <= len(got_a) <= 30, len(got_a)
    b2 = _probe(env, "share-b", clean=False)
    got_b = b2.received(timeout=2.0)
    time.sleep(0.5)
    got_b += b2.received()
    # ... and arrive only when b comes back: delayed, not lost.
    assert len(got_a) + len(got_b) == 40
    a.close()
    b2.close()


def test_ingest_role_cannot_read_credentials(env: IngestEnv) -> None:
    # The service's login is least-privilege: a leaked ingest password does not leak device secrets.
    with psycopg.connect(env.ingest_dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT password_hash FROM device_credentials")
