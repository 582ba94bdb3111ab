"""The Mosquitto accounts timer's script (templates/broker_mosquitto/accounts-sync.sh.j2), run for real
with the provision CLI against PostgreSQL 15: files written when accounts change, the broker reloaded
then and only then. `systemctl` is the one stand-in (a recorder on PATH): this machine's systemd is
not the broker's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from ingest import provisioning as prov
from ingest.db import PsycopgSession
from roles._base import render


def _script(tmp_path: Path, migrated_dsn: str) -> tuple[Path, dict[str, str], Path]:
    info = psycopg.conninfo.conninfo_to_dict(migrated_dsn)
    password_file = tmp_path / "db.password"
    password_file.write_text(str(info.pop("password")) + "\n")
    password_file.chmod(0o600)
    script = tmp_path / "sync.sh"
    script.write_text(
        render(
            "broker_mosquitto/accounts-sync.sh.j2",
            provision_bin=str(Path(sys.executable).parent / "provision"),
            dsn=psycopg.conninfo.make_conninfo(**info),  # type: ignore[arg-type]
            db_password_file=str(password_file),
            passwd_file=str(tmp_path / "telemetry.passwd"),
            acl_file=str(tmp_path / "telemetry.acl"),
            interval="30s",
            timer="t.timer",
        )
    )
    script.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.calls"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (bin_dir / "systemctl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return script, env, calls


def _calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_exports_and_reloads_only_on_change(tmp_path: Path, migrated_dsn: str, db: PsycopgSession) -> None:
    script, env, calls = _script(tmp_path, migrated_dsn)
    prov.add_devices(db, ["sync-1"])

    first = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "telemetry.passwd").read_text().startswith("sync-1:$7$")
    assert "topic write devices/sync-1/" in (tmp_path / "telemetry.acl").read_text()
    assert oct((tmp_path / "telemetry.passwd").stat().st_mode & 0o777) == "0o640"
    assert _calls(calls) == ["reload mosquitto.service"]

    again = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    assert _calls(calls) == ["reload mosquitto.service"]  # nothing changed: no reload

    prov.set_enabled(db, "sync-1", False)
    third = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False)
    assert third.returncode == 0, third.stderr
    assert "sync-1" not in (tmp_path / "telemetry.passwd").read_text()
    assert _calls(calls) == ["reload mosquitto.service"] * 2


def test_database_unreachable_fails_without_touching_files(tmp_path: Path, migrated_dsn: str) -> None:
    script, env, calls = _script(tmp_path, migrated_dsn)
    (tmp_path / "db.password").write_text("wrong\n")
    (tmp_path / "telemetry.passwd").write_text("kept:$7$x\n")
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert (tmp_path / "telemetry.passwd").read_text() == "kept:$7$x\n"
    assert _calls(calls) == []
