"""Device and service-account provisioning: the single writer of credentials and ACL rows.

Both brokers enforce what is written here: EMQX queries ``device_credentials``/``device_acl`` directly
(:mod:`ingest.schema`), and Mosquitto gets files rendered by :func:`export_mosquitto` from the same rows.
A password exists in clear only in the :class:`Credentials` returned once to the caller.

Every operation validates first and writes in one transaction, so bad input changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from ingest.db import Session, transaction
from ingest.hashing import (
    DEFAULT_ALGORITHM,
    HashAlgorithm,
    generate_password,
    generate_salt,
    hash_password,
    mosquitto_hash,
    mosquitto_verify,
    verify_password,
)

# Mirrors the `device_ident` domain in migrations/0001_core.sql; checked here first for a clear message.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ID_LENGTH = 64
TOPIC_PREFIX = "devices"
DEVICE_PUBLISH = ("telemetry", "status", "heartbeat")
DEVICE_SUBSCRIBE = ("config", "command")


class ProvisioningError(Exception):
    """Bad input or a state conflict; the message is one line and nothing was changed."""


@dataclass(frozen=True)
class AclRule:
    permission: str  # allow | deny
    action: str  # publish | subscribe | all
    topic: str
    qos: str = "0,1,2"
    retain: str = "all"


@dataclass(frozen=True)
class Credentials:
    """Returned once by add/rotate: the only moment the password exists in clear."""

    device_id: str
    username: str
    password: str
    hash_algorithm: str


@dataclass
class Account:
    username: str
    kind: str
    enabled: bool
    hash_algorithm: str
    is_superuser: bool
    expires_at: datetime | None
    created_at: datetime
    rotated_at: datetime | None
    device_id: str | None = None
    name: str = ""
    type: str = ""
    disabled_at: datetime | None = None
    last_seen_at: datetime | None = None
    status: str | None = None
    acl: list[AclRule] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        return data


def validate_ident(value: str, what: str = "device id") -> str:
    if not isinstance(value, str) or not value:
        raise ProvisioningError(f"{what} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise ProvisioningError(f"{what} is {len(value)} characters long; at most {MAX_ID_LENGTH} are allowed")
    if not _ID_RE.match(value):
        bad = sorted({c for c in value if not re.match(r"[A-Za-z0-9_.-]", c)})
        shown = ", ".join(repr(c) for c in bad) or "its first character"
        raise ProvisioningError(
            f"{what} {value!r} is not allowed ({shown}): use letters, digits and _ . - "
            "starting with a letter or digit, so it is safe inside MQTT topics"
        )
    return value


def device_acl(device_id: str) -> list[AclRule]:
    """A device may publish only on its own data topics and subscribe only to its own control topics;
    the final deny makes that explicit even where the broker's no_match default is allow."""
    base = f"{TOPIC_PREFIX}/{device_id}"
    rules = [AclRule("allow", "publish", f"{base}/{leaf}") for leaf in DEVICE_PUBLISH]
    rules += [AclRule("allow", "subscribe", f"{base}/{leaf}") for leaf in DEVICE_SUBSCRIBE]
    rules.append(AclRule("deny", "all", "#"))
    return rules


def _check_topic(topic: str) -> str:
    if not topic or "\x00" in topic or len(topic.encode()) > 65535:
        raise ProvisioningError(f"invalid topic filter {topic!r}")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise ProvisioningError(f"invalid topic filter {topic!r}: misplaced wildcard")
    return topic


def service_acl(publish: Iterable[str] = (), subscribe: Iterable[str] = ()) -> list[AclRule]:
    rules = [AclRule("allow", "publish", _check_topic(t)) for t in publish]
    rules += [AclRule("allow", "subscribe", _check_topic(t)) for t in subscribe]
    if not rules:
        raise ProvisioningError("a service account needs at least one --publish or --subscribe topic")
    rules.append(AclRule("deny", "all", "#"))
    return rules


def _new_secret(algo: HashAlgorithm) -> tuple[str, str, str, str]:
    password = generate_password()
    salt = generate_salt(algo)
    return password, salt, hash_password(password, salt, algo), mosquitto_hash(password)


