"""The ingest service: MQTT (paho network thread) -> inbox -> writer thread (parse, COPY, commit) -> acks.

Threads and what they own:

* paho's network thread (``loop_start``): socket reads, the sink that appends (topic, payload, mid)
  to the inbox, keepalive, reconnects with backoff, writing queued PUBACKs.
* the writer thread: takes the inbox in chunks of at most ``batch_max_messages``, processes them,
  writes one transaction per chunk, and only after COMMIT queues the chunk's PUBACKs. A database
  error keeps the chunk (nothing acknowledged), reconnects with backoff and retries it.
* the HTTP server thread, and the main thread, which waits for SIGTERM/SIGINT.

At-least-once hinges on one rule: a PUBACK is sent only for a message whose transaction committed,
and only on the connection that delivered it. Every disconnect starts a new *generation*; acks of an
older generation are dropped (the broker redelivers those messages from the persistent session and
the unique index drops the duplicate rows). Without that rule, a packet id acknowledged after a
reconnect into a fresh session could acknowledge a *different* message that was never written.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.config import Config
from ingest.metrics import IngestMetrics
from ingest.service.mqtt import FastClient
from ingest.service.processor import KIND_NAMES, Batch, Catalog, Processor
from ingest.service.store import Store, is_connection_error

log = logging.getLogger("ingest")

Item = tuple[bytes, bytes, int]
POISON_ATTEMPTS = 3  # a batch failing this often for a non-connection reason is dead-lettered


@dataclass
class Health:
    mqtt: bool
    database: bool
    buffered: int
    oldest_wait_s: float
    detail: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.mqtt and self.database


class IngestService:
    def __init__(self, cfg: Config, metrics: IngestMetrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics or IngestMetrics()
        ic = cfg.ingest
        self.store = Store(cfg.database.conninfo, ic.max_metrics)
        self.catalog = Catalog(ic, self.store.lookup_device, self.store.create_metric)
        self.processor = Processor(ic, self.catalog)

        self._lock = threading.Lock()
        self._inbox: list[Item] = []
        self._sealed: list[tuple[int, list[Item]]] = []
        self._gen = 0
        self._pending = 0  # received, not yet committed (inbox + in the writer's hands)
        self._first_at = 0.0  # monotonic time of the oldest message waiting in the inbox
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._writer_done = threading.Event()
        self._flushed = False
        self._mqtt_up = False
        self._mqtt_ever = False
        self._mqtt_error = "not connected yet"
        self._db_up = False
        self._db_error = "not connected yet"
        self._last_commit = 0.0
        self._oldest_uncommitted = 0.0

        m = cfg.mqtt
        self._v5 = m.protocol == "5"
        self.client = FastClient(
            self._on_publish,
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=m.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else False,  # persistent session: the broker queues while we are away
            manual_ack=True,
            reconnect_on_failure=True,
        )
        self.client.paused = self._paused
        self.client.sink_many = self._on_publish_many
        self.client.username_pw_set(m.username, m.password)
        if m.tls:
            self.client.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None, keyfile=m.key_file or None)
        self.client.reconnect_delay_set(max(1, round(m.reconnect_min_s)), max(1, round(m.reconnect_max_s)))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self._writer = threading.Thread(target=self._writer_main, name="ingest-writer", daemon=True)

    # -- MQTT side (paho's thread) ---------------------------------------------------------

    def _on_publish(self, topic: bytes, payload: bytes, mid: int) -> None:
        with self._lock:
            inbox = self._inbox
            inbox.append((topic, payload, mid))
            self._pending += 1
            if len(inbox) == 1:
                self._first_at = time.monotonic()
            if len(inbox) == self.cfg.ingest.batch_max_messages:
                self._wake.set()  # once: Event.set takes a lock; the writer re-checks the size itself

    def _on_publish_many(self, items: list[Item]) -> None:
        with self._lock:
            inbox = self._inbox
            before = len(inbox)
            inbox += items
            self._pending += len(items)
            if before == 0:
                self._first_at = time.monotonic()
            size = self.cfg.ingest.batch_max_messages
            if before < size <= len(inbox):
                self._wake.set()

    def _paused(self) -> bool:
        return self._stopping.is_set() or self._pending >= self.cfg.ingest.max_buffer_messages

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        if rc.is_failure:
            self._mqtt_error = f"CONNACK refused: {rc}"
            log.error("broker refused the connection: %s", rc)
            return
        if self._mqtt_ever:
            self.metrics.reconnects.labels("mqtt").inc()
        self._mqtt_ever = True
        log.info("connected to broker (session present: %s); subscribing", getattr(flags, "session_present", "?"))
        # Always (re)subscribe: harmless with a kept session, essential when the broker lost it.
        client.subscribe([(t, 1) for t in self.cfg.mqtt.topics()])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Properties | None
    ) -> None:
        failed = [str(rc) for rc in rcs if rc.is_failure]
        if failed:
            # Usually the ACL: the ingest account must be allowed to subscribe to these filters.
            self._mqtt_error = f"subscription refused: {failed} for {self.cfg.mqtt.topics()}"
            log.error("%s", self._mqtt_error)
            return
        self._mqtt_up = True
        self._mqtt_error = ""
        self.metrics.up.labels("mqtt").set(1)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        with self._lock:
            # New generation: acks for what the old connection delivered must never be sent.
            self._sealed.append((self._gen, self._inbox))
            self._inbox = []
            self._gen += 1
            self._wake.set()
        self._mqtt_up = False
        self.metrics.up.labels("mqtt").set(0)
        if not self._stopping.is_set():
            self._mqtt_error = f"disconnected: {rc}"
            log.warning("disconnected from broker: %s; paho reconnects with backoff", rc)

    # -- writer thread ---------------------------------------------------------------------

    def _take(self) -> list[tuple[int, list[Item]]]:
        with self._lock:
            segments = self._sealed
            if self._inbox:
                segments.append((self._gen, self._inbox))
            self._sealed = []
            self._inbox = []
            self._wake.clear()
        size = self.cfg.ingest.batch_max_messages
        out: list[tuple[int, list[Item]]] = []
        for gen, items in segments:
            for i in range(0, len(items), size):
                out.append((gen, items[i : i + size]))
        return out

    def _wait_for_work(self) -> None:
        wait_s = self.cfg.ingest.batch_max_wait_ms / 1000
        while not self._stopping.is_set():
            with self._lock:
                n = len(self._inbox) + sum(len(s[1]) for s in self._sealed)
                first = self._first_at
            if n >= self.cfg.ingest.batch_max_messages or self._sealed:
                return
            if n and time.monotonic() - first >= wait_s:
                return
            self._maybe_refresh()
            self._wake.wait(wait_s - (time.monotonic() - first) if n else wait_s)

    def _writer_main(self) -> None:
        try:
            self._writer_loop()
        except BaseException:
            log.exception("writer thread crashed; stopping the service")
            self._stopping.set()
        finally:
            self._writer_done.set()

    def _writer_loop(self) -> None:
        self._next_refresh = 0.0
        self._db_connect()
        while True:
            self._wait_for_work()
            chunks = self._take()
            for gen, items in chunks:
                if not self._commit(gen, items):
                    return  # stopping with the database unreachable: nothing more can be committed
            if self._stopping.is_set():
                with self._lock:
                    empty = not self._inbox and not self._sealed
                if empty:
                    self._flushed = True
                    return

    def _backoff(self, attempt: int) -> float:
        d = self.cfg.database
        return float(min(d.reconnect_max_s, d.reconnect_min_s * (2 ** min(attempt, 20))))

    def _db_connect(self) -> bool:
        """Connect and (re)load the caches; on failure record why. Returns success."""
        try:
            self.store.connect()
            self.catalog.load(
                self.store.devices(self.cfg.ingest.device_cache_size), self.store.metrics(), self.cfg.mqtt.topic_prefix
            )
        except Exception as exc:
            self.store.close()
            self._set_db(False, _one_line(exc))
            return False
        self._next_refresh = time.monotonic() + self.cfg.ingest.device_refresh_s
        self._set_db(True, "")
        return True

    def _set_db(self, up: bool, error: str) -> None:
        if up and not self._db_up and self._db_error != "not connected yet":
            self.metrics.reconnects.labels("database").inc()
            log.info("database connection restored")
        self._db_up = up
        self._db_error = error
        self.metrics.up.labels("database").set(1 if up else 0)

    def _maybe_refresh(self) -> None:
        if not self.store.connected or time.monotonic() < self._next_refresh:
            return
        try:
            self.catalog.load(
                self.store.devices(self.cfg.ingest.device_cache_size), self.store.metrics(), self.cfg.mqtt.topic_prefix
            )
        except Exception as exc:
            log.warning("device refresh failed: %s", _one_line(exc))
            self.store.close()
            self._set_db(False, _one_line(exc))
        self._next_refresh = time.monotonic() + self.cfg.ingest.device_refresh_s

    def _commit(self, gen: int, items: list[Item]) -> bool:
        """Write ``items`` in one transaction and acknowledge them; retry until it works. Returns
        False only when stopping and the shutdown deadline passed first."""
        attempt = 0
        failures = 0
        received_at = time.monotonic()
        while True:
            if self._stopping.is_set() and time.monotonic() > self._deadline:
                log.error(
                    "shutdown deadline passed with %d uncommitted messages (they stay unacknowledged)", len(items)
                )
                return False
            if not self.store.connected and not self._db_connect():
                time.sleep(self._backoff(attempt))
                attempt += 1
                continue
            t0 = time.monotonic()
            try:
                if failures >= POISON_ATTEMPTS:
                    batch = self._dead_letter_all(items, self._db_error)
                else:
                    batch = self.processor.process(items)
                result = self.store.write(batch)
            except Exception as exc:
                self.metrics.db_errors.inc()
                msg = _one_line(exc)
                if is_connection_error(exc):
                    log.warning("database error (will reconnect and retry %d messages): %s", len(items), msg)
                    self.store.close()
                else:
                    failures += 1
                    log.error("batch failed (%d/%d): %s", failures, POISON_ATTEMPTS, msg)
                    self._db_error = msg
                    if failures > POISON_ATTEMPTS:
                        self.store.close()  # even dead-lettering failed: start from a fresh session
                self._set_db(False, msg)
                time.sleep(self._backoff(attempt))
                attempt += 1
                continue
            break
        elapsed = time.monotonic() - t0
        if not self._db_up:
            self._set_db(True, "")
        with self._lock:
            if gen == self._gen:
                self.client.ack_many(mid for _t, _p, mid in items)
            self._pending -= len(items)
        self.client.wake.set()  # a paused network thread: read again, write the PUBACKs
        self._last_commit = time.monotonic()
        self._record(batch, len(items), result.inserted, result.duplicates, elapsed, self._last_commit - received_at)
        return True

    def _dead_letter_all(self, items: list[Item], error: str) -> Batch:
        batch = Batch()
        batch.copy += b"\xff\xff"
        for topic, payload, _mid in items:
            batch.reject(topic, payload, "write_failed", error)
        log.error("dead-lettering %d messages after %d failed attempts: %s", len(items), POISON_ATTEMPTS, error)
        return batch

    def _record(self, batch: Batch, n: int, inserted: int, dups: int, elapsed: float, lag: float) -> None:
        m = self.metrics
        for kind, count in enumerate(batch.received):
            if count:
                m.received.labels(KIND_NAMES[kind]).inc(count)
        for reason, count in batch.reject_counts.items():
            m.rejected.labels(reason).inc(count)
        m.committed.inc(n)
        m.rows_written.inc(inserted)
        if dups:
            m.rows_duplicate.inc(dups)
        m.batch_messages.observe(n)
        m.commit_seconds.observe(elapsed)
        m.lag_seconds.observe(lag)
        m.buffered.set(self._pending)

    # -- lifecycle -------------------------------------------------------------------------

    def health(self) -> Health:
        with self._lock:
            pending = self._pending
            first = self._first_at if self._inbox else 0.0
        oldest = time.monotonic() - first if first else 0.0
        limit = self.cfg.http.health_max_commit_age_s
        stuck = bool(limit and oldest > limit)
        return Health(
            mqtt=self._mqtt_up,
            database=self._db_up and not stuck,
            buffered=pending,
            oldest_wait_s=round(oldest, 3),
            detail={
                "mqtt": {"connected": self._mqtt_up, "error": self._mqtt_error, "client_id": self.cfg.mqtt.client_id},
                "database": {"connected": self._db_up, "error": self._db_error},
                "stopping": self._stopping.is_set(),
            },
        )

    def start(self) -> None:
        self._deadline = float("inf")
        self._writer.start()
        m = self.cfg.mqtt
        kwargs: dict[str, Any] = {}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = m.session_expiry_s
            # The broker sends at most this many unacknowledged messages: our buffer bound in MQTT 5.
            props.ReceiveMaximum = m.receive_maximum
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s, **kwargs)
        self.client.loop_start()

    def stop(self) -> bool:
        """Flush, commit, acknowledge, disconnect. Returns True when everything received was committed
        and acknowledged within shutdown_timeout_s."""
        self._deadline = time.monotonic() + self.cfg.ingest.shutdown_timeout_s
        self._stopping.set()  # pauses socket reads; the writer drains the inbox and exits
        self._wake.set()
        self._writer_done.wait(max(0.0, self._deadline - time.monotonic()))
        # Let paho's thread write the queued PUBACKs before saying goodbye.
        while self.client.want_write() and time.monotonic() < self._deadline and self._mqtt_up:
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
        self.store.close()
        return self._flushed

    def run_forever(self) -> int:
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: flushing and stopping", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not stop.wait(0.5):
            if self._writer_done.is_set():
                log.error("writer stopped unexpectedly")
                break
        ok = self.stop()
        log.info("stopped (%s)", "all received messages committed and acknowledged" if ok else "NOT fully flushed")
        return 0 if ok else 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
