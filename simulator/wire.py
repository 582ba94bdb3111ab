"""The two MQTT encodings that code building raw packets needs (the simulator's preflight CONNECT and
the tests' fast publishers), kept in one place."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """MQTT's variable-length integer (remaining length): 7 bits per byte, high bit = more follow."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(text: str | bytes) -> bytes:
    """An MQTT UTF-8 string (or binary field): 2-byte big-endian length, then the bytes."""
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data
