"""The encrypted backup archive: a streamed AEAD envelope around a simple entry stream.

Envelope (everything after the header is ciphertext)::

    header  = MAGIC (8) | algorithm (1) | chunk size (4, BE) | salt (16) | key id (8)
    records = ( length (4, BE) | AES-256-GCM ciphertext + tag )*

Each record encrypts one chunk of at most ``chunk size`` plaintext bytes with a per-archive key
(HKDF-SHA256 of the master key and the random salt, so nonces never repeat across archives) and the
nonce ``chunk index (11 bytes, BE) | final flag (1 byte)``. The whole header is the associated data
of every record. Hence: a changed byte anywhere fails a tag; records swapped or dropped fail (the
index is in the nonce); a file cut at a record boundary fails (the last record read was not sealed
as final); a changed length field shifts the record boundary and fails the tag. Memory stays at
one chunk whatever the archive size.

Entry stream (the plaintext): ``meta length (4) | meta JSON`` per entry, then for a file its data as
``length (4) | bytes`` frames ending with an empty frame. The manifest (JSON, sizes and SHA-256 of
every part) is the last entry, so parts can be streamed straight from ``pg_dump`` without a
plaintext copy on disk; nothing in an archive is trusted before the last record authenticated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"TPBKUP\x00\x01"
ALG_AES256GCM = 1
SALT_LEN = 16
KEY_ID_LEN = 8
HEADER = struct.Struct(f">8sBI{SALT_LEN}s{KEY_ID_LEN}s")
LEN = struct.Struct(">I")
TAG_LEN = 16
DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 16 << 20
MAX_META = 1 << 20
FINAL = b"\x01"
NOT_FINAL = b"\x00"
MANIFEST_NAME = "manifest.json"


class IntegrityError(Exception):
    """The archive is not what the backup wrote: tampered, truncated, or encrypted with another key."""


class KeyFileError(Exception):
    """The key file is missing, unreadable, malformed or too widely readable."""


# --- keys ---------------------------------------------------------------------------------------


def load_key(path: Path | str | None) -> bytes:
    """32 bytes from a key file: raw, hex (64 chars) or base64. Refused when world-accessible: the key
    decrypts every backup, so the repository's rule for secrets (at most 0640) applies."""
    if not path:
        raise KeyFileError("no encryption key file configured (backup.key_file or --key-file)")
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"encryption key file {p} does not exist (create one with --generate-key)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read encryption key file {p}: {exc.strerror}") from None
    if st.st_mode & 0o007:
        raise KeyFileError(
            f"encryption key file {p} is accessible to other users (mode {st.st_mode & 0o777:o}); chmod 600"
        )
    if len(data) == 32:
        return data
    text = data.strip()
    try:
        if len(text) == 64:
            return bytes.fromhex(text.decode("ascii"))
        import base64

        key = base64.b64decode(text, validate=True)
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(f"encryption key file {p} holds no 32-byte key (raw, hex or base64)") from None
    if len(key) != 32:
        raise KeyFileError(f"encryption key file {p} holds {len(key)} bytes; a 32-byte key is required")
    return key


