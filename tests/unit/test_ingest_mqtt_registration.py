"""The paho fast path against paho's own decoder, batched PUBACKs, and the HMAC verifier."""

from __future__ import annotations

import paho.mqtt
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from ingest.registration import AuthError, ReplayCache, Verifier, sign, signed_headers
from ingest.service.mqtt import FAST_PATHS, FastClient, puback_blob

KEY = b"k" * 32


def test_fast_paths_are_active_for_the_pinned_paho() -> None:
    # The fast paths use paho internals; a version bump must be reviewed (see ingest/service/mqtt.py).
    assert paho.mqtt.__version__ == "2.2.0" and FAST_PATHS


def test_fast_publish_decoder_agrees_with_paho() -> None:
    got: list[tuple[bytes, bytes, int]] = []
    c = FastClient(lambda t, p, m: got.append((t, p, m)), callback_api_version=CallbackAPIVersion.VERSION2,
                   protocol=MQTTProtocolVersion.MQTTv311, manual_ack=True)  # fmt: skip
    for topic, payload, mid in [
        (b"devices/a/telemetry", b'{"x":1}', 1),
        (b"t", b"", 65535),
        (b"\xc3\xa9/x", b"\0" * 300, 7),
    ]:
        body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + payload
        c._in_packet = {**c._in_packet, "command": 0x32, "packet": bytearray(body)}
        assert c._handle_publish() == 0
        ref = _packet.decode_publish(0x32, bytearray(body), MQTTProtocolVersion.MQTTv311)
        assert got[-1] == (bytes(ref.topic), bytes(ref.payload), ref.mid)
        assert type(got[-1][0]) is bytes  # hashable: it keys the device cache


def _publish(topic: bytes, payload: bytes, mid: int, flags: int = 0) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if mid else b"") + payload
    n, size = len(body), bytearray()
    while True:
        n, digit = n >> 7, n & 127
        size.append(digit | (128 if n else 0))
        if not n:
            break
    return bytes([0x30 | (2 if mid else 0) | flags]) + bytes(size) + body


@pytest.mark.parametrize("seed", range(12))
def test_buffer_drain_delivers_a_split_stream_exactly_once_in_order(seed: int) -> None:
    """The stream a broker sends (QoS 1 publishes, some with DUP/RETAIN, QoS 0, a PINGRESP, payloads
    whose length needs 1-3 varint bytes), arriving in random pieces: every message reaches the
    inbox once, in order, whichever path (buffer drain or paho's packet reader) took it."""
    import random
    import socket

    rng = random.Random(seed)
    got: list[tuple[bytes, bytes, int]] = []
    c = FastClient(lambda t, p, m: got.append((t, p, m)), callback_api_version=CallbackAPIVersion.VERSION2,
                   protocol=MQTTProtocolVersion.MQTTv311, manual_ack=True)  # fmt: skip
    c.sink_many = got.extend
    want: list[tuple[bytes, bytes, int]] = []
    stream = bytearray()
    for i in range(400):
        topic = f"devices/d{rng.randrange(50)}/telemetry".encode()
        payload = rng.randbytes(rng.choice((0, 5, 126, 127, 128, 300, 20_000)))
        mid = 0 if i % 37 == 5 else 1 + i % 65535
        flags = rng.choice((0, 0, 0x08, 0x01))
        stream += _publish(topic, payload, mid, flags)
        want.append((topic, payload, mid))
        if i % 53 == 7:
            stream += b"\xd0\x00"  # PINGRESP
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    c._sock = ours
    try:
        pos = 0
        while pos < len(stream):
            step = rng.choice((1, 2, 3, 7, 100, 4096, 70_000))
            theirs.sendall(stream[pos : pos + step])
            pos += step
            for _ in range(3):
                assert c.loop_read() == 0
        for _ in range(50):
            if len(got) == len(want):
                break
            assert c.loop_read() == 0
    finally:
        c._sock = None
        ours.close()
        theirs.close()
    assert got == want
    assert all(type(t) is bytes and type(p) is bytes for t, p, _m in got)


def test_puback_blob_is_concatenated_pubacks_skipping_qos0() -> None:
    assert puback_blob([1, 0, 258]) == b"\x40\x02\x00\x01" + b"\x40\x02\x01\x02"


def test_verifier_accepts_valid_and_refuses_each_attack() -> None:
    now = 1_800_000_000.0
    v = Verifier(KEY, 300, clock=lambda: now)
    body = b'{"device_id": "a1"}'
    h = signed_headers(KEY, "POST", "/v1/devices/register", body, now=now)
    v.verify("POST", "/v1/devices/register", h, body)
    with pytest.raises(AuthError, match="replayed"):
        v.verify("POST", "/v1/devices/register", h, body)
    h2 = signed_headers(KEY, "POST", "/v1/devices/register", body, now=now)
    for method, path, headers, b in [
        ("POST", "/v1/devices/register", h2, body + b" "),
        ("GET", "/v1/devices/register", h2, body),
        ("POST", "/v1/devices/registeR", h2, body),
        ("POST", "/v1/devices/register", {**h2, "X-Signature": "0" * 64}, body),
        ("POST", "/v1/devices/register", {**h2, "X-Nonce": "short"}, body),
        (
            "POST",
            "/v1/devices/register",
            signed_headers(KEY, "POST", "/v1/devices/register", body, now=now - 301),
            body,
        ),
    ]:
        with pytest.raises(AuthError):
            v.verify(method, path, headers, b)
    assert sign(KEY, "post", "/p", "1", "n" * 16, b"") == sign(KEY, "POST", "/p", "1", "n" * 16, b"")


def test_replay_cache_expires_and_is_bounded() -> None:
    c = ReplayCache(10, max_entries=2)
    c.check_and_add("a" * 16, 0)
    c.check_and_add("b" * 16, 1)
    with pytest.raises(AuthError, match="full"):
        c.check_and_add("c" * 16, 2)
    c.check_and_add("c" * 16, 25)  # the first two expired after 2 x window
