"""Fixtures for real services: PostgreSQL, a test PKI, Mosquitto. Everything on 127.0.0.1.

Every fixture registers its teardown with `request.addfinalizer` *before* starting anything, so a
service that fails half-way through its start is still stopped, and a failing test never leaves a
process behind. Directories come from `tmp_path_factory` (kept for the last runs: logs survive a
failure for inspection).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.mosquitto import MosquittoBroker, MosquittoFactory
from tests.support.pki import PkiFiles, create_pki
from tests.support.postgres import PostgresServer

# PostgreSQL truncates identifiers to 63 bytes; slug + 12 hex chars stays well below.
_DB_SLUG_LEN = 40


@dataclass(frozen=True)
class PgDatabase:
    """A database created for one test; `dsn` is the superuser's, over TCP with password."""

    name: str
    dsn: str
    admin_dsn: str
    server: PostgresServer


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> PostgresServer:
    """One PostgreSQL cluster for the whole session (initdb + start takes about a second)."""
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    request.addfinalizer(server.close)  # stop, keep the log in the tmp dir, remove the cluster
    server.start()
    return server


@pytest.fixture(scope="session")
def pg_admin_dsn(pg_server: PostgresServer) -> str:
    """Superuser DSN to the `postgres` maintenance database (roles, CREATE DATABASE...)."""
    return pg_server.admin_dsn


@pytest.fixture
def pg_database(pg_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[PgDatabase]:
    """A fresh, uniquely named database for this test, dropped (WITH FORCE) afterwards."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:_DB_SLUG_LEN]
    name = f"t_{slug}_{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: pg_server.drop_database(name))
    dsn = pg_server.create_database(name)
    yield PgDatabase(name=name, dsn=dsn, admin_dsn=pg_server.admin_dsn, server=pg_server)


@pytest.fixture
def pg_dsn(pg_database: PgDatabase) -> str:
    """Superuser DSN (libpq URI) of this test's fresh database."""
    return pg_database.dsn


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    """A test CA (ECDSA P-256) with a server certificate for localhost/127.0.0.1 and a client one."""
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mosquitto_factory(
    tmp_path_factory: pytest.TempPathFactory, pki: PkiFiles, request: pytest.FixtureRequest
) -> MosquittoFactory:
    """Factory for brokers (MosquittoBroker keyword arguments); all are stopped after the test."""
    brokers: list[MosquittoBroker] = []

    def stop_all() -> None:
        errors: list[BaseException] = []
        for broker in reversed(brokers):
            try:
                broker.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    request.addfinalizer(stop_all)

    def make(*, start: bool = True, **options: Any) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), pki, **options)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    return make


@pytest.fixture
def mosquitto(mosquitto_factory: MosquittoFactory) -> MosquittoBroker:
    """A started broker with default settings: admin account, TLS + plain listeners."""
    return mosquitto_factory()
