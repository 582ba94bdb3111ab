"""EMQX's own authn/authz queries, as the broker role runs them, against our schema.

EMQX prepares each query with ``${username}`` as a bind parameter and verifies the returned hash with the
rules in shared/emqx-5.8-contract.md, which ingest.hashing.verify_password implements.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from ingest import provisioning as prov
from ingest.db import PsycopgSession
from ingest.hashing import HashAlgorithm, verify_password
from ingest.schema import EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY, ROLE_BROKER, emqx_query_to_psycopg

ALGORITHMS = [
    "plain:prefix",
    "md5:prefix",
    "md5:suffix",
    "sha:disable",
    "sha256:prefix",
    "sha256:suffix",
    "sha512:prefix",
    "sha512:disable",
    "pbkdf2:sha256:1000",
    "pbkdf2:sha512:500:32",
    "bcrypt:4",
]


@pytest.fixture
def broker(role_dsn: Callable[[str], str]) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(role_dsn(ROLE_BROKER), autocommit=True)
    return conn


def authn(conn: psycopg.Connection[tuple[object, ...]], username: str) -> list[tuple[object, ...]]:
    text, names = emqx_query_to_psycopg(EMQX_AUTHN_QUERY)
    return conn.execute(text, [{"username": username}[n] for n in names]).fetchall()  # type: ignore[arg-type]


def authz(conn: psycopg.Connection[tuple[object, ...]], username: str) -> list[tuple[object, ...]]:
    text, names = emqx_query_to_psycopg(EMQX_AUTHZ_QUERY)
    return conn.execute(text, [{"username": username}[n] for n in names]).fetchall()  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ALGORITHMS)
def test_authn_row_verifies_under_emqx_rules_for_every_algorithm(
    db: PsycopgSession, broker: psycopg.Connection[tuple[object, ...]], spec: str
) -> None:
    creds = prov.add_device(db, "dev-1", algorithm=HashAlgorithm.parse(spec))
    rows = authn(broker, "dev-1")
    assert len(rows) == 1
    password_hash, salt, is_superuser = rows[0]
    assert isinstance(password_hash, str) and isinstance(salt, str), "salt must never be NULL"
    assert is_superuser is False
    algo = HashAlgorithm.parse(spec)
    assert verify_password(creds.password, password_hash, salt, algo)
    assert not verify_password(creds.password + "x", password_hash, salt, algo)


def test_disabled_and_expired_accounts_get_no_row(
    db: PsycopgSession, broker: psycopg.Connection[tuple[object, ...]]
) -> None:
    prov.add_device(db, "on")
    prov.add_device(db, "off")
    prov.add_device(db, "old")
    prov.set_enabled(db, "off", False)
    db.execute("UPDATE device_credentials SET expires_at = now() - interval '1 minute' WHERE username = 'old'")
    assert len(authn(broker, "on")) == 1
    assert authn(broker, "off") == []
    assert authn(broker, "old") == []
    assert authn(broker, "nobody") == []
    prov.set_enabled(db, "off", True)
    assert len(authn(broker, "off")) == 1


def test_injection_through_username_is_just_a_value(
    db: PsycopgSession, broker: psycopg.Connection[tuple[object, ...]]
) -> None:
    prov.add_device(db, "victim")
    assert authn(broker, "x' OR '1'='1") == []
    assert authz(broker, "x' OR '1'='1") == []


def test_authz_returns_the_devices_rules_in_order(
    db: PsycopgSession, broker: psycopg.Connection[tuple[object, ...]]
) -> None:
    prov.add_device(db, "A")
    prov.add_device(db, "B")
    rows = authz(broker, "A")
    expected = [(r.permission, r.action, r.topic, r.qos, r.retain) for r in prov.device_acl("A")]
    assert rows == expected
    assert rows[-1][:3] == ("deny", "all", "#")
    assert all("/B/" not in str(r[2]) for r in rows)


def test_placeholder_translation_matches_emqx_prepare() -> None:
    text, names = emqx_query_to_psycopg("SELECT 1 WHERE a = ${username} AND b = ${clientid} AND c = ${username}")
    assert text == "SELECT 1 WHERE a = %s AND b = %s AND c = %s"
    assert names == ["username", "clientid", "username"]
