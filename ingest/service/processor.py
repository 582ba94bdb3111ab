"""Turn a batch of raw MQTT messages into binary COPY rows, status/heartbeat updates and rejections.

This is the hot path: per message it does a dict lookup of the topic, one ``json.loads`` and, per
field, a type check, a dict lookup of the metric id and one ``struct.pack`` straight into the COPY
buffer. No per-row Python objects are kept; a message that turns out bad half-way is rolled back by
truncating the buffer to where the message started.

Database look-ups (unknown device, new metric name) go through the :class:`Catalog` callbacks and
happen only on cache misses.
"""

from __future__ import annotations

import json
import json.scanner
import math
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ingest.config import IngestConfig

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00:00Z in Unix microseconds
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"
# One telemetry tuple: 4 fields; time int8 (us since 2000), device int4, metric int2, value float8.
_ROW = struct.Struct(">hiqiiihid")
_pack_row = _ROW.pack
MAX_REJECTED_PAYLOAD = 4096  # rejected_messages.payload CHECK (octet_length <= 4096)
_METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# json.loads(bytes) costs three Python-level calls (encoding detection, decode, raw_decode) and two
# regex matches around the C scanner; calling the scanner directly halves the decode cost.
# Stricter on one point: payloads must be UTF-8 (UTF-16/32 JSON is rejected as invalid_json).
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_JSON_WS = " \t\n\r"


def loads(payload: bytes) -> object:
    """json.loads for UTF-8 bytes; raises ValueError (including UnicodeDecodeError) or RecursionError."""
    s = payload.decode()
    if s[:1] in _JSON_WS:  # '' is in any string: the empty payload goes to the scanner and fails there
        s = s.lstrip(_JSON_WS)
    try:
        obj, end = _scan_once(s, 0)
    except StopIteration:
        raise ValueError("Expecting value: line 1 column 1 (char 0)") from None
    if end != len(s) and s[end:].strip(_JSON_WS):
        raise ValueError(f"Extra data at char {end}")
    return obj


KIND_TELEMETRY, KIND_STATUS, KIND_HEARTBEAT = 0, 1, 2
KIND_NAMES = ("telemetry", "status", "heartbeat")
_KINDS = {b"telemetry": KIND_TELEMETRY, b"status": KIND_STATUS, b"heartbeat": KIND_HEARTBEAT}
UNKNOWN, DISABLED = -1, -2
_MS_THRESHOLD = 100_000_000_000  # epoch numbers above this are milliseconds (1e11 s is year 5138)


_MISSING = object()


