"""The backup archive's envelope and entry stream, the key file rules and retention (no services)."""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import os
from pathlib import Path

import pytest

from scripts import _archive as arc
from scripts.backup import SUFFIX, apply_retention, archive_time, select_keep

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def seal(plain: bytes, chunk: int = 64, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    enc = arc.EncryptingWriter(out, key, chunk)
    enc.write(plain)
    enc.close()
    return out.getvalue()


def open_(data: bytes, key: bytes = KEY) -> bytes:
    reader = arc.DecryptingReader(io.BytesIO(data), key)
    plain = reader.read()
    assert reader.at_end()
    return plain


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 128, 1000])
def test_envelope_round_trip_at_chunk_boundaries(size: int) -> None:
    plain = os.urandom(size)
    sealed = seal(plain)
    # Ciphertext must not contain the plaintext. Below 16 bytes random ciphertext contains a random
    # plaintext by chance (1 byte: ~20% of runs), so only longer ones say anything.
    if size >= 16:
        assert plain not in sealed
    assert open_(sealed) == plain


def _small_archive(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "a.tpbk"
    with open(path, "wb") as fh:
        w = arc.ArchiveWriter(arc.EncryptingWriter(fh, KEY, 64), frame=50)
        w.add_stream("database/x.dump", io.BytesIO(b"d" * 300), kind="database")
        w.add_symlink("files/certs/etc/live/cert.pem", "../archive/cert1.pem", kind="certs")
        w.add_stream("files/secrets/etc/pw", io.BytesIO(b"secret"), kind="secrets")
        w.finish({"format": 1})
    return path, path.read_bytes()


def test_archive_round_trip_and_manifest(tmp_path: Path) -> None:
    path, _ = _small_archive(tmp_path)
    seen: dict[str, bytes] = {}
    result = arc.read_archive(path, KEY, lambda e, chunks: seen.__setitem__(e.name, b"".join(chunks)))
    assert seen == {"database/x.dump": b"d" * 300, "files/secrets/etc/pw": b"secret"}
    parts = {p["name"]: p for p in result.manifest["parts"]}
    assert parts["files/secrets/etc/pw"]["size"] == 6 and len(parts["database/x.dump"]["sha256"]) == 64
    assert parts["files/certs/etc/live/cert.pem"]["target"] == "../archive/cert1.pem"


def test_every_single_byte_change_is_refused(tmp_path: Path) -> None:
    path, data = _small_archive(tmp_path)
    for offset in range(len(data)):  # exhaustive: header, length fields, ciphertext, tags, last byte
        changed = bytearray(data)
        changed[offset] ^= 0x01
        path.write_bytes(bytes(changed))
        with pytest.raises(arc.IntegrityError):
            arc.read_archive(path, KEY)


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    path, data = _small_archive(tmp_path)
    for length in range(len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(arc.IntegrityError):
            arc.read_archive(path, KEY)


def test_appended_data_is_refused(tmp_path: Path) -> None:
    path, data = _small_archive(tmp_path)
    path.write_bytes(data + data[arc.HEADER.size :][:84])
    with pytest.raises(arc.IntegrityError):
        arc.read_archive(path, KEY)


def test_swapped_records_are_refused() -> None:
    sealed = seal(b"a" * 64 + b"b" * 64 + b"c" * 10)
    h = arc.HEADER.size
    rec = 4 + 64 + arc.TAG_LEN
    first, second = sealed[h : h + rec], sealed[h + rec : h + 2 * rec]
    with pytest.raises(arc.IntegrityError, match="record 0"):
        open_(sealed[:h] + second + first + sealed[h + 2 * rec :])


def test_dropping_the_final_record_is_refused() -> None:
    sealed = seal(b"x" * 200)  # four records: 64, 64, 64, 8 (final)
    last = 4 + 8 + arc.TAG_LEN
    with pytest.raises(arc.IntegrityError, match="final"):
        open_(sealed[:-last])


def test_wrong_key_is_named_as_such() -> None:
    with pytest.raises(arc.IntegrityError, match="another key"):
        open_(seal(b"hello"), OTHER_KEY)


def test_key_file_formats_and_errors(tmp_path: Path) -> None:
    raw, hexed, b64 = tmp_path / "raw", tmp_path / "hex", tmp_path / "b64"
    raw.write_bytes(KEY)
    hexed.write_text(KEY.hex() + "\n")
    b64.write_text(base64.b64encode(KEY).decode() + "\n")
    for p in (raw, hexed, b64):
        p.chmod(0o600)
        assert arc.load_key(p) == KEY
    with pytest.raises(arc.KeyFileError, match="does not exist"):
        arc.load_key(tmp_path / "missing")
    hexed.chmod(0o644)
    with pytest.raises(arc.KeyFileError, match="other users"):
        arc.load_key(hexed)
    short = tmp_path / "short"
    short.write_text("abcd")
    short.chmod(0o600)
    with pytest.raises(arc.KeyFileError, match="32-byte"):
        arc.load_key(short)
    generated = tmp_path / "gen"
    arc.generate_key_file(generated)
    assert len(arc.load_key(generated)) == 32 and generated.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        arc.generate_key_file(generated)


def test_entry_names_cannot_escape() -> None:
    w = arc.ArchiveWriter(arc.EncryptingWriter(io.BytesIO(), KEY))
    for bad in ("/etc/passwd", "files/../../x", "manifest.json", ""):
        with pytest.raises(ValueError):
            w.add_stream(bad, io.BytesIO(b""), kind="x")


# --- retention ----------------------------------------------------------------------------------


def test_select_keep_daily_and_weekly() -> None:
    base = dt.datetime(2026, 3, 1, 2, 0, tzinfo=dt.UTC)
    stamps = [base + dt.timedelta(days=d, hours=h) for d in range(30) for h in (0, 12)]
    keep = select_keep(stamps, daily=3, weekly=3)
    newest = max(stamps)  # Monday 2026-03-30
    # the newest of each of the last three days; weeks: this one and the last (covered), and 03-16..22
    assert {s.date() for s in keep} == {newest.date() - dt.timedelta(days=i) for i in range(3)} | {dt.date(2026, 3, 22)}
    assert all(s.hour == 14 for s in keep)


def test_retention_over_a_simulated_month_of_daily_runs(tmp_path: Path) -> None:
    """What a month of cron runs leaves behind: exactly 7 daily + the newest of 4 ISO weeks."""
    log = logging.getLogger("test")
    start = dt.datetime(2026, 3, 2, 3, 15, tzinfo=dt.UTC)  # a Monday
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / ".telemetry-x.tpbk.abc.tmp").write_text("a crashed run's temp file")
    for day in range(31):
        now = start + dt.timedelta(days=day)
        new = tmp_path / f"telemetry-{now:%Y%m%dT%H%M%SZ}{SUFFIX}"
        new.write_bytes(b"archive")
        result = apply_retention(tmp_path, "telemetry", 7, 4, new, log)
        assert new.name in result["kept"]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    stamps = sorted(s for s in (archive_time(n, "telemetry") for n in remaining) if s)
    last = start + dt.timedelta(days=30)  # Wednesday 2026-04-01
    daily = [last - dt.timedelta(days=i) for i in range(7)]
    # ISO weeks: newest of the week of 03-30 (= last), of 03-23 (Sun 03-29), 03-16 (Sun 03-22), 03-09 (Sun 03-15)
    weekly = [last, start + dt.timedelta(days=27), start + dt.timedelta(days=20), start + dt.timedelta(days=13)]
    assert stamps == sorted(set(daily) | set(weekly))
    assert len(stamps) == 9
    assert "notes.txt" in remaining and ".telemetry-x.tpbk.abc.tmp" in remaining  # never touched
