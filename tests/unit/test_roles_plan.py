"""deploys/all.py: roles composed in order from each host's groups and backends."""

from __future__ import annotations

import pytest
from pyinfra.context import host

from roles.plan import all_roles
from tests.support.deploy_fake import run_deploys


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
}


@pytest.mark.parametrize(
    ("inventory", "host_name", "expected"),
    [
        ("prod", "telemetry.example.net", ["base", "docker", "database_timescaledb", "broker_emqx"]),
        ("lab", "lab.telemetry.test", ["base", "docker", "database_postgresql", "broker_mosquitto"]),
        ("cluster-example", "broker-b.cluster.example.net", ["base", "docker", "broker_emqx"]),
        ("cluster-example", "ingest-a.cluster.example.net", ["base"]),
        ("cluster-example", "db-a.cluster.example.net", ["base", "docker", "database_timescaledb"]),
    ],
)
def test_roles_per_host(inventory: str, host_name: str, expected: list[str]) -> None:
    result = run_deploys(inventory, [everything])[host_name]
    uploaded = list(result.files)
    present = [role for role, path in SIGNATURE.items() if path in uploaded]
    assert sorted(present) == sorted(expected)
    # order: base before docker before the database before the broker
    positions = [uploaded.index(SIGNATURE[role]) for role in expected]
    assert positions == sorted(positions)
