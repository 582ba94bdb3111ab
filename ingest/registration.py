"""Device self-registration: HMAC-SHA256 request signing, replay protection, provisioning.

A request is signed with a key shared between the device factory (or an onboarding tool) and us:

    X-Timestamp: <unix seconds>
    X-Nonce:     <16-128 chars of [A-Za-z0-9_-]>, unique per request
    X-Signature: hex(HMAC-SHA256(key, METHOD "\\n" PATH "\\n" TIMESTAMP "\\n" NONCE "\\n" BODY))

The body is signed byte for byte (no JSON canonicalisation: any change to it breaks the signature).
A request is accepted only if the signature matches (``hmac.compare_digest``: constant time), the
timestamp is within ``replay_window_s`` of our clock, and the nonce was not seen within the window.
Nonces are remembered in memory for the window (bounded); with several API instances, route the
API to one of them (nginx upstream) or a replay could be accepted once per instance.

Every refusal is the same 401 with no detail for the client (the reason is logged and counted):
an attacker learns nothing about which check failed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ingest import provisioning
from ingest.db import PsycopgSession

_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_NONCES = 200_000


def canonical(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return f"{method.upper()}\n{path}\n{timestamp}\n{nonce}\n".encode() + body


def sign(key: bytes, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    return hmac.new(key, canonical(method, path, timestamp, nonce, body), hashlib.sha256).hexdigest()


def signed_headers(key: bytes, method: str, path: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """Headers for a signed request (clients and tests)."""
    import secrets

    ts = str(int(time.time() if now is None else now))
    nonce = secrets.token_urlsafe(24)
    return {"X-Timestamp": ts, "X-Nonce": nonce, "X-Signature": sign(key, method, path, ts, nonce, body)}


class AuthError(Exception):
    """Why a request was refused (logged, counted; never shown to the client)."""


class ReplayCache:
    def __init__(self, window_s: int, max_entries: int = MAX_NONCES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def check_and_add(self, nonce: str, now: float) -> None:
        with self._lock:
            # Entries are in insertion order, so expired ones are at the front.
            while self._seen:
                first, expires = next(iter(self._seen.items()))
                if expires > now:
                    break
                del self._seen[first]
            if nonce in self._seen:
                raise AuthError("replayed nonce")
            if len(self._seen) >= self.max_entries:
                # Refusing is safer than forgetting nonces that are still inside the window.
                raise AuthError("replay cache full")
            # Kept for twice the window: a timestamp may be window_s in the future.
            self._seen[nonce] = now + 2 * self.window_s


class Verifier:
    def __init__(self, key: bytes, window_s: int, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 32:
            raise ValueError("HMAC key must be at least 32 bytes")
        self._key = key
        self.window_s = window_s
        self.clock = clock
        self.replays = ReplayCache(window_s)

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> None:
        ts = headers.get("X-Timestamp", "")
        nonce = headers.get("X-Nonce", "")
        sig = headers.get("X-Signature", "").lower()
        if not ts.isdigit() or len(ts) > 12:
            raise AuthError("missing or malformed X-Timestamp")
        if not _NONCE.match(nonce):
            raise AuthError("missing or malformed X-Nonce")
        if not _HEX64.match(sig):
            raise AuthError("missing or malformed X-Signature")
        expected = sign(self._key, method, path, ts, nonce, body)
        # Signature first (constant time), so timing says nothing about the other checks' order.
        if not hmac.compare_digest(expected, sig):
            raise AuthError("bad signature")
        now = self.clock()
        if abs(now - int(ts)) > self.window_s:
            raise AuthError(f"timestamp outside the {self.window_s}s window")
        self.replays.check_and_add(nonce, now)


@dataclass
class RegistrationResult:
    status: int
    body: dict[str, Any]


class Registrar:
    """Validates the JSON body and provisions through ingest.provisioning (one transaction)."""

    def __init__(self, conninfo: str, device_type: str) -> None:
        self.conninfo = conninfo
        self.device_type = device_type
        self._session: PsycopgSession | None = None
        self._lock = threading.Lock()

    def _get_session(self) -> PsycopgSession:
        if self._session is None or self._session.conn.closed:
            self._session = PsycopgSession.connect(self.conninfo)
        return self._session

    def register(self, body: bytes) -> RegistrationResult:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return RegistrationResult(400, {"error": "body is not JSON"})
        if not isinstance(data, dict) or not isinstance(data.get("device_id"), str):
            return RegistrationResult(400, {"error": 'expected {"device_id": "...", "name": "..."}'})
        name = data.get("name", "")
        if not isinstance(name, str) or len(name) > 200 or "\x00" in name:
            return RegistrationResult(400, {"error": "name must be a string of at most 200 characters"})
        unknown = set(data) - {"device_id", "name"}
        if unknown:
            return RegistrationResult(400, {"error": f"unknown fields: {', '.join(sorted(unknown))}"})
        with self._lock:
            try:
                session = self._get_session()
                creds = provisioning.add_device(session, data["device_id"], name=name, type=self.device_type)
            except provisioning.ProvisioningError as exc:
                status = 409 if "already exists" in str(exc) else 400
                return RegistrationResult(status, {"error": str(exc)})
            except Exception:
                if self._session is not None:
                    self._session.close()
                self._session = None
                raise
        return RegistrationResult(
            201,
            {
                "device_id": creds.device_id,
                "username": creds.username,
                "password": creds.password,
                "note": "the password is shown once and is not stored",
            },
        )

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
