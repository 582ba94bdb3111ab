"""paho-mqtt 2.2 with a faster receive path and batched acknowledgements.

Profiling stock paho draining a persistent session (QoS 1, manual_ack) showed three costs that
dominate long before JSON or the database do (26k msg/s with an empty on_message):

* every inbound packet costs three ``recv`` syscalls (1 byte command, 1 byte length, body) and a
  ``select``, because ``loop_read`` handles one packet per loop iteration;
* every ``ack(mid)`` is its own ``send`` syscall (and a wake-up of the broker);
* every PUBLISH builds an ``MQTTMessage`` and walks the topic-filter callbacks.

:class:`FastClient` keeps paho for everything else (connect, TLS, keepalive, reconnect, MQTT 5)
and changes only these: reads go through a 256 KiB userspace buffer and one loop iteration drains
what is buffered; QoS 1 PUBLISH packets of MQTT 3.1.1 are decoded in place and handed to a sink as
(topic, payload, mid); acknowledgements are queued as one packet of concatenated PUBACKs per batch
(a PUBACK is 4 bytes in 3.1.1 and, with reason "success" omitted, in MQTT 5 too).

These hooks use paho internals (``_sock_recv``, ``_handle_publish``, ``_packet_queue``,
``_in_packet``). paho-mqtt is pinned exactly in pyproject.toml; on any other version the fast paths
switch themselves off (stock behaviour, ``FAST_PATHS`` False) and tests/unit/test_ingest_mqtt.py
fails loudly so the pin bump is looked at.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion

log = logging.getLogger(__name__)

FAST_PATHS = paho.mqtt.__version__ == "2.2.0"
_PUBACK = 0x40
_RECV_SIZE = 256 * 1024
_MAX_PACKETS_PER_READ = 4000  # then let paho write (acks, pings) and check keepalive

# (topic, payload, mid); mid 0 = QoS 0, nothing to acknowledge
Sink = Callable[[bytes, bytes, int], None]


def puback_blob(mids: Iterable[int]) -> bytes:
    """Concatenated PUBACK packets, one ``send`` for a whole batch."""
    out = bytearray()
    for mid in mids:
        if mid:
            out += b"\x40\x02" + mid.to_bytes(2, "big")
    return bytes(out)


class FastClient(mqtt.Client):
    def __init__(self, sink: Sink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self._rbuf = b""
        self._rpos = 0
        self.paused: Callable[[], bool] = lambda: False
        # MQTT 3.1.1 QoS 1 PUBLISH packets already in the read buffer go here in one call per read.
        self.sink_many: Callable[[list[tuple[bytes, bytes, int]]], None] | None = None
        # Set by the consumer when it frees buffer space or queues PUBACKs: ends a paused wait.
        self.wake = threading.Event()
        self.on_message = self._on_stock_message

    # -- receive path ----------------------------------------------------------------------

    def _sock_recv(self, bufsize: int) -> bytes:
        if not FAST_PATHS:
            return super()._sock_recv(bufsize)
        avail = len(self._rbuf) - self._rpos
        if avail <= 0:
            data = super()._sock_recv(_RECV_SIZE)  # raises BlockingIOError when nothing is there
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data
            self._rbuf, self._rpos = data, 0
            avail = len(data)
        n = bufsize if bufsize < avail else avail
        start = self._rpos
        self._rpos = start + n
        return self._rbuf[start : start + n]

    def buffered(self) -> int:
        return len(self._rbuf) - self._rpos

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        if self.paused():
            # Backpressure: leave data in the kernel; TCP flow control then holds the broker back.
            # (_loop sleeps while paused, so this is no busy loop.)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if not FAST_PATHS:
            return super().loop_read(max_packets)
        drain = self.sink_many is not None and self._protocol != MQTTProtocolVersion.MQTTv5
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        n = 0
        while n < _MAX_PACKETS_PER_READ:
            if drain and self._in_packet["command"] == 0:
                n += self._drain_publishes()
            # One packet the paho way: whatever the buffer's head is (not a whole QoS 1 PUBLISH, or
            # the buffer is empty and this refills it from the socket with one recv), with paho's
            # own handling of partial packets, errors and end of stream.
            rc = super().loop_read(max_packets)
            n += 1
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is None or not self.buffered():
                break
        return rc

    def _drain_publishes(self) -> int:
        """Hand every complete MQTT 3.1.1 QoS 1 PUBLISH at the head of the read buffer to
        ``sink_many`` in one call; stop at the first other packet or an incomplete one (paho's
        ``_packet_read`` takes those). Per message this is a few slices instead of paho's
        per-packet state machine (five ``_sock_recv`` calls, a dict reset, a lock): the network
        thread's CPU per message fell from 5.9 to ~1.5 us (bench/ingest_drain.py)."""
        buf = self._rbuf
        pos = self._rpos
        end = len(buf)
        items: list[tuple[bytes, bytes, int]] = []
        append = items.append
        while pos + 5 <= end:
            if buf[pos] & 0xF6 != 0x32:  # PUBLISH, QoS 1 (DUP and RETAIN may be set)
                break
            # Remaining length: a varint of at most 4 bytes.
            i = pos + 1
            b = buf[i]
            length = b & 127
            i += 1
            shift = 7
            while b & 128:
                if i >= end or shift > 21:
                    length = -1  # incomplete here, or malformed: paho decides
                    break
                b = buf[i]
                length |= (b & 127) << shift
                i += 1
                shift += 7
            if length < 0:
                break
            stop = i + length
            if stop > end or length < 4:
                break
            slen = (buf[i] << 8) | buf[i + 1]
            if slen == 0 or length < slen + 4:
                break  # malformed: paho's decoder reports the protocol error
            t = i + 2 + slen
            append((buf[i + 2 : t], buf[t + 2 : stop], (buf[t] << 8) | buf[t + 1]))
            pos = stop
        if not items:
            return 0
        self._rpos = pos
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        assert self.sink_many is not None
        self.sink_many(items)
        return len(items)

    def _loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        if self.paused():
            # Reads are off (back-pressure), so select() would report the socket readable at once,
            # every time: a busy loop that also competes with the writer thread for the GIL
            # (measured: 22,000 empty iterations per 100,000 messages drained, a third of the
            # process's CPU). Sleep until the consumer makes room or queues acknowledgements (or
            # 50 ms), and meanwhile only write (PUBACKs) and keep the connection alive.
            self.wake.clear()
            if self.paused():
                self.wake.wait(min(timeout, 0.05))
            if self.paused():
                if self._sock is not None and self.want_write():
                    rc = self.loop_write()
                    if rc or self._sock is None:
                        return rc
                return self.loop_misc()
        if self._sock is not None and self.buffered():
            # Bytes in our buffer are invisible to select(): read them before blocking.
            rc = self.loop_read()
            if rc or self._sock is None:
                return rc
            if self.buffered():
                timeout = 0.0
        return super()._loop(timeout)

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        if not FAST_PATHS or self._protocol == MQTTProtocolVersion.MQTTv5 or header & 0x06 != 0x02:
            return super()._handle_publish()  # MQTT 5 properties, QoS 0/2: paho's own decoder
        packet = self._in_packet["packet"]
        slen = (packet[0] << 8) | packet[1]
        if slen == 0 or len(packet) < slen + 4:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        # paho accumulates packets in a bytearray; topics must be hashable (they key the device cache).
        self._sink(bytes(packet[2 : 2 + slen]), bytes(packet[4 + slen :]), (packet[2 + slen] << 8) | packet[3 + slen])
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _on_stock_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._sink(bytes(message._topic), bytes(message.payload), message.mid if message.qos else 0)

    # -- acknowledgements ------------------------------------------------------------------

    def ack_many(self, mids: Iterable[int]) -> None:
        """Queue PUBACKs for ``mids`` as one packet. Thread-safe the way paho's publish() is: a deque
        append plus a wake-up of the network thread."""
        if not FAST_PATHS:
            for mid in mids:
                if mid:
                    self.ack(mid, 1)
            return
        blob = puback_blob(mids)
        if blob:
            self._packet_queue(_PUBACK, blob, 0, 0)