def generate_key_file(path: Path) -> None:
    """A new random key, hex-encoded, mode 0600; never overwrites (that would orphan old backups)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(os.urandom(32).hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def key_id(key: bytes) -> bytes:
    """A short public fingerprint, so that a wrong key is reported as such rather than as tampering."""
    return hmac.new(key, b"telemetry-backup key id", hashlib.sha256).digest()[:KEY_ID_LEN]


def _subkey(key: bytes, salt: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"telemetry-backup v1 aes-256-gcm").derive(key)
    return AESGCM(derived)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (FINAL if final else NOT_FINAL)


# --- envelope -----------------------------------------------------------------------------------


class EncryptingWriter:
    """File-like sink: plaintext in, sealed records out. ``close()`` seals the final record."""

    def __init__(self, out: BinaryIO, key: bytes, chunk_size: int = DEFAULT_CHUNK) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk size must be 1..{MAX_CHUNK}")
        salt = os.urandom(SALT_LEN)
        self.header = HEADER.pack(MAGIC, ALG_AES256GCM, chunk_size, salt, key_id(key))
        self._aead = _subkey(key, salt)
        self._out = out
        self._chunk = chunk_size
        self._buf = bytearray()
        self._index = 0
        self._closed = False
        self.bytes_in = 0
        out.write(self.header)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        self.bytes_in += len(data)
        # Strictly more than a chunk: the last chunk must stay buffered until close() marks it final.
        while len(self._buf) > self._chunk:
            self._seal(bytes(self._buf[: self._chunk]), final=False)
            del self._buf[: self._chunk]
        return len(data)

    def _seal(self, plain: bytes, final: bool) -> None:
        sealed = self._aead.encrypt(_nonce(self._index, final), plain, self.header)
        self._out.write(LEN.pack(len(sealed)))
        self._out.write(sealed)
        self._index += 1

    def close(self) -> None:
        if not self._closed:
            self._seal(bytes(self._buf), final=True)
            self._buf.clear()
            self._closed = True


class DecryptingReader:
    """File-like source: reads records, returns authenticated plaintext only. Raises
    :class:`IntegrityError` on the first record that does not authenticate, and at EOF unless the
    final record was seen."""

    def __init__(self, src: BinaryIO, key: bytes) -> None:
        header = src.read(HEADER.size)
        if len(header) < HEADER.size:
            raise IntegrityError("archive is truncated (incomplete header)")
        magic, alg, chunk, salt, kid = HEADER.unpack(header)
        if magic != MAGIC:
            raise IntegrityError("not a telemetry backup archive (bad magic) or header damaged")
        if alg != ALG_AES256GCM or not 1 <= chunk <= MAX_CHUNK:
            raise IntegrityError("unknown algorithm or chunk size in header (damaged or newer format)")
        if not hmac.compare_digest(kid, key_id(key)):
            raise IntegrityError(
                f"archive was encrypted with another key (key id {kid.hex()}, this key {key_id(key).hex()}) "
                "or its header was changed"
            )
        self.header = header
        self._aead = _subkey(key, salt)
        self._src = src
        self._max_record = chunk + TAG_LEN
        self._index = 0
        self._buf = b""
        self._pos = 0
        self._next_len = self._read_len()
        if self._next_len is None:
            raise IntegrityError("archive is truncated (no data records)")
        self.finished = False

    def _read_len(self) -> int | None:
        raw = self._src.read(LEN.size)
        if not raw:
            return None
        if len(raw) < LEN.size:
            raise IntegrityError("archive is truncated (inside a record header)")
        (length,) = LEN.unpack(raw)
        if not TAG_LEN <= length <= self._max_record:
            raise IntegrityError(f"record {self._index} has an impossible length {length} (damaged)")
        return int(length)

    def _next_record(self) -> bool:
        if self.finished:
            return False
        length = self._next_len
        if length is None:  # cannot happen: EOF after a non-final record is caught below
            raise IntegrityError("archive is truncated")
        sealed = self._src.read(length)
        if len(sealed) < length:
            raise IntegrityError(f"archive is truncated (inside record {self._index})")
        self._next_len = self._read_len()
        final = self._next_len is None
        try:
            self._buf = self._aead.decrypt(_nonce(self._index, final), sealed, self.header)
        except InvalidTag:
            if final:
                raise IntegrityError(
                    f"record {self._index} does not authenticate as the final record: archive truncated or changed"
                ) from None
            raise IntegrityError(f"record {self._index} does not authenticate: archive changed") from None
        self._pos = 0
        self._index += 1
        self.finished = final
        return True

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._pos >= len(self._buf):
                if not self._next_record():
                    break
                continue
            take = len(self._buf) - self._pos if n < 0 else min(n - len(out), len(self._buf) - self._pos)
            out += self._buf[self._pos : self._pos + take]
            self._pos += take
        return bytes(out)

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) < n:
            raise IntegrityError("archive ends inside an entry")
        return data

    def at_end(self) -> bool:
        """True only when every record authenticated and all plaintext was consumed."""
        if self._pos < len(self._buf):
            return False
        while not self.finished:
            self._next_record()
            if self._buf:
                return False
        return True


# --- entry stream -------------------------------------------------------------------------------


class HashingSink:
    """Counts and hashes what passes through to the archive, as the manifest records it."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)


