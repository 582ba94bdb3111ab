"""Fixtures shared by integration tests that need the project's schema on the real PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ingest.db import PsycopgSession
from ingest.migrate import migrate
from ingest.schema import ROLE_INGEST
from tests.support.ingest_proc import IngestEnv, IngestEnvFactory, provision_env
from tests.support.mosquitto import MosquittoFactory
from tests.support.postgres import PostgresServer


@pytest.fixture
def migrated_dsn(pg_dsn: str) -> str:
    """A fresh database (superuser DSN) with every migration applied."""
    session = PsycopgSession.connect(pg_dsn)
    try:
        migrate(session)
    finally:
        session.close()
    return pg_dsn


@pytest.fixture
def db(migrated_dsn: str) -> Iterator[PsycopgSession]:
    """A superuser session on a migrated database (the account provisioning runs as in tests)."""
    session = PsycopgSession.connect(migrated_dsn)
    yield session
    session.close()


@pytest.fixture
def role_dsn(pg_server: PostgresServer, migrated_dsn: str) -> Iterator[Callable[[str], str]]:
    """Factory: a LOGIN user that is a member of one group role (as a deploy creates it), and its DSN."""
    created: list[str] = []
    dbname = psycopg.conninfo.conninfo_to_dict(migrated_dsn)["dbname"]

    def make(group_role: str) -> str:
        user = f"u_{group_role}_{secrets.token_hex(3)}"
        password = secrets.token_urlsafe(12)
        with psycopg.connect(migrated_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                    sql.Identifier(user), sql.Literal(password), sql.Identifier(group_role)
                )
            )
        created.append(user)
        return pg_server.dsn(str(dbname), user=user, password=password)

    yield make
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        for user in created:
            # The test database is dropped by pg_dsn's teardown after this; drop the role's grants here.
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(user)))


@pytest.fixture
def ingest_env(
    migrated_dsn: str, role_dsn: Callable[[str], str], mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> IngestEnvFactory:
    """Factory ``(device_ids, **MosquittoBroker options)``: devices and the ingest account provisioned,
    a broker whose password/ACL files come from the database, the ingest login in ROLE_INGEST."""

    def make(device_ids: list[str], **broker_options: Any) -> IngestEnv:
        broker = mosquitto_factory(**broker_options)
        return provision_env(migrated_dsn, role_dsn(ROLE_INGEST), broker, tmp_path, device_ids)

    return make
