"""backup + restore against the real test PostgreSQL: drill, tampering, truncation, missing key,
database down, restore into a fresh database, extraction, off-site copy. The scripts run as the
operator runs them: ``python scripts/<name>.py`` in a subprocess, with a YAML config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from ingest.db import PsycopgSession
from ingest.migrate import migrate
from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
ROWS = 100_000


@dataclass
class Setup:
    config: Path
    key: Path
    workdir: Path
    backup_dir: Path
    dbname: str
    server: PostgresServer
    files: dict[str, Path]


def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def drill_databases(server: PostgresServer) -> set[str]:
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'drill\\_%'")}


@pytest.fixture(scope="module")
def setup(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("backup")
    dbname = f"bk_{uuid.uuid4().hex[:10]}"
    dsn = pg_server.create_database(dbname)
    try:
        session = PsycopgSession.connect(dsn)
        migrate(session)
        session.execute("INSERT INTO devices (device_id) SELECT 'dev' || g FROM generate_series(1, 50) g")
        session.execute("INSERT INTO metrics (name) VALUES ('temp'), ('hum'), ('pres')")
        session.execute(
            "INSERT INTO telemetry SELECT timestamptz '2026-01-01' + make_interval(secs => g), g %% 50 + 1,"
            " (g %% 3 + 1)::smallint, g * 0.001 FROM generate_series(1, %s) g",
            (ROWS,),
        )
        session.execute(
            "INSERT INTO rejected_messages (topic, reason, payload, payload_size)"
            " VALUES ('x', 'bad_json', '\\x00ff', 2)"
        )
        session.close()
        # What a host has besides the database: config, certs (certbot's live/ symlinks), secrets,
        # Mosquitto's config and persistence file.
        etc = work / "etc"
        certs = etc / "letsencrypt"
        (certs / "archive").mkdir(parents=True)
        (certs / "live").mkdir()
        (certs / "archive" / "fullchain1.pem").write_text("-----BEGIN CERTIFICATE-----\nabc\n")
        (certs / "live" / "fullchain.pem").symlink_to("../archive/fullchain1.pem")
        secrets = etc / "secrets"
        secrets.mkdir()
        (secrets / "db.pw").write_text(pg_server.password + "\n")
        (secrets / "db.pw").chmod(0o600)
        mosq = etc / "mosquitto.conf"
        mosq.write_text("listener 8883\npersistence true\n")
        persistence = work / "mosquitto.db"
        persistence.write_bytes(b"\x00\xb5\x00mosquitto db" * 100)
        key = work / "backup.key"  # outside every backed-up path
        assert run("backup.py", "--generate-key", str(key)).returncode == 0
        backup_dir = work / "backups"
        config = work / "ops.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "database": {
                        "dsn": f"host=127.0.0.1 port={pg_server.port} dbname={dbname} user=postgres",
                        "password_file": str(secrets / "db.pw"),
                    },
                    "backup": {
                        "dir": str(backup_dir),
                        "key_file": str(key),
                        "log_file": str(work / "log" / "backup.log"),
                        "textfile_dir": str(work / "textfile"),
                        "retention": {"daily": 7, "weekly": 4},
                        "paths": {"certs": [str(certs)], "secrets": [str(secrets)]},
                    },
                    "broker": {"kind": "mosquitto", "files": [str(mosq)], "persistence": str(persistence)},
                }
            )
        )
        (work / "textfile").mkdir()
        yield Setup(
            config=config,
            key=key,
            workdir=work,
            backup_dir=backup_dir,
            dbname=dbname,
            server=pg_server,
            files={"cert": certs / "archive" / "fullchain1.pem", "persistence": persistence, "mosq": mosq},
        )
    finally:
        if not pg_server.running:
            pg_server.start()
        pg_server.drop_database(dbname)


@pytest.fixture(scope="module")
def archive(setup: Setup) -> Path:
    result = run("backup.py", "--config", str(setup.config), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == "ok"
    assert out["tables"]["public.telemetry"]["rows"] == ROWS
    assert out["database"]["postgresql_major"] == int(setup.server.major_version)
    return Path(out["archive"])


def admin_conninfo(setup: Setup) -> list[str]:
    # restore connects to the maintenance database to CREATE/DROP databases
    dsn = f"host=127.0.0.1 port={setup.server.port} dbname=postgres user=postgres"
    return ["--dsn", dsn]


def test_backup_then_drill_matches(setup: Setup, archive: Path) -> None:
    before = drill_databases(setup.server)
    result = run("restore.py", "--config", str(setup.config), str(archive), "--drill", "--json", *admin_conninfo(setup))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == "ok" and out["mismatches"] == []
    assert out["tables"]["public.telemetry"]["rows"] == ROWS
    assert out["tables"]["public.devices"]["rows"] == 50
    manifest_tables = json.loads(
        run("restore.py", "--config", str(setup.config), str(archive), "--list", "--json").stdout
    )["manifest"]["database"]["tables"]
    assert out["tables"] == manifest_tables
    assert drill_databases(setup.server) == before  # the scratch database was dropped
    metrics = (setup.workdir / "textfile" / "telemetry_backup_drill.prom").read_text()
    assert "telemetry_backup_drill_last_attempt_success 1.0" in metrics


def test_list_shows_every_part(setup: Setup, archive: Path) -> None:
    result = run("restore.py", "--config", str(setup.config), str(archive), "--list", "--json")
    assert result.returncode == 0, result.stderr
    parts = {p["name"]: p for p in json.loads(result.stdout)["manifest"]["parts"]}
    assert f"database/{setup.dbname}.dump" in parts
    persistence = parts[f"files/broker{setup.files['persistence']}"]
    assert persistence["size"] == setup.files["persistence"].stat().st_size
    live = [p for n, p in parts.items() if n.endswith("live/fullchain.pem")]
    assert live and live[0]["target"] == "../archive/fullchain1.pem"
    assert any(n.endswith("secrets/db.pw") for n in parts)
    text = run("restore.py", "--config", str(setup.config), str(archive), "--list").stdout
    assert "public.telemetry" in text and str(ROWS) in text


def test_metric_and_log_written(setup: Setup, archive: Path) -> None:
    metrics = (setup.workdir / "textfile" / "telemetry_backup.prom").read_text()
    assert "telemetry_backup_last_attempt_success 1.0" in metrics
    assert f"telemetry_backup_last_size_bytes {float(archive.stat().st_size)}" in metrics
    assert "written and verified" in (setup.workdir / "log" / "backup.log").read_text()


@pytest.mark.parametrize("where", ["magic", "key-id", "first-length", "middle", "last-byte", "truncated", "cut-record"])
def test_damaged_archive_is_refused_and_nothing_restored(
    setup: Setup, archive: Path, tmp_path: Path, where: str
) -> None:
    data = bytearray(archive.read_bytes())
    offsets = {"magic": 0, "key-id": 30, "first-length": 37, "middle": len(data) // 2, "last-byte": len(data) - 1}
    if where == "truncated":
        data = data[: len(data) // 3]
    elif where == "cut-record":
        data = data[:-1]
    else:
        data[offsets[where]] ^= 0x40
    damaged = tmp_path / archive.name
    damaged.write_bytes(bytes(data))
    target = f"restored_{uuid.uuid4().hex[:8]}"
    for action in (["--drill"], ["--target-db", target], ["--list"], ["--extract", str(tmp_path / "x")]):
        before = drill_databases(setup.server)
        result = run("restore.py", "--config", str(setup.config), str(damaged), *action, *admin_conninfo(setup))
        assert result.returncode == 3, (action, result.stdout, result.stderr)
        assert "REFUSED" in result.stderr and "nothing was restored" in result.stderr
        assert drill_databases(setup.server) == before
    with psycopg.connect(setup.server.admin_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,)).fetchone() is None
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_missing_key_file_is_a_clear_error(setup: Setup, archive: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.key"
    result = run("restore.py", "--config", str(setup.config), str(archive), "--key-file", str(missing), "--drill")
    assert result.returncode == 2
    assert f"encryption key file {missing} does not exist" in result.stderr
    result = run("backup.py", "--config", str(setup.config), "--key-file", str(missing), "--dir", str(tmp_path / "b"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_wrong_key_is_refused(setup: Setup, archive: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    assert run("backup.py", "--generate-key", str(other)).returncode == 0
    result = run("restore.py", "--config", str(setup.config), str(archive), "--key-file", str(other))
    assert result.returncode == 3 and "another key" in result.stderr


def test_restore_into_fresh_database_and_refuse_existing(setup: Setup, archive: Path) -> None:
    target = f"restored_{uuid.uuid4().hex[:8]}"
    try:
        args = ["--config", str(setup.config), str(archive), *admin_conninfo(setup), "--json"]
        result = run("restore.py", *args, "--target-db", target)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["mismatches"] == []
        with psycopg.connect(setup.server.dsn(target), autocommit=True) as conn:
            row = conn.execute("SELECT count(*), min(time), sum(value) FROM telemetry").fetchone()
            assert row is not None and row[0] == ROWS
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (3,)
        again = run("restore.py", *args, "--target-db", target)
        assert again.returncode == 2 and "exists" in again.stderr
    finally:
        setup.server.drop_database(target)


def test_extract_gives_back_the_files(setup: Setup, archive: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = run("restore.py", "--config", str(setup.config), str(archive), "--extract", str(dest))
    assert result.returncode == 0, result.stderr
    cert = dest / f"files/certs{setup.files['cert']}"
    assert cert.read_bytes() == setup.files["cert"].read_bytes()
    live = cert.parent.parent / "live" / "fullchain.pem"
    assert live.is_symlink() and live.read_bytes() == cert.read_bytes()
    assert (dest / f"files/broker{setup.files['persistence']}").read_bytes() == setup.files["persistence"].read_bytes()


def test_offsite_copy_with_rsync(setup: Setup, tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync not installed")
    cfg: dict[str, Any] = yaml.safe_load(setup.config.read_text())
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg["backup"]["dir"] = str(tmp_path / "local")
    cfg["backup"]["offsite"] = {"target": str(remote) + "/"}
    config = tmp_path / "ops.yml"
    config.write_text(yaml.safe_dump(cfg))
    result = run("backup.py", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["offsite"]["ok"] is True
    assert (remote / Path(out["archive"]).name).read_bytes() == Path(out["archive"]).read_bytes()
    cfg["backup"]["offsite"] = {"target": str(tmp_path / "missing" / "deeper") + "/"}
    # A folder of its own: archives are named by the second, and the script refuses to overwrite one
    # (a second backup within the same second failed here with exit 1 instead of reaching rsync).
    cfg["backup"]["dir"] = str(tmp_path / "local-2")
    config.write_text(yaml.safe_dump(cfg))
    result = run("backup.py", "--config", str(config), "--json")
    assert result.returncode == 4, result.stderr  # archive kept locally, off-site failure is loud
    assert json.loads(result.stdout)["status"] == "offsite_failed"


def test_backup_with_database_stopped_fails_and_keeps_no_archive(setup: Setup, tmp_path: Path) -> None:
    cfg: dict[str, Any] = yaml.safe_load(setup.config.read_text())
    backup_dir = tmp_path / "down"
    cfg["backup"]["dir"] = str(backup_dir)
    config = tmp_path / "ops.yml"
    config.write_text(yaml.safe_dump(cfg))
    setup.server.stop()
    try:
        result = run("backup.py", "--config", str(config), "--json")
    finally:
        setup.server.start()
    assert result.returncode == 1
    assert "database unreachable" in result.stderr
    assert json.loads(result.stdout)["status"] == "failed"
    assert not backup_dir.exists() or list(backup_dir.iterdir()) == []  # no archive, no temp file
    metrics = (setup.workdir / "textfile" / "telemetry_backup.prom").read_text()
    assert "telemetry_backup_last_attempt_success 0.0" in metrics
    # the last success is still the earlier backup's
    assert "telemetry_backup_last_success_timestamp_seconds 0.0" not in metrics


def test_checksums_see_value_changes_not_only_counts(setup: Setup, tmp_path: Path) -> None:
    """Same row count, one value changed: the manifest's checksum must differ, or a drill would
    pass on a restore that silently altered data."""
    dsn = setup.server.dsn(setup.dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE rejected_messages SET reason = 'bad_jsoN'")
    try:
        result = run("backup.py", "--config", str(setup.config), "--json", "--dir", str(tmp_path / "b"))
        assert result.returncode == 0, result.stderr
        new = json.loads(result.stdout)["tables"]["public.rejected_messages"]
        listing = run("restore.py", "--config", str(setup.config), "--latest", "--list", "--json")
        assert listing.returncode == 0, listing.stderr
        first = json.loads(listing.stdout)["manifest"]["database"]["tables"]["public.rejected_messages"]
        assert new["rows"] == first["rows"] == 1
        assert new["checksum"] != first["checksum"]
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE rejected_messages SET reason = 'bad_json'")