class ArchiveWriter:
    """Entries into an :class:`EncryptingWriter`; the manifest goes last (see module docstring)."""

    def __init__(self, enc: EncryptingWriter, frame: int = DEFAULT_CHUNK) -> None:
        self.enc = enc
        self.frame = frame
        self.parts: list[dict[str, Any]] = []

    def _meta(self, meta: dict[str, Any]) -> None:
        raw = json.dumps(meta, sort_keys=True).encode("utf-8")
        self.enc.write(LEN.pack(len(raw)) + raw)

    def add_stream(self, name: str, src: IO[bytes], kind: str, mode: int = 0o600, **extra: Any) -> dict[str, Any]:
        """Copy ``src`` to EOF as entry ``name``; returns its manifest record (size, sha256)."""
        _check_name(name)
        self._meta({"name": name, "type": "file", "mode": mode})
        sink = HashingSink()
        while True:
            data = src.read(self.frame)
            if not data:
                break
            sink.update(data)
            self.enc.write(LEN.pack(len(data)))
            self.enc.write(data)
        self.enc.write(LEN.pack(0))
        record = {"name": name, "type": "file", "kind": kind, "size": sink.size, "sha256": sink.sha.hexdigest()}
        record.update(extra)
        self.parts.append(record)
        return record

    def add_symlink(self, name: str, target: str, kind: str) -> None:
        _check_name(name)
        self._meta({"name": name, "type": "symlink", "target": target})
        self.parts.append({"name": name, "type": "symlink", "kind": kind, "target": target})

    def finish(self, manifest: dict[str, Any]) -> None:
        manifest = {**manifest, "parts": self.parts}
        raw = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
        self._meta({"name": MANIFEST_NAME, "type": "manifest", "size": len(raw)})
        self.enc.write(raw)
        self.enc.close()


def _check_name(name: str) -> None:
    # Names become paths on --extract: no absolute paths, no way out of the target directory.
    parts = Path(name).parts
    if not name or name.startswith("/") or ".." in parts or name == MANIFEST_NAME:
        raise ValueError(f"invalid archive entry name {name!r}")


@dataclass
class Entry:
    name: str
    type: str
    mode: int = 0o600
    target: str | None = None
    size: int = 0
    sha256: str = ""


@dataclass
class ReadResult:
    manifest: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)


# Called per file entry with (entry meta, chunk iterator); must consume the iterator.
EntryHandler = Callable[[Entry, Iterator[bytes]], None]


def read_archive(path: Path, key: bytes, handler: EntryHandler | None = None) -> ReadResult:
    """Decrypt and parse the whole archive, check every part against the manifest, return it.

    ``handler`` sees each file's data as it streams (restore pipes the dump into pg_restore); a
    caller must treat what it did as provisional until this function returns without raising.
    """
    entries: list[Entry] = []
    with open(path, "rb") as fh:
        reader = DecryptingReader(fh, key)
        manifest: dict[str, Any] | None = None
        while True:
            (meta_len,) = LEN.unpack(reader.read_exact(LEN.size))
            if meta_len > MAX_META:
                raise IntegrityError("entry header too large (damaged)")
            try:
                meta = json.loads(reader.read_exact(meta_len))
            except ValueError:
                raise IntegrityError("entry header is not JSON (damaged)") from None
            kind = meta.get("type")
            if kind == "manifest":
                raw = reader.read_exact(int(meta["size"]))
                manifest = json.loads(raw)
                break
            entry = Entry(name=str(meta["name"]), type=str(kind), mode=int(meta.get("mode", 0o600)))
            if kind == "symlink":
                entry.target = str(meta["target"])
            elif kind == "file":
                sink = HashingSink()

                def frames(sink: HashingSink = sink) -> Iterator[bytes]:
                    while True:
                        (n,) = LEN.unpack(reader.read_exact(LEN.size))
                        if n == 0:
                            return
                        if n > MAX_CHUNK:
                            raise IntegrityError("data frame too large (damaged)")
                        data = reader.read_exact(n)
                        sink.update(data)
                        yield data

                it = frames()
                if handler is not None:
                    handler(entry, it)
                for _ in it:  # whatever the handler left unread
                    pass
                entry.size, entry.sha256 = sink.size, sink.sha.hexdigest()
            else:
                raise IntegrityError(f"unknown entry type {kind!r}")
            entries.append(entry)
        if not reader.at_end():
            raise IntegrityError("data after the manifest (damaged)")
    _check_against_manifest(manifest, entries)
    return ReadResult(manifest=manifest, entries=entries)


def _check_against_manifest(manifest: dict[str, Any], entries: list[Entry]) -> None:
    # Authentication already proves the bytes are the writer's; this catches a writer-side bug
    # (a part that changed while it was read) before anyone relies on the manifest.
    expected = {p["name"]: p for p in manifest.get("parts", [])}
    seen = {e.name: e for e in entries}
    if set(expected) != set(seen) or len(seen) != len(entries):
        raise IntegrityError("archive entries do not match its manifest")
    for name, part in expected.items():
        entry = seen[name]
        if part["type"] == "file" and (entry.size != part["size"] or entry.sha256 != part["sha256"]):
            raise IntegrityError(f"part {name} does not match its manifest size/SHA-256")
        if part["type"] == "symlink" and entry.target != part["target"]:
            raise IntegrityError(f"symlink {name} does not match its manifest")
