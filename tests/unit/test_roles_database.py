"""database_timescaledb and database_postgresql: compose validated, loopback-only, tuned from memory."""

from __future__ import annotations

from pathlib import Path

import yaml

from ingest.schema import ROLE_BROKER, ROLE_INGEST, ROLE_PROVISIONER
from roles._database import tuning
from roles.database_postgresql import database_postgresql
from roles.database_timescaledb import database_timescaledb
from tests.support import deploy_validators as v
from tests.support.deploy_fake import NO_SYSTEMD_HOST, in_group, run_deploys

D = "/srv/telemetry/timescaledb"


def _project(files: dict[str, str]) -> dict[str, str]:
    return {p.removeprefix(D + "/"): c for p, c in files.items() if p.startswith(D + "/")}


def test_timescaledb_compose_is_valid_and_private(tmp_path: Path) -> None:
    (r,) = run_deploys("prod", [database_timescaledb]).values()
    v.compose_config_ok(_project(r.files), tmp_path)
    v.compose_env_escaped(r.files[f"{D}/compose.yaml"])
    svc = yaml.safe_load(r.files[f"{D}/compose.yaml"])["services"]["timescaledb"]
    assert svc["image"].startswith("timescale/timescaledb:2.") and svc["image"].endswith("-pg15")
    assert svc["ports"] == ["127.0.0.1:5432:5432"]
    assert svc["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "shared_preload_libraries = 'timescaledb'" in r.files[f"{D}/postgresql.conf"]
    v.systemd_verify_ok(
        {"telemetry-timescaledb.service": r.files["/etc/systemd/system/telemetry-timescaledb.service"]}, tmp_path
    )


def test_tuning_follows_memory() -> None:
    (small,) = run_deploys("prod", [database_timescaledb]).values()  # 4096 MiB fake host
    assert "shared_buffers = 1024MB" in small.files[f"{D}/postgresql.conf"]
    big = tuning(65536, 200, 0.25, 0.75)
    assert big["shared_buffers_mib"] == 16384 and big["effective_cache_mib"] == 49152
    (chroot,) = run_deploys("prod", [database_timescaledb], responses=NO_SYSTEMD_HOST).values()
    assert "shared_buffers = 512MB" in chroot.files[f"{D}/postgresql.conf"]  # fallback 2048 MiB


def test_logins_join_the_schema_group_roles() -> None:
    (r,) = run_deploys("prod", [database_timescaledb]).values()
    sql = r.files[f"{D}/roles.sql"]
    for group in (ROLE_BROKER, ROLE_INGEST, ROLE_PROVISIONER):
        assert f"'{group}'" in sql
    migrate = [c for c in r.commands if " migrate " in c]
    assert migrate and "--password-file /srv/telemetry/timescaledb/postgres_password" in migrate[0]


def test_cluster_database_listens_for_peers(tmp_path: Path) -> None:
    results = run_deploys("cluster-example", [in_group("databases", database_timescaledb)])
    r = results["db-a.cluster.example.net"]
    svc = yaml.safe_load(r.files[f"{D}/compose.yaml"])["services"]["timescaledb"]
    assert svc["ports"] == ["0.0.0.0:5432:5432"]
    assert "10.0.0.0/24" in r.files[f"{D}/pg_hba.conf"]
    assert set(results["broker-a.cluster.example.net"].files) == set()
    v.compose_config_ok(_project(r.files), tmp_path)


def test_postgresql_apt_is_loopback_scram() -> None:
    (r,) = run_deploys("lab", [database_postgresql]).values()
    hba = r.files["/etc/postgresql/15/main/pg_hba.conf"]
    hosts = [line.split() for line in hba.splitlines() if line.startswith("host")]
    assert {h[3] for h in hosts} == {"127.0.0.1/32", "::1/128"}
    assert all(h[4] == "scram-sha-256" for h in hosts)
    conf = r.files["/etc/postgresql/15/main/conf.d/60-telemetry.conf"]
    assert "listen_addresses = '127.0.0.1'" in conf and "timescaledb" not in conf
    assert any("postgresql@15-main" in c for c in r.commands)


def test_postgresql_without_systemd_only_writes_files() -> None:
    (r,) = run_deploys("lab", [database_postgresql], responses=NO_SYSTEMD_HOST).values()
    assert not any("systemctl" in c or "psql" in c for c in r.commands)


def test_one_setting_changes_only_its_file() -> None:
    (a,) = run_deploys("lab", [database_postgresql]).values()
    (b,) = run_deploys("lab", [database_postgresql], override={"database_max_connections": 50}).values()
    assert {p for p in a.files if a.files[p] != b.files.get(p)} == {"/etc/postgresql/15/main/conf.d/60-telemetry.conf"}
