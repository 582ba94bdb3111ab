"""Drain benchmark: N QoS 1 messages preloaded into persistent sessions on a real Mosquitto while the
consumers are stopped; then start them and time until every row is committed.

Scenarios (each on a fresh broker, the same database truncated in between):
  ingest_1   one `ingest run` process (at-least-once, ack after commit, dedupe)
  ingest_2   two processes on a shared subscription ($share/ingest/...)
  naive      bench/naive_baseline.py (paho 3.1.1, stdlib json, COPY 1000, auto-ack)

Per scenario it also prints the CPU each party used per message (us_cpu_per_msg: consumer, broker,
PostgreSQL, from /proc) and the host's busy time outside them (cpu_accounting.other_s: other jobs):
on a shared host the wall-clock rate moves with the load, the CPU per message hardly does.

Prints progress on stderr and ONE JSON object on the last stdout line.
Usage: bench/ingest_drain.py [--quick] [--messages N] [--devices D] [--batch B]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from _common import CpuAccount, Lab, emit, messages, now_ms, proc_stats, start_lab
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.support.ingest_proc import IngestProcess, secret_file

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def register_session(broker: Any, client_id: str, topic: str, username: str, password: str) -> None:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv311, clean_session=False)  # fmt: skip
    c.username_pw_set(username, password)
    c.connect(broker.host, broker.plain_port)
    c.loop_start()
    info = c.subscribe(topic, 1)
    time.sleep(0.3)
    assert info[0] == 0
    c.disconnect()
    c.loop_stop()


def preload(lab: Lab, env: Any, n: int) -> float:
    t0 = time.monotonic()
    with env.publisher(window=5000) as pub:
        pub.publish_many(messages(lab.devices, n, now_ms() - 3_600_000))
    rate = n / (time.monotonic() - t0)
    log(f"  preloaded {n} messages at {rate:,.0f} msg/s")
    return rate


class Sampler(threading.Thread):
    """Samples /proc of the given pids until stopped (peak RSS and CPU need a live process)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.last: dict[int, dict[str, float]] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.wait(0.1):
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    self.last[pid] = proc_stats(pid)

    def finish(self) -> dict[str, float]:
        for pid in self.pids:
            with contextlib.suppress(OSError):
                self.last[pid] = proc_stats(pid)
        self.stop_flag.set()
        return {
            "cpu_s": round(sum(s["cpu_s"] for s in self.last.values()), 2),
            "peak_rss_mib": max((s["peak_rss_mib"] for s in self.last.values()), default=0.0),
        }


def committed(proc: IngestProcess) -> int:
    text = proc.metrics_text()
    return int(float(text.split("\ningest_messages_committed_total ")[1].split()[0]))


def wait_committed(procs: list[IngestProcess], n: int, timeout: float) -> float:
    """Poll the workers' ``ingest_messages_committed_total`` until they sum to ``n``; returns the
    monotonic time it did. (Polling ``SELECT count(*) FROM telemetry`` instead, as this benchmark
    first did, made PostgreSQL scan up to a million rows 50 times a second: the benchmark itself
    used a good share of the two cores it measures.) Each scrape costs the worker about 1 ms (a
    thread per request), so the interval adapts: half the expected time to go, 10-250 ms. A worker
    that has not bound its HTTP port yet counts as 0."""
    deadline = time.monotonic() + timeout
    last_total, last_t = 0, time.monotonic()
    while True:
        total = 0
        for p in procs:
            with contextlib.suppress(OSError):
                total += committed(p)
        now = time.monotonic()
        if total >= n or now > deadline:
            return now
        rate = (total - last_total) / max(now - last_t, 1e-3)
        last_total, last_t = total, now
        time.sleep(min(0.25, max(0.01, (n - total) / rate / 2)) if rate > 0 else 0.1)


def count_rows(lab: Lab) -> int:
    import psycopg

    with psycopg.connect(lab.dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])  # type: ignore[index]


def duplicates(lab: Lab, table: str = "telemetry") -> int:
    import psycopg

    with psycopg.connect(lab.dsn, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT count(*) - (SELECT count(*) FROM (SELECT DISTINCT device, metric, time FROM {table}) d) "
            f"FROM {table}"
        ).fetchone()
    return int(row[0])  # type: ignore[index]


