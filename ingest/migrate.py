"""Ordered, versioned SQL migrations and their runner (``ingest migrate``).

Files in ``ingest/migrations`` are named ``NNNN_name.sql``, or ``NNNN_name.<variant>.sql`` when a
version has one file per backend: ``timescaledb`` (used when the extension is available) and
``plain`` (otherwise). The schema must work on both (design, section 1).

Guarantees:
- each migration and its bookkeeping row commit in one transaction, so a crash leaves it either
  applied or not at all;
- a migration that declares ``-- migrate: no-transaction`` (a single statement PostgreSQL refuses
  inside a transaction, such as ``CREATE INDEX CONCURRENTLY``) is recorded as ``applying`` first;
  if it was interrupted the runner refuses to go on until an operator looked at it: it never re-runs
  half-applied SQL blindly;
- an applied migration whose file changed since is refused (the history must not be rewritten);
- runs are serialized with an advisory lock, so two deploys cannot race.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ingest.db import Session, transaction

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VARIANTS = ("timescaledb", "plain")
# Arbitrary but fixed: identifies "the telemetry schema migration" among advisory locks.
_LOCK_KEY = 7_311_004_211
_FILE_RE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)(?:\.(?P<variant>[a-z]+))?\.sql$")
_NO_TX_RE = re.compile(r"^--\s*migrate:\s*no-transaction\s*$", re.MULTILINE)

TimescaleMode = Literal["auto", "on", "off"]


class MigrationError(Exception):
    """A one-line, operator-facing reason why migrating stopped; nothing was half-applied."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    variant: str  # "" when the version has a single file
    path: Path
    sql: str
    transactional: bool

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}" + (f" ({self.variant})" if self.variant else "")


@dataclass
class MigrateResult:
    applied: list[str] = field(default_factory=list)
    already_applied: int = 0
    timescaledb: bool = False


def load_migrations(directory: Path = MIGRATIONS_DIR) -> dict[int, dict[str, Migration]]:
    """Version -> {variant: migration}; variant "" for single-file versions."""
    found: dict[int, dict[str, Migration]] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _FILE_RE.match(path.name)
        if not m:
            raise MigrationError(f"unexpected file name in {directory}: {path.name} (want NNNN_name.sql)")
        variant = m.group("variant") or ""
        if variant and variant not in VARIANTS:
            raise MigrationError(f"{path.name}: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        sql = path.read_text(encoding="utf-8")
        mig = Migration(
            version=int(m.group("version")),
            name=m.group("name"),
            variant=variant,
            path=path,
            sql=sql,
            transactional=not _NO_TX_RE.search(sql),
        )
        per_version = found.setdefault(mig.version, {})
        if any(other.name != mig.name for other in per_version.values()):
            raise MigrationError(f"two different migrations share version {mig.version:04d}")
        per_version[variant] = mig
    for version, variants in found.items():
        if "" in variants and len(variants) > 1:
            raise MigrationError(f"version {version:04d} has both a common file and variant files")
        if "" not in variants and set(variants) != set(VARIANTS):
            raise MigrationError(f"version {version:04d} must have one file per variant {VARIANTS}")
    return dict(sorted(found.items()))


def _timescaledb_available(session: Session) -> bool:
    rows = session.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    return bool(rows)


def _ensure_bookkeeping(session: Session) -> None:
    session.execute_script(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
          version     integer PRIMARY KEY,
          name        text NOT NULL,
          variant     text NOT NULL DEFAULT '',
          checksum    text NOT NULL,
          state       text NOT NULL CHECK (state IN ('applying', 'applied')),
          applied_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )


def status(session: Session) -> list[tuple[int, str, str, str]]:
    """Recorded migrations as (version, name, variant, state), oldest first."""
    _ensure_bookkeeping(session)
    rows = session.execute("SELECT version, name, variant, state FROM schema_migrations ORDER BY version")
    return [(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


def migrate(
    session: Session,
    *,
    timescaledb: TimescaleMode = "auto",
    directory: Path = MIGRATIONS_DIR,
    log: Callable[[str], None] = lambda _msg: None,
) -> MigrateResult:
    migrations = load_migrations(directory)
    session.execute("SELECT pg_advisory_lock(%s)", [_LOCK_KEY])
    try:
        return _migrate_locked(session, migrations, timescaledb, log)
    finally:
        session.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])


def _migrate_locked(
    session: Session,
    migrations: dict[int, dict[str, Migration]],
    mode: TimescaleMode,
    log: Callable[[str], None],
) -> MigrateResult:
    _ensure_bookkeeping(session)
    recorded = {
        int(r[0]): (str(r[1]), str(r[2]), str(r[3]), str(r[4]))
        for r in session.execute("SELECT version, name, variant, checksum, state FROM schema_migrations")
    }
    available = _timescaledb_available(session)
    if mode == "on" and not available:
        raise MigrationError("timescaledb was required (--timescaledb on) but the extension is not available")
    use_ts = available if mode == "auto" else mode == "on"

    # A database that already chose a variant keeps it: switching needs a data migration, not a flag.
    chosen = {variant for (_n, variant, _c, _s) in recorded.values() if variant}
    if len(chosen) > 1:
        raise MigrationError(f"schema_migrations mixes variants {sorted(chosen)}; fix by hand")
    if chosen:
        was_ts = chosen == {"timescaledb"}
        if was_ts != use_ts:
            if mode != "auto":
                raise MigrationError(
                    f"database was migrated with the {'timescaledb' if was_ts else 'plain'} schema; "
                    "switching backends needs a dump and restore into a fresh database"
                )
            log(f"note: keeping the {'timescaledb' if was_ts else 'plain'} schema this database was created with")
            use_ts = was_ts
    variant = "timescaledb" if use_ts else "plain"
    result = MigrateResult(timescaledb=use_ts)

    for version, (name, rec_variant, checksum, state) in sorted(recorded.items()):
        label = f"{version:04d}_{name}"
        if state != "applied":
            raise MigrationError(
                f"migration {label} was interrupted half-way (state {state!r}); inspect the database, "
                "finish or undo it by hand, then delete its schema_migrations row or mark it applied"
            )
        if version not in migrations:
            raise MigrationError(
                f"database has migration {label} that this code does not know: is this an older release?"
            )
        known = migrations[version].get(rec_variant)
        if known is None or known.checksum != checksum:
            raise MigrationError(
                f"migration {label} changed after it was applied; add a new migration instead of editing it"
            )

    for version, variants in migrations.items():
        if version in recorded:
            result.already_applied += 1
            continue
        mig = variants.get("") or variants[variant]
        log(f"applying {mig.label}")
        _apply(session, mig)
        result.applied.append(mig.label)
    return result


def _apply(session: Session, mig: Migration) -> None:
    insert = "INSERT INTO schema_migrations (version, name, variant, checksum, state) VALUES (%s, %s, %s, %s, %s)"
    params: Sequence[object] = [mig.version, mig.name, mig.variant, mig.checksum]
    if mig.transactional:
        with transaction(session):
            session.execute_script(mig.sql)
            session.execute(insert, [*params, "applied"])
        return
    # Outside a transaction nothing is atomic: leave a marker that a later run will refuse to pass.
    session.execute(insert, [*params, "applying"])
    session.execute_script(mig.sql)
    session.execute("UPDATE schema_migrations SET state = 'applied' WHERE version = %s", [mig.version])
