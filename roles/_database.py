"""What both database backends share: memory-based tuning, service logins, migrations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyinfra.operations import server

from ingest.schema import ROLE_BROKER, ROLE_INGEST, ROLE_PROVISIONER
from roles._base import Role, RoleError, render
from roles.facts import MemTotalMiB
from roles.ingest import package_changed
from roles.secrets import secrets_for

#: The postgres exporter's login (roles/monitoring.py), a member of the built-in pg_monitor role: read
#: statistics, nothing of the data. Named after the OS user Debian's prometheus-postgres-exporter runs as,
#: so that on the apt backend it logs in by peer authentication over the socket and has no password at
#: all (templates/database/pg_hba.conf.j2); the TimescaleDB container is reached over TCP with the vault's
#: db_monitor_password.
MONITOR_LOGIN = "prometheus"
MONITOR_GROUP = "pg_monitor"


@dataclass(frozen=True)
class Login:
    name: str
    group: str
    #: None: no password (peer authentication only); a password login is then impossible.
    password: str | None


def tuning(memory_mib: int, max_connections: int, shared_ratio: float, cache_ratio: float) -> dict[str, int]:
    """Classic PostgreSQL sizing: a quarter of memory for shared_buffers, three quarters assumed as OS
    cache, work_mem so that every connection sorting at once still fits."""
    shared = max(128, int(memory_mib * shared_ratio))
    return {
        "memory_mib": memory_mib,
        "shared_buffers_mib": shared,
        "effective_cache_mib": max(256, int(memory_mib * cache_ratio)),
        "maintenance_work_mem_mib": max(64, min(2048, memory_mib // 16)),
        "work_mem_mib": max(4, (memory_mib - shared) // (max_connections * 3)),
    }


class DatabaseRole(Role):
    """Base for database_timescaledb and database_postgresql."""

    timescaledb = False

    def memory_mib(self) -> int:
        measured = self.host.get_fact(MemTotalMiB)
        if measured is None:
            self.warn_once("cannot read /proc/meminfo: tuning for database_memory_fallback_mib")
            return int(self.data("database_memory_fallback_mib"))
        return int(measured)

    def tuning_conf(self, listen_addresses: str) -> str:
        max_connections = int(self.data("database_max_connections"))
        return render(
            "database/postgresql-tuning.conf.j2",
            listen_addresses=listen_addresses,
            port=5432 if self.timescaledb else self.data("database_port"),
            max_connections=max_connections,
            timescaledb=self.timescaledb,
            **tuning(
                self.memory_mib(),
                max_connections,
                float(self.data("database_shared_buffers_ratio")),
                float(self.data("database_effective_cache_ratio")),
            ),
        )

    def logins(self) -> list[Login]:
        secrets = secrets_for(self.host)
        users = [
            (self.data("db_broker_user"), ROLE_BROKER, "db_broker_password"),
            (self.data("db_ingest_user"), ROLE_INGEST, "db_ingest_password"),
            (self.data("db_provisioner_user"), ROLE_PROVISIONER, "db_provisioner_password"),
        ]
        out = []
        for name, group, secret in users:
            if not str(name).replace("_", "").isalnum():
                raise RoleError(f"{self.name}: database user {name!r} must be letters, digits and _")
            out.append(Login(str(name), group, secrets[secret]))
        monitor_password = secrets["db_monitor_password"] if self.timescaledb else None
        out.append(Login(MONITOR_LOGIN, MONITOR_GROUP, monitor_password))
        return out

    def roles_sql(self) -> str:
        return render("database/roles.sql.j2", database=self.data("database_name"), users=self.logins())

    def run_sql_and_migrations(self, psql: str, migrate_dsn: str, password_file: str | None, **ctx: Any) -> None:
        """Apply the login SQL, then the schema migrations with the ingest CLI, then the SQL again
        (the grants need the group roles the first migration creates). Runs only when something of
        this role changed, or when ingest_package (which runs before this role) installed new code,
        whose migrations must then apply."""
        if not self.has_systemd:
            self.warn_once("systemd is not PID 1: database not running, logins and migrations deferred")
            return
        changed = self.any_of(self.changed("install", "config", "unit", "roles"), package_changed(self.host))
        ingest = self.data("ingest_bin")
        pw = f" --password-file {password_file}" if password_file else ""
        server.shell(
            name=f"{self.name}: service logins, schema migrations, grants",
            commands=[
                psql,
                # The ingest CLI arrives with the ingest role; until then migrations wait for it.
                f"if [ -x {ingest} ]; then {ingest} migrate --dsn '{migrate_dsn}'{pw}; "
                f"else echo '{self.name}: {ingest} not installed yet, migrations deferred' >&2; fi",
                psql,
            ],
            _if=changed,
            **ctx,
        )