def run_ingest(lab: Lab, n: int, workers: int, batch: int) -> dict[str, Any]:
    name = f"ingest_{workers}"
    log(f"scenario {name}")
    lab.truncate()
    broker, env = lab.broker(name, inflight=2 * batch)
    try:
        shared = {"shared_group": "ingest"} if workers > 1 else {}
        procs: list[IngestProcess] = [
            env.process(f"{name}-w{i}", mqtt=shared, ingest={"batch_max_messages": batch, "batch_max_wait_ms": 100,
                                                              "max_buffer_messages": max(50_000, 4 * batch)})
            for i in range(workers)
        ]  # fmt: skip
        for p in procs:  # create the persistent sessions and subscriptions, then stop
            p.start()
        for p in procs:
            assert p.stop() == 0, p.log_tail()
        preload(lab, env, n)
        t0 = time.monotonic()
        for p in procs:
            p.start(wait_healthy=False)
        assert broker.pid is not None
        account = CpuAccount({"broker": broker.pid, "postgres": lab.pg_pid}
                             | {f"ingest{i}": p.pid for i, p in enumerate(procs) if p.pid}).start()  # fmt: skip
        sampler = Sampler([p.pid for p in procs if p.pid])
        sampler.start()
        t_end = wait_committed(procs, n, timeout=600)
        stats = sampler.finish()
        where = account.stop()
        per_worker = [committed(p) for p in procs]
        for p in procs:
            assert p.stop() == 0, p.log_tail()
        rows = count_rows(lab)
        elapsed = t_end - t0
        result = {
            "messages": n,
            "rows": rows,
            "rows_expected": 2 * n,
            "duplicates": duplicates(lab),
            "committed_per_worker": per_worker,
            "seconds": round(elapsed, 2),
            "msg_per_s": round(n / elapsed),
            **stats,
            "us_cpu_per_msg": {k: round(1e6 * v / n, 1) for k, v in where["cpu_s"].items()},
            "cpu_accounting": where,
        }
        log(f"  {result}")
        return result
    finally:
        broker.stop()


def run_naive(lab: Lab, n: int) -> dict[str, Any]:
    import psycopg

    log("scenario naive")
    lab.truncate()
    with psycopg.connect(lab.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS naive_telemetry")
        conn.execute("CREATE TABLE naive_telemetry (LIKE telemetry INCLUDING INDEXES)")
    broker, env = lab.broker("naive", inflight=2000)
    try:
        register_session(broker, "naive", "devices/+/telemetry", "ingest", lab.service_password)
        preload(lab, env, n)
        pwfile = secret_file(lab.root, "naive.pw", lab.service_password)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "naive_baseline.py"), "--host", broker.host, "--port", str(broker.plain_port),
             "--username", "ingest", "--password-file", str(pwfile), "--dsn", lab.dsn, "--table", "naive_telemetry",
             "--expect", str(n)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert broker.pid is not None
        account = CpuAccount({"broker": broker.pid, "postgres": lab.pg_pid, "naive": proc.pid}).start()
        sampler = Sampler([proc.pid])
        sampler.start()
        while proc.poll() is None:
            time.sleep(0.05)
            if proc.pid:
                try:
                    sampler.last[proc.pid] = proc_stats(proc.pid)
                except OSError:
                    break
        out, _ = proc.communicate(timeout=600)
        elapsed = time.monotonic() - t0
        stats = sampler.finish()
        where = account.stop({"naive": stats["cpu_s"]})  # it has exited: its last /proc sample
        with psycopg.connect(lab.dsn, autocommit=True) as conn:
            rows = int(conn.execute("SELECT count(*) FROM naive_telemetry").fetchone()[0])  # type: ignore[index]
        result = {
            "messages": n,
            "rows": rows,
            "rows_expected": 2 * n,
            "duplicates": duplicates(lab, "naive_telemetry"),
            "seconds": round(elapsed, 2),
            "msg_per_s": round(n / elapsed),
            "self_report": out.strip(),
            **stats,
            "us_cpu_per_msg": {k: round(1e6 * v / n, 1) for k, v in where["cpu_s"].items()},
            "cpu_accounting": where,
        }
        log(f"  {result}")
        return result
    finally:
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k messages (< 60 s)")
    ap.add_argument("--messages", type=int)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--only", choices=["ingest_1", "ingest_2", "naive"], action="append")
    args = ap.parse_args()
    n = args.messages or (100_000 if args.quick else 500_000)
    only = args.only or ["ingest_1", "ingest_2", "naive"]
    out: dict[str, Any] = {"bench": "ingest_drain", "messages": n, "devices": args.devices, "batch": args.batch,
                           "fields_per_message": 2}  # fmt: skip
    for lab in start_lab(args.devices):
        if "ingest_1" in only:
            out["ingest_1"] = run_ingest(lab, n, 1, args.batch)
        if "ingest_2" in only:
            out["ingest_2"] = run_ingest(lab, n, 2, args.batch)
        if "naive" in only:
            out["naive"] = run_naive(lab, n)
    emit(out)


if __name__ == "__main__":
    main()
