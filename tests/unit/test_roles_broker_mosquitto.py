"""broker_mosquitto: the rendered configuration starts the real Mosquitto; SIGHUP only on auth change."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from roles.broker_mosquitto import CONFIG, SYNC_SCRIPT, SYNC_SERVICE, SYNC_TIMER, broker_mosquitto, render_config
from tests.support import deploy_validators as v
from tests.support.deploy_fake import LIVE_HOST, run_deploys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_lab_operations_and_files() -> None:
    (r,) = run_deploys("lab", [broker_mosquitto]).values()
    conf = r.files[CONFIG]
    assert "per_listener_settings true" in conf and "persistence true" in conf
    assert "max_inflight_messages 2000" in conf
    assert "listener 1883 127.0.0.1" in conf and "listener 8883\n" in conf
    assert "allow_anonymous true" not in conf
    # no export yet: deny-all files, and the service reload is tied to them
    assert r.files["/etc/mosquitto/telemetry.passwd"] == ""
    assert "reload mosquitto" in " ".join(r.op_names())


def test_exported_accounts_are_uploaded() -> None:
    responses = {
        **LIVE_HOST,
        "export-mosquitto": ["dev1:$7$101$c2FsdA==$aGFzaA==", "--8<-- acl", "user dev1", "topic write devices/dev1/#"],
    }
    (r,) = run_deploys("lab", [broker_mosquitto], responses=responses).values()
    assert r.files["/etc/mosquitto/telemetry.passwd"] == "dev1:$7$101$c2FsdA==$aGFzaA==\n"
    assert "topic write devices/dev1/#" in r.files["/etc/mosquitto/telemetry.acl"]


def test_one_setting_changes_only_the_config() -> None:
    (a,) = run_deploys("lab", [broker_mosquitto]).values()
    (b,) = run_deploys("lab", [broker_mosquitto], override={"mqtt_max_queued": 5}).values()
    assert {p for p in a.files if a.files[p] != b.files.get(p)} == {CONFIG}


@pytest.mark.skipif(os.geteuid() != 0, reason="mosquitto drops to its own user only when started as root")
def test_real_mosquitto_starts_with_the_rendered_config(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # mosquitto writes its pid and persistence after dropping to its own user: give it a folder it
    # can reach (pytest's tmp_path sits under a root-only 0700 parent)
    shared = Path(tempfile.mkdtemp(prefix="mosquitto-test-"))
    shared.chmod(0o777)
    request.addfinalizer(lambda: shutil.rmtree(shared, ignore_errors=True))
    tmp_path = shared
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    persistence = shared / "persist"
    persistence.mkdir(mode=0o777)
    persistence.chmod(0o777)
    for f in (key, cert):
        f.chmod(0o644)
    (tmp_path / "passwd").write_text("")
    (tmp_path / "acl").write_text("# none\n")
    ports = [_free_port() for _ in range(3)]
    (r,) = run_deploys("lab", [broker_mosquitto]).values()
    # Same template, test paths and ports: what is validated is the template's structure.
    production = r.files[CONFIG]
    conf = render_config(
        {
            "pid_file": str(shared / "pid"),
            "persistence_dir": str(persistence),
            "autosave_interval": 60,
            "max_inflight": 2000,
            "max_queued": 10000,
            "max_packet_size": 1048576,
            "log_dest": "stderr",
            "loopback_port": ports[0],
            "tls_port": ports[1],
            "wss_port": ports[2],
            "certfile": str(cert),
            "keyfile": str(key),
            "passwd_file": str(tmp_path / "passwd"),
            "acl_file": str(tmp_path / "acl"),
        }
    )
    strip = [line.split()[0] for line in production.splitlines() if line and not line.startswith("#")]
    assert strip == [line.split()[0] for line in conf.splitlines() if line and not line.startswith("#")]
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen(
        [v.tool("mosquitto", "/usr/sbin/mosquitto"), "-c", str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", ports[1]), timeout=0.5).close()
                up = True
                break
            except OSError:
                time.sleep(0.1)
        assert up and proc.poll() is None, proc.communicate(timeout=5)[0] if proc.poll() is not None else "no listener"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert "Error" not in out, out


def test_accounts_sync_script_and_units_are_valid(tmp_path: Path) -> None:
    (r,) = run_deploys("lab", [broker_mosquitto], responses=LIVE_HOST).values()
    script = r.files[SYNC_SCRIPT]
    v.shellcheck_ok(script, tmp_path)
    assert "--passwords /etc/mosquitto/telemetry.passwd --acl /etc/mosquitto/telemetry.acl" in script
    stub = tmp_path / "root" / SYNC_SCRIPT.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    units = {name: r.files[f"/etc/systemd/system/{name}"] for name in (SYNC_SERVICE, SYNC_TIMER)}
    v.systemd_verify_ok(units, tmp_path)
    assert "OnUnitActiveSec=30s" in units[SYNC_TIMER]
    # ProtectSystem=full makes /etc read-only: the files' folder must be writable (seen on the lab).
    assert "ReadWritePaths=/etc/mosquitto\n" in units[SYNC_SERVICE]
    assert f"{SYNC_TIMER} enabled and running" in " ".join(r.op_names())
