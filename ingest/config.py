"""The ingest service's configuration: one TOML file, secrets only from files.

Every key is declared once in ``SCHEMA`` with its type, default, bounds and a one-line description
(``ingest check-config --explain`` prints them; README, "Ingest service" lists them). Unknown keys are errors,
not warnings: a typo such as ``batch_max_mesages`` would otherwise silently run with the default.
Keys that hold secrets exist only as ``*_file`` paths, so a secret never appears on a command line,
in the unit file, or in the config itself (which is often world-readable in /etc).
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

TOPIC_KINDS = ("telemetry", "status", "heartbeat")


class ConfigError(Exception):
    """Configuration problems; ``problems`` lists every one found, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    required: bool = False


# section -> key -> declaration. Defaults are what production should run with.
SCHEMA: dict[str, dict[str, Key]] = {
    "mqtt": {
        "host": Key(str, "127.0.0.1", "broker host name or address"),
        "port": Key(int, 8883, "broker port", 1, 65535),
        "tls": Key(bool, True, "connect with TLS (ca_file verifies the broker)"),
        "ca_file": Key(str, "", "CA bundle that signed the broker certificate (empty: system store)"),
        "cert_file": Key(str, "", "client certificate for mTLS (optional)"),
        "key_file": Key(str, "", "client key for mTLS (optional; a secret, keep it 0600)"),
        "username": Key(str, "", "MQTT username (a service account from `provision add-service`)", required=True),
        "password_file": Key(str, "", "file holding the MQTT password", required=True),
        "client_id": Key(str, "ingest", "MQTT client id; also names the persistent session, unique per worker"),
        "protocol": Key(
            str, "3.1.1", "MQTT protocol: 3.1.1 (about twice as fast in paho) or 5", choices=("3.1.1", "5")
        ),
        "keepalive_s": Key(int, 30, "MQTT keepalive", 5, 3600),
        "session_expiry_s": Key(
            int, 7 * 86400, "MQTT 5 session expiry: how long the broker keeps our queue while we are away", 60
        ),
        "receive_maximum": Key(int, 0, "MQTT 5 Receive Maximum (0: 2 x batch_max_messages, capped at 65535)", 0, 65535),
        "shared_group": Key(str, "", "subscribe via $share/<group>/... so several workers split the load"),
        "topic_prefix": Key(str, "devices", "topics are <prefix>/<device id>/{telemetry,status,heartbeat}"),
        "reconnect_min_s": Key((int, float), 0.5, "first reconnect delay (doubles up to reconnect_max_s)", 0.05),
        "reconnect_max_s": Key((int, float), 30.0, "longest reconnect delay", 0.1),
    },
    "database": {
        "dsn": Key(str, "", "libpq DSN without password, user = a member of telemetry_ingest", required=True),
        "password_file": Key(str, "", "file holding the database password (empty: libpq's ~/.pgpass)"),
        "connect_timeout_s": Key(int, 5, "libpq connect_timeout", 1, 120),
        "reconnect_min_s": Key((int, float), 0.2, "first reconnect delay after a database error", 0.01),
        "reconnect_max_s": Key((int, float), 10.0, "longest reconnect delay", 0.1),
    },
    "ingest": {
        "batch_max_messages": Key(int, 5000, "commit after this many messages", 1, 100_000),
        "batch_max_wait_ms": Key(int, 200, "... or after this long since the batch's first message", 1, 60_000),
        "max_buffer_messages": Key(
            int, 50_000, "stop reading from the broker above this many uncommitted messages", 100, 10_000_000
        ),
        "max_payload_bytes": Key(int, 8192, "larger payloads are rejected (payload_too_large)", 16, 1 << 20),
        "max_fields": Key(int, 64, "more numeric fields are rejected (too_many_fields)", 1, 10_000),
        "max_metrics": Key(int, 1000, "cap on distinct metric names; new names beyond it are rejected", 1, 32_000),
        "max_future_s": Key(int, 300, "timestamps further in the future are rejected", 0),
        "max_past_s": Key(int, 30 * 86400, "timestamps further in the past are rejected", 0),
        "device_cache_size": Key(int, 100_000, "devices kept in memory", 10, 10_000_000),
        "device_refresh_s": Key(int, 60, "reload the device list (new, disabled, re-enabled devices)", 1),
        "status_max_length": Key(int, 64, "longer status payloads are rejected", 1, 4096),
        "shutdown_timeout_s": Key((int, float), 15.0, "SIGTERM: flush, commit, ack within this bound", 1),
    },
    "http": {
        "listen": Key(str, "127.0.0.1:8081", "host:port of /healthz, /metrics and the API (behind nginx)"),
        "health_max_commit_age_s": Key(int, 0, "when > 0, unhealthy if messages wait longer than this for a commit", 0),
    },
    "api": {
        "enabled": Key(bool, False, "serve POST /v1/devices/register"),
        "hmac_key_file": Key(str, "", "shared HMAC-SHA256 key (at least 32 bytes)"),
        "dsn": Key(str, "", "DSN of a telemetry_provisioner login (empty: use [database] dsn)"),
        "password_file": Key(str, "", "password file for the api dsn"),
        "replay_window_s": Key(int, 300, "accepted clock skew of X-Timestamp; nonces are kept this long", 5, 3600),
        "max_body_bytes": Key(int, 4096, "larger request bodies are refused (413)", 64, 1 << 20),
        "device_type": Key(str, "generic", "type recorded for self-registered devices"),
    },
}


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    tls: bool
    ca_file: str
    cert_file: str
    key_file: str
    username: str
    password: str = field(repr=False)
    client_id: str
    protocol: str
    keepalive_s: int
    session_expiry_s: int
    receive_maximum: int
    shared_group: str
    topic_prefix: str
    reconnect_min_s: float
    reconnect_max_s: float

    def topics(self) -> list[str]:
        base = [f"{self.topic_prefix}/+/{kind}" for kind in TOPIC_KINDS]
        if self.shared_group:
            return [f"$share/{self.shared_group}/{t}" for t in base]
        return base


