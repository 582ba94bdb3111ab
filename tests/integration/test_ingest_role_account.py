"""The ingest service's MQTT account as the deploy keeps it: `provision ensure-service` on the real
database, logged in as a telemetry_provisioner member (the login the ingest host has)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from ingest.hashing import HashAlgorithm, mosquitto_verify, verify_password
from ingest.provision_cli import main
from ingest.schema import ROLE_PROVISIONER

VAULT_PASSWORD = "kept-in-the-vault-not-here"  # the test stands in for the vault
TOPICS = ["devices/+/telemetry", "$share/ingest/devices/+/telemetry"]

Run = Callable[..., tuple[int, dict[str, object], str]]


@pytest.fixture
def run(role_dsn: Callable[[str], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """`provision ensure-service ingest ...` as the provisioner login, password in a 0640 file."""
    info = psycopg.conninfo.conninfo_to_dict(role_dsn(ROLE_PROVISIONER))
    db_password = tmp_path / "db.password"
    db_password.write_text(str(info.pop("password")) + "\n")
    dsn = psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]

    def invoke(
        *extra: str, password: str = VAULT_PASSWORD, topics: list[str] = TOPICS
    ) -> tuple[int, dict[str, object], str]:
        secret = tmp_path / "mqtt.password"
        secret.write_text(password + "\n")
        secret.chmod(0o640)
        argv = ["ensure-service", "ingest", "--dsn", dsn, "--password-file", str(db_password)]
        argv += ["--account-password-file", str(secret), "--json", *extra]
        for topic in topics:
            argv += ["--subscribe", topic]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, (json.loads(out) if out.strip() else {}), err

    return invoke


def stored(dsn: str) -> tuple[object, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT kind, enabled, password_hash, salt, hash_algorithm, mosquitto_hash FROM device_credentials "
            "WHERE username = 'ingest'"
        ).fetchone()
        acl = conn.execute(
            "SELECT permission, action, topic FROM device_acl WHERE username = 'ingest' ORDER BY rule_order"
        ).fetchall()
    assert row is not None
    return (*row, acl)


def test_created_then_unchanged_then_refreshed(run: Run, migrated_dsn: str) -> None:
    assert run("--check") == (0, {"username": "ingest", "up_to_date": False}, "")
    assert run()[:2] == (0, {"username": "ingest", "changed": True})
    kind, enabled, pw_hash, salt, algo, mosq, acl = stored(migrated_dsn)
    assert (kind, enabled, algo) == ("service", True, "sha256:prefix")
    assert verify_password(VAULT_PASSWORD, str(pw_hash), str(salt), HashAlgorithm.parse(str(algo)))
    assert mosquitto_verify(VAULT_PASSWORD, str(mosq))
    assert acl == [("allow", "subscribe", TOPICS[0]), ("allow", "subscribe", TOPICS[1]), ("deny", "all", "#")]

    # the second deploy: nothing to do, nothing written
    before = stored(migrated_dsn)
    assert run("--check")[:2] == (0, {"username": "ingest", "up_to_date": True})
    assert run()[:2] == (0, {"username": "ingest", "changed": False})
    assert stored(migrated_dsn) == before

    # a new password in the vault, a new topic list, a disabled account: each is converged back
    assert run(password="rotated-in-the-vault")[1]["changed"] is True
    assert mosquitto_verify("rotated-in-the-vault", str(stored(migrated_dsn)[5]))
    assert run(password="rotated-in-the-vault", topics=TOPICS[:1])[1]["changed"] is True
    assert len(stored(migrated_dsn)[6]) == 2  # type: ignore[arg-type]
    with psycopg.connect(migrated_dsn) as conn:
        conn.execute("UPDATE device_credentials SET enabled = false WHERE username = 'ingest'")
    assert run(password="rotated-in-the-vault", topics=TOPICS[:1])[1]["changed"] is True
    assert stored(migrated_dsn)[1] is True
    # another hash algorithm (the broker's setting changed) re-hashes
    assert run("--hash", "sha512:suffix", password="rotated-in-the-vault", topics=TOPICS[:1])[1]["changed"] is True
    assert stored(migrated_dsn)[4] == "sha512:suffix"


def test_a_device_account_is_never_taken_over(run: Run, migrated_dsn: str) -> None:
    with psycopg.connect(migrated_dsn) as conn:
        (dev,) = conn.execute("INSERT INTO devices (device_id) VALUES ('ingest') RETURNING id").fetchone()  # type: ignore[misc]
        conn.execute(
            "INSERT INTO device_credentials (username, device, kind, password_hash, salt, hash_algorithm, "
            "mosquitto_hash) VALUES ('ingest', %s, 'device', 'x', '', 'sha256:prefix', 'x')",
            [dev],
        )
    code, out, err = run()
    assert code == 2 and out == {} and "is a device account" in err
    assert stored(migrated_dsn)[0] == "device"


def test_an_empty_password_changes_nothing(run: Run, migrated_dsn: str) -> None:
    code, _, err = run(password="")
    assert code == 2 and "is empty" in err
    with psycopg.connect(migrated_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM device_credentials").fetchone() == (0,)
