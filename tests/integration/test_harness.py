"""Proof that the service fixtures in tests/conftest.py do what later tests rely on."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from paho.mqtt.enums import MQTTProtocolVersion

from tests.conftest import PgDatabase
from tests.support.mosquitto import MosquittoBroker, MosquittoFactory, MqttProbe, password_file
from tests.support.pki import CertificateAuthority, KeyType, PkiFiles, create_pki
from tests.support.ports import free_port, free_ports
from tests.support.postgres import PREFERRED_MAJOR, PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NOT_AUTHORIZED = 0x87  # MQTT 5 reason code; paho maps MQTT 3.1.1 CONNACK rc 5 onto it too


# -- ports and PKI ------------------------------------------------------------------------------


def test_free_ports_are_never_handed_out_twice() -> None:
    ports = [*free_ports(50), free_port()]
    assert len(set(ports)) == len(ports)
    assert all(1024 < p < 65536 for p in ports)


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_pki_issues_loopback_server_cert_and_private_keys_0600(tmp_path: Path, key_type: KeyType) -> None:
    files = create_pki(tmp_path, key_type=key_type)
    for key in (files.ca_key, files.server_key, files.client.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # The key matches the certificate (what a TLS server checks when loading them).
    ssl.create_default_context().load_cert_chain(str(files.server_cert), str(files.server_key))


# -- PostgreSQL ---------------------------------------------------------------------------------


def test_pg_password_login_over_tcp(pg_server: PostgresServer, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        version = conn.execute("SELECT version()").fetchone()
        server_addr = conn.execute("SELECT inet_server_addr()::text").fetchone()
        dbname = conn.info.dbname
    assert version is not None
    assert version[0].startswith(f"PostgreSQL {pg_server.major_version}.")
    if Path(f"/usr/lib/postgresql/{PREFERRED_MAJOR}/bin").is_dir():
        assert pg_server.major_version == PREFERRED_MAJOR
    assert server_addr == ("127.0.0.1/32",)  # TCP, not the unix socket

    wrong = pg_server.dsn(dbname, user=pg_server.superuser, password="wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5).close()


_seen_databases: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
def test_pg_each_test_gets_its_own_database(pg_database: PgDatabase, pg_admin_dsn: str, run: int) -> None:
    # Symmetric on purpose: whichever run goes first, the second must not see its table.
    with psycopg.connect(pg_database.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.leak_probe')").fetchone() == (None,)
        conn.execute("CREATE TABLE leak_probe (run int)")
        conn.execute("INSERT INTO leak_probe VALUES (%s)", (run,))
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        for previous in _seen_databases:
            row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (previous,)).fetchone()
            assert row is None, f"database {previous} of an earlier test was not dropped"
    assert pg_database.name not in _seen_databases
    _seen_databases.append(pg_database.name)


def test_pg_restart_keeps_data_and_breaks_open_connections(pg_server: PostgresServer, pg_dsn: str) -> None:
    port = pg_server.port
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('before restart')")
        old = psycopg.connect(pg_dsn, autocommit=True)
    try:
        pg_server.restart()
        assert pg_server.port == port  # same DSN before and after: clients just reconnect
        with pytest.raises(psycopg.OperationalError):
            old.execute("SELECT 1")
    finally:
        old.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("before restart",)]


# -- Mosquitto ----------------------------------------------------------------------------------


def test_mqtt_tls_round_trip(mosquitto: MosquittoBroker) -> None:
    with MqttProbe(mosquitto) as sub, MqttProbe(mosquitto) as pub:
        assert not sub.connect().is_failure
        assert isinstance(sub.client.socket(), ssl.SSLSocket)
        granted = sub.subscribe("harness/round-trip", qos=1)
        assert [rc.value for rc in granted] == [1]
        assert not pub.connect().is_failure
        pub.publish("harness/round-trip", b"hello over tls", qos=1)
        message = sub.expect_message(timeout=5)
    assert message.topic == "harness/round-trip"
    assert message.payload == b"hello over tls"
    assert message.qos == 1


@pytest.mark.parametrize(
    "protocol", [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5], ids=["mqtt311", "mqtt5"]
)
def test_mqtt_wrong_password_is_not_authorized(mosquitto: MosquittoBroker, protocol: MQTTProtocolVersion) -> None:
    with MqttProbe(mosquitto, mosquitto.admin_username, "wrong password", protocol=protocol) as probe:
        reason = probe.connect()
    assert reason.is_failure
    assert reason.value == NOT_AUTHORIZED, str(reason)


def test_mqtt_client_trusting_another_ca_fails_handshake(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    rogue = CertificateAuthority.create(tmp_path, common_name="rogue CA")
    probe = MqttProbe(mosquitto, ca_certs=rogue.cert_path)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            probe.connect()
    finally:
        probe.close()


def _refused_at_tls(probe: MqttProbe) -> bool:
    """True if the broker rejected the TLS session (during or right after the handshake)."""
    try:
        reason = probe.connect()
    except TimeoutError:
        return False  # no answer at all is not a TLS refusal
    except OSError:  # ssl.SSLError (TLS 1.2: in the handshake) or ConnectionError (TLS 1.3: after)
        return True
    finally:
        probe.close()
    raise AssertionError(f"connection got a CONNACK ({reason}) instead of a TLS failure")


def test_mqtt_mtls_rejects_client_certificates_from_unknown_ca(
    mosquitto_factory: MosquittoFactory, pki: PkiFiles, tmp_path: Path
) -> None:
    broker = mosquitto_factory(require_client_cert=True, plain_listener=False)
    rogue_ca = CertificateAuthority.create(tmp_path / "rogue", common_name="rogue CA")
    rogue = rogue_ca.issue_client(tmp_path / "rogue", "device-1")

    with MqttProbe(broker, certfile=pki.client.cert, keyfile=pki.client.key) as good:
        assert not good.connect().is_failure
    assert _refused_at_tls(MqttProbe(broker, certfile=rogue.cert, keyfile=rogue.key))
    assert _refused_at_tls(MqttProbe(broker))  # no client certificate at all


def test_mqtt_acl_denies_publish_on_forbidden_topic(mosquitto: MosquittoBroker) -> None:
    device_password = "device-secret"
    mosquitto.write_passwords(
        password_file({mosquitto.admin_username: mosquitto.admin_password, "device-1": device_password})
    )
    mosquitto.write_acl(
        f"user {mosquitto.admin_username}\ntopic readwrite #\n\nuser device-1\ntopic write devices/device-1/#\n"
    )
    mosquitto.reload()

    with MqttProbe(mosquitto) as sub, MqttProbe(mosquitto, "device-1", device_password) as device:
        assert not sub.connect().is_failure
        sub.subscribe("#", qos=1)
        assert not device.connect().is_failure
        device.publish("devices/device-2/telemetry", b"forbidden", qos=1)
        # Same client, same QoS: had the forbidden message been routed, it would arrive first.
        device.publish("devices/device-1/telemetry", b"allowed", qos=1)
        first = sub.expect_message(timeout=5)
        rest = sub.received(timeout=0.2)
    assert (first.topic, first.payload) == ("devices/device-1/telemetry", b"allowed")
    assert rest == []


def test_mqtt_plain_listener_and_persistence_across_restart(mosquitto: MosquittoBroker) -> None:
    # A persistent session (clean_start off, session expiry) with a QoS 1 subscription...
    with MqttProbe(mosquitto, client_id="harness-sub", clean_start=False, session_expiry=3600) as sub:
        assert not sub.connect().is_failure
        sub.subscribe("harness/persist", qos=1)
    # ...gets a message queued while offline, over the plain listener...
    with MqttProbe(mosquitto, tls=False) as pub:
        assert not pub.connect().is_failure
        pub.publish("harness/persist", b"queued", qos=1)
    # ...which survives a broker restart (persistence written on SIGTERM, read at start).
    mosquitto.restart()
    with MqttProbe(mosquitto, client_id="harness-sub", clean_start=False, session_expiry=3600) as sub:
        assert not sub.connect().is_failure
        message = sub.expect_message(timeout=5)
    assert (message.topic, message.payload) == ("harness/persist", b"queued")


def test_mosquitto_runs_unprivileged(mosquitto: MosquittoBroker) -> None:
    assert mosquitto.pid is not None
    uid = Path(f"/proc/{mosquitto.pid}").stat().st_uid
    if os.geteuid() == 0:
        assert uid != 0
    assert os.stat(mosquitto.workdir).st_uid == uid


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs services as other users")
def test_services_survive_a_concurrent_session_tightening_the_temp_root(
    pg_server: PostgresServer, pg_dsn: str, mosquitto: MosquittoBroker
) -> None:
    # What every new pytest session does to /tmp/pytest-of-root (mode 0700), possibly mid-test here.
    temp_root = next((p for p in mosquitto.workdir.parents if p.name.startswith("pytest-of-")), None)
    if temp_root is None:
        pytest.skip("not under pytest's default temp root (--basetemp given)")
    temp_root.chmod(0o700)
    # A reload re-reads the password file as the `mosquitto` user: the new account must work.
    mosquitto.write_passwords(
        password_file({mosquitto.admin_username: mosquitto.admin_password, "late-user": "late-password"})
    )
    mosquitto.reload()
    with MqttProbe(mosquitto, "late-user", "late-password") as probe:
        assert not probe.connect().is_failure
    mosquitto.restart()  # persistence is written and read back as `mosquitto`
    with MqttProbe(mosquitto, "late-user", "late-password") as probe:
        assert not probe.connect().is_failure
    assert "Permission denied" not in mosquitto.log_tail()
    assert "Error" not in mosquitto.log_tail(lines=1000)
    temp_root.chmod(0o700)
    pg_server.restart()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
