"""Shared set-up for the ingest benchmarks: a private PostgreSQL and Mosquitto from tests/support,
the schema, an ingest login, provisioned devices, and process accounting from /proc."""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql

from ingest.db import PsycopgSession
from ingest.migrate import migrate
from tests.support.ingest_proc import IngestEnv
from tests.support.mosquitto import MosquittoBroker
from tests.support.pki import create_pki
from tests.support.postgres import PostgresServer

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Lab:
    root: Path
    pg: PostgresServer
    dsn: str
    ingest_dsn: str
    devices: list[str]
    service_password: str

    def broker(self, name: str, inflight: int) -> tuple[MosquittoBroker, IngestEnv]:
        pki = create_pki(self.root / f"pki-{name}")
        broker = MosquittoBroker(self.root / f"mosq-{name}", pki, max_inflight_messages=inflight, max_queued_messages=0)
        env = IngestEnv(self.dsn, self.ingest_dsn, broker, "ingest", self.service_password, {}, self.root / name)
        env.sync_broker_accounts()
        broker.start()
        return broker, env

    @property
    def pg_pid(self) -> int:
        return int((self.pg.datadir / "postmaster.pid").read_text().split()[0])

    def truncate(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE telemetry")
            conn.execute("CHECKPOINT")


def start_lab(n_devices: int) -> Iterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    pg = PostgresServer(root / "pg")
    try:
        pg.start()
        dsn = pg.create_database("bench")
        session = PsycopgSession.connect(dsn)
        migrate(session)
        session.close()
        user, pw = "bench_ingest", secrets.token_urlsafe(12)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE telemetry_ingest").format(
                    sql.Identifier(user), sql.Literal(pw)
                )
            )
        devices = [f"bench{i:05d}" for i in range(n_devices)]
        service_password = provision_db(dsn, devices)
        yield Lab(root, pg, dsn, pg.dsn("bench", user=user, password=pw), devices, service_password)
    finally:
        pg.close()


def provision_db(dsn: str, devices: list[str]) -> str:
    """Devices + the ingest service account; returns the service account's password."""
    from ingest.provisioning import add_devices, add_service

    session = PsycopgSession.connect(dsn)
    try:
        for i in range(0, len(devices), 500):
            add_devices(session, devices[i : i + 500])
        svc = add_service(session, "ingest", subscribe=["devices/+/telemetry", "devices/+/status",
                                                        "devices/+/heartbeat", "$share/+/devices/+/+"])  # fmt: skip
    finally:
        session.close()
    return svc.password


def messages(devices: list[str], n: int, t0_ms: int) -> Iterator[tuple[str, bytes]]:
    nd = len(devices)
    topics = [f"devices/{d}/telemetry" for d in devices]
    for i in range(n):
        yield topics[i % nd], b'{"ts":%d,"temp":%d.5,"hum":%d}' % (t0_ms + i // nd, i % 40, i % 100)


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user+system, including reaped children) and peak RSS (MiB) of a live process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    cpu = sum(int(x) for x in fields[11:15]) / CLK_TCK
    peak = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    if not peak:
        raise ProcessLookupError(pid)  # a zombie has no memory figures left: keep the last sample
    return {"cpu_s": round(cpu, 2), "peak_rss_mib": round(peak, 1)}


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user+system) of a process and all its live descendants, plus what its reaped
    children used (cutime/cstime): continuous across backends that exit (PostgreSQL) as long as
    the root lives. 0.0 when the root is gone."""
    children: dict[int, list[int]] = {}
    own: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        p = int(entry.name)
        children.setdefault(int(fields[1]), []).append(p)
        own[p] = sum(int(x) for x in fields[11:15]) / CLK_TCK
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += own.get(p, 0.0)
        todo.extend(children.get(p, ()))
    return total


def machine_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, idle seconds) from /proc/stat, all cores summed."""
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals[:8]) - idle) / CLK_TCK, idle / CLK_TCK


class CpuAccount:
    """CPU seconds per named process tree between start() and stop(), and the machine's busy time
    that none of them explains ("other": other jobs on the host, the benchmark itself, the kernel's
    softirq work not charged to a process). Tells where the time went and how loaded the host was."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = 0.0
        self.start_cpu: dict[str, float] = {}
        self.start_busy = 0.0

    def start(self) -> CpuAccount:
        self.t0 = time.monotonic()
        self.start_cpu = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        self.start_busy = machine_busy_seconds()[0]
        return self

    def stop(self, final: dict[str, float] | None = None) -> dict[str, Any]:
        """``final``: the CPU seconds of trees whose root already exited (sampled before it did)."""
        wall = time.monotonic() - self.t0
        final = final or {}
        used = {
            name: round(final.get(name, tree_cpu_seconds(pid)) - self.start_cpu[name], 2)
            for name, pid in self.pids.items()
        }
        busy = machine_busy_seconds()[0] - self.start_busy
        return {
            "wall_s": round(wall, 2),
            "cpu_s": used,
            "machine_busy_s": round(busy, 2),
            "other_s": round(busy - sum(used.values()), 2),
            "machine_busy_pct": round(100 * busy / (wall * (os.cpu_count() or 1)), 1) if wall > 0 else None,
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, sort_keys=True))


def now_ms() -> int:
    return int(time.time() * 1000)
