"""TimescaleDB 2.x on PostgreSQL 15 as a compose project, tuned from the host's memory."""

from __future__ import annotations

from pyinfra.operations import files

from roles._base import render, role_deploy
from roles._database import DatabaseRole
from roles.docker import compose_command
from roles.secrets import secrets_for
from roles.stack import compose_project

PROJECT = "timescaledb"
# uid of the postgres user in the (Alpine-based) timescale/timescaledb image: the entrypoint reads
# the password file after dropping root.
POSTGRES_UID = 70


class DatabaseTimescaledb(DatabaseRole):
    name = "database_timescaledb"
    timescaledb = True

    @property
    def directory(self) -> str:
        return f"{self.data('compose_root')}/{PROJECT}"

    def install(self) -> None:
        files.directory(name=f"{self.name}: {self.directory}", path=self.directory, mode="0750")
        files.directory(
            name=f"{self.name}: {self.directory}/data",
            path=f"{self.directory}/data",
            user=str(POSTGRES_UID),
            group=str(POSTGRES_UID),
            mode="0700",
        )

    def configure(self) -> None:
        d = self.directory
        networks = list(self.data("database_allowed_networks"))
        self.put(
            render(
                "database_timescaledb/compose.yaml.j2",
                image=self.data("timescaledb_image"),
                database=self.data("database_name"),
                listen=self.data("database_listen_address"),
                port=self.data("database_port"),
            ),
            f"{d}/compose.yaml",
            key="config",
        )
        # Inside the container PostgreSQL listens everywhere; the published port decides who reaches it.
        conf = self.tuning_conf("*") + "hba_file = '/etc/postgresql/pg_hba.conf'\n"
        self.put(conf, f"{d}/postgresql.conf", key="config")
        # Docker's bridge gateway is where published-port connections come from.
        hba = render(
            "database/pg_hba.conf.j2",
            role=self.name,
            networks=["172.16.0.0/12", *networks],
            # The socket is reachable only inside the container (docker exec for the login SQL).
            local_method="trust",
            postgres_peer=False,
        )
        self.put(hba, f"{d}/pg_hba.conf", key="config")
        self.put(
            secrets_for(self.host)["db_superuser_password"] + "\n",
            f"{d}/postgres_password",
            key="config",
            mode="0600",
            user=POSTGRES_UID,
            group=POSTGRES_UID,
            secret=True,
        )
        self.put(self.roles_sql(), f"{d}/roles.sql", key="roles", mode="0600", secret=True)

    def activate(self) -> None:
        compose_project(self, PROJECT, self.directory, restart_if=self.changed("config"))
        compose = compose_command(self.data("docker_source"))
        psql = (
            f"cd {self.directory} && {compose} --project-name {PROJECT} exec -T timescaledb "
            f"psql -q -U postgres -d postgres < {self.directory}/roles.sql"
        )
        self.run_sql_and_migrations(
            psql,
            f"host=127.0.0.1 port={self.data('database_port')} dbname={self.data('database_name')} user=postgres",
            f"{self.directory}/postgres_password",
        )


database_timescaledb = role_deploy(DatabaseTimescaledb)
