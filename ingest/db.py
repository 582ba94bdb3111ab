"""The smallest database interface the migration runner and the provisioning library need.

Two implementations exist: :class:`PsycopgSession` for real PostgreSQL, and the pglite bridge in
``tests/support/pglite.py`` that runs the same code against the TimescaleDB WASM build. Keeping the
interface this small is what lets the *same* runner be proven on both.

Sessions are in autocommit mode: callers that need atomicity issue ``BEGIN``/``COMMIT`` themselves
through :func:`transaction`, so both backends behave identically.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import psycopg

Row = tuple[Any, ...]


class Session(Protocol):
    def execute(self, sql: str, params: Sequence[Any] | None = None) -> list[Row]:
        """Run one statement with ``%s`` placeholders; return its rows (empty if none)."""

    def execute_script(self, sql: str) -> None:
        """Run several statements without parameters (a migration file)."""


@contextmanager
def transaction(session: Session) -> Iterator[None]:
    session.execute_script("BEGIN")
    try:
        yield
    except BaseException:
        session.execute_script("ROLLBACK")
        raise
    session.execute_script("COMMIT")


class PsycopgSession:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True
        self.conn = conn

    @classmethod
    def connect(cls, dsn: str) -> PsycopgSession:
        return cls(psycopg.connect(dsn, autocommit=True))

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> list[Row]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def execute_script(self, sql: str) -> None:
        # Without parameters psycopg uses the simple query protocol, which accepts many statements.
        self.conn.execute(sql)

    def close(self) -> None:
        self.conn.close()
