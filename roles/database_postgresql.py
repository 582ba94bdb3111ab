"""PostgreSQL from apt (lab and small sites): same logins and migrations as TimescaleDB, plain tables."""

from __future__ import annotations

from pyinfra.operations import apt, files

from roles._base import render, role_deploy
from roles._database import DatabaseRole


class DatabasePostgresql(DatabaseRole):
    name = "database_postgresql"

    @property
    def etc(self) -> str:
        return f"/etc/postgresql/{self.data('postgresql_version')}/main"

    def install(self) -> None:
        version = self.data("postgresql_version")
        self.record(
            "install",
            apt.packages(
                name=f"{self.name}: postgresql-{version}",
                packages=[f"postgresql-{version}", f"postgresql-client-{version}"],
                no_recommends=True,
                update=True,
                cache_time=3600,
            ),
        )
        files.directory(name=f"{self.name}: /etc/telemetry", path="/etc/telemetry", mode="0755")

    def configure(self) -> None:
        listen = str(self.data("database_listen_address"))
        self.put(
            self.tuning_conf(listen),
            f"{self.etc}/conf.d/60-telemetry.conf",
            key="config",
            user="postgres",
            group="postgres",
        )
        self.put(
            render(
                "database/pg_hba.conf.j2",
                role=self.name,
                networks=list(self.data("database_allowed_networks")),
                local_method="scram-sha-256",
                postgres_peer=True,
            ),
            f"{self.etc}/pg_hba.conf",
            key="hba",
            mode="0640",
            user="postgres",
            group="postgres",
        )
        self.put(
            self.roles_sql(),
            "/etc/telemetry/database-roles.sql",
            key="roles",
            mode="0600",
            user="postgres",
            group="postgres",
            secret=True,
        )

    def activate(self) -> None:
        version = self.data("postgresql_version")
        self.service(
            f"postgresql@{version}-main",
            restart_if=self.changed("config"),
            reload_if=self.changed("hba"),
        )
        self.run_sql_and_migrations(
            "psql -q -d postgres -f /etc/telemetry/database-roles.sql",
            f"host=/var/run/postgresql dbname={self.data('database_name')} user=postgres",
            None,
            _sudo=True,
            _sudo_user="postgres",
        )


database_postgresql = role_deploy(DatabasePostgresql)
