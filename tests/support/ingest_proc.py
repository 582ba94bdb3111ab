"""Run the ingest service as a real subprocess, and feed brokers fast, for tests, benchmarks and the lab.

Two helpers:

* :class:`IngestProcess` writes a TOML config (secrets in 0600 files, as in production), starts
  ``python -m ingest.cli run --config ...`` in its own session, waits for ``/healthz``, and stops it
  with SIGTERM (clean: flush, commit, ack, exit 0) or SIGKILL (crash). The log goes to a file.
* :class:`FastPublisher` is a minimal MQTT 3.1.1 QoS 1 publisher over a raw socket. paho publishes
  roughly 10-15k QoS 1 msg/s from Python; tests and benchmarks need to preload hundreds of
  thousands of messages quickly, so this one pre-encodes PUBLISH packets and keeps a window of
  unacknowledged packet ids in flight (returns once the broker acknowledged every message).

Both are deliberately free of test-framework imports so ``bench/`` and ``simulator`` can reuse them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from simulator.wire import utf8, varint
from tests.support.ports import LOOPBACK, free_port

# -- fast publisher -------------------------------------------------------------------------------


class FastPublisher:
    """MQTT 3.1.1 publisher on a plain TCP socket: QoS 1 with a bounded in-flight window.

    ``publish_many`` returns only after every PUBLISH was acknowledged (PUBACK), so a caller knows
    the broker holds each message (in the subscriber's session, if it is offline)."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        client_id: str | None = None,
        window: int = 2000,
        timeout: float = 30.0,
    ) -> None:
        self.window = min(window, 30000)  # packet ids are 16-bit; stay far from wrapping onto in-flight ones
        self.timeout = timeout
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id or f"fastpub-{secrets.token_hex(4)}"
        body = (
            utf8("MQTT")
            + b"\x04\xc2"  # protocol level 4, flags: username, password, clean session
            + (60).to_bytes(2, "big")
            + utf8(cid)
            + utf8(username)
            + utf8(password)
        )
        self._sock.sendall(b"\x10" + varint(len(body)) + body)
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"CONNACK refused: {connack!r}")
        self._acked = 0
        self._cond = threading.Condition()
        self._reader_error: BaseException | None = None
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()
        self._next_mid = 0

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def _read_acks(self) -> None:
        # PUBACK is 4 bytes (0x40 0x02 mid mid); count them, nothing else arrives on this connection.
        pending = b""
        try:
            self._sock.settimeout(None)
            while True:
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionError("broker closed the connection")
                pending += data
                n = len(pending) // 4
                if n:
                    if pending[0] != 0x40:
                        raise ConnectionError(f"unexpected packet from broker: {pending[:4]!r}")
                    pending = pending[n * 4 :]
                    with self._cond:
                        self._acked += n
                        self._cond.notify_all()
        except BaseException as exc:  # reported to the publishing thread
            with self._cond:
                self._reader_error = exc
                self._cond.notify_all()

    def _wait_acked(self, target: int) -> None:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while self._acked < target:
                if self._reader_error is not None:
                    raise ConnectionError(f"publisher connection failed: {self._reader_error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {self._acked}/{target} PUBACKs within {self.timeout}s")
                self._cond.wait(left)

    def publish_many(self, messages: Iterable[tuple[str, bytes]], *, wait_all: bool = True) -> int:
        """Publish (topic, payload) pairs with QoS 1; returns the count once all are acknowledged.
        ``wait_all=False`` returns once they are sent with at most ``window`` unacknowledged (paced
        publishing: waiting for every PUBACK per small chunk would stall on Nagle/delayed ACK);
        call ``flush()`` at the end."""
        sent = 0
        base = getattr(self, "_sent_total", 0)  # everything sent before this call
        chunk: list[bytes] = []
        for topic, payload in messages:
            self._next_mid = self._next_mid % 65535 + 1
            var = utf8(topic) + self._next_mid.to_bytes(2, "big")
            chunk.append(b"\x32" + varint(len(var) + len(payload)) + var + payload)
            sent += 1
            if len(chunk) >= 256:
                self._wait_acked(base + sent - self.window)
                self._sock.sendall(b"".join(chunk))
                chunk = []
        if chunk:
            self._wait_acked(base + sent - self.window)
            self._sock.sendall(b"".join(chunk))
        self._sent_total = base + sent
        if wait_all:
            self._wait_acked(base + sent)
        return sent

    def flush(self) -> None:
        """Wait until everything sent so far is acknowledged."""
        self._wait_acked(getattr(self, "_sent_total", 0))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(b"\xe0\x00")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> FastPublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def telemetry_payload(ts_ms: int, **values: float) -> bytes:
    return json.dumps({"ts": ts_ms, **values}, separators=(",", ":")).encode()


