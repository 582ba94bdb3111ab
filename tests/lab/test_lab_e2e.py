"""End to end on the lab target: build or reuse, deploy, testinfra, deploy again with zero changes,
restart the target and find its units back, tear down.

Drives the lab through its CLI (``python -m tools.lab``) in subprocesses, exactly as ``make lab``
does, on an instance of its own (own state dir, run dir, bridge and dockerd), so a lab a developer
has up is neither reused nor torn down. The rootfs tarball in .cache/lab is shared (built once).

Needs root and /sys/fs/cgroup (a systemd container on a private dockerd). CI runs it; for quick local
runs set TELEMETRY_SKIP_LAB=1.

The suite must also fail when the host is wrong: the test breaks three things on the target (a
listener on a port the inventory does not open, a secret file made world-readable, a unit stopped),
checks that tests/infra reports exactly those three, and that one more deploy repairs the two the
deploy owns (the listener is removed by the test itself: a deploy does not kill strangers' processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.broker_mosquitto import DB_PASSWORD_FILE
from tests.infra.test_host import secret_files
from tests.lab.phases import PHASES
from tools.lab.deploy import parse_results
from tools.lab.inventory import load_host
from tools.lab.target import REPO

pytestmark = [
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.environ.get("TELEMETRY_SKIP_LAB") == "1", reason="TELEMETRY_SKIP_LAB=1"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (private dockerd, bridge, iptables)"),
    pytest.mark.skipif(not Path("/sys/fs/cgroup").is_dir(), reason="no /sys/fs/cgroup: systemd cannot boot"),
]


def _phase(name: str, cmd: list[str], env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout, check=False)
    finally:
        PHASES.append((name, time.monotonic() - start))


def _ok(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    instance = REPO / ".cache/lab-e2e"
    env = {
        **os.environ,
        "TELEMETRY_LAB_DIR": str(instance),
        "TELEMETRY_LAB_RUN_DIR": "/run/telemetry-lab-e2e",
        "TELEMETRY_LAB_BRIDGE": "tlabe2e0",
        "TELEMETRY_LAB_BRIDGE_ADDRESS": "172.31.253.1/24",
    }
    env.pop("LAB_SSH_PORT", None)
    cli = [sys.executable, "-m", "tools.lab"]
    # Teardown first in line: a failure half-way through bring-up still removes what was started.
    try:
        up = _phase("bring up target (rootfs, dockerd, import, boot)", [*cli, "up"], env)
        _ok(up, "lab up")
        yield {"env": env, "cli": cli, "dir": instance, **json.loads(up.stdout)}
    finally:
        down = _phase("tear down", [*cli, "down"], env, timeout=300)
        assert down.returncode == 0, down.stderr


def _deploy(lab: dict[str, Any], label: str) -> tuple[list[str], list[str]]:
    result = _phase(f"{label} (pyinfra deploys/all.py)", [*lab["cli"], "deploy", "--label", label], lab["env"])
    document = json.loads((lab["dir"] / f"{label}.json").read_text() or "{}")
    changed, errors, _ = parse_results(document)
    if result.returncode != 0 and not errors:
        # No JSON when pyinfra stops early: keep the log lines that say why, not the whole log.
        why = [line.strip() for line in result.stderr.splitlines() if "error" in line.lower()]
        errors = [f"pyinfra exited {result.returncode}: {' | '.join(why[-5:]) or result.stderr[-2000:]}"]
    return changed, errors


def _ssh(lab: dict[str, Any], command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ssh", "-F", lab["ssh_config"], "lab", command], text=True, capture_output=True, timeout=120, check=False
    )
    assert not check or done.returncode == 0, f"{command}: {done.stderr}"
    return done


def _failures(junit: Path) -> dict[str, str]:
    """test name -> failure message, from testinfra's JUnit XML (not from its log text)."""
    root = ET.parse(junit).getroot()  # noqa: S314 -- the JUnit file our own pytest run just wrote
    out = {}
    for case in root.iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            out[case.get("name", "?").split("[")[0]] = (bad.get("message") or "") + (bad.text or "")
    return out


