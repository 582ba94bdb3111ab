"""restore: verify, list, restore into a fresh database, extract files, or run the restore drill.

Every action first decrypts and verifies the whole archive (pass 1); a tampered, truncated or
wrongly keyed archive is refused before anything is written. The restore itself decrypts again and
streams the dump into ``pg_restore`` (pass 2), so no plaintext dump ever lands on disk; if pass 2
fails (the file changed in between) the fresh database is dropped.

Exit codes: 0 ok; 1 failed (restore error, drill mismatch); 2 configuration/usage error (missing key
file, database exists); 3 archive refused (integrity).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python scripts/restore.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql

from ingest import dbconfig
from scripts import _archive as arc
from scripts import _common as common
from scripts import _pgstate as pgs
from scripts.backup import list_archives

DRILL_METRICS_FILE = "telemetry_backup_drill.prom"


class RestoreFailed(Exception):
    pass


class UsageProblem(Exception):
    pass


def _connect(conninfo: str, dbname: str | None = None) -> psycopg.Connection[Any]:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    if dbname is not None:
        params["dbname"] = dbname
    try:
        return psycopg.connect(psycopg.conninfo.make_conninfo("", **params), autocommit=True)
    except psycopg.OperationalError as exc:
        raise RestoreFailed(f"cannot connect to the database: {(str(exc).strip().splitlines() or ['?'])[0]}") from None


def _check_versions(conn: psycopg.Connection[Any], manifest: dict[str, Any]) -> list[str]:
    """TimescaleDB must be the very version that was dumped; PostgreSQL may be newer, never older."""
    db = manifest["database"]
    notes = []
    here = pgs.versions(conn)
    if here["postgresql_major"] < db["postgresql_major"]:
        raise RestoreFailed(f"server is PostgreSQL {here['postgresql']}, the dump is from {db['postgresql']} (newer)")
    if here["postgresql_major"] != db["postgresql_major"]:
        notes.append(f"restoring a PostgreSQL {db['postgresql']} dump into {here['postgresql']}")
    if db.get("timescaledb"):
        row = conn.execute(
            "SELECT 1 FROM pg_available_extension_versions WHERE name = 'timescaledb' AND version = %s",
            (db["timescaledb"],),
        ).fetchone()
        if row is None:
            raise RestoreFailed(
                f"the dump needs TimescaleDB {db['timescaledb']} exactly; install that version on this server first"
            )
    return notes


def restore_database(
    archive: Path,
    key: bytes,
    manifest: dict[str, Any],
    conninfo: str,
    target: str,
    *,
    pg_bindir: str | None,
    no_owner: bool,
    logger: logging.Logger,
) -> dict[str, Any]:
    """Create ``target`` (must not exist), restore the dump into it, return its table stats. On any
    failure the half-restored database is dropped."""
    db = manifest["database"]
    with _connect(conninfo) as admin:
        notes = _check_versions(admin, manifest)
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,)).fetchone()
        if exists:
            raise UsageProblem(f"database {target!r} exists; restore only into a fresh database (or drop it first)")
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target)))
    created = True
    try:
        if db.get("timescaledb"):
            with _connect(conninfo, target) as conn:
                conn.execute(sql.SQL("CREATE EXTENSION timescaledb VERSION {}").format(sql.Literal(db["timescaledb"])))
                conn.execute("SELECT timescaledb_pre_restore()")
        _pg_restore(archive, key, db["dump"], conninfo, target, pg_bindir=pg_bindir, no_owner=no_owner, logger=logger)
        with _connect(conninfo, target) as conn:
            if db.get("timescaledb"):
                conn.execute("SELECT timescaledb_post_restore()")
            conn.execute("ANALYZE")
            pgs.pin_settings(conn)
            stats = pgs.table_stats(conn)
        created = False  # success: keep it
        return {"database": target, "tables": stats, "notes": notes}
    finally:
        if created:
            _drop(conninfo, target, logger)


def _pg_restore(
    archive: Path,
    key: bytes,
    dump_name: str,
    conninfo: str,
    target: str,
    *,
    pg_bindir: str | None,
    no_owner: bool,
    logger: logging.Logger,
) -> None:
    tool_conninfo, env = pgs.tool_invocation(conninfo, target)
    cmd = [pgs.pg_tool("pg_restore", pg_bindir), "--exit-on-error", "--no-password", f"--dbname={tool_conninfo}"]
    if no_owner:
        cmd += ["--no-owner", "--no-acl"]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=stderr, env=env)
        assert proc.stdin is not None
        stdin = proc.stdin

        def feed(entry: arc.Entry, chunks: Iterator[bytes]) -> None:
            if entry.name != dump_name:
                return
            try:
                for chunk in chunks:
                    stdin.write(chunk)
            except BrokenPipeError:
                pass  # pg_restore stopped early; its exit code and stderr say why
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

        try:
            arc.read_archive(archive, key, feed)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
        rc = proc.wait()
        stderr.seek(0)
        err = stderr.read().decode("utf-8", "replace").strip()
    if rc != 0:
        raise RestoreFailed(f"pg_restore exited {rc}: {err[-800:]}")
    if err:
        logger.warning("pg_restore: %s", err)


def _drop(conninfo: str, name: str, logger: logging.Logger) -> None:
    try:
        with _connect(conninfo) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    except (psycopg.Error, RestoreFailed) as exc:
        logger.error("could not drop database %s: %s", name, exc)


def extract(archive: Path, key: bytes, dest: Path) -> list[str]:
    """Write every part under ``dest`` (a new or empty directory): the operator puts files back in
    place by hand; a restore never overwrites /etc on its own."""
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    if any(dest.iterdir()):
        raise UsageProblem(f"{dest} is not empty")
    written: list[str] = []

    def write(entry: arc.Entry, chunks: Iterator[bytes]) -> None:
        path = dest / entry.name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, entry.mode & 0o700 or 0o600)
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        written.append(entry.name)

    result = arc.read_archive(archive, key, write)
    for e in result.entries:
        if e.type == "symlink" and e.target is not None:
            link = dest / e.name
            link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            link.symlink_to(e.target)
            written.append(e.name)
    return written


def _listing(manifest: dict[str, Any]) -> str:
    db = manifest["database"]
    lines = [
        f"created {manifest['created_at']} on {manifest['host']}; PostgreSQL {db['postgresql']}, "
        f"TimescaleDB {db.get('timescaledb') or '-'}; broker {manifest['broker'].get('kind') or '-'}",
        f"{'SIZE':>14}  {'SHA-256':<16}  NAME",
    ]
    for part in manifest["parts"]:
        if part["type"] == "file":
            lines.append(f"{part['size']:>14}  {part['sha256'][:16]}  {part['name']}")
        else:
            lines.append(f"{'link':>14}  {'':<16}  {part['name']} -> {part['target']}")
    lines.append("tables:")
    for name, t in db["tables"].items():
        lines.append(f"  {name:<40} {t['rows']:>12} rows")
    return "\n".join(lines)


def _drill_metrics(textfile_dir: Path | None, ok: bool) -> None:
    if textfile_dir is None:
        return
    previous = common.read_textfile_metrics(textfile_dir / DRILL_METRICS_FILE)
    now = time.time()
    last_ok = now if ok else previous.get("telemetry_backup_drill_last_success_timestamp_seconds", 0.0)
    common.write_textfile_metrics(
        textfile_dir,
        DRILL_METRICS_FILE,
        {
            "telemetry_backup_drill_last_success_timestamp_seconds": ("End of the last successful drill", last_ok),
            "telemetry_backup_drill_last_attempt_timestamp_seconds": ("End of the last drill", now),
            "telemetry_backup_drill_last_attempt_success": ("1 if the last restore drill matched", 1.0 if ok else 0.0),
        },
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restore",
        description="Verify, list, restore or drill a backup archive. Nothing is restored unless the whole archive "
        "authenticates. Exit codes: 0 ok, 1 failed, 2 configuration error, 3 archive refused (tampered, truncated, "
        "wrong key).",
    )
    common.add_common_arguments(parser)
    dbconfig.add_db_arguments(parser)
    parser.add_argument(
        "archive", nargs="?", type=Path, help="archive file (default with --latest: newest in backup.dir)"
    )
    parser.add_argument("--latest", action="store_true", help="use the newest archive in backup.dir")
    parser.add_argument("--key-file", type=Path, help="encryption key file (default: backup.key_file)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="verify, then list parts and tables")
    action.add_argument("--target-db", metavar="NAME", help="verify, then restore into this new database")
    action.add_argument("--drill", action="store_true", help="restore into a scratch database, compare, drop it")
    action.add_argument("--extract", type=Path, metavar="DIR", help="verify, then write every part under DIR")
    parser.add_argument("--no-owner", action="store_true", help="pg_restore --no-owner --no-acl (roles missing)")
    parser.add_argument("--textfile-dir", type=Path, help="node exporter textfile dir for the drill metric")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = common.config_from_args(args)
        logger = common.setup_logging("restore", common.log_file_from(args, config, "backup"), args.verbose)
        backup_cfg = common.section(config, "backup")
        db_cfg = common.section(config, "database")
        archive: Path | None = args.archive
        if archive is None and args.latest:
            directory = backup_cfg.get("dir")
            if not directory:
                raise common.ConfigError("--latest needs backup.dir in the config")
            found = list_archives(Path(directory), str(backup_cfg.get("prefix", "telemetry")))
            if not found:
                raise common.ConfigError(f"no archives in {directory}")
            archive = found[0][1]
        if archive is None:
            raise common.ConfigError("name an archive or pass --latest")
        if not archive.is_file():
            raise common.ConfigError(f"archive {archive} does not exist")
        key = arc.load_key(args.key_file or backup_cfg.get("key_file"))
    except (common.ConfigError, arc.KeyFileError) as exc:
        print(f"restore: error: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    textfile = args.textfile_dir or backup_cfg.get("textfile_dir")
    textfile_dir = Path(textfile) if textfile else None
    result: dict[str, Any] = {"archive": str(archive)}
    try:
        started = time.monotonic()
        checked = arc.read_archive(archive, key)
        manifest = checked.manifest
        result["verified"] = True
        result["verify_s"] = round(time.monotonic() - started, 3)
        logger.info("%s verified (%d parts)", archive, len(manifest["parts"]))
        if args.list:
            result["manifest"] = manifest
            common.emit(args, {"status": "ok", **result}, _listing(manifest))
            return common.EXIT_OK
        if args.extract:
            written = extract(archive, key, args.extract)
            common.emit(
                args, {"status": "ok", "written": written, **result}, f"{len(written)} parts under {args.extract}"
            )
            return common.EXIT_OK
        if not (args.target_db or args.drill):
            common.emit(args, {"status": "ok", **result}, f"{archive}: verified, {len(manifest['parts'])} parts")
            return common.EXIT_OK
        conninfo = dbconfig.build_conninfo(
            args.dsn or db_cfg.get("dsn"), args.password_file or db_cfg.get("password_file")
        )
        target = args.target_db or f"drill_{time.strftime('%Y%m%d%H%M%S')}_{os.getpid()}"
        started = time.monotonic()
        restored = restore_database(
            archive,
            key,
            manifest,
            conninfo,
            target,
            pg_bindir=db_cfg.get("pg_bindir"),
            no_owner=args.no_owner,
            logger=logger,
        )
        result["restore_s"] = round(time.monotonic() - started, 3)
        problems = pgs.compare(manifest["database"]["tables"], restored["tables"])
        if args.drill:
            _drop(conninfo, target, logger)
            result["dropped"] = target
        result.update(
            {"tables": restored["tables"], "notes": restored["notes"], "mismatches": problems, "database": target}
        )
    except arc.IntegrityError as exc:
        logger.error("archive %s REFUSED: %s", archive, exc)
        if args.drill:
            _drill_failed(config, textfile_dir, str(archive), f"archive refused: {exc}", logger)
        print(f"restore: REFUSED: {archive}: {exc}; nothing was restored", file=sys.stderr)
        if args.json:
            common.emit(args, {"status": "refused", "error": str(exc), **result}, "")
        return common.EXIT_INTEGRITY
    except (UsageProblem, common.ConfigError, dbconfig.ConfigError) as exc:
        print(f"restore: error: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    except (RestoreFailed, psycopg.Error) as exc:
        logger.error("restore of %s FAILED: %s", archive, exc)
        if args.drill:
            _drill_failed(config, textfile_dir, str(archive), str(exc), logger)
        print(f"restore: FAILED: {exc}", file=sys.stderr)
        if args.json:
            common.emit(args, {"status": "failed", "error": str(exc), **result}, "")
        return common.EXIT_FAILED
    ok = not problems
    if args.drill:
        _drill_metrics(textfile_dir, ok)
        if not ok:
            _drill_failed(config, None, str(archive), "; ".join(problems), logger)
    rows = sum(t["rows"] for t in restored["tables"].values())
    verdict = "MATCH" if ok else "MISMATCH: " + "; ".join(problems)
    what = f"drill in scratch database {target} (dropped)" if args.drill else f"restored into {target}"
    logger.info("%s: %s", what, verdict)
    common.emit(
        args,
        {"status": "ok" if ok else "mismatch", **result},
        f"{archive}: verified; {what}: {len(restored['tables'])} tables, {rows} rows; counts and checksums {verdict}",
    )
    return common.EXIT_OK if ok else common.EXIT_FAILED


def _drill_failed(
    config: common.Config, textfile_dir: Path | None, archive: str, reason: str, logger: logging.Logger
) -> None:
    _drill_metrics(textfile_dir, False)
    alerts = common.section(config, "alerts")
    if alerts:
        common.deliver_alert(
            alerts,
            f"[telemetry] restore drill FAILED on {os.uname().nodename}",
            {"check": "backup_drill", "status": "critical", "archive": archive, "detail": reason},
            logger,
        )


if __name__ == "__main__":
    sys.exit(main())
