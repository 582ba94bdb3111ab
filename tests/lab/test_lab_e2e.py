"""End to end on the lab target: build or reuse, deploy, testinfra, deploy again with zero changes,
restart the target and find its units back, tear down.

Drives the lab through its CLI (``python -m tools.lab``) in subprocesses, exactly as ``make lab``
does, on an instance of its own (own state dir, run dir, bridge and dockerd), so a lab a developer
has up is neither reused nor torn down. The rootfs tarball in .cache/lab is shared (built once).

Needs root and /sys/fs/cgroup (a systemd container on a private dockerd). CI runs it; for quick local
runs set TELEMETRY_SKIP_LAB=1. Later phases of issue 8 (devices, simulator traffic, backup drill,
the deliberately-broken-host test) are not here yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import PHASES
from tools.lab.deploy import parse_results
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

    restart = _phase("restart target", [*lab["cli"], "restart"], lab["env"], timeout=300)
    _ok(restart, "restart")
    back = _infra(lab, "units and sockets after restart", "-k", "units or listening or docker")
    _ok(back, "units after restart")
