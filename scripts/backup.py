"""backup: one encrypted, verified archive of everything needed to rebuild the platform.

Database (``pg_dump -Fc`` in an exported snapshot, with per-table row counts and checksums taken in
that same snapshot for the restore drill, and the PostgreSQL/TimescaleDB versions), broker state
(Mosquitto: config + persistence file; EMQX: ``emqx ctl data export`` through ``docker exec`` + the
generated config), certificates, configuration and secrets directories. The archive is streamed
through AES-256-GCM (see scripts/_archive.py) into a temporary file, fsynced, read back and
verified in full, and only then renamed to its final name; retention runs only after that.

Exit codes: 0 ok; 1 failed (no archive was kept); 2 configuration/usage error; 4 archive ok but the
off-site copy failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python scripts/backup.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from ingest import dbconfig
from scripts import _archive as arc
from scripts import _common as common
from scripts import _pgstate as pgs

SUFFIX = ".tpbk"
STAMP = "%Y%m%dT%H%M%SZ"
METRICS_FILE = "telemetry_backup.prom"


class BackupFailed(Exception):
    """The backup cannot be trusted; the message says why (exit code 1)."""


@dataclass(frozen=True)
class Settings:
    directory: Path
    key_file: Path
    prefix: str
    chunk_size: int
    daily: int
    weekly: int
    textfile_dir: Path | None
    offsite: dict[str, Any]
    paths: dict[str, list[str]]
    broker: dict[str, Any]
    dsn: str | None
    password_file: Path | None
    pg_bindir: str | None
    compress: int | None

    @classmethod
    def from_config(cls, config: common.Config, args: argparse.Namespace) -> Settings:
        b = common.section(config, "backup")
        db = common.section(config, "database")
        directory = args.dir or b.get("dir")
        if not directory:
            raise common.ConfigError("no backup directory: set backup.dir or pass --dir")
        retention = b.get("retention") or {}
        daily, weekly = int(retention.get("daily", 7)), int(retention.get("weekly", 4))
        if daily < 1 or weekly < 0:
            # daily >= 1 is what guarantees the backup just made is never deleted by its own run.
            raise common.ConfigError("retention needs daily >= 1 and weekly >= 0")
        prefix = str(b.get("prefix", "telemetry"))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
            raise common.ConfigError(f"backup.prefix {prefix!r} may only use letters, digits, _ . -")
        paths = b.get("paths") or {}
        if not isinstance(paths, dict) or not all(isinstance(v, list) for v in paths.values()):
            raise common.ConfigError("backup.paths must map a category (certs, config, secrets) to a list of paths")
        password_file = args.password_file or db.get("password_file")
        textfile = args.textfile_dir or b.get("textfile_dir")
        return cls(
            directory=Path(directory),
            key_file=Path(args.key_file or b.get("key_file") or ""),
            prefix=prefix,
            chunk_size=int(b.get("chunk_size", arc.DEFAULT_CHUNK)),
            daily=daily,
            weekly=weekly,
            textfile_dir=Path(textfile) if textfile else None,
            offsite=dict(b.get("offsite") or {}),
            paths={str(k): [str(p) for p in v] for k, v in paths.items()},
            broker=common.section(config, "broker"),
            dsn=args.dsn or db.get("dsn"),
            password_file=Path(password_file) if password_file else None,
            pg_bindir=db.get("pg_bindir"),
            compress=b.get("compress"),
        )


# --- retention ----------------------------------------------------------------------------------


def archive_time(name: str, prefix: str) -> dt.datetime | None:
    match = re.fullmatch(re.escape(prefix) + r"-(\d{8}T\d{6}Z)" + re.escape(SUFFIX), name)
    if not match:
        return None
    return dt.datetime.strptime(match.group(1), STAMP).replace(tzinfo=dt.UTC)


def list_archives(directory: Path, prefix: str) -> list[tuple[dt.datetime, Path]]:
    """Finished archives, newest first. Temporary files never match the pattern."""
    found = []
    for path in Path(directory).iterdir():
        stamp = archive_time(path.name, prefix)
        if stamp is not None and path.is_file():
            found.append((stamp, path))
    return sorted(found, reverse=True)


def select_keep(stamps: Iterable[dt.datetime], daily: int, weekly: int) -> set[dt.datetime]:
    """The newest archive of each of the ``daily`` most recent days that have one, plus the newest of
    each of the ``weekly`` most recent ISO weeks that have one (the usual keep-daily/keep-weekly)."""
    keep: set[dt.datetime] = set()
    days: set[dt.date] = set()
    weeks: set[tuple[int, int]] = set()
    for stamp in sorted(stamps, reverse=True):
        day = stamp.date()
        if day not in days and len(days) < daily:
            days.add(day)
            keep.add(stamp)
        week = stamp.isocalendar()[:2]
        if week not in weeks and len(weeks) < weekly:
            weeks.add(week)
            keep.add(stamp)
    return keep


def apply_retention(
    directory: Path, prefix: str, daily: int, weekly: int, protect: Path, logger: logging.Logger
) -> dict[str, list[str]]:
    archives = list_archives(directory, prefix)
    keep = select_keep([s for s, _ in archives], daily, weekly)
    kept, deleted = [], []
    for stamp, path in archives:
        if stamp in keep or path == protect:
            kept.append(path.name)
        else:
            path.unlink()
            deleted.append(path.name)
            logger.info("retention: deleted %s", path.name)
    return {"kept": kept, "deleted": deleted}


# --- parts --------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _add_path(archive: arc.ArchiveWriter, category: str, source: Path, logger: logging.Logger) -> int:
    """Add a file or a directory tree as ``files/<category>/<absolute path>``; symlinks stay links
    (certbot's live/ points into archive/). Returns the number of entries."""
    source = source.absolute()
    if not source.exists() and not source.is_symlink():
        raise BackupFailed(f"{category} path {source} does not exist (fix backup.paths)")

    def name_of(p: Path) -> str:
        return f"files/{category}{p}"

    def add_one(p: Path) -> int:
        if p.is_symlink():
            archive.add_symlink(name_of(p), os.readlink(p), kind=category)
            return 1
        if p.is_file():
            try:
                with open(p, "rb") as fh:
                    archive.add_stream(name_of(p), fh, kind=category, mode=p.stat().st_mode & 0o777)
            except OSError as exc:
                raise BackupFailed(f"cannot read {p}: {exc.strerror}") from None
            return 1
        logger.warning("skipped %s: not a regular file, directory or symlink", p)
        return 0

    if source.is_symlink() or not source.is_dir():
        return add_one(source)
    count = 0
    for root, dirs, files in os.walk(source, followlinks=False):
        dirs.sort()
        base = Path(root)
        for name in sorted(files) + [d for d in dirs if (base / d).is_symlink()]:
            count += add_one(base / name)
    return count


def _add_broker(archive: arc.ArchiveWriter, broker: dict[str, Any], logger: logging.Logger) -> dict[str, Any]:
    kind = broker.get("kind")
    if not kind:
        return {"kind": None}
    for path in broker.get("files", []):
        _add_path(archive, "broker", Path(path), logger)
    if kind == "mosquitto":
        persistence = broker.get("persistence")
        if persistence:
            p = Path(persistence)
            # Mosquitto replaces the file by rename when it saves, so a copy is always one whole save.
            # It only exists after the first save: absent is recorded, not fatal.
            if p.exists():
                _add_path(archive, "broker", p, logger)
            else:
                logger.warning("mosquitto persistence file %s does not exist yet", p)
                return {"kind": kind, "persistence": "absent"}
        return {"kind": kind}
    if kind == "emqx":
        return {"kind": kind, "export": _emqx_export(archive, broker, logger)}
    raise BackupFailed(f"unknown broker.kind {kind!r} (mosquitto or emqx)")


def _emqx_export(archive: arc.ArchiveWriter, broker: dict[str, Any], logger: logging.Logger) -> str:
    """``emqx ctl data export`` inside the container, streamed out with ``docker exec cat`` (no copy
    on the host's disk), then removed from the container so exports do not pile up in its volume."""
    docker = str(broker.get("docker", "docker"))
    container = str(broker.get("container", "emqx"))
    try:
        out = subprocess.run(
            [docker, "exec", container, "emqx", "ctl", "data", "export"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackupFailed(f"emqx data export failed: {exc}") from None
    match = re.search(r"(/\S+\.tar\.gz)", out.stdout)
    if out.returncode != 0 or not match:
        raise BackupFailed(
            f"emqx data export failed (exit {out.returncode}): {(out.stdout + out.stderr).strip()[:300]}"
        )
    inside = match.group(1)
    with subprocess.Popen([docker, "exec", container, "cat", inside], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        archive.add_stream(f"broker/emqx/{Path(inside).name}", proc.stdout, kind="broker")
    if proc.returncode != 0:
        raise BackupFailed(f"could not read {inside} from container {container}")
    subprocess.run([docker, "exec", container, "rm", "-f", inside], capture_output=True, timeout=60, check=False)
    logger.info("emqx export %s added", inside)
    return inside


def _dump_database(archive: arc.ArchiveWriter, s: Settings, logger: logging.Logger) -> dict[str, Any]:
    """pg_dump in an exported snapshot while the same snapshot computes row counts and checksums,
    so the drill compares exactly what was dumped even with ingest writing meanwhile."""
    conninfo = dbconfig.build_conninfo(s.dsn, s.password_file)  # ConfigError: usage
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        first = (str(exc).strip().splitlines() or ["connection failed"])[0]
        raise BackupFailed(f"database unreachable, nothing backed up: {first}") from None
    try:
        pgs.pin_settings(conn)
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        snapshot = str(row[0])
        info = pgs.versions(conn)
        tool_conninfo, env = pgs.tool_invocation(conninfo)
        cmd = [pgs.pg_tool("pg_dump", s.pg_bindir), "-Fc", f"--snapshot={snapshot}", "--no-password"]
        if s.compress is not None:
            cmd.append(f"--compress={int(s.compress)}")
        cmd.append(f"--dbname={tool_conninfo}")
        version = subprocess.run([*cmd[:1], "--version"], capture_output=True, text=True, check=False).stdout.strip()
        stats: dict[str, Any] = {}
        errors: list[BaseException] = []

        def count() -> None:
            try:
                stats.update(pgs.table_stats(conn))
            except BaseException as exc:
                errors.append(exc)

        counter = threading.Thread(target=count, name="table-stats")
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env)
            except OSError as exc:
                raise BackupFailed(f"cannot run pg_dump: {exc}") from None
            counter.start()
            assert proc.stdout is not None
            try:
                record = archive.add_stream(f"database/{info['database']}.dump", proc.stdout, kind="database")
            finally:
                proc.stdout.close()
                rc = proc.wait()
                counter.join()
            stderr.seek(0)
            err = stderr.read().decode("utf-8", "replace").strip()
        if rc != 0:
            raise BackupFailed(f"pg_dump exited {rc}: {err[-500:]}")
        if errors:
            raise BackupFailed(f"row counts/checksums failed: {errors[0]}")
        if err:
            logger.warning("pg_dump: %s", err)
        conn.execute("COMMIT")
    except psycopg.Error as exc:
        raise BackupFailed(f"database error during backup: {str(exc).strip().splitlines()[0]}") from None
    finally:
        conn.close()
    logger.info("database %s dumped: %d bytes, %d tables", info["database"], record["size"], len(stats))
    return {**info, "pg_dump": version, "dump": record["name"], "tables": stats}


# --- run ----------------------------------------------------------------------------------------


def _write_metrics(s: Settings, now: dt.datetime, ok: bool, size: int, duration: float) -> None:
    if s.textfile_dir is None:
        return
    previous = common.read_textfile_metrics(s.textfile_dir / METRICS_FILE)
    last_ok = now.timestamp() if ok else previous.get("telemetry_backup_last_success_timestamp_seconds", 0.0)
    last_size = float(size) if ok else previous.get("telemetry_backup_last_size_bytes", 0.0)
    common.write_textfile_metrics(
        s.textfile_dir,
        METRICS_FILE,
        {
            "telemetry_backup_last_success_timestamp_seconds": ("End of the last verified backup", last_ok),
            "telemetry_backup_last_size_bytes": ("Size of the last verified backup archive", last_size),
            "telemetry_backup_last_attempt_timestamp_seconds": ("End of the last backup attempt", now.timestamp()),
            "telemetry_backup_last_attempt_success": ("1 if the last backup attempt succeeded", 1.0 if ok else 0.0),
            "telemetry_backup_last_duration_seconds": ("Duration of the last backup attempt", duration),
        },
    )


def _offsite(archive: Path, offsite: dict[str, Any], logger: logging.Logger) -> dict[str, Any]:
    target = offsite.get("target")
    if not target:
        return {"enabled": False}
    cmd = [str(offsite.get("rsync", "rsync")), "-t", "--partial-dir=.rsync-partial", "--timeout=300"]
    if offsite.get("bwlimit_kbps"):
        cmd.append(f"--bwlimit={int(offsite['bwlimit_kbps'])}")
    if ":" in str(target):  # remote: over SSH, never prompting (cron has no terminal)
        ssh = ["ssh", "-o", "BatchMode=yes"]
        if offsite.get("ssh_key"):
            ssh += ["-i", str(offsite["ssh_key"])]
        if offsite.get("known_hosts"):
            ssh += ["-o", f"UserKnownHostsFile={offsite['known_hosts']}", "-o", "StrictHostKeyChecking=yes"]
        cmd += ["-e", " ".join(ssh)]
    cmd += [str(archive), str(target)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=int(offsite.get("timeout", 3600)))
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.error("off-site copy failed: %s", exc)
        return {"enabled": True, "ok": False, "error": str(exc)}
    if result.returncode != 0:
        logger.error("off-site copy failed (rsync exit %d): %s", result.returncode, result.stderr.strip())
        return {"enabled": True, "ok": False, "error": result.stderr.strip()[-300:]}
    logger.info("off-site copy to %s done", target)
    return {"enabled": True, "ok": True, "target": str(target)}


def _check_key_outside(s: Settings) -> None:
    key = s.key_file.resolve()
    for paths in s.paths.values():
        for p in paths:
            if key == Path(p).resolve() or key.is_relative_to(Path(p).resolve()):
                raise common.ConfigError(
                    f"the encryption key {s.key_file} is inside backed-up path {p}; an archive must not carry its key"
                )


def run_backup(s: Settings, now: dt.datetime, logger: logging.Logger) -> dict[str, Any]:
    """Raises BackupFailed, ConfigError or KeyFileError; on return the archive is final and verified."""
    key = arc.load_key(s.key_file)
    _check_key_outside(s)
    s.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = s.directory / f"{s.prefix}-{now.strftime(STAMP)}{SUFFIX}"
    if final.exists():
        raise BackupFailed(f"{final} already exists (two backups in the same second?)")
    started = time.monotonic()
    fd, tmp_name = tempfile.mkstemp(dir=s.directory, prefix=f".{final.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            enc = arc.EncryptingWriter(fh, key, s.chunk_size)
            archive = arc.ArchiveWriter(enc)
            database = _dump_database(archive, s, logger)
            broker = _add_broker(archive, s.broker, logger)
            counts = {
                cat: sum(_add_path(archive, cat, Path(p), logger) for p in paths) for cat, paths in s.paths.items()
            }
            archive.finish(
                {
                    "format": 1,
                    "created_at": now.isoformat(),
                    "host": os.uname().nodename,
                    "database": database,
                    "broker": broker,
                    "files": counts,
                }
            )
            fh.flush()
            os.fsync(fh.fileno())
        # Read back what is on disk, not what we meant to write: the archive counts only once it
        # authenticates end to end and every part matches the manifest.
        try:
            checked = arc.read_archive(tmp, key)
        except arc.IntegrityError as exc:
            raise BackupFailed(f"verification of the new archive failed: {exc}") from None
        os.link(tmp, final)  # no-clobber rename
        tmp.unlink()
        _fsync_dir(s.directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = final.stat().st_size
    logger.info("backup %s written and verified (%d bytes)", final, size)
    retention = apply_retention(s.directory, s.prefix, s.daily, s.weekly, final, logger)
    offsite = _offsite(final, s.offsite, logger)
    return {
        "archive": str(final),
        "size": size,
        "duration_s": round(time.monotonic() - started, 3),
        "parts": len(checked.manifest["parts"]),
        "database": {k: v for k, v in database.items() if k != "tables"},
        "tables": database["tables"],
        "retention": retention,
        "offsite": offsite,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backup",
        description="Encrypted, verified backup of the database, broker state, certificates, configuration and "
        "secrets; retention and off-site copy after verification. Exit codes: 0 ok, 1 failed (no archive kept), "
        "2 configuration error, 4 archive ok but off-site copy failed.",
    )
    common.add_common_arguments(parser)
    dbconfig.add_db_arguments(parser)
    parser.add_argument("--dir", type=Path, help="backup directory (default: backup.dir)")
    parser.add_argument("--key-file", type=Path, help="encryption key file (default: backup.key_file)")
    parser.add_argument(
        "--textfile-dir", type=Path, help="node exporter textfile directory (default: backup.textfile_dir)"
    )
    parser.add_argument("--now", type=common.parse_time, help=argparse.SUPPRESS)  # injected clock (tests, drills)
    parser.add_argument(
        "--generate-key", type=Path, metavar="PATH", help="create a new random key file (mode 0600) and exit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.generate_key:
        try:
            arc.generate_key_file(args.generate_key)
        except FileExistsError:
            print(f"backup: error: {args.generate_key} exists; never overwrite a backup key", file=sys.stderr)
            return common.EXIT_USAGE
        common.emit(args, {"key_file": str(args.generate_key)}, f"new key written to {args.generate_key}")
        return common.EXIT_OK
    now = args.now or common.utcnow()
    started = time.monotonic()
    try:
        config = common.config_from_args(args)
        logger = common.setup_logging("backup", common.log_file_from(args, config, "backup"), args.verbose)
        s = Settings.from_config(config, args)
    except common.ConfigError as exc:
        print(f"backup: error: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    try:
        result = run_backup(s, now, logger)
    except (common.ConfigError, dbconfig.ConfigError, arc.KeyFileError) as exc:
        logger.error("%s", exc)
        print(f"backup: error: {exc}", file=sys.stderr)
        if args.json:
            common.emit(args, {"status": "error", "error": str(exc)}, "")
        return common.EXIT_USAGE
    except BackupFailed as exc:
        logger.error("backup FAILED: %s", exc)
        _write_metrics(s, common.utcnow() if args.now is None else now, False, 0, time.monotonic() - started)
        print(f"backup: FAILED: {exc}", file=sys.stderr)
        if args.json:
            common.emit(args, {"status": "failed", "error": str(exc)}, "")
        return common.EXIT_FAILED
    # The injected clock stands for "now" throughout; otherwise the metric says when the backup ended.
    _write_metrics(s, args.now or common.utcnow(), True, result["size"], time.monotonic() - started)
    status = "ok" if result["offsite"].get("ok", True) else "offsite_failed"
    rows = sum(t["rows"] for t in result["tables"].values())
    common.emit(
        args,
        {"status": status, **result},
        f"backup {result['archive']}: {result['size']} bytes, {result['parts']} parts, {rows} rows in "
        f"{len(result['tables'])} tables, verified in {result['duration_s']} s; retention kept "
        f"{len(result['retention']['kept'])}, deleted {len(result['retention']['deleted'])}"
        + ("" if status == "ok" else "; OFF-SITE COPY FAILED"),
    )
    return common.EXIT_OK if status == "ok" else common.EXIT_PARTIAL


if __name__ == "__main__":
    sys.exit(main())
