"""Simulator pieces that need no broker: payload profiles, templates, input validation, the CLI's
one-line errors."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from simulator import cli
from simulator.config import BadInput, Broker, DeviceCreds, Faults, RunConfig, load_credentials
from simulator.payloads import Generic, PayloadError, Template, TemplateProfile, Thermalog, malformed, oversized


def cfg(n: int = 10, **kw: Any) -> RunConfig:
    devices = [DeviceCreds(f"d{i}", f"d{i}", "pw") for i in range(n)]
    base: dict[str, object] = {"broker": Broker.parse("mqtt://127.0.0.1:1883"), "devices": devices, "rate": 1.0}
    base["duration"] = 10.0
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


# -- profiles --------------------------------------------------------------------------------------


def test_thermalog_drifts_plausibly() -> None:
    p = Thermalog(random.Random(1))
    samples = [p.telemetry(1_700_000_000_000 + i * 10_000, i) for i in range(5000)]
    temps = [s["temperature"] for s in samples]
    steps = [abs(a - b) for a, b in itertools.pairwise(temps)]
    assert min(temps) > 10 and max(temps) < 32, "mean reversion keeps a room's temperature in range"
    assert max(steps) < 1.0, "a sensor reading every 10 s does not jump degrees"
    assert len(set(temps)) > 50, "but it does move"
    assert all(0 <= s["humidity"] <= 100 for s in samples)
    batteries = [s["battery"] for s in samples]
    assert batteries == sorted(batteries, reverse=True), "a battery only discharges"
    assert set(samples[0]) == {"ts", "temperature", "humidity", "battery"}


def test_generic_profile_has_numeric_metrics_only() -> None:
    s = Generic(random.Random(2)).telemetry(1_700_000_000_000, 5)
    assert len(s) >= 8 and all(isinstance(v, int | float) for v in s.values())


def test_template_placeholders_keep_types(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps(
            {
                "ts": "{{ts}}",
                "dev": "{{device_id}}",
                "label": "sensor {{device_id}} #{{seq}}",
                "t": "{{walk:10:20}}",
                "r": "{{rand:0:1}}",
                "n": "{{randint:1:3}}",
                "mode": "{{choice:eco|boost}}",
                "nested": [{"iso": "{{iso}}"}, 7],
            }
        )
    )
    p = TemplateProfile(random.Random(3), Template.load(path), "dev-7")
    first = p.telemetry(1_700_000_000_123, 1)
    assert first["ts"] == 1_700_000_000_123 and first["dev"] == "dev-7" and first["label"] == "sensor dev-7 #1"
    assert 10 <= first["t"] <= 20 and 0 <= first["r"] <= 1 and first["n"] in (1, 2, 3)
    assert first["mode"] in ("eco", "boost") and first["nested"] == [{"iso": "2023-11-14T22:13:20.123Z"}, 7]
    walk = [p.telemetry(0, i)["t"] for i in range(200)]
    assert all(10 <= w <= 20 for w in walk) and max(abs(a - b) for a, b in itertools.pairwise(walk)) < 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "is not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"x": "{{nope}}"}', "unknown template placeholder"),
        ('{"x": "{{rand:5}}"}', "takes 2 argument"),
        ('{"x": "{{rand:9:1}}"}', "MIN is greater than MAX"),
        ('{"x": "{{rand:a:1}}"}', "is not a number"),
    ],
)
def test_bad_templates_are_refused_with_a_reason(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(PayloadError, match=needle):
        Template.load(path)


def test_fault_payloads() -> None:
    rng = random.Random(4)
    bad = {malformed(rng, 1) for _ in range(200)}
    assert len(bad) >= 4
    for payload in bad:
        try:
            doc = json.loads(payload)
        except ValueError:
            continue
        assert not isinstance(doc, dict) or not isinstance(doc.get("ts"), int)
    big = oversized(1, 5000)
    assert len(big) == 5000 and json.loads(big)["ts"] == 1


# -- configuration ------------------------------------------------------------------------------------


def test_broker_urls() -> None:
    assert Broker.parse("mqtts://h.example") == Broker("h.example", 8883, True)
    assert Broker.parse("mqtt://10.0.0.1:1999") == Broker("10.0.0.1", 1999, False)
    for bad in ("http://x", "mqtts://", "mqtt://h:99999", "mqtt://h/path"):
        with pytest.raises(BadInput):
            Broker.parse(bad)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"rate": 0.0}, "--rate 0 is out of range"),
        ({"rate": 1000.0}, "minimum is 0.05s"),
        ({"duration": 0.0}, "--duration"),
        ({"qos": 2}, "--qos"),
        ({"faults": Faults(malformed=2)}, "--fault-malformed 2"),
        ({"faults": Faults(storm=100)}, "--fault-storm"),
        ({"cert": Path("c.pem")}, "--cert and --key go together"),
        ({"ca": Path("ca.pem")}, "is not TLS"),
    ],
)
def test_range_checks(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(BadInput, match=needle):
        cfg(**kw).validate()


def test_cross_topic_needs_a_victim() -> None:
    with pytest.raises(BadInput, match="at least 2 devices"):
        cfg(1, faults=Faults(cross_topic=0.1)).validate()


def test_missing_ca_and_junk_ca(tmp_path: Path) -> None:
    tls = Broker.parse("mqtts://127.0.0.1")
    with pytest.raises(BadInput, match="No such file"):
        cfg(broker=tls, ca=tmp_path / "none.pem").ssl_context()
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(BadInput, match="no usable PEM"):
        cfg(broker=tls, ca=junk).ssl_context()


def test_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"device_id": "a", "username": "a", "password": "p", "hash_algorithm": "sha256"}]))
    assert load_credentials(path) == [DeviceCreds("a", "a", "p")]
    for doc, needle in (
        ({"a": 1}, "JSON array"),
        ([{"username": "a"}], "lacks a username or password"),
        ([{"username": "a", "password": "p"}] * 2, "appears twice"),
        ([{"device_id": "a/b", "username": "a", "password": "p"}], "unusable device_id"),
        ([], "holds no credentials"),
    ):
        path.write_text(json.dumps(doc))
        with pytest.raises(BadInput, match=needle):
            load_credentials(path)
    with pytest.raises(BadInput, match="no such file"):
        load_credentials(tmp_path / "missing.json")


# -- CLI -------------------------------------------------------------------------------------------------


def test_usage_errors_are_one_line_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--broker", "mqtt://x", "--devices", "f", "--duration", "soon"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a duration" in err


def test_help_explains_faults_and_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    for needle in ("--from-db", "--credentials-out", "0x87", "--fault-storm", "exit codes", "--expect-rate"):
        assert needle in text


def test_durations() -> None:
    assert cli._duration("20") == 20 and cli._duration("20s") == 20 and cli._duration("5m") == 300
    assert cli._duration("1.5h") == 5400 and cli._duration("250ms") == 0.25


def test_from_db_requires_a_credentials_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["run", "--broker", "mqtt://127.0.0.1:1", "--from-db", "host=127.0.0.1 dbname=x", "--count", "2"])
    assert rc == 2 and "--credentials-out" in capsys.readouterr().err


def test_connack_receive_maximum_is_found_among_other_properties() -> None:
    from simulator.engine import _receive_maximum, _skip_properties
    from simulator.wire import utf8, varint

    def block(props: bytes) -> bytes:
        return b"\x00\x00" + varint(len(props)) + props  # CONNACK flags, reason, then the properties

    props = (
        b"\x11\x00\x00\x00\x3c"  # session expiry interval
        + b"\x12"
        + utf8("assigned")  # assigned client identifier
        + b"\x26"
        + utf8("k")
        + utf8("v")  # user property
        + b"\x0b\x80\x01"  # a variable byte integer property
        + b"\x21\x00\x0a"  # receive maximum 10
        + b"\x22\x00\x05"  # topic alias maximum
    )
    buf = block(props)
    assert _receive_maximum(buf, 2) == 10 and _skip_properties(buf, 2) == len(buf)
    assert _receive_maximum(block(b""), 2) == 65535
    assert _receive_maximum(block(b"\x22\x00\x05"), 2) == 65535