@dataclass(frozen=True)
class DatabaseConfig:
    conninfo: str = field(repr=False)  # includes the password
    connect_timeout_s: int
    reconnect_min_s: float
    reconnect_max_s: float


@dataclass(frozen=True)
class IngestConfig:
    batch_max_messages: int
    batch_max_wait_ms: int
    max_buffer_messages: int
    max_payload_bytes: int
    max_fields: int
    max_metrics: int
    max_future_s: int
    max_past_s: int
    device_cache_size: int
    device_refresh_s: int
    status_max_length: int
    shutdown_timeout_s: float


@dataclass(frozen=True)
class HttpConfig:
    host: str
    port: int
    health_max_commit_age_s: int


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool
    hmac_key: bytes = field(repr=False)
    conninfo: str = field(repr=False)
    replay_window_s: int
    max_body_bytes: int
    device_type: str


@dataclass(frozen=True)
class Config:
    path: Path
    mqtt: MqttConfig
    database: DatabaseConfig
    ingest: IngestConfig
    http: HttpConfig
    api: ApiConfig


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return {"str": "string", "int": "integer", "bool": "boolean", "float": "number"}.get(t.__name__, t.__name__)


def read_secret(path_text: str, key: str, problems: list[str], *, binary: bool = False) -> str | bytes:
    """Read a secret file; refuse files that other users may write or read (a 0644 key file is a leak)."""
    path = Path(path_text)
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{key}: cannot read {path}: {exc.strerror}")
        return b"" if binary else ""
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        problems.append(f"{key}: {path} is mode {stat.S_IMODE(st.st_mode):04o}; use 0600 or 0640 for secrets")
    data = data.strip()
    if not data:
        problems.append(f"{key}: {path} is empty")
    if binary:
        return data
    try:
        return data.decode()
    except UnicodeDecodeError:
        problems.append(f"{key}: {path} is not UTF-8 text")
        return ""


