"""The platform's own services on a deployed host: the ingest service, the operations scripts and
their cron file, the boot check, monitoring. Read-only; expectations from the roles and group data."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from roles import ingest, ops
from tests.unit.test_roles_ops import parse_cron_d
from tools.lab.inventory import InventoryHost


def _bin(data: dict[str, Any], name: str) -> str:
    return f"{data['ingest_venv_dir']}/bin/{name}"


def test_ingest_service_healthy(host: Any, expected: InventoryHost) -> None:
    if "ingest" not in expected.roles:
        pytest.skip("no ingest service on this host")
    data = expected.data
    unit = host.service(ingest.UNIT)
    assert unit.is_enabled and unit.is_running
    # /healthz answers 200 only when the broker session and the database are both up.
    out = host.run(f"curl -s -w '\\n%{{http_code}}' http://{data['ingest_http_address']}/healthz")
    body, _, code = out.stdout.strip().rpartition("\n")
    assert code == "200", out.stdout
    assert json.loads(body)["ok"] is True
    # The service runs as its own unprivileged user.
    pid = host.check_output(f"systemctl show -p MainPID --value {ingest.UNIT}")
    assert host.check_output(f"ps -o user= -p {pid}") == data["ingest_service_user"]


def test_host_scripts_runnable(host: Any, expected: InventoryHost) -> None:
    if "ops" not in expected.roles:
        pytest.skip("no operations role on this host")
    broken = []
    for name in ops.SCRIPTS.values():
        done = host.run(f"{shlex.quote(_bin(expected.data, name))} --help")
        if done.rc != 0 or "usage" not in done.stdout.lower():
            broken.append(f"{name}: rc={done.rc} {done.stderr.strip()[-200:]}")
    assert broken == []


def test_cron_file_parses_and_runs_installed_scripts(host: Any, expected: InventoryHost) -> None:
    if "ops" not in expected.roles:
        pytest.skip("no operations role on this host")
    cron = host.file(ops.CRON_FILE)
    # cron.d ignores files that are group- or world-writable or not owned by root.
    assert (cron.user, cron.mode & 0o022) == ("root", 0)
    _, jobs = parse_cron_d(cron.content_string)
    assert jobs, "no cron jobs"
    named = set()
    for job in jobs:
        assert job.comment, f"uncommented cron job: {job.command}"
        for name in ops.SCRIPTS.values():
            if _bin(expected.data, name) in job.command:
                named.add(name)
                assert host.file(_bin(expected.data, name)).mode & 0o111, f"{name} not executable"
    assert {"telemetry-backup", "telemetry-healthcheck", "telemetry-restore"} <= named
    assert host.service("cron").is_running


def test_boot_check_enabled(host: Any, expected: InventoryHost) -> None:
    if "ops" not in expected.roles:
        pytest.skip("no operations role on this host")
    assert host.service(ops.BOOT_UNIT.removesuffix(".service")).is_enabled


def test_operations_config_not_world_readable(host: Any, expected: InventoryHost) -> None:
    if "ops" not in expected.roles:
        pytest.skip("no operations role on this host")
    config = host.file(ops.OPS_CONFIG)
    assert config.exists and config.user == "root" and config.mode & 0o007 == 0


def test_prometheus_ready_and_targets_up(host: Any, expected: InventoryHost) -> None:
    if "monitoring" not in expected.roles:
        pytest.skip("no monitoring on this host")
    address = expected.data["prometheus_listen_address"]
    assert host.run(f"curl -sf http://{address}/-/ready").rc == 0
    targets = json.loads(host.check_output(f"curl -sf http://{address}/api/v1/targets"))["data"]["activeTargets"]
    assert targets, "Prometheus scrapes nothing"
    # Scrapes run every prometheus_scrape_interval; a target never scraped yet is 'unknown', not down.
    down = [t["scrapeUrl"] + ": " + t.get("lastError", "") for t in targets if t["health"] == "down"]
    assert down == []
