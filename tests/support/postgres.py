"""A private PostgreSQL server for integration tests: initdb in a temp dir, loopback only.

The server is the Debian package's binaries run by hand (no cluster registered with
postgresql-common, no systemd), listening on a free 127.0.0.1 port with its unix socket inside the
temp dir, so it never collides with a system cluster or with a parallel test run.

PostgreSQL refuses to run as root. When the tests run as root, every server binary is executed as
the `postgres` system user (created by the Debian package) through subprocess's `user=`/`group=`
arguments, which do the setgroups/setgid/setuid in the child like `runuser -u postgres --` would,
without a shell or PAM session in between.

Where the cluster lives, when running as root: NOT under pytest's temp root. /tmp/pytest-of-root is
mode 0700, and every pytest session that starts (other people run tests on this machine at the
same time) resets it to 0700, so granting `postgres` the search bit on it is a race we lost in
practice (initdb's bootstrap PANICked with "Permission denied" on pg_control). The cluster goes to a
private `mkdtemp` directory in /tmp owned by `postgres`, linked from the caller's `workdir` as
`workdir/cluster`; `close()` copies the server log into `workdir` and removes the cluster. Not
running as root, the cluster simply lives in `workdir`.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg
from psycopg import sql

from tests.support.pki import chown_tree
from tests.support.ports import LOOPBACK, free_port

SERVICE_USER = "postgres"
SUPERUSER = "postgres"
PREFERRED_MAJOR = "15"

# Unix socket paths are limited to 107 bytes; the socket file itself is ".s.PGSQL.<port>".
_MAX_SOCKET_DIR_LEN = 90
_BIND_FAILURE = re.compile(r"could not bind|Address already in use|could not create any TCP/IP sockets")
_START_ATTEMPTS = 3

# Servers not closed when the interpreter exits (a crashed fixture, Ctrl-C in the wrong place):
# closed by atexit so that no postmaster and no cluster directory outlives the test run.
_open: set[PostgresServer] = set()


class PostgresStartError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def find_bindir(preferred_major: str = PREFERRED_MAJOR) -> Path:
    """Locate the PostgreSQL server binaries.

    Order: $PG_BINDIR, the Debian layout /usr/lib/postgresql/<major>/bin (preferring
    `preferred_major`, else the newest), then `pg_config --bindir`. PATH is deliberately not
    consulted: wrappers named initdb/pg_ctl elsewhere on PATH are not the server's tools.
    """
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").is_file()]
    preferred = [c for c in candidates if c.parent.name == preferred_major]
    if preferred:
        return preferred[0]
    numeric = [c for c in candidates if c.parent.name.isdigit()]
    if numeric:
        return max(numeric, key=lambda c: int(c.parent.name))
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").is_file():
            return bindir
    raise FileNotFoundError("PostgreSQL server binaries not found (install postgresql or set PG_BINDIR)")


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... from the developer's shell would silently redirect pg_ctl.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PostgresServer:
    """One PostgreSQL cluster: `start()`, `stop()`, `restart()`, `close()`, DSNs, databases.

    The superuser is always `postgres`; its password is `password` (random unless given). TCP
    connections need the password (scram-sha-256); the unix socket trusts the superuser only.
    `workdir` receives the server log (at `close()`); see the module docstring for where the
    cluster itself lives.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.bindir = bindir or find_bindir()
        self.host = LOOPBACK
        self.superuser = SUPERUSER
        self.password = password or secrets.token_urlsafe(18)
        self.settings = dict(settings or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._run_as = SERVICE_USER if os.geteuid() == 0 else None
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            self.cluster_dir = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
            chown_tree(self.cluster_dir, self._run_as)
            link = self.workdir / "cluster"
            link.unlink(missing_ok=True)
            link.symlink_to(self.cluster_dir, target_is_directory=True)
        else:
            self.cluster_dir = self.workdir
        _open.add(self)
        self.datadir = self.cluster_dir / "data"
        self.log_path = self.cluster_dir / "postgres.log"
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self._socket_dir = self._choose_socket_dir()
        self._major: str | None = None
        self._closed = False

    # -- properties -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def socket_dir(self) -> Path:
        return self._socket_dir

    @property
    def major_version(self) -> str:
        """Major version of the binaries, e.g. "15"."""
        if self._major is None:
            out = subprocess.run(
                [str(self.bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
            ).stdout
            match = re.search(r"\) (\d+)", out) or re.search(r"(\d+)", out)
            if not match:
                raise RuntimeError(f"cannot parse postgres --version output: {out!r}")
            self._major = match.group(1)
        return self._major

    @property
    def running(self) -> bool:
        if not (self.datadir / "postmaster.pid").exists():
            return False
        result = self._run([self._bin("pg_ctl"), "status", "-D", str(self.datadir)], check=False)
        return result.returncode == 0

    # -- DSNs and databases -----------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """A libpq URI over TCP to 127.0.0.1. Without `user`: the superuser and its password."""
        if user is None:
            user = self.superuser
            if password is None:
                password = self.password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self._port}/{quote(dbname, safe='')}"

    @property
    def admin_dsn(self) -> str:
        """Superuser DSN to the `postgres` maintenance database."""
        return self.dsn("postgres")

    def create_database(self, name: str, owner: str | None = None) -> str:
        """Create database `name` (any identifier; quoted for you) and return its superuser DSN."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            query = sql.SQL("{} OWNER {}").format(query, sql.Identifier(owner))
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(query)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop `name` if it exists, disconnecting whatever a test left connected (WITH FORCE)."""
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(query)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """initdb on first use, then start and wait until a password login over TCP works."""
        if self._closed:
            raise RuntimeError("this PostgresServer was closed (its cluster is gone); make a new one")
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._write_config()
            try:
                self._start_once()
                return
            except PostgresStartError as exc:
                # Another process may have taken the port between free_port() and the bind.
                if self._fixed_port or attempt == _START_ATTEMPTS or not _BIND_FAILURE.search(str(exc)):
                    raise
                self._port = free_port()

    def stop(self) -> None:
        """Fast shutdown and wait; escalate to immediate, then SIGKILL. Safe to call any time."""
        pidfile = self.datadir / "postmaster.pid"
        if not pidfile.exists():
            return
        for mode in ("fast", "immediate"):
            result = self._run(
                [self._bin("pg_ctl"), "stop", "-D", str(self.datadir), "-m", mode, "-w",
                 "-t", str(int(self.stop_timeout))],
                check=False,
                timeout=self.stop_timeout + 10,
            )  # fmt: skip
            if result.returncode == 0 or not pidfile.exists():
                return
        self._kill_postmaster(pidfile)

    def restart(self) -> None:
        """Stop (fast) and start again on the same port: what a client sees when the DB restarts."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop, keep the server log in `workdir`, remove an out-of-tree cluster. Idempotent."""
        try:
            self.stop()
        finally:
            self._closed = True
            _open.discard(self)
            if self.cluster_dir != self.workdir and self.cluster_dir.exists():
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.log_path, self.workdir / "postgres.log")
                shutil.rmtree(self.cluster_dir, ignore_errors=True)
                (self.workdir / "cluster").unlink(missing_ok=True)
            if not self._socket_dir.is_relative_to(self.cluster_dir):
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals --------------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _choose_socket_dir(self) -> Path:
        candidate = self.cluster_dir / "sock"
        if len(str(candidate)) <= _MAX_SOCKET_DIR_LEN:
            return candidate
        # A deep --basetemp would overflow sun_path; fall back to a short private dir in /tmp.
        return Path(tempfile.mkdtemp(prefix="pgsock-"))

    def _run(self, cmd: list[str], *, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            cmd,
            user=self._run_as,
            group=self._run_as,
            extra_groups=[] if self._run_as else None,
            cwd=self.cluster_dir,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise PostgresStartError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def _initdb(self) -> None:
        self._socket_dir.mkdir(mode=0o700, exist_ok=True)
        pwfile = self.cluster_dir / "superuser.pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        chown_tree(self.cluster_dir, self._run_as)
        if not self._socket_dir.is_relative_to(self.cluster_dir):
            chown_tree(self._socket_dir, self._run_as)
        try:
            self._run(
                [
                    self._bin("initdb"),
                    "-D", str(self.datadir),
                    "-U", self.superuser,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-sync",  # the cluster lives as long as the test run
                    "--no-instructions",
                ],
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        # Tighter than initdb's default: other local users get nothing over the socket, and TCP
        # always needs the password (the tests of the services rely on auth being real).
        self._write_owned(
            self.datadir / "pg_hba.conf",
            "# written by tests/support/postgres.py\n"
            f"local   all          {self.superuser}  trust\n"
            "local   all          all       scram-sha-256\n"
            f"host    all          all       {LOOPBACK}/32  scram-sha-256\n"
            f"host    replication  all       {LOOPBACK}/32  scram-sha-256\n",
        )
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'harness.conf'\n")

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": f"'{LOOPBACK}'",
            "port": str(self._port),
            "unix_socket_directories": f"'{self._socket_dir}'",
            # Durability is not what these tests measure; a crash loses the whole temp dir anyway.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            **self.settings,
        }
        body = "".join(f"{key} = {value}\n" for key, value in settings.items())
        self._write_owned(self.datadir / "harness.conf", "# written by tests/support/postgres.py\n" + body)

    def _write_owned(self, path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o600)
        if self._run_as is not None:
            entry = self.datadir.stat()
            os.chown(path, entry.st_uid, entry.st_gid)

    def _start_once(self) -> None:
        started = time.monotonic()
        result = self._run(
            [self._bin("pg_ctl"), "start", "-D", str(self.datadir), "-l", str(self.log_path),
             "-w", "-t", str(int(self.start_timeout)), "-s"],
            check=False,
            timeout=self.start_timeout + 15,
        )  # fmt: skip
        if result.returncode != 0:
            # A slow server may still come up after pg_ctl gave up: do not leave it behind.
            self.stop()
            raise PostgresStartError(
                f"PostgreSQL failed to start on {self.host}:{self._port} (timeout {self.start_timeout}s, "
                f"pg_ctl exit {result.returncode}).\n{result.stdout}{result.stderr}\n"
                f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
            )
        # pg_ctl -w only knows the postmaster is accepting on its socket; prove the TCP path and
        # the password work, within what is left of the start timeout.
        deadline = started + self.start_timeout
        while True:
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PostgresStartError(
                        f"PostgreSQL started but a TCP login to {self.host}:{self._port} failed: {exc}\n"
                        f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
                    ) from exc
                time.sleep(0.05)

    def _kill_postmaster(self, pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        pidfile.unlink(missing_ok=True)


@atexit.register
def _close_leftovers() -> None:
    for server in list(_open):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            server.close()
