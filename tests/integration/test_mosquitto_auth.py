"""Provisioned accounts against the real Mosquitto over TLS: the files `export-mosquitto` renders are what
the broker enforces — credentials, disabling, and per-device topic isolation."""

from __future__ import annotations

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from ingest import provisioning as prov
from ingest.db import PsycopgSession
from tests.support.mosquitto import MosquittoBroker, MosquittoFactory, MqttProbe, password_line


def sync_broker(db: PsycopgSession, broker: MosquittoBroker) -> None:
    """What the deploy does: render both files from the database, install them, SIGHUP."""
    passwd, acl = prov.export_mosquitto(db)
    # Keep the harness's admin account so the test can observe traffic.
    admin = password_line(broker.admin_username, broker.admin_password)
    broker.write_passwords(passwd + admin)
    broker.write_acl(acl + f"\nuser {broker.admin_username}\ntopic readwrite #\n")
    broker.reload()


@pytest.fixture
def broker(mosquitto_factory: MosquittoFactory) -> MosquittoBroker:
    return mosquitto_factory(plain_listener=False)


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5])
def test_device_connects_with_its_credentials_and_a_wrong_password_is_refused(
    db: PsycopgSession, broker: MosquittoBroker, protocol: MQTTProtocolVersion
) -> None:
    creds = prov.add_device(db, "ESP32_001")
    sync_broker(db, broker)
    with MqttProbe(broker, creds.username, creds.password, client_id="ESP32_001", protocol=protocol) as ok:
        assert not ok.connect().is_failure
    with MqttProbe(broker, creds.username, creds.password + "x", protocol=protocol) as bad:
        assert bad.connect().is_failure


def test_disabled_and_rotated_credentials_are_refused_after_export(db: PsycopgSession, broker: MosquittoBroker) -> None:
    first = prov.add_device(db, "dev-1")
    second = prov.add_device(db, "dev-2")
    sync_broker(db, broker)

    prov.set_enabled(db, "dev-1", False)
    rotated = prov.rotate(db, "dev-2")
    sync_broker(db, broker)

    with MqttProbe(broker, first.username, first.password) as disabled:
        assert disabled.connect().is_failure
    with MqttProbe(broker, second.username, second.password) as old:
        assert old.connect().is_failure
    with MqttProbe(broker, rotated.username, rotated.password) as new:
        assert not new.connect().is_failure


def test_device_cannot_publish_or_subscribe_on_another_devices_topics(
    db: PsycopgSession, broker: MosquittoBroker
) -> None:
    a = prov.add_device(db, "A")
    b = prov.add_device(db, "B")
    sync_broker(db, broker)

    with (
        MqttProbe(broker, client_id="watcher") as watcher,
        MqttProbe(broker, a.username, a.password, client_id="A") as dev_a,
        MqttProbe(broker, b.username, b.password, client_id="B") as dev_b,
    ):
        for probe in (watcher, dev_a, dev_b):
            assert not probe.connect().is_failure
        assert not watcher.subscribe("devices/B/#")[0].is_failure

        # Subscriptions: Mosquitto 2.0's acl_file may grant the SUBACK and enforce `read` at delivery
        # (EMQX refuses the SUBACK); either way A must never receive what is meant for B.
        assert not dev_a.subscribe("devices/A/command")[0].is_failure
        for topic in ("devices/B/command", "devices/+/command", "devices/#", "#"):
            dev_a.subscribe(topic)
        watcher.publish("devices/B/command", b"meant-for-B")
        watcher.publish("devices/A/command", b"meant-for-A")
        got = dev_a.expect_message(timeout=5)
        assert (got.topic, got.payload) == ("devices/A/command", b"meant-for-A")
        # Overlapping filters (devices/#, #) may deliver A's own command again, never B's.
        assert {(m.topic, m.payload) for m in dev_a.received(timeout=0.5)} <= {("devices/A/command", b"meant-for-A")}
        assert [m.payload for m in watcher.received(timeout=0.5)] == [b"meant-for-B"]  # watcher sees B/#

        # A forged publish on B's topic is acknowledged to A (MQTT does not tell 3.1.1 clients) but
        # never delivered. B's own marker, published after A's PUBACK, must be the first thing seen.
        dev_a.publish("devices/B/telemetry", b'{"temp": -99}')
        dev_a.publish("devices/B/command", b"reboot")
        dev_b.publish("devices/B/telemetry", b'{"temp": 21}')
        first = watcher.expect_message(timeout=5)
        assert (first.topic, first.payload) == ("devices/B/telemetry", b'{"temp": 21}')
        assert watcher.received(timeout=0.5) == []

        # And A's own data topics work: the isolation is not just "everything denied".
        dev_a.publish("devices/A/telemetry", b'{"temp": 20}')
        with MqttProbe(broker, client_id="watcher-a") as watch_a:
            watch_a.connect()
            watch_a.subscribe("devices/A/#")
            dev_a.publish("devices/A/status", b"online")
            assert watch_a.expect_message(timeout=5).payload == b"online"
