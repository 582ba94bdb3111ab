"""How many devices one simulator process holds: 1k / 5k / 10k / as many as ``ulimit -n`` allows
(up to 20k), over TLS and plain, against a real Mosquitto on loopback, at 1 message / 10 s each.

Figures per run (from the simulator's own report, so they are what an operator would see):
connect time (start until every device had its CONNACK), steady CPU of the simulator (from 2 s
after the last CONNACK to the end of publishing), peak RSS, schedule lag, errors. The broker's CPU
over the same run is read from /proc for context (it shares the machine).

Targets (issue 4): 10,000 devices connected in < 10 s with steady CPU < 50 % of one core over
TLS; 20,000 without TLS. Real figures are printed even when a target is missed.

    .venv/bin/python bench/simulator_scale.py            # full matrix, several minutes
    .venv/bin/python bench/simulator_scale.py --quick    # < 60 s: 1k TLS + 2k plain, short runs

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ingest.hashing import mosquitto_hash  # noqa: E402
from tests.support.mosquitto import DEFAULT_ACL, MosquittoBroker  # noqa: E402
from tests.support.pki import create_pki  # noqa: E402

FD_RESERVE = 100  # the simulator's own reserve (64) plus margin


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; the broker started after this inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    return target


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_credentials(directory: Path, n: int) -> tuple[Path, str]:
    """Credentials file for the simulator and the broker's password lines; one PBKDF2 iteration keeps
    generating 20k hashes (and the broker checking them) cheap - the hash cost is not under test."""
    creds = [{"device_id": f"bench{i:05d}", "username": f"bench{i:05d}", "password": f"pw-{i:05d}-x"} for i in range(n)]
    path = directory / "creds.json"
    path.write_text(json.dumps(creds))
    path.chmod(0o600)
    lines = "".join(f"{c['username']}:{mosquitto_hash(c['password'], iterations=1)}\n" for c in creds)
    return path, lines


def run_one(broker: MosquittoBroker, creds: Path, ca: Path, n: int, tls: bool, duration: float) -> dict[str, Any]:
    report = creds.parent / f"report-{n}-{'tls' if tls else 'plain'}.json"
    url = f"mqtts://127.0.0.1:{broker.tls_port}" if tls else f"mqtt://127.0.0.1:{broker.plain_port}"
    cmd = [sys.executable, "-m", "simulator.cli", "run", "--broker", url, "--devices", str(creds), "--count", str(n),
           "--interval", "10s", "--duration", f"{duration}s", "--ramp", "0", "--report", str(report),
           "--max-errors", "1000000", "--progress-interval", "5"]  # fmt: skip
    if tls:
        cmd += ["--ca", str(ca)]
    assert broker.pid is not None
    broker_cpu0, t0 = proc_cpu_seconds(broker.pid), time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=False, cwd=REPO)
    wall = time.monotonic() - t0
    broker_cpu = proc_cpu_seconds(broker.pid) - broker_cpu0
    if proc.returncode not in (0, 1) or not report.exists():
        return {"devices": n, "tls": tls, "failed": True, "rc": proc.returncode, "stderr": proc.stderr[-500:]}
    r = json.loads(report.read_text())
    timing = r["timing"]
    return {
        "devices": n,
        "tls": tls,
        "connected_max": r["totals"]["connected_max"],
        "connect_time_s": timing["all_connected_s"],
        "steady_cpu_pct": timing["steady_cpu_pct"],
        "max_rss_mb": timing["max_rss_mb"],
        "schedule_lag_ms_max": timing["schedule_lag_ms"]["max"],
        "schedule_lag_ms_p99": timing["schedule_lag_ms"]["p99"],
        "telemetry_rate": timing["achieved_rate"],
        "acked": r["totals"]["acked"],
        "unconfirmed": r["totals"]["unconfirmed"],
        "errors": r["errors"]["total"],
        "error_kinds": dict(list(r["errors"]["by_kind"].items())[:3]),
        "broker_cpu_pct_avg": round(100 * broker_cpu / wall, 1),
        "wall_s": round(wall, 1),
    }


def verdict(row: dict[str, Any]) -> dict[str, Any]:
    n, tls = row["devices"], row["tls"]
    ok_connect = row.get("connect_time_s") is not None and row["connect_time_s"] < 10.0
    ok_cpu = row.get("steady_cpu_pct") is not None and row["steady_cpu_pct"] < 50.0
    if tls and n >= 10_000:
        row["target"] = "10k over TLS: connected < 10 s, steady CPU < 50%"
        row["target_met"] = ok_connect and ok_cpu and row["connected_max"] >= 10_000
    elif not tls and n >= 20_000:
        row["target"] = "20k plain"
        row["target_met"] = row["connected_max"] >= 20_000 and ok_cpu
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="< 60 s: small counts, short runs")
    parser.add_argument("--duration", type=float, help="seconds of publishing per run (default 35; quick 12)")
    args = parser.parse_args()
    limit = raise_nofile()
    most = min(20_000, (limit - FD_RESERVE) // 100 * 100)
    if args.quick:
        matrix = [(1000, True), (2000, False)]
        duration = args.duration or 12.0
    else:
        sizes = sorted({s for s in (1000, 5000, 10_000, most) if s <= most})
        matrix = [(n, tls) for n in sizes for tls in (True, False)]
        duration = args.duration or 35.0
    biggest = max(n for n, _ in matrix)
    rows = []
    with tempfile.TemporaryDirectory(prefix="simbench-") as tmp:
        work = Path(tmp)
        pki = create_pki(work / "pki")
        creds, passwd_lines = write_credentials(work, biggest)
        # Mosquitto's own default caps nothing but the fd limit it inherits; -1 says so explicitly.
        broker = MosquittoBroker(
            work / "broker",
            pki,
            extra_config="max_connections -1\n",
            max_queued_messages=1000,
        )
        try:
            broker.write_passwords(broker.default_passwords() + passwd_lines)
            broker.write_acl(DEFAULT_ACL + "\npattern write devices/%u/#\npattern read devices/%u/#\n")
            broker.start()
            for n, tls in matrix:
                row = verdict(run_one(broker, creds, pki.ca_cert, n, tls, duration))
                rows.append(row)
                print(json.dumps(row), flush=True)
                time.sleep(1.0)  # let the broker reap the last run's sockets
        finally:
            broker.stop()
    result = {
        "benchmark": "simulator_scale",
        "quick": args.quick,
        "nofile_limit": limit,
        "max_devices_by_fd_limit": most,
        "cpus": os.cpu_count(),
        "message_interval_s": 10,
        "duration_s": duration,
        "runs": rows,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
