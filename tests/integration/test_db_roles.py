"""Least privilege, proven by permission-denied errors from the real server."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from ingest import provisioning as prov
from ingest.db import PsycopgSession
from ingest.schema import (
    EMQX_AUTHN_QUERY,
    EMQX_AUTHZ_QUERY,
    ROLE_BROKER,
    ROLE_INGEST,
    ROLE_PROVISIONER,
    ROLE_READONLY,
    emqx_query_to_psycopg,
)

RoleDsn = Callable[[str], str]


def denied(dsn: str, statement: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


@pytest.fixture
def seeded(db: PsycopgSession) -> prov.Credentials:
    creds = prov.add_device(db, "ESP32_001")
    db.execute("INSERT INTO metrics (name) VALUES ('temp')")
    db.execute("INSERT INTO telemetry VALUES (now(), 1, 1, 21.5)")
    return creds


def test_broker_role_reads_only_what_its_queries_need(role_dsn: RoleDsn, seeded: prov.Credentials) -> None:
    dsn = role_dsn(ROLE_BROKER)
    with psycopg.connect(dsn) as conn:
        for query in (EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY):
            text, names = emqx_query_to_psycopg(query)
            assert names == ["username"]
            assert conn.execute(text, ["ESP32_001"]).fetchall()  # type: ignore[arg-type]
    for statement in (
        "SELECT mosquitto_hash FROM device_credentials",
        "SELECT * FROM telemetry",
        "SELECT * FROM devices",
        "UPDATE device_credentials SET enabled = true",
        "INSERT INTO device_acl (username, rule_order, permission, action, topic) "
        "VALUES ('ESP32_001', 99, 'allow', 'all', '#')",
        "DELETE FROM device_acl",
    ):
        assert denied(dsn, statement), statement


def test_ingest_role_appends_but_cannot_touch_credentials(role_dsn: RoleDsn, seeded: prov.Credentials) -> None:
    dsn = role_dsn(ROLE_INGEST)
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO telemetry VALUES (now() - interval '1 s', 1, 1, 22.0)")
        conn.execute("INSERT INTO metrics (name) VALUES ('humidity')")
        conn.execute("INSERT INTO rejected_messages (topic, reason, payload, payload_size) VALUES ('t', 'r', 'x', 1)")
        conn.execute("UPDATE devices SET last_seen_at = now(), status = 'online', status_at = now()")
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (1,)
    for statement in (
        "SELECT * FROM device_credentials",
        "SELECT * FROM device_acl",
        "UPDATE devices SET name = 'x'",
        "DELETE FROM telemetry",
        "UPDATE telemetry SET value = 0",
        "DELETE FROM rejected_messages",
        "INSERT INTO devices (device_id) VALUES ('rogue')",
    ):
        assert denied(dsn, statement), statement


def test_readonly_role_sees_data_never_secrets(role_dsn: RoleDsn, seeded: prov.Credentials) -> None:
    dsn = role_dsn(ROLE_READONLY)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT device_id, metric, value FROM telemetry_named").fetchall() == [
            ("ESP32_001", "temp", 21.5)
        ]
        assert conn.execute("SELECT count(*) FROM telemetry_hourly").fetchone() == (1,)
    for statement in (
        "SELECT * FROM device_credentials",
        "SELECT * FROM device_acl",
        "INSERT INTO metrics (name) VALUES ('x')",
        "DELETE FROM telemetry",
    ):
        assert denied(dsn, statement), statement


def test_provisioner_role_can_provision_but_not_read_telemetry(role_dsn: RoleDsn, seeded: prov.Credentials) -> None:
    dsn = role_dsn(ROLE_PROVISIONER)
    session = PsycopgSession.connect(dsn)
    try:
        creds = prov.add_device(session, "ESP32_002")
        assert prov.show(session, "ESP32_002").enabled
        prov.rotate(session, creds.username)
        prov.set_enabled(session, creds.username, False)
        prov.remove(session, creds.username)
    finally:
        session.close()
    assert denied(dsn, "SELECT * FROM telemetry")
    assert denied(dsn, "INSERT INTO telemetry VALUES (now(), 1, 1, 1)")


def test_public_has_no_access(migrated_dsn: str) -> None:
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE nobody_in_particular LOGIN PASSWORD 'x'")
        try:
            conn.execute("SET ROLE nobody_in_particular")
            for table in ("device_credentials", "telemetry", "devices"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"SELECT 1 FROM {table}")
        finally:
            conn.execute("RESET ROLE")
            conn.execute("DROP ROLE nobody_in_particular")
