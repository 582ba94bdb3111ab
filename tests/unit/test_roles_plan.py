"""deploys/all.py: roles composed in order from each host's groups and backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyinfra.context import host

import roles.ingest
from roles._wheel import Bundle, lock_text
from roles.plan import all_roles
from tests.support.deploy_fake import run_deploys


@pytest.fixture(autouse=True)
def small_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in wheelhouse: the real one is built and tested in tests/integration/test_ingest_role_wheel.py."""
    wheel = tmp_path / "paho_mqtt-2.2.0-py3-none-any.whl"
    wheel.write_text("wheel\n")
    project = tmp_path / "telemetry_platform-0.1.0-py3-none-any.whl"
    project.write_text("project\n")
    b = Bundle(tmp_path, (wheel,), lock_text([wheel]), project)
    monkeypatch.setattr(roles.ingest, "bundle", lambda target: b)


def everything() -> None:
    for role in all_roles(host):
        role()


# One file only each role writes. (Operation names are not used: in pyinfra's API mode operations of
# different hosts share hashes by position, so their names mix across hosts.)
SIGNATURE = {
    "base": "/etc/ssh/sshd_config.d/10-telemetry.conf",
    "docker": "/etc/docker/daemon.json",
    "database_timescaledb": "/srv/telemetry/timescaledb/compose.yaml",
    "database_postgresql": "/etc/telemetry/database-roles.sql",
    "broker_emqx": "/srv/telemetry/emqx/etc/emqx.conf",
    "broker_mosquitto": "/etc/mosquitto/mosquitto.conf",
    "ingest_package": "/opt/telemetry/wheelhouse/requirements.lock",
    "ingest_account": "/etc/telemetry/ingest/mqtt.password",
    "ingest": "/etc/systemd/system/telemetry-ingest.service",
    "monitoring": "/etc/prometheus/prometheus.yml",
    "ops": "/etc/cron.d/telemetry",
    "logrotate": "/etc/logrotate.d/telemetry",
}
# Every host of the platform's groups watches itself, gets the operations side and log rotation, last.
LAST = ["monitoring", "ops", "logrotate"]


@pytest.mark.parametrize(
    ("inventory", "host_name", "expected"),
    [
        (
            "prod",
            "telemetry.example.net",
            [
                "base",
                "docker",
                "ingest_package",
                "database_timescaledb",
                "ingest_account",
                "broker_emqx",
                "ingest",
                *LAST,
            ],
        ),
        (
            "lab",
            "lab.telemetry.test",
            [
                "base",
                "docker",
                "ingest_package",
                "database_postgresql",
                "ingest_account",
                "broker_mosquitto",
                "ingest",
                *LAST,
            ],
        ),
        ("cluster-example", "broker-b.cluster.example.net", ["base", "docker", "ingest_package", "broker_emqx", *LAST]),
        (
            "cluster-example",
            "ingest-a.cluster.example.net",
            ["base", "ingest_package", "ingest_account", "ingest", *LAST],
        ),
        (
            "cluster-example",
            "db-a.cluster.example.net",
            ["base", "docker", "ingest_package", "database_timescaledb", *LAST],
        ),
    ],
)
def test_roles_per_host(inventory: str, host_name: str, expected: list[str]) -> None:
    result = run_deploys(inventory, [everything])[host_name]
    uploaded = list(result.files)
    present = [role for role, path in SIGNATURE.items() if path in uploaded]
    assert sorted(present) == sorted(expected)
    # order: base, docker, the host virtualenv, the database (migrates with it), the ingest account
    # (the broker reads accounts from the database), the broker, the ingest service (stops first)
    positions = [uploaded.index(SIGNATURE[role]) for role in expected]
    assert positions == sorted(positions)
