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
