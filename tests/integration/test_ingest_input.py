"""Bad input: every malformed message yields exactly one rejected_messages row with its reason, a
counter, and an acknowledgement; valid messages in the same stream still land; /metrics agrees."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from ingest.db import PsycopgSession
from ingest.provisioning import set_enabled
from tests.support.ingest_proc import IngestEnv, IngestEnvFactory, IngestProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DEVICES = ["good1", "good2", "off1"]
NOW_MS = int(time.time() * 1000)
T = f'"ts":{NOW_MS}'


def j(text: str) -> bytes:
    return text.encode()


# (topic device, topic kind, payload, expected reason)
MALFORMED: list[tuple[str, str, bytes, str]] = [
    ("good1", "telemetry", b"", "invalid_json"),
    ("good1", "telemetry", b"{", "invalid_json"),
    ("good1", "telemetry", b"not json", "invalid_json"),
    ("good1", "telemetry", b"\xff\xfe\x00garbage", "invalid_json"),
    ("good1", "telemetry", b'{"temp": 1,}', "invalid_json"),
    ("good1", "telemetry", b"[" * 2000 + b"]" * 2000, "invalid_json"),  # deep nesting: RecursionError
    ("good1", "telemetry", b"[1, 2, 3]", "not_an_object"),
    ("good1", "telemetry", b"42", "not_an_object"),
    ("good1", "telemetry", b'"a string"', "not_an_object"),
    ("good1", "telemetry", b"null", "not_an_object"),
    ("good1", "telemetry", j(f'{{{T}, "temp": "22.5"}}'), "non_numeric_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": true}}'), "non_numeric_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": null}}'), "non_numeric_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": [1]}}'), "non_numeric_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": {{"v": 1}}}}'), "non_numeric_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": NaN}}'), "non_finite_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": Infinity}}'), "non_finite_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": -Infinity}}'), "non_finite_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": 1e999}}'), "non_finite_value"),
    ("good1", "telemetry", j(f'{{{T}, "temp": {10**400}}}'), "non_finite_value"),
    ("good1", "telemetry", j(f'{{"ts": {NOW_MS + 86_400_000}, "temp": 1}}'), "timestamp_out_of_range"),
    ("good1", "telemetry", b'{"ts": "2001-01-01T00:00:00Z", "temp": 1}', "timestamp_out_of_range"),
    ("good1", "telemetry", b'{"ts": 946684800, "temp": 2}', "timestamp_out_of_range"),
    ("good1", "telemetry", b'{"ts": "yesterday", "temp": 1}', "invalid_timestamp"),
    ("good1", "telemetry", b'{"ts": true, "temp": 1}', "invalid_timestamp"),
    ("good1", "telemetry", b'{"ts": null, "temp": 1}', "invalid_timestamp"),
    ("good1", "telemetry", b'{"ts": [1], "temp": 1}', "invalid_timestamp"),
    ("good1", "telemetry", j(f"{{{T}}}"), "no_values"),
    ("good1", "telemetry", b"{}", "no_values"),
    ("good1", "telemetry", j("{" + T + "," + ",".join(f'"f{i}": {i}' for i in range(20)) + "}"), "too_many_fields"),
    ("good1", "telemetry", j(f'{{{T}, "bad name": 1}}'), "invalid_metric_name"),
    ("good1", "telemetry", j(f'{{{T}, "1abc": 1}}'), "invalid_metric_name"),
    ("good1", "telemetry", j(f'{{{T}, "x\\u0000y": 1}}'), "invalid_metric_name"),
    ("good1", "telemetry", j(f'{{{T}, "\\ud800": 1}}'), "invalid_metric_name"),
    ("good1", "telemetry", j(f'{{{T}, "' + "m" * 65 + '": 1}'), "invalid_metric_name"),
    ("good1", "telemetry", j(f'{{{T}, "brand_new_metric": 1}}'), "metric_cap_reached"),
    ("good1", "telemetry", b'{"temp": 1, "pad": "' + b"x" * 5000 + b'"}', "payload_too_large"),
    ("nosuch", "telemetry", j(f'{{{T}, "temp": 1}}'), "unknown_device"),
    ("bad%20id", "telemetry", j(f'{{{T}, "temp": 2}}'), "unknown_device"),
    ("off1", "telemetry", j(f'{{{T}, "temp": 1}}'), "device_disabled"),
    ("good1", "status", b"", "invalid_status"),
    ("good1", "status", b"x" * 100, "invalid_status"),
    ("good1", "status", b'{"state": "online"}', "invalid_status"),
    ("good1", "status", b"line\nbreak", "invalid_status"),
    ("good1", "heartbeat", b'{"ts": "soon"}', "invalid_timestamp"),
]


def _valid(i: int) -> tuple[str, bytes]:
    dev = DEVICES[i % 2]
    return f"devices/{dev}/telemetry", j(f'{{"ts": {NOW_MS - 10_000 + i}, "temp": {i}.5, "hum": {i}}}')


@pytest.fixture
def env(ingest_env: IngestEnvFactory, migrated_dsn: str) -> IngestEnv:
    e = ingest_env(DEVICES, max_inflight_messages=1000, max_queued_messages=0)
    session = PsycopgSession.connect(migrated_dsn)
    try:
        set_enabled(session, "off1", False)
        # The metric cap below is 2: these two exist, any third name is refused.
        session.execute("INSERT INTO metrics (name) VALUES ('temp'), ('hum')")
    finally:
        session.close()
    return e


@pytest.fixture
def ingest(env: IngestEnv) -> Iterator[IngestProcess]:
    proc = env.process(
        ingest={"batch_max_messages": 500, "batch_max_wait_ms": 20, "max_fields": 16, "max_metrics": 2,
                "max_payload_bytes": 4096, "max_past_s": 86_400, "max_future_s": 300},
    )  # fmt: skip
    proc.start()
    yield proc
    proc.kill()


def _metrics(proc: IngestProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(proc.metrics_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_malformed_table_each_one_rejected_row_valid_ones_land_and_metrics_match(
    env: IngestEnv, ingest: IngestProcess
) -> None:
    assert len(MALFORMED) >= 30
    stream: list[tuple[str, bytes]] = []
    valid = 0
    for i, (dev, kind, payload, _reason) in enumerate(MALFORMED):
        stream.append(_valid(i))  # interleaved: bad neighbours must not take good messages down
        valid += 1
        stream.append((f"devices/{dev}/{kind}", payload))
    stream += [("devices/good2/status", b"online"), ("devices/good1/heartbeat", b"")]
    with env.publisher() as pub:
        pub.publish_many(stream)

    n_rej = env.wait_count(len(MALFORMED), "SELECT count(*) FROM rejected_messages")
    assert env.wait_count(2 * valid) == 2 * valid, ingest.log_tail()
    time.sleep(0.3)
    assert n_rej == len(MALFORMED) == env.count("SELECT count(*) FROM rejected_messages")
    rows = env.query("SELECT topic, reason, payload, payload_size FROM rejected_messages ORDER BY id")
    for (dev, kind, payload, reason), (topic, got_reason, stored, size) in zip(MALFORMED, rows, strict=True):
        assert (topic, got_reason) == (f"devices/{dev}/{kind}", reason), payload[:80]
        assert size == len(payload)
        assert bytes(stored) == payload[:4096]
    assert env.query("SELECT status FROM devices WHERE device_id = 'good2'") == [("online",)]
    assert env.count("SELECT count(*) FROM devices WHERE last_seen_at IS NOT NULL") == 2
    assert env.count("SELECT count(*) FROM metrics") == 2, "the metric cap let a new name through"

    # /metrics parses and its counters match what was sent.
    m = _metrics(ingest)
    expected = Counter(reason for *_, reason in MALFORMED)
    for reason, count in expected.items():
        assert m[("ingest_messages_rejected_total", (("reason", reason),))] == count, reason
    kinds = Counter(kind for _d, kind, _p, _r in MALFORMED)
    assert m[("ingest_messages_received_total", (("kind", "telemetry"),))] == valid + kinds["telemetry"]
    assert m[("ingest_messages_received_total", (("kind", "status"),))] == kinds["status"] + 1
    assert m[("ingest_messages_received_total", (("kind", "heartbeat"),))] == kinds["heartbeat"] + 1
    assert m[("ingest_messages_committed_total", ())] == len(stream)
    assert m[("ingest_telemetry_rows_written_total", ())] == 2 * valid
    assert m[("ingest_batch_messages_count", ())] >= 1
    assert m[("ingest_up", (("peer", "database"),))] == 1


def _oracle(payload: bytes) -> bool:
    """Independent statement of the rules: True when the payload must be accepted."""
    if len(payload) > 4096:
        return False
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return False
    if not isinstance(obj, dict):
        return False
    ts = obj.pop("ts", NOW_MS)
    # The service's window is [now - max_past_s, now + max_future_s]; the strategies stay well inside
    # it (+-120 s) or far outside it (random numbers), so the clock's progress does not matter.
    if type(ts) is not int or not NOW_MS - 86_400_000 < ts < NOW_MS + 300_000:
        return False
    if not obj or len(obj) > 16:
        return False
    for name, value in obj.items():
        if name not in ("temp", "hum"):
            return False
        if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > 1.7e308:
            return False
    return True


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
payloads = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"ts": st.integers(NOW_MS - 120_000, NOW_MS + 120_000)},
        optional={
            "temp": st.floats(allow_nan=True) | st.integers() | st.text(max_size=3),
            "hum": st.floats(-1e6, 1e6) | st.booleans(),
            "other": st.floats(),
        },
    ).map(lambda d: json.dumps(d).encode()),
)


# Generation only, derandomized: shrinking against real services would take many minutes, and CI
# must be reproducible. The unit-level fuzz (tests/unit/test_ingest_processor.py) explores far more.
@settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(payloads, min_size=20, max_size=60))
def test_fuzzed_payloads_exactly_one_outcome_each_service_survives(
    env: IngestEnv, ingest: IngestProcess, batch: list[bytes]
) -> None:
    before_rej = env.count("SELECT count(*) FROM rejected_messages")
    sentinel = float(time.monotonic_ns())
    with env.publisher() as pub:
        pub.publish_many([("devices/good1/telemetry", p) for p in batch])
        # One subscriber gets messages in order: once the sentinel is in, the whole batch is.
        pub.publish_many([("devices/good2/telemetry", j(f'{{"temp": {sentinel!r}}}'))])
    sql = f"SELECT count(*) FROM telemetry WHERE value = {sentinel!r}"
    assert env.wait_count(1, sql, timeout=20) == 1, ingest.log_tail()
    rejected = Counter(
        bytes(r[0]) for r in env.query("SELECT payload FROM rejected_messages ORDER BY id OFFSET %s", [before_rej])
    )
    assert rejected == Counter(p for p in batch if not _oracle(p))
    assert ingest.health()[0] == 200