def _exists(session: Session, table: str, column: str, value: str) -> bool:
    return bool(session.execute(f"SELECT 1 FROM {table} WHERE {column} = %s", [value]))


def _write_acl(session: Session, username: str, rules: Sequence[AclRule]) -> None:
    session.execute("DELETE FROM device_acl WHERE username = %s", [username])
    for order, rule in enumerate(rules, start=1):
        session.execute(
            "INSERT INTO device_acl (username, rule_order, permission, action, topic, qos, retain) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [username, order, rule.permission, rule.action, rule.topic, rule.qos, rule.retain],
        )


def add_devices(
    session: Session,
    device_ids: Sequence[str],
    *,
    name: str = "",
    type: str = "generic",
    algorithm: HashAlgorithm = DEFAULT_ALGORITHM,
    expires_at: datetime | None = None,
) -> list[Credentials]:
    """All or nothing: one bad or duplicate id and no device of the batch is created."""
    for device_id in device_ids:
        validate_ident(device_id)
    if len(set(device_ids)) != len(device_ids):
        raise ProvisioningError("the same device id was given twice")
    issued: list[Credentials] = []
    with transaction(session):
        for device_id in device_ids:
            if _exists(session, "device_credentials", "username", device_id):
                raise ProvisioningError(f"device {device_id!r} already exists")
            password, salt, pw_hash, mosq = _new_secret(algorithm)
            (dev_pk,) = session.execute(
                "INSERT INTO devices (device_id, name, type) VALUES (%s, %s, %s) RETURNING id",
                [device_id, name, type],
            )[0]
            session.execute(
                "INSERT INTO device_credentials (username, device, kind, password_hash, salt, hash_algorithm, "
                "mosquitto_hash, expires_at) VALUES (%s, %s, 'device', %s, %s, %s, %s, %s)",
                [device_id, dev_pk, pw_hash, salt, algorithm.spec, mosq, expires_at],
            )
            _write_acl(session, device_id, device_acl(device_id))
            issued.append(Credentials(device_id, device_id, password, algorithm.spec))
    return issued


def add_device(
    session: Session,
    device_id: str,
    *,
    name: str = "",
    type: str = "generic",
    algorithm: HashAlgorithm = DEFAULT_ALGORITHM,
    expires_at: datetime | None = None,
) -> Credentials:
    return add_devices(session, [device_id], name=name, type=type, algorithm=algorithm, expires_at=expires_at)[0]


def add_service(
    session: Session,
    username: str,
    *,
    publish: Iterable[str] = (),
    subscribe: Iterable[str] = (),
    algorithm: HashAlgorithm = DEFAULT_ALGORITHM,
) -> Credentials:
    """An MQTT account that is not a device (the ingest service, an operator console)."""
    validate_ident(username, "service name")
    rules = service_acl(publish, subscribe)
    password, salt, pw_hash, mosq = _new_secret(algorithm)
    with transaction(session):
        if _exists(session, "device_credentials", "username", username):
            raise ProvisioningError(f"account {username!r} already exists")
        session.execute(
            "INSERT INTO device_credentials (username, kind, password_hash, salt, hash_algorithm, "
            "mosquitto_hash) VALUES (%s, 'service', %s, %s, %s, %s)",
            [username, pw_hash, salt, algorithm.spec, mosq],
        )
        _write_acl(session, username, rules)
    return Credentials("", username, password, algorithm.spec)


def _service_current(row: Sequence[Any], password: str, algorithm: HashAlgorithm) -> bool:
    kind, enabled, pw_hash, salt, algo, mosq, expires_at, superuser = row
    return (
        kind == "service"
        and bool(enabled)
        and expires_at is None
        and not superuser
        and algo == algorithm.spec
        and verify_password(password, pw_hash, salt, algorithm)
        and mosquitto_verify(password, mosq)
    )


