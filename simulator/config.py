"""What a run is: validated settings and device credentials. Everything here is checked before a
single socket is opened, so bad input fails with one line and nothing to clean up."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from simulator.payloads import Template

# Limits that keep a typo from becoming a denial of service on the operator's own broker.
MAX_COUNT = 100_000
MAX_TOTAL_RATE = 100_000.0  # telemetry messages per second, all devices together
MIN_DEVICE_INTERVAL = 0.05  # seconds between two telemetry messages of one device
MAX_DEVICE_INTERVAL = 86_400.0
MAX_DURATION = 7 * 86_400.0
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BadInput(Exception):
    """Operator error found before the run: one line, exit code 2, nothing started."""


@dataclass(frozen=True)
class DeviceCreds:
    device_id: str
    username: str
    password: str


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    # Name the certificate must carry when it differs from the address dialled (a broker reached
    # through a forwarded 127.0.0.1 port, as the lab's is); the certificate is still fully verified.
    server_name: str | None = None

    @property
    def tls_name(self) -> str:
        return self.server_name or self.host

    @classmethod
    def parse(cls, url: str) -> Broker:
        try:
            parts = urlsplit(url if "://" in url else f"mqtts://{url}")
            port = parts.port
        except ValueError as exc:
            raise BadInput(f"--broker {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise BadInput(f"--broker {url!r}: scheme must be mqtts:// (TLS) or mqtt:// (plain)")
        if not parts.hostname:
            raise BadInput(f"--broker {url!r}: no host name")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise BadInput(f"--broker {url!r}: give only scheme://host[:port]")
        return cls(parts.hostname, port or DEFAULT_PORTS[scheme], scheme == "mqtts")

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass
class Faults:
    """Fault rates. Message faults are the fraction of telemetry messages affected (0..1)."""

    malformed: float = 0.0
    oversized: float = 0.0
    duplicate: float = 0.0
    clock_skew: float = 0.0
    cross_topic: float = 0.0
    offline: float = 0.0  # probability per device per minute of dropping off the network
    storm: float = 0.0  # reconnect storms per minute (all devices drop at once)
    wrong_credentials: float = 0.0  # fraction of connection attempts made with a wrong password
    oversized_bytes: int = 256 * 1024
    skew_seconds: float = 3600.0
    offline_seconds: tuple[float, float] = (2.0, 10.0)

    def active(self) -> dict[str, float]:
        names = ("malformed", "oversized", "duplicate", "clock_skew", "cross_topic", "offline", "storm")
        out = {n: getattr(self, n) for n in (*names, "wrong_credentials")}
        return {k: v for k, v in out.items() if v}


@dataclass
class RunConfig:
    broker: Broker
    devices: list[DeviceCreds]
    rate: float  # telemetry messages per second, all devices together
    duration: float
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    mqtt_version: int = 5  # 4 = MQTT 3.1.1, 5 = MQTT 5
    qos: int = 1
    ramp: float = 1000.0  # new connections per second; 0 = as fast as possible
    max_pending: int = 64  # connections in TCP/TLS/CONNACK at once (the broker's listen backlog)
    tls_resume: str = "off"  # TLS session resumption: off, device (own session on reconnect), shared
    source_addresses: tuple[str, ...] = ()  # local addresses the devices' connections come from, in turn
    heartbeat_interval: float = 30.0
    status_interval: float = 300.0
    jitter: float = 0.1
    keepalive: int = 60
    connect_timeout: float = 15.0
    drain_timeout: float = 5.0
    profile: str = "thermalog"
    template: Template | None = None
    faults: Faults = field(default_factory=Faults)
    seed: int | None = None
    expect_rate: float | None = None
    max_errors: int = 0
    progress_interval: float = 10.0

    @property
    def count(self) -> int:
        return len(self.devices)

    @property
    def device_interval(self) -> float:
        return self.count / self.rate

    def validate(self) -> None:
        n = self.count
        if not 1 <= n <= MAX_COUNT:
            raise BadInput(f"--count {n} is out of range (1..{MAX_COUNT})")
        if not 0 < self.rate <= MAX_TOTAL_RATE:
            raise BadInput(f"--rate {self.rate:g} is out of range (0 < rate <= {MAX_TOTAL_RATE:g} messages/s in total)")
        interval = self.device_interval
        if interval < MIN_DEVICE_INTERVAL:
            raise BadInput(
                f"--rate {self.rate:g} with --count {n} means one message every {interval:.3g}s per device; "
                f"the minimum is {MIN_DEVICE_INTERVAL}s (raise --count or lower --rate)"
            )
        if interval > MAX_DEVICE_INTERVAL:
            raise BadInput(f"--rate {self.rate:g} is too low: one message per device every {interval:.0f}s (max 1/day)")
        if not 0 < self.duration <= MAX_DURATION:
            raise BadInput(f"--duration {self.duration:g}s is out of range (0 < duration <= 7 days)")
        if self.ramp < 0:
            raise BadInput("--ramp must be >= 0 connections/s (0 = unlimited)")
        if not 1 <= self.max_pending <= 10_000:
            raise BadInput("--max-pending must be 1..10000")
        if self.tls_resume not in ("off", "device", "shared"):
            raise BadInput("--tls-resume must be off, device or shared")
        if self.tls_resume != "off" and not self.broker.tls:
            raise BadInput(f"--tls-resume {self.tls_resume} needs a TLS broker (mqtts://)")
        if self.qos not in (0, 1):
            raise BadInput("--qos must be 0 or 1")
        for addr in self.source_addresses:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise BadInput(f"--source-address {addr!r} is not an IP address") from None
        if not 0 <= self.jitter < 1:
            raise BadInput("--jitter must be in [0, 1)")
        if self.heartbeat_interval <= 0 or self.status_interval <= 0:
            raise BadInput("--heartbeat-interval and --status-interval must be > 0")
        if not 5 <= self.keepalive <= 65535:
            raise BadInput("--keepalive must be 5..65535 s")
        if self.max_errors < 0:
            raise BadInput("--max-errors must be >= 0")
        if self.expect_rate is not None and self.expect_rate < 0:
            raise BadInput("--expect-rate must be >= 0")
        f = self.faults
        for name in (
            "malformed",
            "oversized",
            "duplicate",
            "clock_skew",
            "cross_topic",
            "offline",
            "wrong_credentials",
        ):
            value = getattr(f, name)
            if not 0 <= value <= 1:
                raise BadInput(f"--fault-{name.replace('_', '-')} {value:g} is out of range (0..1)")
        if not 0 <= f.storm <= 60:
            raise BadInput(f"--fault-storm {f.storm:g} is out of range (0..60 storms per minute)")
        if not 64 <= f.oversized_bytes <= 256 * 1024 * 1024:
            raise BadInput("--oversized-bytes must be 64 bytes .. 256 MiB (MQTT's limit)")
        if f.cross_topic and n < 2:
            raise BadInput("--fault-cross-topic needs at least 2 devices (a victim to publish for)")
        if (self.cert is None) != (self.key is None):
            raise BadInput("--cert and --key go together (client certificate for mTLS)")
        if not self.broker.tls and (self.ca or self.cert):
            raise BadInput(f"--ca/--cert given but --broker {self.broker} is not TLS (use mqtts://)")
        if not self.broker.tls and self.broker.server_name:
            raise BadInput(f"--tls-server-name given but --broker {self.broker} is not TLS (use mqtts://)")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The one TLS context all devices share; load errors become one-line BadInput."""
        if not self.broker.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
        if self.ca is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only the given CA, not the system store
            _readable(self.ca, "--ca")
            try:
                ctx.load_verify_locations(cafile=str(self.ca))
            except ssl.SSLError as exc:
                raise BadInput(f"--ca {self.ca} holds no usable PEM CA certificate ({exc.reason or exc})") from None
        if self.cert is not None and self.key is not None:
            _readable(self.cert, "--cert")
            _readable(self.key, "--key")
            try:
                ctx.load_cert_chain(str(self.cert), str(self.key))
            except ssl.SSLError as exc:
                raise BadInput(
                    f"--cert {self.cert} / --key {self.key}: not a matching PEM certificate and key "
                    f"({exc.reason or exc})"
                ) from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


