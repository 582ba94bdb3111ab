"""The database side: one connection, one transaction per batch, as a member of telemetry_ingest.

Per batch, normally: binary COPY straight into telemetry, then dead letters and device updates.
When that COPY hits the unique index (device, metric, time) -- a QoS 1 redelivery after a crash or
reconnect -- the transaction is rolled back and the batch is written the deduplicating way: binary
COPY into a session-local staging table (temporary, ON COMMIT DELETE ROWS: no WAL, no cleanup), then
``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. Device updates lock their rows in id order first.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from ingest.service.processor import Batch

log = logging.getLogger(__name__)

STAGING_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS ingest_staging "
    "(time timestamptz NOT NULL, device integer NOT NULL, metric smallint NOT NULL, value double precision NOT NULL) "
    "ON COMMIT DELETE ROWS"
)
DIRECT_COPY_SQL = "COPY telemetry (time, device, metric, value) FROM STDIN (FORMAT BINARY)"
COPY_SQL = "COPY ingest_staging (time, device, metric, value) FROM STDIN (FORMAT BINARY)"
MERGE_SQL = (
    "INSERT INTO telemetry (time, device, metric, value) "
    "SELECT time, device, metric, value FROM ingest_staging ON CONFLICT DO NOTHING"
)
REJECT_SQL = "INSERT INTO rejected_messages (topic, reason, detail, payload, payload_size) VALUES (%s, %s, %s, %s, %s)"
# Times travel as int8 microseconds since 2000-01-01 (the COPY representation): dumping int arrays is
# done in C, building a datetime per device was a visible share of the writer's profile.
# Row locks in id order first: two workers updating overlapping devices can then never deadlock.
LOCK_SQL = "SELECT id FROM devices WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
STATUS_SQL = (
    "UPDATE devices d SET status = v.status, status_at = v.t "
    "FROM (SELECT id, status, timestamptz '2000-01-01 00:00:00+00' + us * interval '1 microsecond' AS t "
    "FROM unnest(%s::int[], %s::text[], %s::int8[]) AS u(id, status, us)) v "
    "WHERE d.id = v.id AND (d.status_at IS NULL OR d.status_at <= v.t)"
)
SEEN_SQL = (
    "UPDATE devices d SET last_seen_at = v.t "
    "FROM (SELECT id, timestamptz '2000-01-01 00:00:00+00' + us * interval '1 microsecond' AS t "
    "FROM unnest(%s::int[], %s::int8[]) AS u(id, us)) v "
    "WHERE d.id = v.id AND (d.last_seen_at IS NULL OR d.last_seen_at < v.t)"
)


@dataclass
class WriteResult:
    inserted: int
    duplicates: int


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


class Store:
    def __init__(self, conninfo: str, max_metrics: int) -> None:
        self.direct_copy_skip = 0  # batches to write via staging before trying direct COPY again
        self.conninfo = conninfo
        self.max_metrics = max_metrics
        self.conn: psycopg.Connection[Any] | None = None

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def connect(self) -> None:
        self.close()
        conn = psycopg.connect(self.conninfo, autocommit=True)
        try:
            conn.execute(STAGING_DDL)
            # A batch must never wait minutes on a lock or a stuck server: fail and retry instead.
            conn.execute("SET statement_timeout = '60s'")
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            # A broken connection may fail to close; it is gone either way.
            with contextlib.suppress(Exception):
                conn.close()

    def _c(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            raise psycopg.OperationalError("not connected")
        return self.conn

    # -- catalog ---------------------------------------------------------------------------

    def devices(self, limit: int) -> list[tuple[str, int, bool]]:
        rows = self._c().execute(
            "SELECT device_id, id, disabled_at IS NOT NULL FROM devices ORDER BY last_seen_at DESC NULLS LAST LIMIT %s",
            [limit],
        )
        return [(str(r[0]), int(r[1]), bool(r[2])) for r in rows.fetchall()]

    def metrics(self) -> list[tuple[str, int]]:
        return [(str(r[0]), int(r[1])) for r in self._c().execute("SELECT name, id FROM metrics").fetchall()]

    def lookup_device(self, device_id: str) -> tuple[int, bool] | None:
        row = (
            self._c()
            .execute("SELECT id, disabled_at IS NOT NULL FROM devices WHERE device_id = %s", [device_id])
            .fetchone()
        )
        return None if row is None else (int(row[0]), bool(row[1]))

    def create_metric(self, name: str) -> int | None:
        """Id of metric ``name``, creating it unless the table already holds max_metrics names.
        (Several workers may overshoot the cap by a few names at the same instant; it is a guard
        against unbounded growth from garbage field names, not an exact quota.)"""
        conn = self._c()
        row = conn.execute("SELECT id FROM metrics WHERE name = %s", [name]).fetchone()
        if row is not None:
            return int(row[0])
        count = conn.execute("SELECT count(*) FROM metrics").fetchone()
        if count is not None and int(count[0]) >= self.max_metrics:
            return None
        row = conn.execute(
            "INSERT INTO metrics (name) VALUES (%s) ON CONFLICT (name) DO NOTHING RETURNING id", [name]
        ).fetchone()
        if row is None:
            row = conn.execute("SELECT id FROM metrics WHERE name = %s", [name]).fetchone()
        return None if row is None else int(row[0])

    # -- the batch transaction -------------------------------------------------------------

    def write(self, batch: Batch) -> WriteResult:
        """One transaction. Optimistic path: COPY straight into telemetry (about twice as fast as
        staging + INSERT ... ON CONFLICT, measured). A duplicate key (a redelivery after a crash or
        reconnect, or a device repeating a timestamp) aborts that COPY; the batch is then written
        again through the staging table, which drops duplicates, and the next batches use staging
        too for a while, since redeliveries come in runs."""
        if batch.rows and self.direct_copy_skip <= 0:
            try:
                return self._write(batch, direct=True)
            except psycopg.errors.UniqueViolation:
                self.direct_copy_skip = 20
        self.direct_copy_skip -= 1
        return self._write(batch, direct=False)

    def _write(self, batch: Batch, *, direct: bool) -> WriteResult:
        conn = self._c()
        inserted = 0
        with conn.transaction(), conn.cursor() as cur:
            if batch.rows:
                if direct:
                    with cur.copy(DIRECT_COPY_SQL) as copy:
                        copy.write(batch.copy)
                    inserted = batch.rows
                else:
                    with cur.copy(COPY_SQL) as copy:
                        copy.write(batch.copy)
                    cur.execute(MERGE_SQL)
                    inserted = max(cur.rowcount, 0)
            if batch.rejected:
                cur.executemany(REJECT_SQL, batch.rejected)
            if batch.statuses or batch.seen:
                ids = sorted(set(batch.statuses) | set(batch.seen))
                cur.execute(LOCK_SQL, [ids])
                if batch.statuses:
                    sids = sorted(batch.statuses)
                    cur.execute(
                        STATUS_SQL,
                        [
                            sids,
                            [batch.statuses[i][0] for i in sids],
                            [batch.statuses[i][1] for i in sids],
                        ],
                    )
                if batch.seen:
                    seen_ids = sorted(batch.seen)
                    cur.execute(SEEN_SQL, [seen_ids, [batch.seen[i] for i in seen_ids]])
        return WriteResult(inserted=inserted, duplicates=batch.rows - inserted)