class Reject(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Batch:
    """What one transaction writes."""

    copy: bytearray = field(default_factory=lambda: bytearray(COPY_HEADER))
    rows: int = 0
    statuses: dict[int, tuple[str, int]] = field(default_factory=dict)  # device -> (status, time us)
    seen: dict[int, int] = field(default_factory=dict)  # device -> latest time (pg us)
    rejected: list[tuple[str, str, str, bytes, int]] = field(default_factory=list)
    received: list[int] = field(default_factory=lambda: [0, 0, 0])
    reject_counts: dict[str, int] = field(default_factory=dict)

    def reject(self, topic: bytes, payload: bytes, reason: str, detail: str = "") -> None:
        self.rejected.append(
            (
                _text(topic.decode("utf-8", "replace")),
                reason,
                _text(detail[:500]),
                payload[:MAX_REJECTED_PAYLOAD],
                len(payload),
            )
        )
        self.reject_counts[reason] = self.reject_counts.get(reason, 0) + 1


def _text(s: str) -> str:
    """PostgreSQL text can hold neither NUL nor lone surrogates (from JSON escapes like \\ud800);
    either would fail the whole batch's transaction."""
    if s.isascii():
        return s.replace("\x00", "\\x00")
    return s.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


class Catalog:
    """Device and metric ids with bounded caches. ``lookup_device(device_id)`` returns
    (id, disabled) or None; ``create_metric(name)`` returns an id, or None at the cap."""

    def __init__(
        self,
        cfg: IngestConfig,
        lookup_device: Callable[[str], tuple[int, bool] | None],
        create_metric: Callable[[str], int | None],
    ) -> None:
        self.cfg = cfg
        self._lookup_device = lookup_device
        self._create_metric = create_metric
        self.topics: dict[bytes, tuple[int, int]] = {}  # topic -> (kind, device id | UNKNOWN | DISABLED)
        self.metrics: dict[str, int] = {}
        self._refused_metrics: dict[str, float] = {}  # name -> until (negative cache at the cap)
        self.prefix = b""

    def load(self, devices: list[tuple[str, int, bool]], metrics: list[tuple[str, int]], prefix: str) -> None:
        """Replace the caches (startup and every device_refresh_s)."""
        self.prefix = prefix.encode() + b"/"
        topics: dict[bytes, tuple[int, int]] = {}
        limit = self.cfg.device_cache_size
        for device_id, pk, disabled in devices[:limit]:
            base = self.prefix + device_id.encode() + b"/"
            value = DISABLED if disabled else pk
            for name, kind in _KINDS.items():
                topics[base + name] = (kind, value)
        self.topics = topics
        self.metrics = dict(metrics)
        self._refused_metrics.clear()

    def resolve_topic(self, topic: bytes) -> tuple[int, int]:
        """Cache miss: parse the topic and ask the database. Unknown topics get kind -1."""
        parts = topic.split(b"/")
        if len(parts) != 3 or parts[0] + b"/" != self.prefix or parts[2] not in _KINDS:
            return (-1, UNKNOWN)
        kind = _KINDS[parts[2]]
        try:
            device_id = parts[1].decode()
        except UnicodeDecodeError:
            return (kind, UNKNOWN)
        if not _DEVICE_ID.match(device_id):
            return (kind, UNKNOWN)
        found = self._lookup_device(device_id)
        value = UNKNOWN if found is None else (DISABLED if found[1] else found[0])
        if len(self.topics) >= 3 * self.cfg.device_cache_size:
            # Bounded: drop the oldest entry (dicts keep insertion order); a miss costs one query.
            del self.topics[next(iter(self.topics))]
        self.topics[topic] = (kind, value)
        return (kind, value)

    def metric_id(self, name: str) -> int:
        if not _METRIC_NAME.match(name):
            raise Reject("invalid_metric_name", name[:100])
        now = time.monotonic()
        if self._refused_metrics.get(name, 0.0) > now:
            raise Reject("metric_cap_reached", name)
        mid = self._create_metric(name)
        if mid is None:
            if len(self._refused_metrics) > 10_000:
                self._refused_metrics.clear()
            self._refused_metrics[name] = now + 60.0
            raise Reject("metric_cap_reached", name)
        self.metrics[name] = mid
        return mid


def parse_timestamp(value: object) -> int:
    """Unix microseconds from an ISO 8601 string or epoch seconds/milliseconds."""
    t = type(value)
    if t is int or t is float:
        v: float = value  # type: ignore[assignment]
        if not math.isfinite(v):
            raise Reject("invalid_timestamp", repr(value))
        if abs(v) >= _MS_THRESHOLD:
            return int(v) * 1000 if t is int else round(v * 1000)
        return int(v) * 1_000_000 if t is int else round(v * 1_000_000)
    if t is str:
        s: str = value  # type: ignore[assignment]
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise Reject("invalid_timestamp", s[:100]) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)  # documented: naive timestamps are UTC
        delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    raise Reject("invalid_timestamp", f"{t.__name__} {str(value)[:100]}")


