"""Time and peak memory of a backup and of a verified restore (the drill) for a telemetry database.

    python bench/backup.py [--quick] [--target-gb 1.0]

Starts a private PostgreSQL 15 (tests/support/postgres.py) in a temp dir, fills ``telemetry`` until
the table with its indexes holds at least ``--target-gb`` (``--quick``: 300k rows, well under a
minute), then runs ``scripts/backup.py`` and ``scripts/restore.py --drill`` as an operator would.
Peak memory is the largest resident set of any process of each run (the script, pg_dump or
pg_restore), measured with getrusage in a wrapper process; it should not grow with the database
(the archive is streamed in 1 MiB chunks). Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.db import PsycopgSession  # noqa: E402
from ingest.migrate import migrate  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

# Runs a command and reports the peak RSS (KiB on Linux) of its process tree's largest member.
_MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)
BATCH = 2_000_000


def measured(cmd: list[str]) -> tuple[float, int, str]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed ({result.returncode}): {result.stderr[-2000:]}")
    peak_kib = int(result.stderr.strip().splitlines()[-1])
    return elapsed, peak_kib, result.stdout


def fill(session: PsycopgSession, target_bytes: int, max_rows: int | None) -> int:
    session.execute("INSERT INTO devices (device_id) SELECT 'dev' || g FROM generate_series(1, 1000) g")
    session.execute("INSERT INTO metrics (name) VALUES ('temp'), ('hum'), ('pres'), ('volt')")
    rows = 0
    while True:
        n = BATCH if max_rows is None else min(BATCH, max_rows - rows)
        # 1000 devices x 4 metrics, one sample per (device, metric) per "second" offset: unique keys.
        session.execute(
            "INSERT INTO telemetry SELECT timestamptz '2026-01-01' + make_interval(secs => (%s + g) / 4000),"
            " ((%s + g) / 4) %% 1000 + 1, ((%s + g) %% 4 + 1)::smallint, random() * 100"
            " FROM generate_series(0, %s - 1) g",
            (rows, rows, rows, n),
        )
        rows += n
        size = session.execute("SELECT pg_total_relation_size('telemetry')")[0][0]
        print(f"  {rows:>12,} rows, {size / 2**20:8.0f} MiB", file=sys.stderr)
        if (max_rows is not None and rows >= max_rows) or (max_rows is None and size >= target_bytes):
            return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300k rows instead of >= --target-gb (under a minute)")
    parser.add_argument("--target-gb", type=float, default=1.0, help="telemetry size incl. indexes (default 1.0)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
        work = Path(tmp)
        with PostgresServer(work / "pg", settings={"max_wal_size": "'4GB'", "maintenance_work_mem": "'256MB'"}) as pg:
            dsn = pg.create_database("telemetry")
            session = PsycopgSession.connect(dsn)
            migrate(session)
            started = time.monotonic()
            rows = fill(session, int(args.target_gb * 2**30), 300_000 if args.quick else None)
            session.execute("VACUUM ANALYZE telemetry")
            fill_s = time.monotonic() - started
            table_bytes = session.execute("SELECT pg_total_relation_size('telemetry')")[0][0]
            db_bytes = session.execute("SELECT pg_database_size(current_database())")[0][0]
            session.close()
            password = work / "pw"
            password.write_text(pg.password)
            password.chmod(0o600)
            key = work / "key"
            py, scripts = sys.executable, ROOT / "scripts"
            keygen = [py, str(scripts / "backup.py"), "--generate-key", str(key)]
            subprocess.run(keygen, check=True, capture_output=True)
            base = f"host=127.0.0.1 port={pg.port} user=postgres dbname="
            backup_s, backup_kib, out = measured(
                [py, str(scripts / "backup.py"), "--dir", str(work / "out"), "--key-file", str(key),
                 "--dsn", base + "telemetry", "--password-file", str(password), "--json"]
            )  # fmt: skip
            backup = json.loads(out)
            restore_s, restore_kib, out = measured(
                [py, str(scripts / "restore.py"), backup["archive"], "--drill", "--key-file", str(key),
                 "--dsn", base + "postgres", "--password-file", str(password), "--json"]
            )  # fmt: skip
            drill = json.loads(out)
    mib = 2**20
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "rows": rows,
        "telemetry_mib": round(table_bytes / mib, 1),
        "database_mib": round(db_bytes / mib, 1),
        "fill_s": round(fill_s, 1),
        "archive_mib": round(backup["size"] / mib, 1),
        "backup": {
            "seconds": round(backup_s, 2),
            "db_mb_per_s": round(db_bytes / 1e6 / backup_s, 1),
            "archive_mb_per_s": round(backup["size"] / 1e6 / backup_s, 1),
            "peak_rss_mib": round(backup_kib / 1024, 1),
        },
        "verified_restore": {
            "seconds": round(restore_s, 2),
            "verify_seconds": drill["verify_s"],
            "restore_seconds": drill["restore_s"],
            "db_mb_per_s": round(db_bytes / 1e6 / restore_s, 1),
            "peak_rss_mib": round(restore_kib / 1024, 1),
            "match": drill["status"] == "ok" and not drill["mismatches"],
        },
    }
    print(
        f"{rows:,} rows, telemetry {result['telemetry_mib']} MiB, archive {result['archive_mib']} MiB\n"
        f"backup:           {backup_s:8.1f} s  {result['backup']['db_mb_per_s']:7.1f} MB/s  "
        f"peak RSS {result['backup']['peak_rss_mib']} MiB\n"
        f"verified restore: {restore_s:8.1f} s  {result['verified_restore']['db_mb_per_s']:7.1f} MB/s  "
        f"peak RSS {result['verified_restore']['peak_rss_mib']} MiB  match={result['verified_restore']['match']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
