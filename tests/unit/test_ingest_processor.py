"""The ingest hot path without services: payload rules, COPY encoding, and a hypothesis fuzz."""

from __future__ import annotations

import json
import math
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import SCHEMA, IngestConfig
from ingest.service.processor import COPY_HEADER, COPY_TRAILER, PG_EPOCH_US, Catalog, Processor, loads, parse_timestamp

CFG = IngestConfig(**{k: v.default for k, v in SCHEMA["ingest"].items()})
NOW_US = 1_800_000_000_000_000
ROW = struct.Struct(">hiqiiihid")


def make(max_metrics: int = 10) -> Processor:
    created: dict[str, int] = {"temp": 1}

    def create(name: str) -> int | None:
        if name not in created and len(created) >= max_metrics:
            return None
        return created.setdefault(name, len(created) + 1)

    cat = Catalog(CFG, lambda d: (99, False) if d == "late" else None, create)
    cat.load([("d1", 7, False), ("off", 8, True)], [("temp", 1)], "devices")
    return Processor(CFG, cat)


def rows(buf: bytes) -> list[tuple[int, int, int, float]]:
    assert buf.startswith(COPY_HEADER) and buf.endswith(COPY_TRAILER)
    body = buf[len(COPY_HEADER) : -2]
    out = []
    for i in range(0, len(body), ROW.size):
        n, _, t, _, dev, _, metric, _, value = ROW.unpack_from(body, i)
        assert n == 4
        out.append((t, dev, metric, value))
    return out


def test_valid_message_encodes_binary_copy_rows() -> None:
    ts_ms = NOW_US // 1000 - 5000
    b = make().process([(b"devices/d1/telemetry", json.dumps({"ts": ts_ms, "temp": 21.5, "hum": 40}).encode(), 1)],
                       now_us=NOW_US)  # fmt: skip
    assert not b.rejected and b.rows == 2
    assert rows(bytes(b.copy)) == [(ts_ms * 1000 - PG_EPOCH_US, 7, 1, 21.5), (ts_ms * 1000 - PG_EPOCH_US, 7, 2, 40.0)]
    assert b.seen == {7: ts_ms * 1000 - PG_EPOCH_US}


def test_timestamps_iso_seconds_milliseconds_naive_is_utc() -> None:
    assert parse_timestamp("2026-01-01T00:00:00Z") == 1_767_225_600_000_000
    assert parse_timestamp("2026-01-01T00:00:00") == 1_767_225_600_000_000
    assert parse_timestamp("2026-01-01T01:00:00+01:00") == 1_767_225_600_000_000
    assert parse_timestamp(1_767_225_600) == 1_767_225_600_000_000
    assert parse_timestamp(1_767_225_600_000) == 1_767_225_600_000_000
    assert parse_timestamp(1_767_225_600.5) == 1_767_225_600_500_000


def test_payloads_without_ts_get_strictly_increasing_times() -> None:
    p = make()
    b = p.process([(b"devices/d1/telemetry", b'{"temp": 1}', 1), (b"devices/d1/telemetry", b'{"temp": 2}', 2)],
                  now_us=NOW_US)  # fmt: skip
    times = [r[0] for r in rows(bytes(b.copy))]
    assert len(set(times)) == 2


def test_late_provisioned_device_found_on_cache_miss_and_rejections_roll_back_rows() -> None:
    p = make(max_metrics=2)
    ok = json.dumps({"ts": NOW_US // 1000, "temp": 1}).encode()
    bad = json.dumps({"ts": NOW_US // 1000, "temp": 1, "x": "str"}).encode()
    items = [
        (b"devices/late/telemetry", ok, 1),
        (b"devices/d1/telemetry", bad, 2),
        (b"devices/off/telemetry", ok, 3),
        (b"devices/nope/telemetry", ok, 4),
        (b"devices/d1/telemetry", b'{"a": 1, "b": 2}', 5),
        (b"other/topic", ok, 6),
    ]
    b = p.process(items, now_us=NOW_US)
    assert [r[1] for r in rows(bytes(b.copy))] == [99]  # only the late device's row; the bad one rolled back
    assert [r[1] for r in b.rejected] == [
        "non_numeric_value", "device_disabled", "unknown_device", "metric_cap_reached", "unknown_topic"
    ]  # fmt: skip


def test_loads_matches_json_loads_on_utf8() -> None:
    for text in ['{"a": 1}', "  [1, 2] \n", '"x"', "1e5", '{"a": NaN}']:
        assert repr(loads(text.encode())) == repr(json.loads(text))
    for bad in [b"", b"   ", b"{} x", b"{", b"\xff"]:
        try:
            loads(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


@settings(max_examples=400, deadline=None)
@given(payload=st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
))  # fmt: skip
def test_fuzz_exactly_one_outcome_never_raises(payload: bytes) -> None:
    for topic in (b"devices/d1/telemetry", b"devices/d1/status", b"devices/d1/heartbeat"):
        b = make().process([(topic, payload, 1)], now_us=NOW_US)
        accepted = bool(b.rows) or bool(b.statuses) or (topic.endswith(b"heartbeat") and bool(b.seen))
        assert accepted != bool(b.rejected), (topic, payload, b.rejected)
        assert len(b.rejected) <= 1
        if b.rows:
            assert all(math.isfinite(v) for *_, v in rows(bytes(b.copy)))
        for _topic, _reason, detail, stored, size in b.rejected:
            assert "\x00" not in detail and size == len(payload) and stored == payload[:4096]
            detail.encode("utf-8")  # storable as PostgreSQL text


def test_status_kept_per_device_latest_wins() -> None:
    b = make().process([(b"devices/d1/status", b'{"status": "online", "ts": %d}' % (NOW_US // 1000 - 10), 1),
                        (b"devices/d1/status", b"offline", 2)], now_us=NOW_US)  # fmt: skip
    assert b.statuses[7][0] == "offline" and not b.rejected