class Processor:
    def __init__(self, cfg: IngestConfig, catalog: Catalog) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self._last_auto = 0

    def process(self, items: list[tuple[bytes, bytes, int]], now_us: int | None = None) -> Batch:
        """Messages (topic, payload, mid) -> one Batch. Never raises for bad input; database errors
        from the catalog's look-ups propagate (the caller retries the whole batch)."""
        batch = Batch()
        if now_us is None:
            now_us = time.time_ns() // 1000
        lo = now_us - self.cfg.max_past_s * 1_000_000
        hi = now_us + self.cfg.max_future_s * 1_000_000
        now_pg = now_us - PG_EPOCH_US
        topics = self.catalog.topics
        metrics = self.catalog.metrics
        resolve_topic = self.catalog.resolve_topic
        metric_id = self.catalog.metric_id
        buf = batch.copy
        received = batch.received
        seen = batch.seen
        max_payload = self.cfg.max_payload_bytes
        max_fields = self.cfg.max_fields
        rows = 0
        for topic, payload, _mid in items:
            entry = topics.get(topic)
            if entry is None:
                entry = resolve_topic(topic)
            kind, dev = entry
            if kind < 0:
                batch.reject(topic, payload, "unknown_topic")
                continue
            received[kind] += 1
            if dev < 0:
                batch.reject(topic, payload, "unknown_device" if dev == UNKNOWN else "device_disabled")
                continue
            if len(payload) > max_payload:
                batch.reject(topic, payload, "payload_too_large", f"{len(payload)} > {max_payload} bytes")
                continue
            if kind != KIND_TELEMETRY:
                self._control(batch, topic, payload, kind, dev, lo, hi, now_pg)
                continue
            try:
                obj = loads(payload)
            except (ValueError, RecursionError) as exc:
                batch.reject(topic, payload, "invalid_json", str(exc)[:200])
                continue
            if type(obj) is not dict:
                batch.reject(topic, payload, "not_an_object", type(obj).__name__)
                continue
            mark = len(buf)
            try:
                ts = obj.pop("ts", _MISSING)
                if ts is _MISSING:
                    # No device timestamp: the receive time, strictly increasing per process, so that
                    # two such readings of one device in one batch do not collapse on the unique key.
                    t = self._last_auto + 1 if self._last_auto >= now_pg else now_pg
                    self._last_auto = t
                else:
                    us = parse_timestamp(ts)
                    if us < lo or us > hi:
                        raise Reject("timestamp_out_of_range", str(ts)[:100])
                    t = us - PG_EPOCH_US
                n = len(obj)
                if n == 0:
                    raise Reject("no_values")
                if n > max_fields:
                    raise Reject("too_many_fields", f"{n} > {max_fields}")
                for name, value in obj.items():
                    vt = type(value)
                    if vt is float:
                        if value - value != 0.0:  # inf - inf and nan - nan are nan
                            raise Reject("non_finite_value", name[:100])
                    elif vt is int:
                        if not -1.7e308 < value < 1.7e308:
                            raise Reject("non_finite_value", name[:100])
                    else:
                        raise Reject("non_numeric_value", f"{name[:100]}: {vt.__name__}")
                    m = metrics.get(name)
                    if m is None:
                        m = metric_id(name)
                    buf += _pack_row(4, 8, t, 4, dev, 2, m, 8, value)
            except Reject as r:
                del buf[mark:]
                batch.reject(topic, payload, r.reason, r.detail)
                continue
            rows += n
            if seen.get(dev, -1) < t:
                seen[dev] = t
        buf += COPY_TRAILER
        batch.rows = rows
        return batch

    def _control(
        self, batch: Batch, topic: bytes, payload: bytes, kind: int, dev: int, lo: int, hi: int, now_pg: int
    ) -> None:
        """status: text or {"status": "...", "ts": ...}; heartbeat: empty, text, or {"ts": ...}."""
        t = now_pg
        status: str | None = None
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            batch.reject(topic, payload, "invalid_status" if kind == KIND_STATUS else "invalid_json", "not UTF-8")
            return
        try:
            if text.startswith("{"):
                try:
                    obj = loads(payload)
                except (ValueError, RecursionError) as exc:
                    raise Reject("invalid_json", str(exc)[:200]) from None
                if type(obj) is not dict:
                    raise Reject("not_an_object")
                ts = obj.get("ts", _MISSING)
                if ts is not _MISSING:
                    us = parse_timestamp(ts)
                    if us < lo or us > hi:
                        raise Reject("timestamp_out_of_range", str(ts)[:100])
                    t = us - PG_EPOCH_US
                if kind == KIND_STATUS:
                    s = obj.get("status")
                    if type(s) is not str:
                        raise Reject("invalid_status", "object without a string 'status'")
                    status = s
            elif kind == KIND_STATUS:
                status = text
            if status is not None and (
                not status or len(status) > self.cfg.status_max_length or not status.isprintable()
            ):
                raise Reject("invalid_status", status[:100])
        except Reject as r:
            batch.reject(topic, payload, r.reason, r.detail)
            return
        if status is not None:
            prev = batch.statuses.get(dev)
            if prev is None or prev[1] <= t:
                batch.statuses[dev] = (status, t)
        if batch.seen.get(dev, -1) < t:
            batch.seen[dev] = t


def pg_us_to_datetime(t: int) -> datetime:
    return datetime.fromtimestamp((t + PG_EPOCH_US) / 1_000_000, tz=UTC)