def _check_values(raw: dict[str, Any], problems: list[str]) -> dict[str, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {}
    for section in raw:
        if section not in SCHEMA:
            problems.append(f"[{section}]: unknown section (known: {', '.join(SCHEMA)})")
        elif not isinstance(raw[section], dict):
            problems.append(f"[{section}]: must be a table")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            given = {}
        for key in given:
            if key not in keys:
                hint = ""
                if key in ("password", "hmac_key", "key"):
                    hint = f" (secrets are read from files: use {key}_file)"
                problems.append(f"{section}.{key}: unknown key{hint}")
        out: dict[str, Any] = {}
        for key, decl in keys.items():
            name = f"{section}.{key}"
            if key not in given:
                if decl.required:
                    problems.append(f"{name}: required ({decl.help})")
                out[key] = decl.default
                continue
            value = given[key]
            expected = decl.type if isinstance(decl.type, tuple) else (decl.type,)
            # bool is an int in Python; `port = true` must not pass as 1.
            if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
                problems.append(f"{name}: expected {_type_name(decl.type)}, got {type(value).__name__} {value!r}")
                out[key] = decl.default
                continue
            if decl.choices is not None and value not in decl.choices:
                problems.append(f"{name}: {value!r} is not one of {', '.join(map(str, decl.choices))}")
            if decl.min is not None and value < decl.min:  # type: ignore[operator]
                problems.append(f"{name}: {value} is below the minimum {decl.min}")
            if decl.max is not None and value > decl.max:  # type: ignore[operator]
                problems.append(f"{name}: {value} is above the maximum {decl.max}")
            out[key] = value
        values[section] = out
    return values


def _conninfo(dsn: str, password_file: str, key: str, timeout: int, app: str, problems: list[str]) -> str:
    try:
        params = conninfo_to_dict(dsn)
    except Exception as exc:  # psycopg raises ProgrammingError with a multi-line libpq message
        problems.append(f"{key}.dsn: invalid: {str(exc).splitlines()[0]}")
        return ""
    if params.get("password"):
        problems.append(f"{key}.dsn: contains a password; put it in a file and set {key}.password_file")
        params.pop("password")
    if password_file:
        params["password"] = str(read_secret(password_file, f"{key}.password_file", problems))
    params.setdefault("connect_timeout", str(timeout))
    params.setdefault("application_name", app)
    return make_conninfo(**params)  # type: ignore[arg-type]


def load(path: Path | str) -> Config:
    """Parse and validate; raises ConfigError listing every problem found."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    problems: list[str] = []
    v = _check_values(raw, problems)
    m, d, i, h, a = v["mqtt"], v["database"], v["ingest"], v["http"], v["api"]

    password = str(read_secret(m["password_file"], "mqtt.password_file", problems)) if m["password_file"] else ""
    for key in ("ca_file", "cert_file", "key_file"):
        if m[key] and not os.access(m[key], os.R_OK):
            problems.append(f"mqtt.{key}: cannot read {m[key]}")
    if bool(m["cert_file"]) != bool(m["key_file"]):
        problems.append("mqtt.cert_file and mqtt.key_file go together")
    for key in ("shared_group", "topic_prefix"):
        if any(c in m[key] for c in "+#/") or (key == "topic_prefix" and not m[key]):
            problems.append(f"mqtt.{key}: {m[key]!r} must be a single topic level without wildcards")
    if m["reconnect_max_s"] < m["reconnect_min_s"]:
        problems.append("mqtt.reconnect_max_s is below mqtt.reconnect_min_s")
    if not m["client_id"]:
        problems.append("mqtt.client_id: required: it names the persistent session")

    conninfo = _conninfo(d["dsn"], d["password_file"], "database", d["connect_timeout_s"], "ingest", problems)
    if i["max_buffer_messages"] < 2 * i["batch_max_messages"]:
        problems.append("ingest.max_buffer_messages must be at least 2 x ingest.batch_max_messages")

    host, sep, port_text = h["listen"].rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        problems.append(f"http.listen: {h['listen']!r} is not host:port")
        host, port_text = "127.0.0.1", "0"

    hmac_key = b""
    api_conninfo = ""
    if a["enabled"]:
        if not a["hmac_key_file"]:
            problems.append("api.hmac_key_file: required when api.enabled = true")
        else:
            secret = read_secret(a["hmac_key_file"], "api.hmac_key_file", problems, binary=True)
            hmac_key = secret if isinstance(secret, bytes) else secret.encode()
            if hmac_key and len(hmac_key) < 32:
                problems.append(f"api.hmac_key_file: the key is {len(hmac_key)} bytes; use at least 32 random bytes")
        if a["dsn"]:
            api_conninfo = _conninfo(
                a["dsn"], a["password_file"], "api", d["connect_timeout_s"], "ingest-api", problems
            )
        else:
            if a["password_file"]:
                problems.append("api.password_file is set but api.dsn is not")
            api_conninfo = conninfo
    if problems:
        raise ConfigError(problems)

    return Config(
        path=path,
        mqtt=MqttConfig(
            host=m["host"],
            port=m["port"],
            tls=m["tls"],
            ca_file=m["ca_file"],
            cert_file=m["cert_file"],
            key_file=m["key_file"],
            username=m["username"],
            password=password,
            client_id=m["client_id"],
            protocol=m["protocol"],
            keepalive_s=m["keepalive_s"],
            session_expiry_s=m["session_expiry_s"],
            receive_maximum=m["receive_maximum"] or min(65535, 2 * i["batch_max_messages"]),
            shared_group=m["shared_group"],
            topic_prefix=m["topic_prefix"],
            reconnect_min_s=float(m["reconnect_min_s"]),
            reconnect_max_s=float(m["reconnect_max_s"]),
        ),
        database=DatabaseConfig(
            conninfo=conninfo,
            connect_timeout_s=d["connect_timeout_s"],
            reconnect_min_s=float(d["reconnect_min_s"]),
            reconnect_max_s=float(d["reconnect_max_s"]),
        ),
        ingest=IngestConfig(**{**i, "shutdown_timeout_s": float(i["shutdown_timeout_s"])}),
        http=HttpConfig(host=host, port=int(port_text), health_max_commit_age_s=h["health_max_commit_age_s"]),
        api=ApiConfig(
            enabled=a["enabled"],
            hmac_key=hmac_key,
            conninfo=api_conninfo,
            replay_window_s=a["replay_window_s"],
            max_body_bytes=a["max_body_bytes"],
            device_type=a["device_type"],
        ),
    )


def explain() -> str:
    """The reference of every key, as check-config --explain prints it."""
    lines: list[str] = []
    for section, keys in SCHEMA.items():
        lines.append(f"[{section}]")
        for key, decl in keys.items():
            default = "(required)" if decl.required else repr(decl.default)
            lines.append(f"  {key} ({_type_name(decl.type)}, default {default}): {decl.help}")
    return "\n".join(lines)
