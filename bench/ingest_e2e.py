"""End-to-end benchmark: publish at a fixed rate for a while and measure whether one `ingest run`
keeps up (zero loss, bounded backlog) and the publish-to-commit latency.

Rates are tried in ascending order; a rate passes when the publisher achieved it, every message is
in the database within 5 s after publishing ended, and nothing was lost or duplicated. Latency is
measured on probe messages (every 100th, on a dedicated device) by polling the database every 10 ms:
p50/p99 include up to ~10 ms of polling granularity.

Prints progress on stderr and ONE JSON object on the last stdout line.
Usage: bench/ingest_e2e.py [--quick] [--seconds S] [--rates R1,R2,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any

import psycopg
from _common import Lab, emit, now_ms, proc_stats, start_lab


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_rate(lab: Lab, rate: int, seconds: float, batch: int, wait_ms: int) -> dict[str, Any]:
    lab.truncate()
    broker, env = lab.broker(f"e2e-{rate}", inflight=2 * batch)
    proc = env.process(f"e2e-{rate}", ingest={"batch_max_messages": batch, "batch_max_wait_ms": wait_ms})
    try:
        proc.start()
        devices = lab.devices[1:]
        probe_dev = lab.devices[0]
        with psycopg.connect(lab.dsn, autocommit=True) as conn:
            probe_id = conn.execute("SELECT id FROM devices WHERE device_id = %s", [probe_dev]).fetchone()[0]  # type: ignore[index]
        sent_at: dict[int, float] = {}
        seen_at: dict[int, float] = {}
        done = threading.Event()

        def poll() -> None:
            with psycopg.connect(lab.dsn, autocommit=True) as conn:
                last = 0.0
                while not done.is_set():
                    rows = conn.execute(
                        "SELECT value FROM telemetry WHERE device = %s AND value > %s", [probe_id, last]
                    ).fetchall()
                    t = time.monotonic()
                    for (v,) in rows:
                        seen_at.setdefault(int(v), t)
                        last = max(last, v)
                    time.sleep(0.01)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        tick = 0.02
        per_tick = max(1, round(rate * tick))
        total = int(rate * seconds)
        t0_ms = now_ms() - 600_000
        i = 0
        start = time.monotonic()
        with env.publisher(window=5000) as pub:
            while i < total:
                chunk = []
                for _ in range(min(per_tick, total - i)):
                    if i % 100 == 0:
                        chunk.append((f"devices/{probe_dev}/telemetry", b'{"ts":%d,"seq":%d}' % (t0_ms + i, i + 1)))
                        sent_at[i + 1] = time.monotonic()
                    else:
                        dev = devices[i % len(devices)]
                        chunk.append((f"devices/{dev}/telemetry", b'{"ts":%d,"temp":%d.5}' % (t0_ms + i, i % 50)))
                    i += 1
                pub.publish_many(chunk, wait_all=False)
                # Pace against the schedule, not the previous tick: no drift.
                ahead = start + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            pub.flush()
        pub_elapsed = time.monotonic() - start
        achieved = total / pub_elapsed
        deadline = time.monotonic() + 5
        with psycopg.connect(lab.dsn, autocommit=True) as conn:
            while True:
                rows = int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])  # type: ignore[index]
                if rows >= total or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            drain_s = time.monotonic() - (start + pub_elapsed)
            dups = int(conn.execute(
                "SELECT count(*) - (SELECT count(*) FROM (SELECT DISTINCT device, metric, time FROM telemetry) d) "
                "FROM telemetry").fetchone()[0])  # type: ignore[index]  # fmt: skip
        time.sleep(0.05)
        done.set()
        poller.join(2)
        lat = sorted((seen_at[k] - sent_at[k]) * 1000 for k in sent_at if k in seen_at)
        stats = proc_stats(proc.pid) if proc.pid else {}
        ok = rows == total and dups == 0 and achieved >= 0.97 * rate
        result = {
            "rate": rate,
            "achieved_publish_rate": round(achieved),
            "messages": total,
            "rows": rows,
            "duplicates": dups,
            "drain_after_publish_s": round(drain_s, 2),
            "zero_loss_bounded_backlog": ok,
            "latency_ms_p50": round(statistics.median(lat), 1) if lat else None,
            "latency_ms_p99": round(lat[int(len(lat) * 0.99) - 1], 1) if lat else None,
            "latency_samples": len(lat),
            **stats,
        }
        log(f"  {result}")
        assert proc.stop() == 0
        return result
    finally:
        proc.kill()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 s per rate, three rates (< 60 s)")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--rates", help="comma-separated msg/s")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--wait-ms", type=int, default=50)
    args = ap.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 60.0)
    rates = [int(r) for r in args.rates.split(",")] if args.rates else (
        [5000, 15000, 25000] if args.quick else [5000, 10000, 20000, 30000, 40000])  # fmt: skip
    out: dict[str, Any] = {"bench": "ingest_e2e", "seconds_per_rate": seconds, "batch": args.batch,
                           "batch_max_wait_ms": args.wait_ms, "runs": []}  # fmt: skip
    for lab in start_lab(1000):
        for rate in rates:
            log(f"rate {rate} msg/s for {seconds} s")
            r = run_rate(lab, rate, seconds, args.batch, args.wait_ms)
            out["runs"].append(r)
            if not r["zero_loss_bounded_backlog"]:
                break
    passing = [r for r in out["runs"] if r["zero_loss_bounded_backlog"]]
    best = max(passing, key=lambda r: r["rate"]) if passing else None
    out["highest_zero_loss_rate"] = best["rate"] if best else 0
    out["latency_ms_p50_at_highest"] = best["latency_ms_p50"] if best else None
    out["latency_ms_p99_at_highest"] = best["latency_ms_p99"] if best else None
    emit(out)


if __name__ == "__main__":
    main()
