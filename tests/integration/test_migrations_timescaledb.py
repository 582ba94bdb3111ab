"""The TimescaleDB branch of the schema, on the WASM build (PostgreSQL 17 + TimescaleDB 2.x via pglite).

The same runner and the same provisioning code as on PostgreSQL 15 run here through the pglite bridge.
There is no background worker in the WASM build, so the policies' jobs are driven with CALL run_job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ingest import provisioning as prov
from ingest.hashing import HashAlgorithm, verify_password
from ingest.migrate import migrate
from ingest.schema import EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY, emqx_query_to_psycopg
from tests.support.pglite import PgliteSession, node_executable

pytestmark = pytest.mark.skipif(node_executable() is None, reason="node is not installed (make deps)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pglite") / "db"


@pytest.fixture(scope="module")
def ts(data_dir: Path) -> Iterator[PgliteSession]:
    """A migrated TimescaleDB database; the first migrate happens in a session of its own."""
    with PgliteSession(data_dir) as first:
        result = migrate(first)
    assert result.timescaledb is True
    assert result.applied == ["0001_core", "0002_roles", "0003_hourly (timescaledb)"]
    with PgliteSession(data_dir) as session:
        yield session


def job_id(session: PgliteSession, proc: str) -> int:
    rows = session.execute("SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = %s", [proc])
    assert len(rows) == 1, f"expected exactly one {proc} job, got {rows}"
    return int(rows[0][0])


def test_second_run_in_a_new_process_applies_nothing(ts: PgliteSession) -> None:
    again = migrate(ts)
    assert again.applied == [] and again.already_applied == 3 and again.timescaledb is True


def test_telemetry_is_a_hypertable_with_the_three_policies(ts: PgliteSession) -> None:
    assert ts.execute("SELECT hypertable_name FROM timescaledb_information.hypertables") == [("telemetry",)]
    procs = {r[0] for r in ts.execute("SELECT proc_name FROM timescaledb_information.jobs")}
    assert {"policy_compression", "policy_retention", "policy_refresh_continuous_aggregate"} <= procs
    segment = ts.execute(
        "SELECT attname FROM timescaledb_information.compression_settings "
        "WHERE hypertable_name = 'telemetry' AND segmentby_column_index IS NOT NULL"
    )
    assert segment == [("device",)]


def test_dedupe_compression_retention_and_hourly_aggregate(ts: PgliteSession) -> None:
    ts.execute("INSERT INTO devices (device_id) VALUES ('d1')")
    ts.execute("INSERT INTO metrics (name) VALUES ('temp')")
    # Two hours of minute samples long enough ago to be compressed, plus one sample past retention.
    ts.execute(
        "INSERT INTO telemetry SELECT date_trunc('hour', now()) - interval '10 days' + make_interval(mins => i), "
        "1, 1, i FROM generate_series(0, 119) i"
    )
    ts.execute("INSERT INTO telemetry VALUES (now() - interval '500 days', 1, 1, -1)")
    dup = ts.execute(
        "INSERT INTO telemetry VALUES (date_trunc('hour', now()) - interval '10 days', 1, 1, 99) "
        "ON CONFLICT DO NOTHING RETURNING 1"
    )
    assert dup == [], "the unique key must dedupe a redelivered sample on the hypertable"

    ts.execute_script(f"CALL run_job({job_id(ts, 'policy_retention')})")
    assert ts.execute("SELECT count(*) FROM telemetry WHERE value = -1") == [(0,)]

    ts.execute_script(f"CALL run_job({job_id(ts, 'policy_compression')})")
    compressed = ts.execute(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'telemetry' AND is_compressed"
    )
    assert compressed[0][0] >= 1
    assert ts.execute("SELECT count(*), sum(value) FROM telemetry") == [(120, sum(range(120)))]

    ts.execute_script("CALL refresh_continuous_aggregate('telemetry_hourly', NULL, NULL)")
    # The very query the plain-PostgreSQL test asks of its view.
    rows = ts.execute("SELECT avg, samples FROM telemetry_hourly WHERE device = 1 ORDER BY bucket")
    assert rows == [(29.5, 60), (89.5, 60)]
    named = ts.execute("SELECT device_id, metric, count(*) FROM telemetry_named GROUP BY 1, 2")
    assert named == [("d1", "temp", 120)]


def test_provisioning_and_emqx_queries_work_on_timescaledb(ts: PgliteSession) -> None:
    creds = prov.add_device(ts, "ts-dev", algorithm=HashAlgorithm.parse("pbkdf2:sha256:1000"))
    text, _ = emqx_query_to_psycopg(EMQX_AUTHN_QUERY)
    [(pw_hash, salt, superuser)] = ts.execute(text, ["ts-dev"])
    assert superuser is False
    assert verify_password(creds.password, str(pw_hash), str(salt), HashAlgorithm.parse(creds.hash_algorithm))
    text, _ = emqx_query_to_psycopg(EMQX_AUTHZ_QUERY)
    assert [r[2] for r in ts.execute(text, ["ts-dev"])][-1] == "#"


def test_role_grants_hold_on_the_timescaledb_objects(ts: PgliteSession) -> None:
    # One connection only in the WASM build: privileges are checked with SET ROLE.
    ts.execute_script("SET ROLE telemetry_readonly")
    try:
        # Allowed reads must not raise InsufficientPrivilege (the denied one below must).
        assert len(ts.execute("SELECT count(*) FROM telemetry_hourly")) == 1
        assert len(ts.execute("SELECT count(*) FROM telemetry")) == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ts.execute("SELECT * FROM device_credentials")
    finally:
        ts.execute_script("RESET ROLE")
    ts.execute_script("SET ROLE telemetry_ingest")
    try:
        ts.execute("INSERT INTO telemetry VALUES (now(), 1, 1, 1.0) ON CONFLICT DO NOTHING")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ts.execute("DELETE FROM telemetry")
    finally:
        ts.execute_script("RESET ROLE")
