"""The ingest service on a host (README, "The ingest service on a host"), in three deploys that
roles/plan.py places around the database and broker roles:

``ingest_package`` -- before the database, on every host of ``databases``, ``brokers`` or ``ingest``:
    the project's wheel and a wheelhouse of its pinned dependencies, built on the operator's machine
    (roles/_wheel.py), uploaded and installed into a virtualenv with ``pip --no-index`` (hosts need no
    PyPI). The database role runs ``ingest migrate`` from it, Mosquitto's export runs ``provision`` from
    it, cron runs the ``telemetry-*`` host scripts from it. Re-installed only when the wheel or the
    lock changed: a marker in the virtualenv holds their digests, read by a fact.
``ingest_account`` -- after the database, before the broker, on ``ingest`` hosts: the service's system
    user, its secret files (0640 root:<service group>), and its MQTT account kept at the vault's
    password with ``provision ensure-service`` (a ``--check`` fact guards it). Before the broker,
    because Mosquitto exports its password file from the database when its role runs.
``ingest`` -- after the broker, on ``ingest`` hosts: the TOML config, the hardened unit
    ``telemetry-ingest.service``, ``ingest check-config`` as the service user, then start or restart
    and wait for ``/healthz``.

Migrations: the database role runs them when its own files change, and also when this package
changed (:func:`package_changed`), with the database's admin access; so the schema follows the code
on every host that has a database, whichever host the service runs on.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import shlex
import weakref
from collections.abc import Callable
from typing import Any

from pyinfra.api.facts import FactBase
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.server import Arch, Users
from pyinfra.operations import apt, files, server, systemd

from roles._base import Role, RoleError, render, role_deploy
from roles._wheel import Bundle, Target, bundle
from roles.secrets import secrets_for
from roles.stack import unit_name

UNIT = "telemetry-ingest.service"
PACKAGE_GROUPS = ("databases", "brokers", "ingest")
MARKER = ".telemetry-bundle"  # in the virtualenv: digests of the lock and the wheel it was installed from
TOPIC_KINDS = ("telemetry", "status", "heartbeat")
TOPIC_PREFIX = "devices"
# Secret files in ingest_secrets_dir: file name -> vault key.
SECRET_FILES = {
    "db.password": "db_ingest_password",
    "api-db.password": "db_provisioner_password",
    "mqtt.password": "mqtt_ingest_password",
    "api-hmac.key": "ingest_api_hmac_key",
}
# Health after a (re)start: the broker connection and the first database round trip take a moment.
HEALTH_WAIT_S = 60

# Operations of one role that a later role's decision depends on (per host, for this deploy run):
# "package" (the install), "secrets" (the secret files, the MQTT account).
_CHANGES: weakref.WeakKeyDictionary[Host, dict[str, list[OperationMeta]]] = weakref.WeakKeyDictionary()


def _remember(host: Host, key: str, op: OperationMeta) -> OperationMeta:
    _CHANGES.setdefault(host, {}).setdefault(key, []).append(op)
    return op


def _changed(host: Host, key: str) -> Callable[[], bool]:
    ops = list(_CHANGES.get(host, {}).get(key, []))
    return lambda: any(op.did_change() for op in ops)


def package_changed(host: Host) -> Callable[[], bool]:
    """An ``_if`` callable: did ``ingest_package`` (re)install the virtualenv on ``host`` in this run?
    Call it after ``ingest_package`` has been added (the database role does)."""
    return _changed(host, "package")


def toml_value(value: object) -> str:
    """A TOML literal: JSON strings are valid TOML basic strings; booleans and numbers as TOML writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


# --- facts ------------------------------------------------------------------------------------


class InstalledBundle(FactBase[dict[str, str]]):
    """What the virtualenv was installed from: ``{"lock": digest, "wheel": digest}``; empty when there
    is no virtualenv or the last install did not finish (the marker is written last)."""

    def command(self, marker: str) -> str:
        return f"cat {shlex.quote(marker)} 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, str]:
        out = {}
        for line in output:
            key, sep, value = line.strip().partition("=")
            if sep:
                out[key] = value
        return out


class MqttAccountUpToDate(FactBase[bool]):
    """Whether the service's MQTT account already has the password in ``secret_file`` and exactly the
    wanted ACL (``provision ensure-service --check``). ``None`` when that cannot be asked yet: no
    virtualenv, no secret files, no database -- the deploy then ensures it."""

    def command(self, provision: str, args: str) -> str:
        return f"if [ -x {provision} ]; then {provision} ensure-service {args} --check --json 2>/dev/null; fi; true"

    def process(self, output: list[str]) -> Any:
        for line in output:
            try:
                return bool(json.loads(line)["up_to_date"])
            except (ValueError, KeyError, TypeError):
                continue
        return None