def _infra(lab: dict[str, Any], label: str, *select: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "pytest", "tests/infra", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
        f"--hosts=ssh://root@127.0.0.1:{lab['ssh_port']}", f"--ssh-config={lab['ssh_config']}", *select,
    ]  # fmt: skip
    return _phase(label, cmd, lab["env"], timeout=900)


def test_lab_end_to_end(lab: dict[str, Any]) -> None:
    changed, errors = _deploy(lab, "deploy-1")
    assert errors == [], f"first deploy failed: {errors}"
    assert changed, "a first deploy on a fresh target must change something"

    infra = _infra(lab, "testinfra suite")
    _ok(infra, "tests/infra against the lab")

    changed, errors = _deploy(lab, "deploy-2")
    assert errors == []
    assert changed == [], f"second deploy changed: {changed}"

    traffic = _phase("simulator traffic over TLS (provision, export, 20 s)",
                     [*lab["cli"], "traffic", "--count", "100", "--duration", "20"], lab["env"])  # fmt: skip
    _ok(traffic, "traffic")
    figures = json.loads(traffic.stdout.strip().splitlines()[-1])
    assert figures["ok"] and figures["failed"] == 0, figures
    assert figures["telemetry_messages_in_database"] == figures["telemetry_acked"] > 0, figures
    assert figures["rejected_messages"] == 0, figures

    drill = _phase("backup and restore drill on the target", [*lab["cli"], "drill"], lab["env"], timeout=900)
    _ok(drill, "backup + drill")

    _break_three_things_and_repair(lab)

    restart = _phase("restart target", [*lab["cli"], "restart"], lab["env"], timeout=300)
    _ok(restart, "restart")
    back = _infra(lab, "units, sockets, ingest after restart", "-k", "units or listening or docker or ingest")
    _ok(back, "units after restart")


# What the test breaks, and the test of tests/infra that must catch each (and nothing else).
INTRUDER_PORT = 9999
BROKEN_UNIT = "fail2ban"


def _break_three_things_and_repair(lab: dict[str, Any]) -> None:
    # The Mosquitto role's database password: nothing restarts when only its mode is put back.
    secret = DB_PASSWORD_FILE
    assert secret_files(load_host("lab"))[secret][0] == 0o600, "tests/infra must check this file"
    _ssh(lab, f"systemd-run --unit=lab-intruder python3 -m http.server {INTRUDER_PORT} --bind 0.0.0.0")
    _ssh(lab, f"chmod 0644 {secret}")
    _ssh(lab, f"systemctl stop {BROKEN_UNIT}")
    _ssh(lab, f"for i in $(seq 50); do ss -Htln | grep -q ':{INTRUDER_PORT} ' && exit 0; sleep 0.2; done; exit 1")

    junit = lab["dir"] / "broken.xml"
    broken = _infra(lab, "testinfra suite on a broken host", f"--junitxml={junit}")
    assert broken.returncode == 1, broken.stdout[-3000:]
    failures = _failures(junit)
    assert set(failures) == {
        "test_listening_sockets_and_bind_addresses",
        "test_secret_files_modes_and_owners",
        "test_units_enabled_and_active",
    }, {name: message[:300] for name, message in failures.items()}
    assert str(INTRUDER_PORT) in failures["test_listening_sockets_and_bind_addresses"]
    assert secret in failures["test_secret_files_modes_and_owners"]
    assert BROKEN_UNIT in failures["test_units_enabled_and_active"]

    _ssh(lab, "systemctl stop lab-intruder")
    changed, errors = _deploy(lab, "deploy-repair")
    assert errors == []
    # The deploy puts back exactly what was broken that it owns: the file's mode and the unit.
    assert len(changed) == 2, changed
    assert any(secret in name for name in changed), changed
    assert any(BROKEN_UNIT in name for name in changed), changed
    _ok(_infra(lab, "testinfra suite after the repair deploy"), "tests/infra after repair")