def ensure_service(
    session: Session,
    username: str,
    password: str,
    *,
    publish: Iterable[str] = (),
    subscribe: Iterable[str] = (),
    algorithm: HashAlgorithm = DEFAULT_ALGORITHM,
    check_only: bool = False,
) -> bool:
    """Make ``username`` an enabled service account whose password is ``password`` and whose ACL is
    exactly these topics; return whether the database had to change (with ``check_only``, whether it
    would, writing nothing).

    For accounts whose password the operator keeps (the ingest service's, in the deploy's vault), where
    :func:`add_service` would invent one: a deploy runs this on every run and reports a change only
    when the stored hashes or ACL differ. A device account of that name is refused, never taken over.
    """
    validate_ident(username, "service name")
    if not password:
        raise ProvisioningError(f"the password for service account {username!r} is empty")
    rules = service_acl(publish, subscribe)
    with transaction(session):
        rows = session.execute(
            "SELECT kind, enabled, password_hash, salt, hash_algorithm, mosquitto_hash, expires_at, is_superuser "
            "FROM device_credentials WHERE username = %s FOR UPDATE",
            [username],
        )
        if rows and rows[0][0] != "service":
            raise ProvisioningError(f"{username!r} is a {rows[0][0]} account, not a service account")
        acl = [
            AclRule(*r)
            for r in session.execute(
                "SELECT permission, action, topic, qos, retain FROM device_acl WHERE username = %s ORDER BY rule_order",
                [username],
            )
        ]
        current = bool(rows) and _service_current(rows[0], password, algorithm) and acl == rules
        if current or check_only:
            return not current
        salt = generate_salt(algorithm)
        values = [hash_password(password, salt, algorithm), salt, algorithm.spec, mosquitto_hash(password)]
        if rows:
            session.execute(
                "UPDATE device_credentials SET password_hash = %s, salt = %s, hash_algorithm = %s, "
                "mosquitto_hash = %s, enabled = true, expires_at = NULL, is_superuser = false, rotated_at = now() "
                "WHERE username = %s",
                [*values, username],
            )
        else:
            session.execute(
                "INSERT INTO device_credentials (username, kind, password_hash, salt, hash_algorithm, "
                "mosquitto_hash) VALUES (%s, 'service', %s, %s, %s, %s)",
                [username, *values],
            )
        _write_acl(session, username, rules)
    return True


_ACCOUNT_SQL = """
SELECT c.username, c.kind, c.enabled, c.hash_algorithm, c.is_superuser, c.expires_at, c.created_at,
       c.rotated_at, d.device_id, d.name, d.type, d.disabled_at, d.last_seen_at, d.status
FROM device_credentials c LEFT JOIN devices d ON d.id = c.device
"""


def _account(row: Sequence[Any]) -> Account:
    return Account(
        username=row[0],
        kind=row[1],
        enabled=row[2],
        hash_algorithm=row[3],
        is_superuser=row[4],
        expires_at=row[5],
        created_at=row[6],
        rotated_at=row[7],
        device_id=row[8],
        name=row[9] or "",
        type=row[10] or "",
        disabled_at=row[11],
        last_seen_at=row[12],
        status=row[13],
    )


def list_accounts(session: Session, *, kind: str | None = None) -> list[Account]:
    if kind is not None:
        rows = session.execute(_ACCOUNT_SQL + " WHERE c.kind = %s ORDER BY c.username", [kind])
    else:
        rows = session.execute(_ACCOUNT_SQL + " ORDER BY c.kind, c.username")
    return [_account(r) for r in rows]


def show(session: Session, username: str) -> Account:
    validate_ident(username, "name")
    rows = session.execute(_ACCOUNT_SQL + " WHERE c.username = %s", [username])
    if not rows:
        raise ProvisioningError(f"unknown device or account {username!r}")
    account = _account(rows[0])
    account.acl = [
        AclRule(*r)
        for r in session.execute(
            "SELECT permission, action, topic, qos, retain FROM device_acl WHERE username = %s ORDER BY rule_order",
            [username],
        )
    ]
    return account


