"""Many devices, one process, one event loop.

Each device is one non-blocking socket driven by one ``select.epoll`` loop. The TCP connect, the TLS
handshake and MQTT itself are done here, by a small built-in MQTT 3.1.1/5 client: what a device
needs (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK both ways, PINGREQ, DISCONNECT). The simulator
used to drive one paho-mqtt client per device through paho's external-loop API; profiles showed
paho's per-packet machinery (reason-code and property objects even for MQTT 3.1.1, locks, message
info objects) costing more CPU than the sockets themselves: 0.43 ms per plain connection and
~200 us per published message, so 20,000 devices needed more than half a core. A fresh connection
state per connection also means a dropped connection's unacknowledged messages are never re-sent
behind our back: they are counted as *unconfirmed* instead, which keeps "acknowledged" exact. As
paho-mqtt's default, at most 20 QoS 1 publishes per connection wait for their PUBACK; more wait
in a queue (counted as sent, as with paho).

TLS session resumption (``--tls-resume``): ``off`` (default) makes every connection a full handshake,
as a fleet of devices without session caching; ``device`` lets each device resume its own previous
session when it reconnects (after a storm or an offline fault), as devices with a session cache do;
``shared`` lets every connection resume the latest session of any device - what the broker sees
when the whole fleet reconnects with valid tickets; it roughly halves the handshake CPU on both
sides, which is what bounds a TLS ramp.

Accounting, per device and in total:

* ``sent``: publishes handed to the connection on the device's own topics (telemetry, status,
  heartbeat; command answers go to status).
* ``acked``: QoS 1 - PUBACK with a success code; QoS 0 - written to the socket.
* ``failed``: PUBACK with a failure reason code (MQTT 5 only).
* ``unconfirmed``: in flight when the connection dropped (fault or loss); the broker may or may not
  have delivered them.
* cross-topic fault publishes are counted apart (``cross_sent``/``acl_refused``): they always go
  out with QoS 1 so the broker answers. MQTT 5 brokers answer a refused publish with PUBACK 0x87
  (Not authorized): that is a refusal. MQTT 3.1.1 has no reason codes - Mosquitto acknowledges and
  silently drops - so there such publishes are counted as ``acl_unconfirmed`` instead.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import json
import os
import random
import resource
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from simulator.config import DeviceCreds, Faults, RunConfig, bind_source
from simulator.payloads import Profile, dumps, make_profile, malformed, oversized
from simulator.wire import utf8, varint

# Device states.
IDLE, TCP, TLS, MQTT, UP, DONE = range(6)
_STATE_NAMES = ("idle", "tcp connect", "tls handshake", "waiting for CONNACK", "connected", "done")

# What an in-flight message is, for the accounting.
K_TELEMETRY, K_STATUS, K_HEARTBEAT, K_REPLY, K_OVERSIZED, K_CROSS = range(6)
KIND_NAMES = ("telemetry", "status", "heartbeat", "command_reply", "oversized", "cross_topic")

# Timer kinds.
T_TELEMETRY, T_HEARTBEAT, T_STATUS, T_MISC, T_CONNECT_TIMEOUT, T_RECONNECT = range(6)

TLS_RESUME_MODES = ("off", "device", "shared")

_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_MAX_ERROR_SAMPLES = 50
_LAG_RESERVOIR = 100_000
_NO_FAULTS = Faults()

# MQTT packets and limits.
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"  # MQTT 5: reason 0 (normal disconnection) may be omitted
_MAX_INFLIGHT = 20  # QoS 1 publishes awaiting PUBACK per connection (paho-mqtt's default); more are queued
_MAX_REMAINING = 268_435_455  # the largest MQTT remaining length
_RECV = 65536
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# MQTT 3.1.1 CONNACK return codes, named as paho-mqtt names them.
_CONNACK_311 = {
    1: "Unsupported protocol version",
    2: "Client identifier not valid",
    3: "Server unavailable",
    4: "Bad user name or password",
    5: "Not authorized",
}


def reason_name(packet_type: int, code: int) -> str:
    """The MQTT 5 name of a reason code (paho-mqtt's table), for error messages."""
    try:
        return str(ReasonCode(packet_type, identifier=code).getName())
    except Exception:
        return f"reason code {code:#04x}"


def _receive_maximum(buf: bytes, i: int) -> int:
    """The Receive Maximum property (0x21) in the MQTT 5 property block at ``i``: how many QoS 1/2
    publishes the broker accepts unacknowledged (65535 when absent)."""
    end = _skip_properties(buf, i)
    j = i
    while buf[j] & 128:  # the block's length
        j += 1
    j += 1
    while j < end:
        ident = buf[j]
        j += 1
        if ident == 0x21:
            return (buf[j] << 8) | buf[j + 1]
        kind = _PROPERTY_SIZES.get(ident)
        if kind is None:
            break  # an identifier we do not know: we cannot skip it, assume no limit
        if kind > 0:
            j += kind
        elif kind == -1:  # UTF-8 string or binary data
            j += 2 + ((buf[j] << 8) | buf[j + 1])
        elif kind == -2:  # string pair
            j += 2 + ((buf[j] << 8) | buf[j + 1])
            j += 2 + ((buf[j] << 8) | buf[j + 1])
        else:  # variable byte integer
            while buf[j] & 128:
                j += 1
            j += 1
    return 65535


# MQTT 5 CONNACK properties: fixed size in bytes, or -1 string/binary, -2 string pair, -3 varint.
_PROPERTY_SIZES = {
    0x11: 4, 0x12: -1, 0x13: 2, 0x15: -1, 0x16: -1, 0x1A: -1, 0x1C: -1, 0x1F: -1, 0x21: 2, 0x22: 2,
    0x24: 1, 0x25: 1, 0x26: -2, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1, 0x0B: -3,
}  # fmt: skip


def _skip_properties(buf: bytes, i: int) -> int:
    """Index after the MQTT 5 property block starting at ``i``."""
    length = shift = 0
    while True:
        b = buf[i]
        i += 1
        length |= (b & 127) << shift
        if b < 128:
            return i + length
        shift += 7
        if shift > 21:
            raise ValueError("malformed property length")


class Device:
    __slots__ = (
        "acked",
        "broken",
        "closing",
        "commands",
        "connects",
        "creds",
        "cross_refused",
        "cross_sent",
        "e_cmd",
        "e_hb",
        "e_status",
        "e_tel",
        "e_victim",
        "fail_streak",
        "failed",
        "fd",
        "gen",
        "idx",
        "inflight",
        "interval",
        "last_out",
        "next_mid",
        "note",
        "password",
        "ping_at",
        "profile",
        "q0",
        "queue",
        "rbuf",
        "rng",
        "sent",
        "seq",
        "sock",
        "state",
        "t_cfg",
        "t_cmd",
        "t_hb",
        "t_status",
        "t_tel",
        "tls_session",
        "unconfirmed",
        "up_since",
        "victim",
        "wants",
        "wbuf",
        "window",
        "window_max",
        "wrong_pw",
    )

    def __init__(self, idx: int, creds: DeviceCreds, interval: float, profile: Profile, rng: random.Random) -> None:
        self.idx = idx
        self.creds = creds
        self.password = creds.password
        base = f"devices/{creds.device_id}"
        self.t_tel, self.t_status, self.t_hb = f"{base}/telemetry", f"{base}/status", f"{base}/heartbeat"
        self.t_cmd, self.t_cfg = f"{base}/command", f"{base}/config"
        # Topics as MQTT strings (length-prefixed UTF-8), ready to go into packets.
        self.e_tel, self.e_status, self.e_hb = utf8(self.t_tel), utf8(self.t_status), utf8(self.t_hb)
        self.e_cmd = utf8(self.t_cmd)
        self.victim = ""
        self.e_victim = b""
        self.state = IDLE
        self.sock: Any = None
        self.fd = -1  # kept apart from sock.fileno(): the socket may be closed before we unregister it
        self.gen = 0
        self.wants = 0
        self.interval = interval
        self.profile = profile
        self.rng = rng
        self.seq = 0
        # Connection state (reset by Simulator._reset_conn for every connection).
        self.wbuf = bytearray()  # bytes the socket has not taken yet
        self.rbuf = b""  # the start of an incomplete packet
        self.inflight: dict[int, int] = {}  # mid (negative: QoS 0 not yet written) -> kind
        self.queue: collections.deque[bytes] = collections.deque()  # QoS 1 PUBLISHes beyond the window
        self.q0: list[int] = []
        self.window = 0
        self.window_max = _MAX_INFLIGHT
        self.next_mid = 0
        self.ping_at = 0.0
        self.last_out = 0.0
        self.broken = False
        self.closing = False
        self.tls_session: ssl.SSLSession | None = None
        self.sent = self.acked = self.failed = self.unconfirmed = 0
        self.cross_sent = self.cross_refused = 0
        self.connects = self.commands = 0
        self.fail_streak = 0
        self.wrong_pw = False
        self.note = ""  # why the current connection ended, when we already know (avoids double counting)
        self.up_since = 0.0


@dataclass
class Snapshot:
    elapsed: float
    connected: int
    count: int
    sent: int
    acked: int
    errors: int
    rate: float


class Simulator:
    def __init__(
        self,
        cfg: RunConfig,
        ssl_context: ssl.SSLContext | None,
        *,
        progress: Callable[[Snapshot], None] | None = None,
        progress_every: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.ctx = ssl_context
        self.progress = progress
        self.progress_every = progress_every
        # Simulation noise, not secrets: a seeded PRNG makes a run reproducible with --seed.
        self.rng = random.Random(cfg.seed)  # noqa: S311
        infos = socket.getaddrinfo(cfg.broker.host, cfg.broker.port, type=socket.SOCK_STREAM)
        self.family: socket.AddressFamily = infos[0][0]
        self.addr: Any = infos[0][4]
        self.v5 = cfg.mqtt_version == 5
        self.props = b"\x00" if self.v5 else b""  # MQTT 5: an empty property block in every packet that has one
        self.tls_resume = cfg.tls_resume if ssl_context is not None else "off"
        self.tls_session: ssl.SSLSession | None = None  # --tls-resume shared: the latest session
        self.ep = select.epoll()
        self.devices: list[Device] = []
        interval = cfg.device_interval
        for i, creds in enumerate(cfg.devices):
            rng = random.Random(self.rng.getrandbits(64))  # noqa: S311
            dev = Device(i, creds, interval, make_profile(cfg.profile, rng, creds.device_id, cfg.template), rng)
            self.devices.append(dev)
        for i, dev in enumerate(self.devices):
            dev.victim = f"devices/{self.devices[(i + 1) % len(self.devices)].creds.device_id}/telemetry"
            dev.e_victim = utf8(dev.victim)
        self.by_fd: dict[int, Device] = {}
        self.timers: list[tuple[float, int, int, Device, int]] = []
        self._tseq = 0
        self.connect_queue: collections.deque[Device] = collections.deque()
        self.pending = 0  # devices in TCP/TLS/MQTT
        self.inflight_total = 0
        self.stop_requested = False
        self.abort_requested = False
        self.stopping = False
        # Counters.
        self.kind_sent = [0] * len(KIND_NAMES)
        self.kind_acked = [0] * len(KIND_NAMES)
        self.kind_failed = [0] * len(KIND_NAMES)
        self.c: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.error_samples: list[dict[str, Any]] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.connected = 0
        self.connected_max = 0
        self.lag_max = 0.0
        self.lag_samples: list[float] = []
        self.lag_n = 0
        self.t0 = 0.0
        self.wall0 = 0.0
        self.all_connected_at: float | None = None
        self.cpu_mark: tuple[float, float] | None = None
        self.cpu_end: tuple[float, float] | None = None
        self.end_publishing = 0.0

    # -- timers ------------------------------------------------------------------------------

    def _at(self, when: float, kind: int, dev: Device) -> None:
        self._tseq += 1
        heapq.heappush(self.timers, (when, self._tseq, kind, dev, dev.gen))

    def _jittered(self, base: float, rng: random.Random) -> float:
        j = self.cfg.jitter
        return base * (1.0 + rng.uniform(-j, j)) if j else base

    # -- bookkeeping -------------------------------------------------------------------------

    def _error(self, dev: Device | None, kind: str, detail: str = "") -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < _MAX_ERROR_SAMPLES:
            self.error_samples.append(
                {
                    "t": round(time.monotonic() - self.t0, 3),
                    "device": dev.creds.device_id if dev else None,
                    "error": kind,
                    "detail": detail,
                }
            )

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def _set_interest(self, dev: Device, events: int) -> None:
        if events == dev.wants:
            return
        fd = dev.fd
        if dev.wants == 0:
            self.ep.register(fd, events)
            self.by_fd[fd] = dev
        elif events == 0:
            self.ep.unregister(fd)
            self.by_fd.pop(fd, None)
        else:
            self.ep.modify(fd, events)
        dev.wants = events

    def _unregister(self, dev: Device) -> None:
        # Always called before this process opens another socket, so dev.fd cannot have been reused yet;
        # epoll forgets a closed fd by itself (then unregister raises, which is fine).
        if dev.wants:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(dev.fd)
            self.by_fd.pop(dev.fd, None)
        dev.wants = 0

    # -- connecting --------------------------------------------------------------------------

    def _start_connect(self, dev: Device, now: float) -> None:
        dev.gen += 1
        dev.state = TCP
        dev.note = ""
        self.pending += 1
        self.c["connect_attempts"] += 1
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dev.sock = sock
        dev.fd = sock.fileno()
        sources = self.cfg.source_addresses
        if sources:
            try:
                bind_source(sock, sources[dev.idx % len(sources)])
            except OSError as exc:
                self._fail(dev, "connect", f"bind: {exc.strerror or exc}")
                return
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._fail(dev, "connect", os.strerror(err))
            return
        self._set_interest(dev, _WRITE)
        self._at(now + self.cfg.connect_timeout, T_CONNECT_TIMEOUT, dev)

    def _on_tcp(self, dev: Device) -> None:
        err = dev.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(dev, "connect", os.strerror(err))
            return
        if self.ctx is None:
            self._start_mqtt(dev)
            return
        mode = self.tls_resume
        session = dev.tls_session if mode == "device" else self.tls_session if mode == "shared" else None
        # wrap_socket takes over the same fd, so the epoll registration stays valid.
        dev.sock = self.ctx.wrap_socket(
            dev.sock, server_hostname=self.cfg.broker.tls_name, do_handshake_on_connect=False, session=session
        )
        dev.state = TLS
        self._handshake(dev)

    def _handshake(self, dev: Device) -> None:
        try:
            dev.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_interest(dev, _READ)
            return
        except ssl.SSLWantWriteError:
            self._set_interest(dev, _WRITE)
            return
        except ssl.SSLCertVerificationError as exc:
            self._fail(dev, "tls", f"certificate verify failed: {exc.verify_message}")
            return
        except (ssl.SSLError, OSError) as exc:
            self._fail(dev, "tls", str(getattr(exc, "reason", None) or exc))
            return
        self._start_mqtt(dev)

    def _reset_conn(self, dev: Device) -> None:
        dev.wbuf = bytearray()
        dev.rbuf = b""
        dev.queue.clear()
        dev.q0 = []
        dev.window = 0
        dev.window_max = _MAX_INFLIGHT
        dev.ping_at = 0.0
        dev.broken = dev.closing = False

    def _start_mqtt(self, dev: Device) -> None:
        cfg = self.cfg
        self._reset_conn(dev)
        dev.wrong_pw = bool(cfg.faults.wrong_credentials) and dev.rng.random() < cfg.faults.wrong_credentials
        if dev.wrong_pw:
            self.faults["wrong_credentials"] += 1
        # Clean session (3.1.1) / clean start without session expiry (5), user name and password.
        body = (
            b"\x00\x04MQTT"
            + (b"\x05\xc2" if self.v5 else b"\x04\xc2")
            + cfg.keepalive.to_bytes(2, "big")
            + self.props
            + utf8(dev.creds.username)  # the client id: unique per device
            + utf8(dev.creds.username)
            + utf8(dev.password + "-wrong" if dev.wrong_pw else dev.password)
        )
        dev.state = MQTT
        self._write(dev, b"\x10" + varint(len(body)) + body)
        self._after_io(dev)

    # -- MQTT: writing -----------------------------------------------------------------------

    def _write(self, dev: Device, data: bytes) -> None:
        """Queue a packet. ``_after_io`` sends everything queued while handling one event in one
        ``send`` (one TLS record): a CONNACK's SUBSCRIBE and status PUBLISH, an answer and its PUBACK."""
        dev.last_out = time.monotonic()
        dev.wbuf += data

    def _flush(self, dev: Device) -> None:
        """Send what is queued, as far as the socket takes it; the rest waits for write readiness
        (TLS: retried with the same leading bytes, as OpenSSL requires). An error marks the
        connection broken; ``_after_io`` then tears it down."""
        buf = dev.wbuf
        while buf:
            try:
                n = dev.sock.send(buf)
            except _WOULD_BLOCK:
                return
            except OSError as exc:
                dev.note = dev.note or f"lost: {exc}"
                dev.broken = True
                return
            if n <= 0:
                return
            del buf[:n]
        if dev.q0:  # QoS 0: "acknowledged" means written to the socket
            inflight = dev.inflight
            for key in dev.q0:
                kind = inflight.pop(key)
                self.inflight_total -= 1
                self._settle(dev, kind, 0)
            dev.q0 = []

    def _mid(self, dev: Device) -> int:
        mid = dev.next_mid
        while True:
            mid = mid + 1 if mid < 65535 else 1
            if mid not in dev.inflight:
                dev.next_mid = mid
                return mid

    # -- MQTT: reading -----------------------------------------------------------------------

    def _read(self, dev: Device) -> None:
        sock = dev.sock
        tls = self.ctx is not None
        while True:
            try:
                data = sock.recv(_RECV)
            except _WOULD_BLOCK:
                return
            except OSError as exc:
                dev.note = dev.note or f"lost: {exc}"
                dev.broken = True
                return
            if not data:
                dev.broken = True  # the broker closed the connection (note says why, if we know)
                return
            if dev.rbuf:
                data = dev.rbuf + data
            self._packets(dev, data)
            if dev.broken or dev.sock is not sock:
                return
            # A short read drained the kernel buffer (epoll is level-triggered: more data wakes us
            # again); TLS may still hold whole records decrypted, which epoll does not see.
            if len(data) < _RECV and not (tls and sock.pending()):
                return

    def _packets(self, dev: Device, buf: bytes) -> None:
        """Handle every complete packet in ``buf``; keep an incomplete tail in ``dev.rbuf``."""
        pos, end = 0, len(buf)
        while end - pos >= 2:
            i = pos + 1
            length = shift = 0
            while True:
                if i >= end:
                    dev.rbuf = buf[pos:]
                    return
                b = buf[i]
                i += 1
                length |= (b & 127) << shift
                if b < 128:
                    break
                shift += 7
                if shift > 21:
                    self._protocol_error(dev, "malformed remaining length")
                    return
            stop = i + length
            if stop > end:
                break
            try:
                self._packet(dev, buf[pos], buf, i, stop)
            except (IndexError, ValueError, UnicodeDecodeError) as exc:
                self._protocol_error(dev, f"malformed packet {buf[pos]:#04x}: {exc}")
                return
            pos = stop
            if dev.broken:
                return
        dev.rbuf = buf[pos:] if pos < end else b""

    def _protocol_error(self, dev: Device, detail: str) -> None:
        dev.note = dev.note or f"lost: protocol error: {detail}"
        dev.broken = True

    def _packet(self, dev: Device, header: int, buf: bytes, i: int, stop: int) -> None:
        kind = header & 0xF0
        if kind == 0x40:  # PUBACK: packet id, MQTT 5 reason code (omitted = success)
            mid = (buf[i] << 8) | buf[i + 1]
            rc = buf[i + 2] if self.v5 and stop - i > 2 else 0
            self._on_puback(dev, mid, rc)
        elif kind == 0x30:  # PUBLISH: a command or a config update
            qos = (header >> 1) & 3
            tlen = (buf[i] << 8) | buf[i + 1]
            j = i + 2 + tlen
            topic = buf[i + 2 : j].decode()
            mid = 0
            if qos:
                mid = (buf[j] << 8) | buf[j + 1]
                j += 2
            if self.v5:
                j = _skip_properties(buf, j)
            self._on_message(dev, topic, buf[j:stop])
            if qos == 1:
                self._write(dev, b"\x40\x02" + mid.to_bytes(2, "big"))
            elif qos == 2:
                self._protocol_error(dev, "QoS 2 PUBLISH on a QoS 1 subscription")
        elif kind == 0x20:  # CONNACK: flags, return/reason code (, MQTT 5 properties)
            if self.v5 and stop - i > 2:
                dev.window_max = max(1, min(_MAX_INFLIGHT, _receive_maximum(buf, i + 2)))
            self._on_connack(dev, buf[i + 1])
        elif kind == 0x90:  # SUBACK: packet id (, properties), one code per filter
            j = _skip_properties(buf, i + 2) if self.v5 else i + 2
            codes = buf[j:stop]
            if any(c >= 0x80 for c in codes):
                names = ", ".join(reason_name(PacketTypes.SUBACK, c) for c in codes)
                self._error(dev, "subscribe refused", names)
        elif kind == 0xD0:  # PINGRESP
            dev.ping_at = 0.0
        elif kind == 0xE0 and self.v5:  # DISCONNECT from the broker, with a reason
            rc = buf[i] if stop > i else 0
            if not dev.note and rc:
                dev.note = f"lost: {reason_name(PacketTypes.DISCONNECT, rc)}"
            dev.broken = True
        else:
            self._protocol_error(dev, f"unexpected packet {header:#04x}")

    # -- MQTT: what the broker said -----------------------------------------------------------

    def _on_connack(self, dev: Device, rc: int) -> None:
        if dev.state != MQTT:
            self._protocol_error(dev, "a second CONNACK")
            return
        if rc if not self.v5 else rc >= 0x80:
            if dev.wrong_pw:
                self.c["auth_refused_injected"] += 1
                dev.note = "wrong-credentials"
            else:
                dev.note = "refused"
                name = reason_name(PacketTypes.CONNACK, rc) if self.v5 else _CONNACK_311.get(rc, f"code {rc}")
                self._error(dev, f"connack: {name}")
            dev.broken = True  # the broker closes the connection after a refusal anyway
            return
        if dev.wrong_pw:
            self._error(dev, "wrong password accepted by the broker")
        now = time.monotonic()
        dev.state = UP
        dev.up_since = now
        dev.connects += 1
        dev.fail_streak = 0
        self.pending -= 1
        self.connected += 1
        self.connected_max = max(self.connected_max, self.connected)
        self.c["connects"] += 1
        if self.connected == len(self.devices) and self.all_connected_at is None:
            self.all_connected_at = now
        if self.ctx is not None:
            self._keep_tls_session(dev)
        # SUBSCRIBE command and config topics, QoS 1 (the subscription options byte of MQTT 5 is the QoS).
        body = self._mid(dev).to_bytes(2, "big") + self.props + dev.e_cmd + b"\x01" + utf8(dev.t_cfg) + b"\x01"
        self._write(dev, b"\x82" + varint(len(body)) + body)
        self._publish(dev, dev.e_status, self._status(dev, "online"), K_STATUS)
        rng = dev.rng
        self._at(now + rng.uniform(0, dev.interval), T_TELEMETRY, dev)
        self._at(now + rng.uniform(0, self.cfg.heartbeat_interval), T_HEARTBEAT, dev)
        self._at(now + self._jittered(self.cfg.status_interval, rng), T_STATUS, dev)
        self._at(now + self.cfg.keepalive / 3, T_MISC, dev)

    def _keep_tls_session(self, dev: Device) -> None:
        """Remember the TLS session for --tls-resume (by CONNACK time a TLS 1.3 ticket has arrived:
        the broker sends it right after the handshake, before any application data)."""
        sock = dev.sock
        if sock.session_reused:
            self.c["tls_resumed"] += 1
            return
        self.c["tls_full_handshakes"] += 1
        if self.tls_resume == "device":
            dev.tls_session = sock.session
        elif self.tls_resume == "shared":
            self.tls_session = sock.session

    def _on_puback(self, dev: Device, mid: int, rc: int) -> None:
        kind = dev.inflight.pop(mid, None)
        if kind is None:
            return  # not ours (or the SUBSCRIBE's id): nothing to account
        self.inflight_total -= 1
        if dev.queue:  # the window has room again
            self._write(dev, dev.queue.popleft())
        else:
            dev.window -= 1
        self._settle(dev, kind, rc)

    def _settle(self, dev: Device, kind: int, rc: int) -> None:
        failure = rc >= 0x80
        if kind == K_CROSS:
            if failure:
                self.c["acl_refused"] += 1
                dev.cross_refused += 1
            elif self.v5:
                self._error(dev, "broker accepted a publish on another device's topic", dev.victim)
                self.c["acl_accepted"] += 1
            else:
                self.c["acl_unconfirmed"] += 1
            return
        if failure:
            dev.failed += 1
            self.kind_failed[kind] += 1
            if kind == K_OVERSIZED:
                self.c["oversized_refused"] += 1  # the broker enforcing its size limit is expected
            else:
                self._error(dev, f"puback: {reason_name(PacketTypes.PUBACK, rc)}", KIND_NAMES[kind])
            return
        dev.acked += 1
        self.kind_acked[kind] += 1

    def _on_message(self, dev: Device, topic: str, payload: bytes) -> None:
        if self.stopping or dev.state != UP:
            return
        leaf = topic.rsplit("/", 1)[-1]
        self.c[f"{leaf}_received"] += 1
        ts = int(time.time() * 1000)
        # Answers go to the status topic, so they carry the device's status too (ingest requires it).
        base: dict[str, Any] = {"ts": ts, "status": "online", "device_id": dev.creds.device_id}
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            answer = {**base, "type": f"{leaf}_response", "result": "error", "detail": f"malformed {leaf}"}
            self._publish(dev, dev.e_status, dumps(answer), K_REPLY)
            return
        ident = body.get("id")
        if leaf == "command":
            dev.commands += 1
            name = body.get("command", body.get("name"))
            answer = {**base, "type": "command_response", "id": ident, "command": name}
            if name == "ping":
                answer.update(result="ok", detail="pong")
            elif name == "report":
                answer.update(result="ok", detail="telemetry sent")
                self._telemetry(dev, faults=False)  # no fault here: it could close the socket being read
            else:
                answer.update(result="error", detail=f"unknown command {name!r} (known: ping, report)")
        else:
            answer = {**base, "type": "config_response", "id": ident}
            interval = body.get("telemetry_interval")
            if isinstance(interval, int | float) and 0.05 <= interval <= 86400:
                dev.interval = float(interval)
                answer.update(result="ok", telemetry_interval=interval)
            else:
                answer.update(result="error", detail='expected {"telemetry_interval": seconds (0.05..86400)}')
        self.c[f"{leaf}_answered"] += 1
        self._publish(dev, dev.e_status, dumps(answer), K_REPLY)

    # -- I/O ---------------------------------------------------------------------------------

    def _after_io(self, dev: Device) -> None:
        """After anything touched a connection: tear it down if it broke or our DISCONNECT went out,
        else wait for reads (and writes while bytes are waiting)."""
        if dev.sock is None or dev.state not in (MQTT, UP):
            return
        if dev.wbuf and not dev.broken:
            self._flush(dev)
        if dev.broken or (dev.closing and not dev.wbuf):
            self._drop(dev)
            self._gone(dev)
            return
        self._set_interest(dev, _READ | _WRITE if dev.wbuf else _READ)

    def _on_event(self, dev: Device, mask: int) -> None:
        st = dev.state
        if st == TCP:
            self._on_tcp(dev)
        elif st == TLS:
            self._handshake(dev)
        elif st in (MQTT, UP):
            if mask & (_READ | select.EPOLLHUP | select.EPOLLERR):
                self._read(dev)
            self._after_io(dev)  # writes what is queued (also when only writable)

    def _fail(self, dev: Device, stage: str, detail: str) -> None:
        """A connection attempt failed before the broker said anything."""
        dev.note = "failed"
        self._error(dev, f"{stage}: {detail}")
        self._drop(dev)
        self._gone(dev)

    def _drop(self, dev: Device) -> None:
        """Close the socket without an MQTT DISCONNECT: what a network loss looks like to the broker."""
        self._unregister(dev)
        if dev.sock is not None:
            with contextlib.suppress(OSError):
                dev.sock.close()

    def _gone(self, dev: Device) -> None:
        """The connection is over (whoever closed it): account for it and decide what comes next."""
        self._unregister(dev)
        if dev.sock is not None:
            with contextlib.suppress(OSError):
                dev.sock.close()
        was = dev.state
        if was == UP:
            self.connected -= 1
        elif was in (TCP, TLS, MQTT):
            self.pending -= 1
        if dev.inflight:
            for kind in dev.inflight.values():
                if kind == K_CROSS:
                    self.c["cross_unconfirmed"] += 1
                else:
                    dev.unconfirmed += 1
                    self.c["unconfirmed"] += 1
            self.inflight_total -= len(dev.inflight)
            dev.inflight = {}
        self._reset_conn(dev)
        dev.sock = None
        dev.gen += 1  # every timer of the old connection becomes stale
        note, dev.note = dev.note, ""
        if note == "":
            self._error(dev, "connection closed by the broker" if was == UP else "closed before CONNACK")
        elif note.startswith("lost:"):
            self._error(dev, "connection lost", note[5:].strip())
        if self.stopping:
            dev.state = DONE
            return
        dev.state = IDLE
        now = time.monotonic()
        if note.startswith("fault:"):
            return  # the fault scheduled the reconnect itself
        if note == "wrong-credentials":
            self._at(now + dev.rng.uniform(0.2, 1.0), T_RECONNECT, dev)
            return
        self.c["reconnects_scheduled"] += 1
        dev.fail_streak += 1
        delay = min(30.0, 0.5 * 2 ** min(dev.fail_streak, 6)) * dev.rng.uniform(0.5, 1.5)
        self._at(now + delay, T_RECONNECT, dev)

    # -- publishing --------------------------------------------------------------------------

    def _publish(self, dev: Device, topic: bytes, payload: bytes, kind: int, qos: int | None = None) -> None:
        """PUBLISH ``payload`` on ``topic`` (an MQTT string: length-prefixed UTF-8)."""
        if dev.state != UP or dev.broken or dev.closing:
            return
        q = self.cfg.qos if qos is None else qos
        size = len(topic) + len(self.props) + len(payload) + (2 if q else 0)
        if size > _MAX_REMAINING:
            self._error(dev, "publish: Payload too large.")
            return
        self.kind_sent[kind] += 1
        if kind == K_CROSS:
            dev.cross_sent += 1
        else:
            dev.sent += 1
        if q == 0:  # acknowledged once the socket took it (_flush)
            self._write(dev, b"\x30" + varint(size) + topic + self.props + payload)
            key = -1 - len(dev.q0)
            dev.inflight[key] = kind
            dev.q0.append(key)
            self.inflight_total += 1
            return
        mid = self._mid(dev)
        dev.inflight[mid] = kind
        self.inflight_total += 1
        packet = b"\x32" + varint(size) + topic + mid.to_bytes(2, "big") + self.props + payload
        if dev.window < dev.window_max:
            dev.window += 1
            self._write(dev, packet)
        else:
            dev.queue.append(packet)

    def _status(self, dev: Device, state: str) -> bytes:
        now = time.monotonic()
        return dumps(
            {
                "ts": int(time.time() * 1000),
                "status": state,  # the ingest service stores this string as the device's status
                "fw": "simulator/1",
                "uptime_s": round(now - dev.up_since) if dev.up_since else 0,
                "rssi": dev.rng.randint(-90, -50),
            }
        )

    def _telemetry(self, dev: Device, *, faults: bool = True) -> None:
        f = self.cfg.faults if faults else _NO_FAULTS
        rng = dev.rng
        if f.offline and rng.random() < min(1.0, f.offline * dev.interval / 60.0):
            self.faults["offline"] += 1
            self._fault_drop(dev, time.monotonic() + rng.uniform(*f.offline_seconds))
            return
        dev.seq += 1
        ts = int(time.time() * 1000)
        if f.clock_skew and rng.random() < f.clock_skew:
            self.faults["clock_skew"] += 1
            ts += int(rng.choice((-1, 1)) * f.skew_seconds * 1000)
        kind = K_TELEMETRY
        if f.malformed and rng.random() < f.malformed:
            self.faults["malformed"] += 1
            payload = malformed(rng, ts)
        elif f.oversized and rng.random() < f.oversized:
            self.faults["oversized"] += 1
            payload = oversized(ts, f.oversized_bytes)
            kind = K_OVERSIZED
        else:
            payload = dumps(dev.profile.telemetry(ts, dev.seq))
        self._publish(dev, dev.e_tel, payload, kind)
        if f.duplicate and rng.random() < f.duplicate:
            self.faults["duplicate"] += 1
            self._publish(dev, dev.e_tel, payload, kind)
        if f.cross_topic and rng.random() < f.cross_topic:
            self.faults["cross_topic"] += 1
            body = {"ts": ts, "temperature": 99.9, "sim_fault": "cross_topic", "sim_from": dev.creds.device_id}
            self._publish(dev, dev.e_victim, dumps(body), K_CROSS, qos=1)

    def _fault_drop(self, dev: Device, reconnect_at: float) -> None:
        dev.note = "fault:drop"
        self._drop(dev)
        self._gone(dev)
        self._at(reconnect_at, T_RECONNECT, dev)

    def _storm(self, now: float) -> None:
        self.faults["storm"] += 1
        for dev in self.devices:
            if dev.state == UP:
                dev.note = "fault:storm"
                self._drop(dev)
                self._gone(dev)
                self.connect_queue.append(dev)  # the ramp shapes how fast they come back

    def _fire(self, kind: int, dev: Device, due: float, now: float) -> None:
        if kind == T_RECONNECT:
            if dev.state == IDLE:
                self.connect_queue.append(dev)
            return
        if kind == T_CONNECT_TIMEOUT:
            if dev.state in (TCP, TLS, MQTT):
                self._fail(dev, "connect timeout", _STATE_NAMES[dev.state])
            return
        if dev.state != UP:
            return
        if kind == T_TELEMETRY:
            lag = now - due
            self._record_lag(lag)
            # Keep the cadence anchored on the schedule, unless we fell a whole interval behind.
            base = due if lag < dev.interval else now
            self._at(base + self._jittered(dev.interval, dev.rng), T_TELEMETRY, dev)
            self._telemetry(dev)
        elif kind == T_HEARTBEAT:
            self._at(due + self._jittered(self.cfg.heartbeat_interval, dev.rng), T_HEARTBEAT, dev)
            self._publish(dev, dev.e_hb, dumps({"ts": int(time.time() * 1000), "seq": dev.seq}), K_HEARTBEAT)
        elif kind == T_STATUS:
            self._at(due + self._jittered(self.cfg.status_interval, dev.rng), T_STATUS, dev)
            self._publish(dev, dev.e_status, self._status(dev, "online"), K_STATUS)
        elif kind == T_MISC:
            self._at(now + self.cfg.keepalive / 3, T_MISC, dev)
            self._keepalive(dev, now)
        self._after_io(dev)

    def _keepalive(self, dev: Device, now: float) -> None:
        """Every keepalive/3: a PINGREQ when nothing was sent for 2/3 of the keepalive (the broker
        allows 1.5 x), and the connection counts as lost when a PINGREQ got no PINGRESP within the
        keepalive."""
        ka = self.cfg.keepalive
        if dev.ping_at:
            if now - dev.ping_at >= ka:
                dev.note = dev.note or "lost: no PINGRESP within the keepalive"
                dev.broken = True
        elif now - dev.last_out >= ka * 2 / 3:
            self._write(dev, _PINGREQ)
            dev.ping_at = now

    def _record_lag(self, lag: float) -> None:
        self.lag_max = max(self.lag_max, lag)
        self.lag_n += 1
        if len(self.lag_samples) < _LAG_RESERVOIR:
            self.lag_samples.append(lag)
        else:
            j = self.rng.randrange(self.lag_n)
            if j < _LAG_RESERVOIR:
                self.lag_samples[j] = lag

    # -- the loop ----------------------------------------------------------------------------

    def _snapshot(self, now: float) -> Snapshot:
        elapsed = now - self.t0
        acked = self.kind_acked[K_TELEMETRY]
        return Snapshot(
            elapsed=elapsed,
            connected=self.connected,
            count=len(self.devices),
            sent=sum(self.kind_sent),
            acked=sum(self.kind_acked),
            errors=self.error_total,
            rate=acked / elapsed if elapsed > 0 else 0.0,
        )

    def _cpu(self) -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def _poll(self, timeout: float) -> None:
        by_fd = self.by_fd
        for fd, mask in self.ep.poll(timeout):
            dev = by_fd.get(fd)
            if dev is not None and dev.wants and dev.fd == fd:
                self._on_event(dev, mask)

    def run(self) -> None:
        cfg = self.cfg
        self.t0 = now = time.monotonic()
        self.wall0 = time.time()
        self.connect_queue.extend(self.devices)
        end = self.t0 + cfg.duration
        storm_every = 60.0 / cfg.faults.storm if cfg.faults.storm else None
        next_storm = self.t0 + storm_every if storm_every else float("inf")
        next_progress = self.t0 + self.progress_every
        tokens = 1.0
        last = now
        settle = 2.0  # steady CPU is measured from 2 s after everyone connected: TLS handshakes are over
        while not self.stop_requested and now < end:
            now = time.monotonic()
            # Ramp: a token bucket of connections per second, and a cap on handshakes in progress.
            if cfg.ramp:
                tokens = min(max(1.0, cfg.ramp / 10), tokens + (now - last) * cfg.ramp)
            last = now
            queue = self.connect_queue
            while queue and self.pending < cfg.max_pending and (tokens >= 1.0 or not cfg.ramp):
                dev = queue.popleft()
                if dev.state != IDLE:
                    continue
                tokens -= 1.0
                self._start_connect(dev, now)
            timers = self.timers
            while timers and timers[0][0] <= now:
                due, _, kind, dev, gen = heapq.heappop(timers)
                if gen == dev.gen:
                    self._fire(kind, dev, due, now)
            if now >= next_storm:
                next_storm += storm_every or float("inf")
                self._storm(now)
            if self.all_connected_at is not None and self.cpu_mark is None and now >= self.all_connected_at + settle:
                self.cpu_mark = (now, self._cpu())
            if self.progress is not None and now >= next_progress:
                next_progress = now + self.progress_every
                self.progress(self._snapshot(now))
            timeout = min(0.05, max(0.0, (timers[0][0] - now) if timers else 0.05), end - now)
            if queue and self.pending < cfg.max_pending:
                timeout = min(timeout, 1.0 / cfg.ramp if cfg.ramp else 0.0)
            self._poll(max(0.0, timeout))
            now = time.monotonic()
        self.end_publishing = time.monotonic()
        if self.cpu_mark is not None:
            self.cpu_end = (self.end_publishing, self._cpu())
        self._shutdown()

    def _shutdown(self) -> None:
        """Stop publishing, wait (bounded) for outstanding PUBACKs, then DISCONNECT everyone."""
        self.stopping = True
        deadline = time.monotonic() + (0 if self.abort_requested else self.cfg.drain_timeout)
        while self.inflight_total > 0 and time.monotonic() < deadline and not self.abort_requested:
            self._poll(0.05)
        for dev in self.devices:
            if dev.state == UP and dev.sock is not None and not dev.broken:
                dev.note = "bye"
                self._write(dev, _DISCONNECT)
                dev.closing = True  # closed once the DISCONNECT is written (_after_io)
                self._after_io(dev)
        deadline = time.monotonic() + 1.0
        while self.by_fd and time.monotonic() < deadline and not self.abort_requested:
            self._poll(0.05)
        for dev in self.devices:
            if dev.state != DONE and dev.state != IDLE:
                dev.note = dev.note or "bye"
                self._drop(dev)
                self._gone(dev)
            dev.state = DONE
        self.ep.close()

    # -- results -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        cfg = self.cfg
        elapsed = max(1e-9, self.end_publishing - self.t0)
        lags = sorted(self.lag_samples)

        def pct(p: float) -> float | None:
            return round(lags[min(len(lags) - 1, int(p * len(lags)))] * 1000, 2) if lags else None

        steady_cpu = None
        if self.cpu_mark and self.cpu_end and self.cpu_end[0] - self.cpu_mark[0] >= 1.0:
            steady_cpu = round(100 * (self.cpu_end[1] - self.cpu_mark[1]) / (self.cpu_end[0] - self.cpu_mark[0]), 1)
        tele_acked = self.kind_acked[K_TELEMETRY] + self.kind_acked[K_OVERSIZED]
        kinds = {
            name: {"sent": self.kind_sent[i], "acked": self.kind_acked[i], "failed": self.kind_failed[i]}
            for i, name in enumerate(KIND_NAMES)
        }
        devices = {
            d.creds.device_id: {
                "sent": d.sent,
                "acked": d.acked,
                "failed": d.failed,
                "unconfirmed": d.unconfirmed,
                "cross_sent": d.cross_sent,
                "cross_refused": d.cross_refused,
                "connects": d.connects,
                "commands": d.commands,
            }
            for d in self.devices
        }
        never = [d.creds.device_id for d in self.devices if d.connects == 0]
        return {
            "broker": str(cfg.broker),
            "mqtt_version": "5" if cfg.mqtt_version == 5 else "3.1.1",
            "qos": cfg.qos,
            "count": len(self.devices),
            "rate_target": cfg.rate,
            "duration_s": round(elapsed, 3),
            "started_at": self.wall0,
            "profile": cfg.profile,
            "faults_configured": cfg.faults.active(),
            "totals": {
                "sent": sum(self.kind_sent[i] for i in range(len(KIND_NAMES)) if i != K_CROSS),
                "acked": sum(self.kind_acked[i] for i in range(len(KIND_NAMES)) if i != K_CROSS),
                "failed": sum(self.kind_failed[i] for i in range(len(KIND_NAMES)) if i != K_CROSS),
                "unconfirmed": self.c["unconfirmed"],
                "by_kind": kinds,
                "connected_at_end": self.connected,
                "connected_max": self.connected_max,
                "never_connected": len(never),
                **{k: v for k, v in sorted(self.c.items()) if k != "unconfirmed"},
            },
            "acl": {
                "cross_topic_sent": self.kind_sent[K_CROSS],
                "refused": self.c["acl_refused"],
                "accepted": self.c["acl_accepted"],
                "unconfirmed": self.c["acl_unconfirmed"] + self.c["cross_unconfirmed"],
                "how": "MQTT 5 PUBACK reason code 0x87 (Not authorized)"
                if cfg.mqtt_version == 5
                else "not countable with MQTT 3.1.1 (the broker acknowledges and drops); use --mqtt 5",
            },
            "faults_injected": dict(sorted(self.faults.items())),
            "timing": {
                "all_connected_s": round(self.all_connected_at - self.t0, 3) if self.all_connected_at else None,
                "achieved_rate": round(tele_acked / elapsed, 2),
                "schedule_lag_ms": {"max": round(self.lag_max * 1000, 2), "p50": pct(0.5), "p99": pct(0.99)},
                "steady_cpu_pct": steady_cpu,
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            },
            "errors": {
                "total": self.error_total,
                "by_kind": dict(self.errors.most_common()),
                "samples": self.error_samples,
                "never_connected_sample": never[:20],
            },
            "devices": devices,
        }