# --- ingest_package -----------------------------------------------------------------------------


def install_commands(b: Bundle, venv: str, wheelhouse: str, python: str, fresh: bool) -> list[str]:
    """Shell commands that (re)install the virtualenv from the uploaded wheelhouse, offline.

    ``fresh``: the lock changed (or there is no virtualenv yet): rebuild it empty, so a dependency
    dropped from the lock is gone too. Otherwise only the project's wheel is reinstalled."""
    pip = f"{venv}/bin/pip install --quiet --disable-pip-version-check --no-index --no-deps"
    check = (
        'python3 -c \'import sys; v = "%d.%d" % sys.version_info[:2]; '
        f'sys.exit(None if v == "{python}" else "ingest_package: python3 is " + v + " on this host, the '
        f"wheelhouse is for {python} (ingest_host_python)\")'"
    )
    keep = " ".join(f"! -name {shlex.quote(w.name)}" for w in (*b.wheels, b.project_wheel))
    marker = f"{venv}/{MARKER}"
    commands = [check]
    if fresh:
        commands += [
            f"python3 -m venv --clear {venv}",
            f"{pip} --require-hashes --find-links {wheelhouse} -r {wheelhouse}/requirements.lock",
        ]
    commands += [
        f"{pip} --force-reinstall {wheelhouse}/{b.project_wheel.name}",
        # Wheels of earlier releases: nothing installs from them any more.
        f"find {wheelhouse} -maxdepth 1 -name '*.whl' {keep} -delete",
        f"printf 'lock=%s\\nwheel=%s\\n' {b.lock_digest} {b.wheel_digest} > {marker}.tmp && mv {marker}.tmp {marker}",
    ]
    return commands


class IngestPackage(Role):
    name = "ingest_package"

    _target: Target | None = None

    def target(self) -> Target:
        if self._target is None:
            self._target = self._detect_target()
        return self._target

    def _detect_target(self) -> Target:
        machine = self.host.get_fact(Arch)
        if not machine:
            # Only the fake connector of the tests has no answer to `uname -m`.
            self.warn_once("cannot tell the architecture (uname -m): assuming x86_64")
            machine = "x86_64"
        return Target(str(self.data("ingest_host_python")), str(machine).strip(), str(self.data("ingest_host_glibc")))

    def install(self) -> None:
        apt.packages(
            name=f"{self.name}: python3-venv",
            packages=["python3", "python3-venv"],
            no_recommends=True,
            update=True,
            cache_time=3600,
        )
        parents = {
            p.rstrip("/").rsplit("/", 1)[0] for p in (self.data("ingest_wheelhouse_dir"), self.data("ingest_venv_dir"))
        }
        for parent in sorted(parents):
            files.directory(name=f"{self.name}: {parent}", path=parent, mode="0755")
        files.directory(name=f"{self.name}: wheelhouse", path=str(self.data("ingest_wheelhouse_dir")), mode="0755")

    def configure(self) -> None:
        b = bundle(self.target())
        wheelhouse = str(self.data("ingest_wheelhouse_dir"))
        for wheel in (*b.wheels, b.project_wheel):
            self.record(
                "wheelhouse",
                files.put(
                    name=f"{self.name}: {wheel.name}", src=str(wheel), dest=f"{wheelhouse}/{wheel.name}", mode="0644"
                ),
            )
        self.put(b.lock, f"{wheelhouse}/requirements.lock", key="wheelhouse")

    def activate(self) -> None:
        b = bundle(self.target())
        venv = str(self.data("ingest_venv_dir"))
        installed = self.host.get_fact(InstalledBundle, f"{venv}/{MARKER}") or {}
        if installed.get("lock") == b.lock_digest and installed.get("wheel") == b.wheel_digest:
            return
        op = server.shell(
            name=f"{self.name}: install the wheel into {venv}"
            + (" (new virtualenv: dependencies changed)" if installed.get("lock") != b.lock_digest else ""),
            commands=install_commands(
                b,
                venv,
                str(self.data("ingest_wheelhouse_dir")),
                str(self.data("ingest_host_python")),
                fresh=installed.get("lock") != b.lock_digest,
            ),
        )
        _remember(self.host, "package", self.record("package", op))


# --- ingest_account -----------------------------------------------------------------------------


def service_topics(shared_group: str) -> list[str]:
    topics = [f"{TOPIC_PREFIX}/+/{kind}" for kind in TOPIC_KINDS]
    if shared_group:
        # Mosquitto checks the subscription as written ($share/...) and each delivery by the plain topic.
        topics += [f"$share/{shared_group}/{t}" for t in topics]
    return topics


