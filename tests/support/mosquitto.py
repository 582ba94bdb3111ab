"""A private Mosquitto 2 broker for integration tests, plus a small synchronous paho client.

Each broker gets its own directory (config, password and ACL files, certificate copies, persistence,
log), a TLS listener and optionally a plain listener, both on free 127.0.0.1 ports. Anonymous
access is off: authentication and ACLs are as real as in production, so tests of devices'
permissions mean something.

Started as root, Mosquitto drops privileges to the `mosquitto` user (its default `user`). It reads
the password and ACL files again as that user on every SIGHUP, and writes persistence and its log
as that user, so the whole directory is handed to `mosquitto`. We do not use `user root`.

Every path in the generated mosquitto.conf, and the path of mosquitto.conf itself (re-read on
SIGHUP), is relative to the broker's directory, which is its working directory: `mosquitto` then
never needs to traverse pytest's temp root /tmp/pytest-of-root, which is mode 0700 and which every
new pytest session (other people run tests on this machine too) resets to 0700.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from simulator.wire import varint
from tests.support.pki import PkiFiles, chown_tree
from tests.support.ports import LOOPBACK, free_port, is_listening

SERVICE_USER = "mosquitto"
ADMIN_USERNAME = "admin"
# One admin password per test process: the hash costs a mosquitto_passwd run, so it is cached.
ADMIN_PASSWORD = secrets.token_urlsafe(18)
DEFAULT_ACL = f"user {ADMIN_USERNAME}\ntopic readwrite #\n"

_START_ATTEMPTS = 3
_running: set[MosquittoBroker] = set()


class MosquittoStartError(RuntimeError):
    """The broker did not come up; the message carries the tail of its log."""


def _binary(name: str, fallback: str) -> str:
    return shutil.which(name) or fallback


@functools.cache
def password_line(username: str, password: str) -> str:
    """One password-file line for `username`, hashed by the real `mosquitto_passwd -b`.

    Join lines with newlines for `MosquittoBroker.write_passwords`. Cached: the same pair always
    yields a valid line (the salt differs between calls, which does not matter).
    """
    if ":" in username:
        raise ValueError("a Mosquitto username cannot contain ':'")
    with tempfile.TemporaryDirectory(prefix="mosquitto-passwd-") as tmp:
        path = Path(tmp) / "passwd"
        subprocess.run(
            [_binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd"), "-c", "-b", str(path), username, password],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return path.read_text().strip()


def password_file(users: dict[str, str]) -> str:
    """A whole password file for {username: password}."""
    return "".join(password_line(name, pw) + "\n" for name, pw in users.items())


class MosquittoBroker:
    """One Mosquitto process in `workdir`; see the module docstring.

    `passwords`/`acl` are file contents; by default the only account is ADMIN_USERNAME with
    ADMIN_PASSWORD, allowed `topic readwrite #`. `require_client_cert` turns the TLS listener into
    mTLS (client certificates must chain to the same CA as the server's).
    """

    def __init__(
        self,
        workdir: Path,
        pki: PkiFiles,
        *,
        plain_listener: bool = True,
        passwords: str | None = None,
        acl: str | None = None,
        require_client_cert: bool = False,
        use_identity_as_username: bool = False,
        max_inflight_messages: int = 20,
        max_queued_messages: int = 1000,
        extra_config: str = "",
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.pki = pki
        self.admin_username = ADMIN_USERNAME
        self.admin_password = ADMIN_PASSWORD
        self.plain_listener = plain_listener
        self.require_client_cert = require_client_cert
        self.use_identity_as_username = use_identity_as_username
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.host = LOOPBACK

        self.config_path = self.workdir / "mosquitto.conf"
        self.password_path = self.workdir / "passwords"
        self.acl_path = self.workdir / "acl"
        self.log_path = self.workdir / "mosquitto.log"
        self.stderr_path = self.workdir / "mosquitto.stderr"
        self.persistence_dir = self.workdir / "data"
        self._tls_dir = self.workdir / "tls"
        self._run_as = SERVICE_USER if os.geteuid() == 0 else None
        self._tls_port = free_port()
        self._plain_port = free_port() if plain_listener else None
        self._proc: subprocess.Popen[bytes] | None = None

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persistence_dir.mkdir(exist_ok=True)
        self._tls_dir.mkdir(exist_ok=True)
        # Copies, so that the broker's user can read its key without opening up the shared PKI dir.
        for src, dst in (
            (pki.ca_cert, "ca.crt"),
            (pki.server_cert, "server.crt"),
            (pki.server_key, "server.key"),
        ):
            shutil.copyfile(src, self._tls_dir / dst)
        (self._tls_dir / "server.key").chmod(0o600)
        self._write(self.password_path, passwords if passwords is not None else self.default_passwords())
        self._write(self.acl_path, acl if acl is not None else DEFAULT_ACL)
        self._write_config()
        chown_tree(self.workdir, self._run_as)

    # -- properties -------------------------------------------------------------------------

    @property
    def tls_port(self) -> int:
        return self._tls_port

    @property
    def plain_port(self) -> int:
        if self._plain_port is None:
            raise ValueError("this broker was created with plain_listener=False")
        return self._plain_port

    @property
    def ca_path(self) -> Path:
        """The CA that signed the broker's certificate: what clients must trust."""
        return self.pki.ca_cert

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def default_passwords(self) -> str:
        return password_line(self.admin_username, self.admin_password) + "\n"

    # -- files ------------------------------------------------------------------------------

    def write_passwords(self, text: str) -> None:
        """Replace the password file (lines from `password_line`); call `reload()` to apply."""
        self._write(self.password_path, text)

    def write_acl(self, text: str) -> None:
        """Replace the ACL file; call `reload()` to apply. Keep an admin entry if tests need one."""
        self._write(self.acl_path, text)

    def _write(self, path: Path, text: str) -> None:
        # Write a sibling and rename: a SIGHUP racing with us never sees a half-written file.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)
        chown_tree(tmp, self._run_as)
        tmp.replace(path)

    def _rel(self, path: Path) -> str:
        # Relative to the working directory (see the module docstring); mosquitto.conf cannot
        # quote, but these names never contain whitespace.
        return str(path.relative_to(self.workdir))

    def _write_config(self) -> None:
        lines = [
            "# written by tests/support/mosquitto.py",
            # One password file and ACL for all listeners: the plain listener (ingest, benchmarks)
            # must authenticate exactly like the TLS one.
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {self._rel(self.password_path)}",
            f"acl_file {self._rel(self.acl_path)}",
            "persistence true",
            f"persistence_location {self._rel(self.persistence_dir)}/",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            f"log_dest file {self._rel(self.log_path)}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "log_type unsubscribe",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self._run_as is not None:
            lines.append(f"user {self._run_as}")
        lines += [
            "",
            f"listener {self._tls_port} {LOOPBACK}",
            f"cafile {self._rel(self._tls_dir / 'ca.crt')}",
            f"certfile {self._rel(self._tls_dir / 'server.crt')}",
            f"keyfile {self._rel(self._tls_dir / 'server.key')}",
            f"require_certificate {'true' if self.require_client_cert else 'false'}",
        ]
        if self.use_identity_as_username:
            lines.append("use_identity_as_username true")
        if self._plain_port is not None:
            lines += ["", f"listener {self._plain_port} {LOOPBACK}"]
        if self.extra_config:
            lines += ["", self.extra_config]
        self._write(self.config_path, "\n".join(lines) + "\n")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start and wait until the listeners accept connections; retry on a port taken meanwhile."""
        if self.running:
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start_once()
                return
            except MosquittoStartError as exc:
                if attempt == _START_ATTEMPTS or "Address already in use" not in str(exc):
                    raise
                self._tls_port = free_port()
                if self._plain_port is not None:
                    self._plain_port = free_port()
                self._write_config()

    def stop(self) -> None:
        """SIGTERM (the broker saves its persistence file), wait, SIGKILL on timeout. Idempotent."""
        _running.discard(self)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start on the same ports (clients reconnect to the same address)."""
        self.stop()
        self.start()

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP: re-read the password and ACL files; return once the broker has begun reloading.

        The broker is single-threaded and logs "Reloading config." before re-reading, so any
        client packet we send after this returns is handled with the new files.
        """
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("broker is not running")
        before = self._log_text().count("Reloading config.")
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._log_text().count("Reloading config.") <= before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker did not log a reload within {timeout}s\n{self.log_tail()}")
            time.sleep(0.01)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.stderr_path, self.log_path):
            text = self._read(path)
            if text.strip():
                parts.append(f"--- {path} (tail) ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no broker output)"

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_text(self) -> str:
        return self._read(self.log_path)

    def _ports(self) -> list[int]:
        return [p for p in (self._tls_port, self._plain_port) if p is not None]

    def _mqtt_ping(self, tls: bool) -> bool:
        """True if the listener answers an MQTT CONNECT with a CONNACK (accepted or not).

        A bare TCP connect would do for "the port is open", but the broker then logs an OpenSSL or
        protocol error per check; a real CONNECT/DISCONNECT as admin leaves two ordinary lines and
        also proves the TLS setup (the handshake verifies the server certificate against the CA).
        """
        port = self._tls_port if tls else self._plain_port
        assert port is not None
        if tls and self.require_client_cert and not (self.pki.client_cert and self.pki.client_key):
            return is_listening(port)  # no certificate to pass mTLS with: an open port must do
        user, password = self.admin_username.encode(), self.admin_password.encode()
        client_id = b"harness-ready-" + secrets.token_hex(4).encode()
        body = (
            b"\x00\x04MQTT\x04\xc2\x00\x0a"  # MQTT 3.1.1, user+password+clean session, keepalive 10
            + len(client_id).to_bytes(2, "big")
            + client_id
            + len(user).to_bytes(2, "big")
            + user
            + len(password).to_bytes(2, "big")
            + password
        )
        try:
            with socket.create_connection((self.host, port), timeout=1) as raw:
                sock: socket.socket = raw
                if tls:
                    ctx = ssl.create_default_context(cafile=str(self.ca_path))
                    if self.require_client_cert and self.pki.client_cert and self.pki.client_key:
                        ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
                    sock = ctx.wrap_socket(raw, server_hostname=self.host)
                sock.sendall(b"\x10" + varint(len(body)) + body)
                connack = sock.recv(4)
                if connack[:1] == b"\x20" and connack[-1:] == b"\x00":
                    sock.sendall(b"\xe0\x00")  # DISCONNECT: a clean goodbye, nothing logged as error
                return connack[:1] == b"\x20"
        except OSError:
            return False

    def _start_once(self) -> None:
        runs_before = self._log_text().count(" running")
        with self.stderr_path.open("ab") as err:
            # Own session: a Ctrl-C aimed at pytest must not kill the broker before the fixture's
            # teardown does (teardown would then report a confusing error).
            proc = subprocess.Popen(
                # Relative config path: SIGHUP re-reads it as `mosquitto` (see the module docstring).
                [_binary("mosquitto", "/usr/sbin/mosquitto"), "-c", self._rel(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=self.workdir,
                start_new_session=True,
            )
        self._proc = proc
        _running.add(self)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                self._proc = None
                _running.discard(self)
                raise MosquittoStartError(f"mosquitto exited with {proc.returncode} during start\n{self.log_tail()}")
            # "running" is logged once every listener is bound; then prove the sockets accept: a
            # full TLS handshake (a bare TCP connect would log an OpenSSL error) and a TCP connect.
            if (
                self._log_text().count(" running") > runs_before
                and self._mqtt_ping(tls=True)
                and (self._plain_port is None or self._mqtt_ping(tls=False))
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise MosquittoStartError(
                    f"mosquitto not ready on ports {self._ports()} within {self.start_timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.01)


@atexit.register
def _stop_leftovers() -> None:
    for broker in list(_running):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            broker.stop()


class MosquittoFactory(Protocol):
    """Type of the `mosquitto_factory` fixture: MosquittoBroker's keyword arguments, plus `start`."""

    def __call__(self, *, start: bool = True, **options: Any) -> MosquittoBroker: ...


class MqttProbe:
    """A paho-mqtt 2 client driven synchronously, with bounded waits, for tests.

    `connect()` returns the CONNACK reason code (a failure code is returned, not raised, so tests
    can assert on it); TLS errors raised by the handshake propagate (ssl.SSLError / OSError).
    Received messages land in `messages`. Automatic reconnects are off unless asked for: a test
    should see what the broker did, not paho's retries.
    """

    def __init__(
        self,
        broker: MosquittoBroker,
        username: str | None = None,
        password: str | None = None,
        *,
        tls: bool = True,
        ca_certs: Path | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        client_id: str = "",
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
        clean_start: bool = True,
        session_expiry: int | None = None,
        reconnect: bool = False,
    ) -> None:
        self.broker = broker
        self.tls = tls
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.protocol = protocol
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            # MQTT 3.1.1 takes the session flag at construction; v5 takes clean_start at connect.
            clean_session=clean_start if protocol != MQTTProtocolVersion.MQTTv5 else None,
            reconnect_on_failure=reconnect,
        )
        if username is None:
            username, password = broker.admin_username, broker.admin_password
        self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(
                ca_certs=str(ca_certs or broker.ca_path),
                certfile=str(certfile) if certfile else None,
                keyfile=str(keyfile) if keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.disconnect_reason: ReasonCode | None = None
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._suback_event = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # paho callbacks (run on paho's network thread)
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        self.connack = rc
        self._connected.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        self.disconnect_reason = rc
        self._disconnected.set()
        self._connected.set()  # wake a connect() waiting for a CONNACK that will never come

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Properties | None
    ) -> None:
        with self._suback_event:
            self._subacks[mid] = rcs
            self._suback_event.notify_all()

    def connect(self, timeout: float = 5.0) -> ReasonCode:
        """Connect and wait for the CONNACK; raise TimeoutError if none arrives."""
        port = self.broker.tls_port if self.tls else self.broker.plain_port
        self._connected.clear()
        self._disconnected.clear()
        self.connack = None
        properties = None
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.session_expiry is not None:
                properties.SessionExpiryInterval = self.session_expiry
            self.client.connect(
                self.broker.host, port, keepalive=30, clean_start=self.clean_start, properties=properties
            )
        else:
            self.client.connect(self.broker.host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise TimeoutError(f"no CONNACK within {timeout}s")
        if self.connack is None:
            self.close()
            raise ConnectionError(f"connection closed before CONNACK ({self.disconnect_reason})")
        if self.connack.is_failure:
            self.close()
        return self.connack

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK; returns its reason codes (granted QoS or failure)."""
        result, mid = self.client.subscribe(topic, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"subscribe failed locally: {mqtt.error_string(result)}")
        with self._suback_event:
            if not self._suback_event.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"no SUBACK for {topic!r} within {timeout}s")
            return self._subacks.pop(mid)

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, timeout: float = 5.0
    ) -> mqtt.MQTTMessageInfo:
        """Publish and, for QoS > 0, wait until the broker acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        return info

    def expect_message(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        """The next received message; raises queue.Empty after `timeout`."""
        return self.messages.get(timeout=timeout)

    def received(self, timeout: float = 0.0) -> list[mqtt.MQTTMessage]:
        """Everything received so far (waiting at most `timeout` for the first one)."""
        out: list[mqtt.MQTTMessage] = []
        try:
            out.append(self.messages.get(timeout=timeout) if timeout else self.messages.get_nowait())
            while True:
                out.append(self.messages.get_nowait())
        except queue.Empty:
            return out

    def wait_disconnected(self, timeout: float = 5.0) -> bool:
        return self._disconnected.wait(timeout)

    def close(self) -> None:
        """Disconnect cleanly if connected, and stop the network thread. Idempotent."""
        try:
            if self.client.is_connected():
                self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> MqttProbe:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