def _lock_account(session: Session, username: str) -> tuple[bool, str]:
    validate_ident(username, "name")
    rows = session.execute(
        "SELECT enabled, hash_algorithm FROM device_credentials WHERE username = %s FOR UPDATE", [username]
    )
    if not rows:
        raise ProvisioningError(f"unknown device or account {username!r}")
    return bool(rows[0][0]), str(rows[0][1])


def rotate(session: Session, username: str, *, algorithm: HashAlgorithm | None = None) -> Credentials:
    """New password (and salt); the old one stops working as soon as this commits."""
    with transaction(session):
        enabled, current = _lock_account(session, username)
        if not enabled:
            raise ProvisioningError(f"{username!r} is disabled; enable it before rotating its password")
        algo = algorithm or HashAlgorithm.parse(current)
        password, salt, pw_hash, mosq = _new_secret(algo)
        session.execute(
            "UPDATE device_credentials SET password_hash = %s, salt = %s, hash_algorithm = %s, "
            "mosquitto_hash = %s, rotated_at = now() WHERE username = %s",
            [pw_hash, salt, algo.spec, mosq, username],
        )
        device = session.execute(
            "SELECT d.device_id FROM devices d JOIN device_credentials c ON c.device = d.id WHERE c.username = %s",
            [username],
        )
    return Credentials(device[0][0] if device else "", username, password, algo.spec)


def set_enabled(session: Session, username: str, enabled: bool) -> bool:
    """Returns whether anything changed (disabling a disabled device is not an error)."""
    with transaction(session):
        current, _algo = _lock_account(session, username)
        if current == enabled:
            return False
        session.execute("UPDATE device_credentials SET enabled = %s WHERE username = %s", [enabled, username])
        session.execute(
            "UPDATE devices SET disabled_at = CASE WHEN %s THEN NULL ELSE now() END "
            "WHERE id = (SELECT device FROM device_credentials WHERE username = %s)",
            [enabled, username],
        )
    return True


def remove(session: Session, username: str) -> None:
    """Deletes the account, its ACL and its device row. Telemetry stays: it references the device's
    integer id, which is never reused, so a re-added device starts a new series."""
    with transaction(session):
        _lock_account(session, username)
        device = session.execute("SELECT device FROM device_credentials WHERE username = %s", [username])
        session.execute("DELETE FROM device_credentials WHERE username = %s", [username])
        if device and device[0][0] is not None:
            session.execute("DELETE FROM devices WHERE id = %s", [device[0][0]])


def export_mosquitto(session: Session) -> tuple[str, str]:
    """Mosquitto's password file and ACL file, from the same rows EMQX reads.

    Only enabled, unexpired accounts are exported. Mosquitto denies whatever no line allows and, unlike
    EMQX, lets a matching deny win over any allow; the trailing catch-all deny rows are therefore left
    out (they are Mosquitto's default), and other deny rows become ``topic deny`` lines.
    """
    accounts = session.execute(
        "SELECT username, mosquitto_hash, is_superuser FROM device_credentials "
        "WHERE enabled AND (expires_at IS NULL OR expires_at > now()) ORDER BY username"
    )
    rules: dict[str, list[tuple[str, str, str]]] = {}
    for username, permission, action, topic in session.execute(
        "SELECT a.username, a.permission, a.action, a.topic FROM device_acl a "
        "JOIN device_credentials c USING (username) ORDER BY a.username, a.rule_order"
    ):
        rules.setdefault(username, []).append((permission, action, topic))

    passwd = "".join(f"{username}:{mosq}\n" for username, mosq, _su in accounts)
    acl = ["# Generated by `provision export-mosquitto` from device_acl; do not edit by hand.\n"]
    access = {"publish": "write", "subscribe": "read", "all": "readwrite"}
    for username, _mosq, superuser in accounts:
        acl.append(f"\nuser {username}\n")
        if superuser:
            acl.append("topic readwrite #\n")
            continue
        for permission, action, topic in rules.get(username, []):
            if permission == "deny":
                if topic != "#":
                    acl.append(f"topic deny {topic}\n")
                continue
            acl.append(f"topic {access[action]} {topic}\n")
    return passwd, "".join(acl)