# -- the service as a subprocess ------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    out: list[str] = []
    for name, body in sections.items():
        out.append(f"[{name}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in body.items()]
        out.append("")
    return "\n".join(out)


def secret_file(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return path


@dataclass
class IngestProcess:
    """One ``ingest run`` subprocess. Build with :meth:`configure`, then ``start()``/``stop()``.

    ``config`` is the TOML document as nested dicts (sections ``mqtt``, ``database``, ``ingest``,
    ``http``, ``api``); ``configure`` fills the secrets and ports for a test broker and database.
    """

    workdir: Path
    config: dict[str, dict[str, Any]]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @classmethod
    def configure(
        cls,
        workdir: Path,
        *,
        mqtt_host: str,
        mqtt_port: int,
        mqtt_username: str,
        mqtt_password: str,
        db_dsn: str,
        db_password: str | None = None,
        client_id: str = "ingest-test",
        api_dsn: str | None = None,
        api_db_password: str | None = None,
        api_key: str | None = None,
        mqtt: Mapping[str, Any] | None = None,
        ingest: Mapping[str, Any] | None = None,
        http: Mapping[str, Any] | None = None,
        api: Mapping[str, Any] | None = None,
    ) -> IngestProcess:
        """A config for a local broker (plain listener) and database. A password inside ``db_dsn``
        is moved into a password file: the service refuses DSNs that carry one."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        workdir.mkdir(parents=True, exist_ok=True)
        params = conninfo_to_dict(db_dsn)
        pw = params.pop("password", None)
        db_password = db_password or (str(pw) if pw is not None else None)
        database: dict[str, Any] = {"dsn": make_conninfo(**params)}  # type: ignore[arg-type]
        if db_password is not None:
            database["password_file"] = str(secret_file(workdir, "db.password", db_password))
        sections: dict[str, dict[str, Any]] = {
            "mqtt": {
                "host": mqtt_host,
                "port": mqtt_port,
                "username": mqtt_username,
                "password_file": str(secret_file(workdir, "mqtt.password", mqtt_password)),
                "client_id": client_id,
                **(mqtt or {}),
            },
            "database": database,
            "ingest": {"batch_max_messages": 2000, "batch_max_wait_ms": 50, **(ingest or {})},
            "http": {"listen": f"{LOOPBACK}:{free_port()}", **(http or {})},
        }
        if api_key is not None:
            api_section: dict[str, Any] = {
                "enabled": True,
                "hmac_key_file": str(secret_file(workdir, "api.key", api_key)),
                **(api or {}),
            }
            if api_dsn is not None:
                aparams = conninfo_to_dict(api_dsn)
                apw = aparams.pop("password", None)
                api_section["dsn"] = make_conninfo(**aparams)  # type: ignore[arg-type]
                api_pw = api_db_password or (str(apw) if apw is not None else None)
                if api_pw is not None:
                    api_section["password_file"] = str(secret_file(workdir, "api-db.password", api_pw))
            sections["api"] = api_section
        return cls(workdir=workdir, config=sections)

    @property
    def config_path(self) -> Path:
        return self.workdir / "ingest.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "ingest.log"

    @property
    def http_base(self) -> str:
        return "http://" + str(self.config["http"]["listen"])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def write_config(self) -> Path:
        self.config_path.write_text(write_toml(self.config))
        return self.config_path

    def start(self, *, wait_healthy: bool = True, timeout: float = 20.0) -> None:
        if self.pid is not None:
            raise RuntimeError("ingest is already running")
        self.write_config()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest.cli", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # a Ctrl-C for pytest must not reach it before teardown does
            )
        self.starts += 1
        if wait_healthy:
            self.wait_healthy(timeout)

    def health(self) -> tuple[int, dict[str, Any]]:
        """(status, body) of /healthz; (0, {}) when the server does not answer."""
        try:
            with urllib.request.urlopen(self.http_base + "/healthz", timeout=2) as resp:  # noqa: S310
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read())
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    def wait_healthy(self, timeout: float = 20.0, healthy: bool = True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ingest exited with {self.proc.returncode}\n{self.log_tail()}")
            status, body = self.health()
            if (status == 200) == healthy and status != 0:
                return body
            if time.monotonic() > deadline:
                want = "healthy" if healthy else "unhealthy"
                raise TimeoutError(f"ingest not {want} within {timeout}s: {status} {body}\n{self.log_tail()}")
            time.sleep(0.05)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.http_base + "/metrics", timeout=5) as resp:  # noqa: S310
            text: str = resp.read().decode()
            return text

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL after ``timeout``, then returns -9)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                return -9
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash with no chance to flush or acknowledge anything."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no ingest log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> IngestProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


# -- a whole environment: provisioned database + broker accounts + the service ------------------


@dataclass
class IngestEnv:
    """What tests and benchmarks need around one ingest service.

    ``admin_dsn`` is a superuser DSN of the migrated database (for assertions); the service itself
    connects as ``ingest_dsn`` (a login in telemetry_ingest). ``devices`` maps device id -> password.
    """

    admin_dsn: str
    ingest_dsn: str
    broker: Any  # tests.support.mosquitto.MosquittoBroker (kept untyped: no import cycle for bench/)
    service_username: str
    service_password: str
    devices: dict[str, str]
    workdir: Path

    def process(self, name: str = "ingest", **overrides: Any) -> IngestProcess:
        return IngestProcess.configure(
            self.workdir / name,
            mqtt_host=self.broker.host,
            mqtt_port=self.broker.plain_port,
            mqtt_username=self.service_username,
            mqtt_password=self.service_password,
            db_dsn=self.ingest_dsn,
            client_id=overrides.pop("client_id", name),
            mqtt={"tls": False, **overrides.pop("mqtt", {})},
            **overrides,
        )

    def publisher(self, **kwargs: Any) -> FastPublisher:
        return FastPublisher(
            self.broker.host, self.broker.plain_port, self.broker.admin_username, self.broker.admin_password, **kwargs
        )

    def sync_broker_accounts(self) -> None:
        """Render Mosquitto's files from the database (as the deploy does) and reload the broker."""
        from ingest.db import PsycopgSession
        from ingest.provisioning import export_mosquitto
        from tests.support.mosquitto import DEFAULT_ACL

        session = PsycopgSession.connect(self.admin_dsn)
        try:
            passwd, acl = export_mosquitto(session)
        finally:
            session.close()
        self.broker.write_passwords(self.broker.default_passwords() + passwd)
        self.broker.write_acl(DEFAULT_ACL + "\n" + acl)
        if self.broker.running:
            self.broker.reload()

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def count(self, sql: str = "SELECT count(*) FROM telemetry", params: Any = None) -> int:
        return int(self.query(sql, params)[0][0])

    def wait_count(self, expected: int, sql: str = "SELECT count(*) FROM telemetry", timeout: float = 30.0) -> int:
        """Poll until the count reaches ``expected``; returns the last count (the caller asserts)."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.count(sql)
            if n >= expected or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


# The `ingest_env` fixture (tests/integration/conftest.py): (device_ids, **MosquittoBroker options) -> IngestEnv.
IngestEnvFactory = Callable[..., IngestEnv]


def provision_env(
    admin_dsn: str,
    ingest_dsn: str,
    broker: Any,
    workdir: Path,
    device_ids: Iterable[str],
    *,
    service_username: str = "ingest",
) -> IngestEnv:
    """Provision devices and the ingest service account in the database, then render the broker's
    password and ACL files from it. ``broker`` may be running or not."""
    from ingest.db import PsycopgSession
    from ingest.provisioning import DEVICE_PUBLISH, TOPIC_PREFIX, add_devices, add_service

    session = PsycopgSession.connect(admin_dsn)
    try:
        creds = add_devices(session, list(device_ids))
        topics = [f"{TOPIC_PREFIX}/+/{leaf}" for leaf in DEVICE_PUBLISH]
        # Mosquitto checks a shared subscription against the filter with the $share/<group>/ prefix.
        service = add_service(session, service_username, subscribe=[*topics, "$share/+/devices/+/+"])
    finally:
        session.close()
    env = IngestEnv(
        admin_dsn=admin_dsn,
        ingest_dsn=ingest_dsn,
        broker=broker,
        service_username=service_username,
        service_password=service.password,
        devices={c.device_id: c.password for c in creds},
        workdir=workdir,
    )
    env.sync_broker_accounts()
    return env