# Linux: bind() picks only the address; connect() picks the port, unique per 4-tuple (so ports are
# shared across destinations, as without bind()).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def bind_source(sock: socket.socket, address: str) -> None:
    with contextlib.suppress(OSError):  # not Linux: a plain bind, the port is then chosen here
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((address, 0))


def check_source_addresses(addresses: tuple[str, ...], family: socket.AddressFamily) -> None:
    """Each --source-address must be an address of this host in the broker's address family."""
    for addr in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                bind_source(sock, addr)
            except OSError as exc:
                raise BadInput(f"--source-address {addr}: cannot connect from it ({exc.strerror or exc})") from None


def _readable(path: Path, flag: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise BadInput(f"{flag} {path}: {exc.strerror or exc}") from None


def load_credentials(path: Path) -> list[DeviceCreds]:
    """The file `provision add ... --credentials-out FILE` writes: a JSON array of
    {"device_id", "username", "password", "hash_algorithm"}."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(
            f"--devices {path}: no such file (write one with `provision add ... --credentials-out`)"
        ) from None
    except OSError as exc:
        raise BadInput(f"--devices {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BadInput(f"--devices {path} is not JSON: {exc}") from None
    if not isinstance(doc, list):
        raise BadInput(f"--devices {path} must be a JSON array of credentials")
    out: list[DeviceCreds] = []
    seen: set[str] = set()
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict):
            raise BadInput(f"--devices {path}: entry {i} is not an object")
        username, password = rec.get("username"), rec.get("password")
        device_id = rec.get("device_id") or username
        if not isinstance(username, str) or not username or not isinstance(password, str) or not password:
            raise BadInput(f"--devices {path}: entry {i} lacks a username or password")
        if not isinstance(device_id, str) or "/" in device_id or "+" in device_id or "#" in device_id:
            raise BadInput(f"--devices {path}: entry {i} has an unusable device_id {device_id!r}")
        if username in seen:
            raise BadInput(f"--devices {path}: username {username!r} appears twice")
        seen.add(username)
        out.append(DeviceCreds(device_id, username, password))
    if not out:
        raise BadInput(f"--devices {path} holds no credentials")
    return out
