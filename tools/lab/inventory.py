"""A host as pyinfra's CLI sees it (inventory + group_data), so the lab and tests/infra publish,
check and describe exactly what the deploy uses: one source of truth, no copied port numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from roles import broker_mosquitto, ingest, monitoring, stack
from tools.lab.target import REPO


@dataclass(frozen=True)
class InventoryHost:
    name: str
    groups: list[str]
    data: dict[str, Any]
    roles: list[str]
    # Ports the deploy opens to the world besides SSH (roles.base.public_ports).
    public_ports: list[int]
    # (source, port) pairs only other inventory hosts may reach (roles.base.peer_rules).
    peer_rules: list[tuple[str, int]]

    @property
    def units(self) -> list[str]:
        """Units the deployed roles keep enabled and running (see each role's ``activate``)."""
        units = ["ssh", "fail2ban", "systemd-timesyncd"]
        if "docker" in self.roles:
            units.append("docker")
        if "database_postgresql" in self.roles:
            units.append(f"postgresql@{self.data['postgresql_version']}-main")
        if "broker_mosquitto" in self.roles:
            units += ["mosquitto", broker_mosquitto.SYNC_TIMER]
        if "nginx" in self.roles:
            units.append("nginx")
        for role, project in (("broker_emqx", "emqx"), ("database_timescaledb", "timescaledb")):
            if role in self.roles:
                units.append(stack.unit_name(project).removesuffix(".service"))
        if "ingest" in self.roles:
            units.append(ingest.UNIT.removesuffix(".service"))
        if "monitoring" in self.roles:
            units += [monitoring.UNITS[k] for k in ("prometheus", "alertmanager", "node")]
            if "databases" in self.groups:
                units.append(monitoring.UNITS["postgres"])
        if "ops" in self.roles:
            units.append("cron")
        return units


# Kept for the lab's own modules, where there is exactly one host.
LabHost = InventoryHost


def load_host(inventory: str = "lab", name: str | None = None) -> InventoryHost:
    """One host of ``inventories/<inventory>.py`` with its merged group data; ``name`` may be omitted
    when the inventory has a single host."""
    from pyinfra.api.state import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory  # type: ignore[import-untyped]

    from roles.base import peer_rules, public_ports
    from roles.plan import all_roles

    with ctx_state.use(State()):
        inv = make_inventory(str(REPO / "inventories" / f"{inventory}.py"), cwd=str(REPO))
    hosts = list(inv)
    if name is None:
        if len(hosts) != 1:
            raise ValueError(f"inventory {inventory} has {len(hosts)} hosts: name one of {[h.name for h in hosts]}")
        (host,) = hosts
    else:
        matches = [h for h in hosts if h.name == name]
        if not matches:
            raise ValueError(f"no host {name!r} in inventory {inventory}: {[h.name for h in hosts]}")
        (host,) = matches
    roles = [str(getattr(role, "deploy_name", role.__name__)) for role in all_roles(host)]
    return InventoryHost(
        host.name,
        list(host.groups),
        dict(host.data.dict()),
        roles,
        public_ports(host),
        [(rule.source, rule.port) for rule in peer_rules(host)],
    )


def load_lab_host() -> InventoryHost:
    return load_host("lab")
