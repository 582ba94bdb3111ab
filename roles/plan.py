"""Which roles a host gets, in which order, from its groups and group data (used by deploys/)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyinfra.api.host import Host

from roles._base import RoleError
from roles.base import base
from roles.broker_emqx import broker_emqx
from roles.broker_mosquitto import broker_mosquitto
from roles.certbot import certbot
from roles.database_postgresql import database_postgresql
from roles.database_timescaledb import database_timescaledb
from roles.docker import docker
from roles.ingest import PACKAGE_GROUPS, ingest, ingest_account, ingest_package
from roles.logrotate import logrotate
from roles.monitoring import monitoring
from roles.nginx import nginx
from roles.ops import ops_roles

Deploy = Callable[[], Any]

BROKERS: dict[str, Deploy] = {"emqx": broker_emqx, "mosquitto": broker_mosquitto}
DATABASES: dict[str, Deploy] = {"timescaledb": database_timescaledb, "postgresql": database_postgresql}
COMPOSE_BACKENDS = {"emqx", "timescaledb"}


def _pick(kind: str, table: dict[str, Deploy], value: Any) -> Deploy:
    if value not in table:
        raise RoleError(f"{kind}_backend must be one of {', '.join(table)}, not {value!r}")
    return table[value]


def database_roles(host: Host) -> list[Deploy]:
    if "databases" not in host.groups:
        return []
    return [_pick("database", DATABASES, host.data.get("database_backend"))]


def broker_roles(host: Host) -> list[Deploy]:
    if "brokers" not in host.groups:
        return []
    return [_pick("broker", BROKERS, host.data.get("broker_backend"))]


def docker_roles(host: Host) -> list[Deploy]:
    """Docker wherever a compose stack will run; the lab gets Debian's too (later issues use it)."""
    backends = set()
    if "brokers" in host.groups:
        backends.add(host.data.get("broker_backend"))
    if "databases" in host.groups:
        backends.add(host.data.get("database_backend"))
    wanted = bool(backends & COMPOSE_BACKENDS) or host.data.get("docker_source") == "debian"
    return [docker] if wanted else []


def web_roles(host: Host) -> list[Deploy]:
    """nginx (and certbot) where the API is served or the broker needs a certificate."""
    if not {"brokers", "ingest"} & set(host.groups):
        return []
    return [nginx, certbot]


def ingest_roles(host: Host) -> tuple[list[Deploy], list[Deploy], list[Deploy]]:
    """The host virtualenv (before the database, which migrates with its ``ingest`` CLI) wherever a
    database, broker or ingest runs; on ingest hosts, the service's account (before the broker, which
    reads accounts from the database) and the service itself (after the broker: it starts last, so it
    stops first). See roles/ingest.py."""
    package = [ingest_package] if set(PACKAGE_GROUPS) & set(host.groups) else []
    if "ingest" not in host.groups:
        return package, [], []
    return package, [ingest_account], [ingest]


def all_roles(host: Host) -> list[Deploy]:
    """Base first (firewall, users), then Docker, the host virtualenv, then the database the broker
    authenticates against; certificates before the broker, which reads them at start; the ingest
    service after the broker; monitoring of what runs on the host (it scrapes only what the host's
    groups put there); log rotation for what they write."""
    package, account, service = ingest_roles(host)
    return [
        base,
        *docker_roles(host),
        *package,
        *database_roles(host),
        *account,
        *web_roles(host),
        *broker_roles(host),
        *service,
        monitoring,
        *ops_roles(host),
        logrotate,
    ]