class IngestRole(Role):
    """Settings shared by the account and service deploys."""

    @property
    def user(self) -> str:
        user = str(self.data("ingest_service_user"))
        if not user.replace("-", "").replace("_", "").isalnum():
            raise RoleError(f"{self.name}: ingest_service_user {user!r} must be letters, digits, - and _")
        return user

    @property
    def secrets_dir(self) -> str:
        return str(self.data("ingest_secrets_dir")).rstrip("/")

    def secret(self, name: str) -> str:
        return f"{self.secrets_dir}/{name}"

    def dsn(self, user_key: str) -> str:
        return (
            f"host={self.data('ingest_database_host')} port={self.data('database_port')} "
            f"dbname={self.data('database_name')} user={self.data(user_key)}"
        )

    @property
    def shared_group(self) -> str:
        group = str(self.opt("ingest_shared_group", "") or "")
        if any(c in group for c in "+#/ "):
            raise RoleError(f"{self.name}: ingest_shared_group {group!r} must be one topic level")
        return group


class IngestAccount(IngestRole):
    name = "ingest_account"

    def install(self) -> None:
        user = self.user
        if user not in (self.host.get_fact(Users) or {}):
            # A system user and its own group, no home, no login (useradd --system --user-group).
            server.shell(
                name=f"{self.name}: system user {user}",
                commands=[
                    f"getent passwd {user} >/dev/null || useradd --system --user-group --no-create-home "
                    f"--home-dir /nonexistent --shell /usr/sbin/nologin --comment 'telemetry ingest service' {user}"
                ],
            )
        files.directory(name=f"{self.name}: /etc/telemetry", path="/etc/telemetry", mode="0755")
        files.directory(
            name=f"{self.name}: {self.secrets_dir}", path=self.secrets_dir, user="root", group=user, mode="0750"
        )

    def configure(self) -> None:
        secrets = secrets_for(self.host)
        for filename, key in SECRET_FILES.items():
            op = self.put(
                secrets[key] + "\n", self.secret(filename), key="secrets", mode="0640", group=self.user, secret=True
            )
            _remember(self.host, "secrets", op)

    def ensure_args(self) -> str:
        args = [
            shlex.quote(str(self.data("ingest_mqtt_username"))),
            "--dsn",
            shlex.quote(self.dsn("db_provisioner_user")),
            "--password-file",
            self.secret("api-db.password"),
            "--account-password-file",
            self.secret("mqtt.password"),
            "--hash",
            shlex.quote(str(self.data("emqx_password_hash"))),
        ]
        for topic in service_topics(self.shared_group):
            args += ["--subscribe", shlex.quote(topic)]
        return " ".join(args)

    def activate(self) -> None:
        provision = str(self.data("provision_bin"))
        args = self.ensure_args()
        up_to_date = self.host.get_fact(MqttAccountUpToDate, provision, args)
        # Up to date when the deploy started: only a new password file can make it stale.
        guard = self.changed("secrets") if up_to_date else None
        op = server.shell(
            name=f"{self.name}: MQTT account {self.data('ingest_mqtt_username')} (provision ensure-service)",
            commands=[f"{provision} ensure-service {args}"],
            _if=guard,
        )
        _remember(self.host, "secrets", op)


# --- ingest (the service) -------------------------------------------------------------------------


