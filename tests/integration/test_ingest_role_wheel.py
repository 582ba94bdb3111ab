"""The real wheelhouse the ingest role uploads: the project wheel is byte-identical when rebuilt from
the same sources, and the locked set installs offline (pip --no-index --require-hashes, as on a host)
into a fresh virtualenv whose console scripts run. Needs the package index once (cached in .cache/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from roles import _wheel
from roles._wheel import Target, sha256_file

HOST = Target("3.11", "x86_64", "2.36")  # Debian 12 on amd64, as group_data/all.py says


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, except the build environment and the wheelhouse, which are reused from the
    repository's cache when present (they are keyed by their pins)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for reusable in (*_wheel.CACHE.glob("build-env-*"), *_wheel.CACHE.glob("wheelhouse-*")):
        (cache / reusable.name).symlink_to(reusable)
    monkeypatch.setattr(_wheel, "CACHE", cache)
    return cache


def test_wheel_is_reproducible_and_holds_only_host_code(cache: Path) -> None:
    started = time.monotonic()
    first = _wheel.project_wheel()
    took = time.monotonic() - started
    digest = sha256_file(first)
    shutil.rmtree(first.parent)  # a second build from scratch, seconds later: other mtimes, same bytes
    time.sleep(1.1)
    second = _wheel.project_wheel()
    print(f"project wheel: {first.name}, {first.stat().st_size} bytes, first build {took:.1f} s")
    assert sha256_file(second) == digest
    names = zipfile.ZipFile(second).namelist()
    assert "ingest/migrations/0001_core.sql" in names and "scripts/backup.py" in names
    assert "simulator/cli.py" in names
    assert not [n for n in names if n.startswith(("roles/", "tests/")) or "__pycache__" in n]
    info = zipfile.ZipFile(second).getinfo("ingest/cli.py")
    assert info.date_time == (1980, 1, 1, 0, 0, 0) and (info.external_attr >> 16) & 0o777 == 0o644


def test_locked_wheelhouse_installs_offline(cache: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    folder, lock = _wheel.wheelhouse(HOST)
    wheel = _wheel.project_wheel()
    print(f"wheelhouse {folder.name}: {len(lock.splitlines())} wheels, ready in {time.monotonic() - started:.1f} s")
    names = {line.split("==")[0] for line in lock.splitlines()}
    assert {"paho-mqtt", "psycopg", "psycopg-binary", "cryptography", "bcrypt", "pyyaml"} <= names
    assert not names & {"pyinfra", "ansible-core", "jinja2"}
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the wheelhouse is for CPython 3.11; this interpreter cannot install it")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/pip"), "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps"]
    env = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null"}  # no index, no find-links from this machine
    subprocess.run(
        [*pip, "--require-hashes", "--find-links", str(folder), "-r", str(folder / "requirements.lock")],
        check=True,
        env=env,
    )
    subprocess.run([*pip, str(wheel)], check=True, env=env)
    for script in ("ingest", "provision", "telemetry-backup", "telemetry-restore", "telemetry-healthcheck", "simulate"):
        proc = subprocess.run([str(venv / "bin" / script), "--help"], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-500:]}"
    proc = subprocess.run([str(venv / "bin/provision"), "ensure-service", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--account-password-file" in proc.stdout
