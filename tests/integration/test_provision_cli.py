"""`provision` end to end on the real database: outputs, errors that change nothing, secrets at rest."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import psycopg
import pytest

from ingest.hashing import HashAlgorithm, mosquitto_verify, verify_password
from ingest.provision_cli import main


@pytest.fixture
def run(migrated_dsn: str, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """provision with the test database's DSN (password carried by PGPASSWORD, never by --dsn)."""
    info = psycopg.conninfo.conninfo_to_dict(migrated_dsn)
    password = str(info.pop("password"))
    dsn = psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]

    def invoke(*argv: str) -> tuple[int, str, str]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PGPASSWORD", password)
            code = main([argv[0], "--dsn", dsn, *argv[1:]])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def snapshot(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT c.username, c.password_hash, c.enabled, d.disabled_at IS NULL, "
            "(SELECT count(*) FROM device_acl a WHERE a.username = c.username) "
            "FROM device_credentials c LEFT JOIN devices d ON d.id = c.device ORDER BY 1"
        ).fetchall()


def stored(dsn: str, username: str) -> tuple[str, str, str, str]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT password_hash, salt, hash_algorithm, mosquitto_hash FROM device_credentials WHERE username = %s",
            [username],
        ).fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


def test_add_prints_the_password_once_and_stores_only_hashes(run, migrated_dsn: str) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run("add", "ESP32_001", "--json", "--type", "thermalog")
    assert code == 0, err
    creds = json.loads(out)
    assert creds["username"] == "ESP32_001" and len(creds["password"]) >= 24
    pw_hash, salt, algo, mosq = stored(migrated_dsn, "ESP32_001")
    assert algo == "sha256:prefix" and len(salt) == 32, "default: sha256 with a 16-byte salt"
    assert verify_password(creds["password"], pw_hash, salt, HashAlgorithm.parse(algo))
    assert mosquitto_verify(creds["password"], mosq)
    with psycopg.connect(migrated_dsn) as conn:
        dump = conn.execute("SELECT string_agg(t::text, ' ') FROM (SELECT * FROM device_credentials) t").fetchone()
    assert dump is not None and creds["password"] not in str(dump[0])

    code, out, _ = run("show", "ESP32_001", "--json")
    shown = json.loads(out)
    assert code == 0 and "password" not in out
    assert shown["type"] == "thermalog" and len(shown["acl"]) == 6


def test_bad_input_is_one_line_exit_2_and_changes_nothing(run, migrated_dsn: str) -> None:  # type: ignore[no-untyped-def]
    assert run("add", "ESP32_001")[0] == 0
    run("disable", "ESP32_001")
    before = snapshot(migrated_dsn)
    cases = [
        (("add", "ESP32_002", "ESP32_001"), "already exists"),
        (("add", "ok-1", "bad/id"), "not allowed"),
        (("add", "dev#1"), "not allowed"),
        (("add", "x" * 65), "65 characters"),
        (("add", "dup", "dup"), "given twice"),
        (("add", "ESP32_003", "--hash", "sha3"), "--hash"),
        (("rotate", "ESP32_001"), "is disabled"),
        (("rotate", "ghost"), "unknown device"),
        (("show", "ghost"), "unknown device"),
        (("disable", "ghost"), "unknown device"),
        (("remove", "ESP32_001"), "add --yes"),
        (("add", "ESP32_004", "--credentials-out", "/nonexistent/dir/c.json"), "does not exist"),
    ]
    for argv, message in cases:
        code, out, err = run(*argv)
        assert code == 2, (argv, out, err)
        assert message in err and err.count("\n") == 1, (argv, err)
    assert snapshot(migrated_dsn) == before


def test_rotate_replaces_the_secret_and_keeps_the_algorithm(run, migrated_dsn: str) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = run("add", "dev-1", "--json", "--hash", "pbkdf2:sha256:1000")
    old = json.loads(out)["password"]
    code, out, err = run("rotate", "dev-1", "--json")
    assert code == 0, err
    new = json.loads(out)["password"]
    pw_hash, salt, algo, mosq = stored(migrated_dsn, "dev-1")
    assert algo == "pbkdf2:sha256:1000"
    assert verify_password(new, pw_hash, salt, HashAlgorithm.parse(algo))
    assert not verify_password(old, pw_hash, salt, HashAlgorithm.parse(algo))
    assert mosquitto_verify(new, mosq) and not mosquitto_verify(old, mosq)


def test_disable_enable_remove_lifecycle(run, migrated_dsn: str) -> None:  # type: ignore[no-untyped-def]
    run("add", "dev-1")
    assert run("disable", "dev-1", "--json")[1].strip() == '{"username": "dev-1", "state": "disabled", "changed": true}'
    assert json.loads(run("disable", "dev-1", "--json")[1])["changed"] is False
    listed = json.loads(run("list", "--json")[1])
    assert [(a["username"], a["enabled"]) for a in listed] == [("dev-1", False)]
    assert listed[0]["disabled_at"] is not None
    assert run("enable", "dev-1")[0] == 0
    assert run("remove", "dev-1", "--yes")[0] == 0
    assert snapshot(migrated_dsn) == []


def test_batch_credentials_file_is_private(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out_file = tmp_path / "creds.json"
    ids = [f"SIM_{i:03d}" for i in range(20)]
    code, out, err = run("add", *ids, "--credentials-out", str(out_file))
    assert code == 0, err
    assert "password" not in out
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    records = json.loads(out_file.read_text())
    assert [r["username"] for r in records] == ids
    assert len({r["password"] for r in records}) == 20


def test_service_account_and_export(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run("add", "dev-1")
    run("add", "dev-2")
    run("disable", "dev-2")
    code, _, err = run(
        "add-service", "ingest", "--subscribe", "devices/+/telemetry", "--subscribe", "$share/ingest/devices/+/status"
    )
    assert code == 0, err
    pw, acl = tmp_path / "passwd", tmp_path / "acl"
    code, out, err = run("export-mosquitto", "--passwords", str(pw), "--acl", str(acl), "--json")
    assert code == 0, err
    assert json.loads(out) == {"changed": [str(pw), str(acl)], "accounts": 2}
    assert stat.S_IMODE(pw.stat().st_mode) == 0o640
    users = [line.split(":", 1)[0] for line in pw.read_text().splitlines()]
    assert users == ["dev-1", "ingest"], "disabled devices are not exported"
    text = acl.read_text()
    assert "user dev-1\ntopic write devices/dev-1/telemetry\n" in text
    assert "topic read devices/dev-1/command\n" in text
    assert "user ingest\ntopic read devices/+/telemetry\n" in text
    assert "dev-2" not in text and "deny #" not in text
    # Unchanged content: nothing rewritten, so the deploy does not reload the broker.
    assert json.loads(run("export-mosquitto", "--passwords", str(pw), "--acl", str(acl), "--json")[1])["changed"] == []