def unit_dependencies(host: Host) -> list[str]:
    """The database and broker units of this host: ingest starts after them and stops before them."""
    out = []
    if "databases" in host.groups:
        backend = host.data.get("database_backend")
        out.append(
            unit_name("timescaledb")
            if backend == "timescaledb"
            else f"postgresql@{host.data.get('postgresql_version')}-main.service"
        )
    if "brokers" in host.groups:
        backend = host.data.get("broker_backend")
        out.append(unit_name("emqx") if backend == "emqx" else "mosquitto.service")
    return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Ingest(IngestRole):
    name = "ingest"

    def mqtt(self) -> dict[str, Any]:
        host = str(self.data("ingest_mqtt_host"))
        loopback = host in ("127.0.0.1", "::1", "localhost")
        name = str(self.opt("fqdn") or self.host.name)
        client_id = str(self.data("ingest_mqtt_client_id")) or "ingest-" + name.split(".")[0]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", client_id):
            raise RoleError(
                f"{self.name}: MQTT client id {client_id!r}: letters, digits, _ . - (set ingest_mqtt_client_id)"
            )
        return {
            "host": host,
            "port": int(self.data("mqtt_loopback_port" if loopback else "mqtt_tls_port")),
            # Plain MQTT only on the loopback listener; the system CAs verify any other broker.
            "tls": not loopback,
            "client_id": client_id,
        }

    def timeouts(self) -> tuple[float, int]:
        shutdown = float(self.data("ingest_shutdown_timeout_s"))
        margin = float(self.data("ingest_stop_margin_s"))
        if shutdown < 1 or margin < 1:
            raise RoleError(f"{self.name}: ingest_shutdown_timeout_s and ingest_stop_margin_s must be >= 1 s")
        return shutdown, math.ceil(shutdown + margin)

    def config(self, secrets_dir: str | None = None) -> str:
        """The TOML config; ``secrets_dir`` lets tests point the secret paths at their own files."""
        d = (secrets_dir or self.secrets_dir).rstrip("/")
        batch = int(self.data("ingest_batch_size"))
        shutdown, _ = self.timeouts()
        mqtt = self.mqtt()
        values = {
            "mqtt_host": mqtt["host"],
            "mqtt_port": mqtt["port"],
            "mqtt_tls": mqtt["tls"],
            "mqtt_username": self.data("ingest_mqtt_username"),
            "mqtt_password_file": f"{d}/mqtt.password",
            "mqtt_client_id": mqtt["client_id"],
            "mqtt_shared_group": self.shared_group,
            "mqtt_topic_prefix": TOPIC_PREFIX,
            "db_dsn": self.dsn("db_ingest_user"),
            "db_password_file": f"{d}/db.password",
            "batch_max_messages": batch,
            # Reading pauses above this: two batches in flight, like the broker's window (>= 2 x batch).
            "max_buffer_messages": max(100, int(self.data("mqtt_max_inflight")), 2 * batch),
            "shutdown_timeout_s": shutdown,
            "http_listen": self.data("ingest_http_address"),
            "api_enabled": bool(self.data("ingest_api_enabled")),
            "api_hmac_key_file": f"{d}/api-hmac.key",
            "api_dsn": self.dsn("db_provisioner_user"),
            "api_password_file": f"{d}/api-db.password",
        }
        return render("ingest/ingest.toml.j2", **{k: toml_value(v) for k, v in values.items()})

    def unit(self) -> str:
        shutdown, stop = self.timeouts()
        peers = [str(self.data("ingest_database_host")), str(self.data("ingest_mqtt_host"))]
        ip_allow = ["localhost", *sorted({p for p in peers if _is_ip(p) and not ipaddress.ip_address(p).is_loopback})]
        return render(
            "ingest/telemetry-ingest.service.j2",
            unit=UNIT,
            timescaledb=self.data("database_backend") == "timescaledb",
            config_file=self.data("ingest_config_file"),
            after=unit_dependencies(self.host),
            user=self.user,
            venv=self.data("ingest_venv_dir"),
            shutdown_timeout_s=f"{shutdown:g}",
            timeout_stop_s=stop,
            ip_allow=ip_allow if all(_is_ip(p) or p == "localhost" for p in peers) else [],
        )

    def configure(self) -> None:
        self.put(self.config(), str(self.data("ingest_config_file")), key="config", mode="0640", group=self.user)
        self.put(self.unit(), f"/etc/systemd/system/{UNIT}", key="unit")

    def activate(self) -> None:
        inputs = self.any_of(
            self.changed("config", "unit"), _changed(self.host, "secrets"), _changed(self.host, "package")
        )
        ingest = f"{self.data('ingest_venv_dir')}/bin/ingest"
        config = str(self.data("ingest_config_file"))
        # As the service user: it must be able to read every secret file, with modes the service accepts.
        # A failure stops the deploy here, before the running service is touched.
        server.shell(
            name=f"{self.name}: ingest check-config",
            commands=[f"runuser -u {self.user} -- {ingest} check-config --config {config}"],
            _if=inputs,
        )
        if not self.has_systemd:
            self.warn_once(f"systemd is not PID 1 here: {UNIT} left alone (enable it on first boot)")
            return
        self.daemon_reload(_if=self.changed("unit"))
        started = systemd.service(
            name=f"{self.name}: {UNIT} enabled and running", service=UNIT, running=True, enabled=True
        )
        restarted = systemd.service(
            name=f"{self.name}: restart {UNIT} (package, config, unit or secrets changed)",
            service=UNIT,
            running=True,
            restarted=True,
            _if=inputs,
        )
        url = f"http://{self.data('ingest_http_address')}/healthz"
        server.shell(
            name=f"{self.name}: wait until {url} is healthy",
            commands=[
                f"for i in $(seq {HEALTH_WAIT_S}); do curl -fsS -o /dev/null {url} && exit 0; sleep 1; done; "
                f"curl -sS {url}; journalctl -u {UNIT} -n 30 --no-pager; "
                f"echo 'ingest: {url} not healthy after {HEALTH_WAIT_S} s' >&2; exit 1"
            ],
            _if=self.any_of(started.did_change, restarted.did_change),
        )


ingest_package = role_deploy(IngestPackage)
ingest_account = role_deploy(IngestAccount)
ingest = role_deploy(Ingest)
