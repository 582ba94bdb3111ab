"""ingest_package, ingest_account, ingest: operations, uploaded files and modes, the guards that make a
second deploy change nothing, and the rendered unit and config through real validators
(`systemd-analyze verify`, `systemd-analyze security`, the service's own config loader)."""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.deploy import add_deploy
from pyinfra.api.state import State
from pyinfra.connectors.util import CommandOutput

import roles.ingest as ingest_role
from ingest import config as ingest_config
from roles._wheel import HOST_DISTRIBUTIONS, SOURCES, Bundle, Target, host_requirements, lock_text, normalize
from roles.ingest import (
    MARKER,
    UNIT,
    Ingest,
    ingest,
    ingest_account,
    ingest_package,
    service_topics,
)
from roles.secrets import load
from tests.support import deploy_validators as v
from tests.support.deploy_fake import (
    LIVE_HOST,
    NO_SYSTEMD_HOST,
    REPO,
    HostResult,
    collect,
    fake_state,
    in_group,
    run_deploys,
    vault_env,
)

# The exposure `systemd-analyze security` may report for telemetry-ingest.service (README, "The ingest
# service on a host"). It scores 0.9 with the IP allowlist, 1.1 without; what remains is network
# access, which the service exists for.
EXPOSURE_BOUND = 1.5

SECRETS_DIR = "/etc/telemetry/ingest"
CONFIG = "/etc/telemetry/ingest.toml"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
WHEELHOUSE = "/opt/telemetry/wheelhouse"
VENV = "/opt/telemetry/venv"
HOST = {**LIVE_HOST, "uname -m": ["x86_64"]}


def all_three() -> None:
    for deploy in (ingest_package, ingest_account, ingest):
        in_group("ingest", deploy)()


@pytest.fixture(autouse=True)
def fake_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bundle:
    """A small stand-in for the wheelhouse (the real build is tests/integration/test_ingest_role_wheel.py)."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    wheels = []
    for name in ("paho_mqtt-2.2.0-py3-none-any.whl", "psycopg-3.3.9-py3-none-any.whl"):
        (house / name).write_text(f"wheel {name}\n")
        wheels.append(house / name)
    project = tmp_path / "telemetry_platform-0.1.0-py3-none-any.whl"
    project.write_text("project wheel v1\n")
    b = Bundle(house, tuple(wheels), lock_text(wheels), project)
    targets: list[Target] = []

    def fake(target: Target) -> Bundle:
        targets.append(target)
        return b

    monkeypatch.setattr(ingest_role, "bundle", fake)
    return b


def marker(b: Bundle) -> list[str]:
    return [f"lock={b.lock_digest}", f"wheel={b.wheel_digest}"]


def run(deploys: list[Callable[[], Any]] | None = None, **kw: Any) -> HostResult:
    kw.setdefault("responses", HOST)
    (r,) = run_deploys("lab", deploys or [all_three], **kw).values()
    return r


# --- ingest_package --------------------------------------------------------------------------------


def test_package_fresh_host_uploads_and_installs_offline(fake_bundle: Bundle) -> None:
    r = run([ingest_package])
    assert "python3-venv" in " ".join(r.commands)
    for wheel in (*fake_bundle.wheels, fake_bundle.project_wheel):
        assert r.files[f"{WHEELHOUSE}/{wheel.name}"] == wheel.read_text()
    assert r.files[f"{WHEELHOUSE}/requirements.lock"] == fake_bundle.lock
    assert all("--hash=sha256:" in line for line in fake_bundle.lock.splitlines())
    install = next(op for op in r.ops if "install the wheel" in op.name)
    cmds = "\n".join(install.commands)
    assert f"python3 -m venv --clear {VENV}" in cmds
    assert "--no-index" in cmds and "--require-hashes" in cmds and f"-r {WHEELHOUSE}/requirements.lock" in cmds
    assert f"--force-reinstall {WHEELHOUSE}/{fake_bundle.project_wheel.name}" in cmds
    # the marker is written last, so an interrupted install is retried by the next deploy
    assert install.commands[-1].endswith(f"> {VENV}/{MARKER}.tmp && mv {VENV}/{MARKER}.tmp {VENV}/{MARKER}")
    assert fake_bundle.lock_digest in install.commands[-1] and fake_bundle.wheel_digest in install.commands[-1]
    # the Python check names the version the wheelhouse was downloaded for
    assert '"3.11"' in install.commands[0]
    # stale wheels of earlier releases go, the current ones stay
    cleanup = next(c for c in install.commands if c.startswith("find "))
    assert all(f"! -name {w.name}" in cleanup for w in (*fake_bundle.wheels, fake_bundle.project_wheel))


def test_package_installed_means_no_install(fake_bundle: Bundle) -> None:
    r = run([ingest_package], responses={**HOST, MARKER: marker(fake_bundle)})
    assert not [op for op in r.ops if "install the wheel" in op.name]
    assert not [c for c in r.commands if "pip install" in c]


def test_package_new_wheel_same_lock_reinstalls_only_the_wheel(fake_bundle: Bundle) -> None:
    old = [f"lock={fake_bundle.lock_digest}", "wheel=0000"]
    r = run([ingest_package], responses={**HOST, MARKER: old})
    cmds = "\n".join(r.commands)
    assert "--force-reinstall" in cmds and "venv --clear" not in cmds and "--require-hashes" not in cmds


def test_package_goes_to_databases_and_brokers_too() -> None:
    """The database role migrates with ingest, Mosquitto exports with provision: both need the venv."""
    with vault_env():
        state = fake_state("cluster-example", responses=HOST)
        add_deploy(state, ingest_package)
        results = collect(state)
    for name in ("db-a.cluster.example.net", "broker-a.cluster.example.net", "ingest-a.cluster.example.net"):
        assert any(p.startswith(WHEELHOUSE) for p in results[name].files), name


def test_host_distributions_cover_what_the_host_packages_import() -> None:
    """Every third-party import of ingest/, scripts/ and simulator/ is installed on hosts, and the
    deploy tools (pyinfra, ansible-core, jinja2) are not."""
    local = set(SOURCES)
    dists = packages_distributions()
    needed = set()
    for top in SOURCES:
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    first = name.split(".")[0]
                    if first in sys.stdlib_module_names or first in local:
                        continue
                    needed |= {normalize(d) for d in dists.get(first, [first])}
    assert needed == {normalize(d) for d in HOST_DISTRIBUTIONS}
    pins = host_requirements()
    assert "psycopg[binary]==3.3.9" in pins and not [p for p in pins if p.startswith(("pyinfra", "ansible"))]


# --- ingest_account --------------------------------------------------------------------------------


def test_account_user_secret_files_and_mqtt_account() -> None:
    r = run([in_group("ingest", ingest_package), in_group("ingest", ingest_account)])
    cmds = "\n".join(r.commands)
    assert "useradd --system --user-group" in cmds and "--shell /usr/sbin/nologin" in cmds
    with vault_env():
        secrets = load(REPO / "tests/fixtures/vault", ["brokers", "databases", "ingest", "lab"])
    expected = {
        "db.password": secrets["db_ingest_password"],
        "api-db.password": secrets["db_provisioner_password"],
        "mqtt.password": secrets["mqtt_ingest_password"],
        "api-hmac.key": secrets["ingest_api_hmac_key"],
    }
    for name, value in expected.items():
        assert r.files[f"{SECRETS_DIR}/{name}"] == value + "\n"
    # 0640 root:telemetry-ingest (files.put's chown/chmod commands), the folder 0750
    for name in expected:
        assert f"chmod 640 {SECRETS_DIR}/{name}" in cmds
        assert f"chown root:telemetry-ingest {SECRETS_DIR}/{name}" in cmds
    assert f"chmod 750 {SECRETS_DIR}" in cmds
    ensure = [c for c in r.commands if " ensure-service " in c]
    assert len(ensure) == 1
    assert "--account-password-file /etc/telemetry/ingest/mqtt.password" in ensure[0]
    assert "user=provisioner" in ensure[0] and "--password-file /etc/telemetry/ingest/api-db.password" in ensure[0]
    assert "--hash sha256:prefix" in ensure[0]
    # the ingest group subscribes through a shared subscription: both forms are in the ACL
    for topic in service_topics("ingest"):
        assert f"--subscribe '{topic}'" in ensure[0] or f"--subscribe {topic}" in ensure[0]
    assert not [c for c in r.commands if secrets["mqtt_ingest_password"] in c], "a secret on a command line"


def test_topics() -> None:
    assert service_topics("") == ["devices/+/telemetry", "devices/+/status", "devices/+/heartbeat"]
    assert "$share/g/devices/+/status" in service_topics("g")


# --- ingest (the service) ------------------------------------------------------------------------


def test_service_files_and_operation_order() -> None:
    r = run()
    conf, unit = r.files[CONFIG], r.files[UNIT_PATH]
    assert "ExecStart=/opt/telemetry/venv/bin/ingest run --config /etc/telemetry/ingest.toml" in unit
    assert "User=telemetry-ingest" in unit and "Restart=on-failure" in unit
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert directive in unit
    assert "\nReadWritePaths=" not in unit, "the service writes nothing"
    # lab: PostgreSQL and Mosquitto from apt on the same host
    assert "After=network-online.target postgresql@15-main.service mosquitto.service" in unit
    assert "Wants=network-online.target postgresql@15-main.service mosquitto.service" in unit
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert "shutdown_timeout_s = 15.0" in conf and stop == 25 and stop > 15
    assert 'host = "127.0.0.1"\nport = 1883\ntls = false' in conf
    assert 'username = "ingest"' in conf and 'client_id = "ingest-lab"' in conf and 'shared_group = "ingest"' in conf
    assert 'listen = "127.0.0.1:8081"' in conf and "enabled = true" in conf
    assert "batch_max_messages = 500" in conf
    names = r.op_names()

    def at(fragment: str) -> int:
        return next(i for i, n in enumerate(names) if fragment in n)

    assert at("install the wheel") < at("MQTT account") < at("ingest check-config") < at("restart telemetry")
    assert at("daemon-reload") < at("enabled and running") < at("restart telemetry") < at("wait until")
    cmds = "\n".join(r.commands)
    assert "runuser -u telemetry-ingest -- /opt/telemetry/venv/bin/ingest check-config" in cmds
    assert "curl -fsS -o /dev/null http://127.0.0.1:8081/healthz" in cmds
    assert f"chmod 640 {CONFIG}" in cmds and f"chown root:telemetry-ingest {CONFIG}" in cmds


def test_prod_unit_follows_the_compose_stacks() -> None:
    (r,) = run_deploys("prod", [all_three], responses=HOST).values()
    unit = r.files[UNIT_PATH]
    assert "After=network-online.target telemetry-timescaledb.service telemetry-emqx.service" in unit
    assert "MQTT to TimescaleDB" in unit


def test_cluster_ingest_host_has_no_local_peers() -> None:
    with vault_env():
        state = fake_state(
            "cluster-example",
            responses=HOST,
            override={"ingest_database_host": "10.0.0.31", "ingest_mqtt_host": "10.0.0.11"},
        )
        add_deploy(state, all_three)
        r = collect(state)["ingest-a.cluster.example.net"]
    unit, conf = r.files[UNIT_PATH], r.files[CONFIG]
    assert "After=network-online.target\n" in unit
    assert "IPAddressAllow=localhost 10.0.0.11 10.0.0.31" in unit
    assert 'host = "10.0.0.11"\nport = 8883\ntls = true' in conf
    assert 'dsn = "host=10.0.0.31 port=5432 dbname=telemetry user=ingest"' in conf


def test_host_names_as_peers_drop_the_ip_allowlist() -> None:
    r = run(override={"ingest_database_host": "db.internal.example.net"})
    assert "IPAddressDeny" not in r.files[UNIT_PATH]


def test_without_systemd_files_are_written_and_nothing_starts() -> None:
    r = run(responses={**NO_SYSTEMD_HOST, "uname -m": ["x86_64"]})
    assert CONFIG in r.files and UNIT_PATH in r.files
    assert not [c for c in r.commands if c.startswith("systemctl")]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ingest_service_user": "bad user"}, "ingest_service_user"),
        ({"ingest_shared_group": "a/b"}, "ingest_shared_group"),
        ({"ingest_shutdown_timeout_s": 0}, "ingest_shutdown_timeout_s"),
        ({"ingest_host_python": "python3"}, "ingest_host_python"),
    ],
)
def test_bad_settings_are_refused(override: dict[str, Any], message: str) -> None:
    from roles._base import RoleError

    with pytest.raises(RoleError, match=message):
        run(override=override)


# --- the second deploy: nothing runs ----------------------------------------------------------------


def _converged(b: Bundle) -> dict[str, Any]:
    """What a host answers after the first deploy, as far as the guarded operations ask."""
    return {**HOST, MARKER: marker(b), "ensure-service": ['{"username": "ingest", "up_to_date": true}']}


def _guarded_state(responses: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every operation of the three deploys: name, commands, and its `_if` -- after marking every
    operation executed *without change*, which is what a converged host reports for the files, users
    and packages (pyinfra compares those itself)."""
    with vault_env():
        state: State = fake_state("lab", responses=responses)
        add_deploy(state, all_three)
        (host,) = list(state.inventory)
        ops = []
        for op_hash in host.op_hash_order:
            data = state.get_op_data_for_host(host, op_hash)
            names = sorted(state.get_op_meta(op_hash).names)
            ops.append((names[0], data))
        for _, data in ops:
            data.operation_meta.set_complete(True, [], CommandOutput([]))
        for name, data in ops:
            yield name, data.global_arguments.get("_if")


def test_second_deploy_runs_no_command(fake_bundle: Bundle) -> None:
    """Commands that always count as a change (shell, restart, daemon-reload) are either absent or
    guarded by an `_if` that is false when nothing else changed."""
    always_change = ("install the wheel", "MQTT account", "check-config", "restart", "daemon-reload", "wait until")
    seen = set()
    for name, guard in _guarded_state(_converged(fake_bundle)):
        kind = next((k for k in always_change if k in name), None)
        if kind is None:
            continue
        seen.add(kind)
        assert guard is not None, f"{name}: runs on every deploy"
        checks = guard if isinstance(guard, list) else [guard]
        assert not all(check() for check in checks), f"{name}: would run again"
    # the install is not even planned; the others exist, guarded
    assert seen == {"MQTT account", "check-config", "restart", "daemon-reload", "wait until"}


def test_account_is_ensured_when_the_check_cannot_answer(fake_bundle: Bundle) -> None:
    """Fresh host (no CLI, no database yet when the deploy is planned): the account op is unconditional."""
    responses = {**HOST, MARKER: marker(fake_bundle)}
    guards = {name: guard for name, guard in _guarded_state(responses)}
    assert next(g for n, g in guards.items() if "MQTT account" in n) is None


# --- real validators ------------------------------------------------------------------------------------


def _verify_root(tmp_path: Path) -> None:
    stub = tmp_path / "root" / "opt/telemetry/venv/bin/ingest"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)


@pytest.mark.parametrize("inventory", ["lab", "prod"])
def test_unit_passes_systemd_analyze_verify(inventory: str, tmp_path: Path) -> None:
    (r,) = run_deploys(inventory, [all_three], responses=HOST).values()
    _verify_root(tmp_path)
    v.systemd_verify_ok({UNIT: r.files[UNIT_PATH]}, tmp_path)


@pytest.mark.parametrize(
    ("override", "expected_max"),
    [({}, 1.0), ({"ingest_database_host": "db.internal.example.net"}, EXPOSURE_BOUND)],
    ids=["ip-allowlist", "no-allowlist"],
)
def test_unit_exposure_is_below_the_bound(override: dict[str, Any], expected_max: float, tmp_path: Path) -> None:
    r = run(override=override)
    path = tmp_path / UNIT
    path.write_text(r.files[UNIT_PATH])
    proc = v.run([v.tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(path)])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security {UNIT} ({'with' if not override else 'without'} IP allowlist): {score}")
    assert score <= expected_max <= EXPOSURE_BOUND, proc.stdout


def test_rendered_config_loads_in_the_service(tmp_path: Path) -> None:
    """The service's own loader accepts the rendered file (secret files at 0640, as on the host)."""
    with vault_env():
        state = fake_state("lab", responses=HOST)
        (host,) = list(state.inventory)
        role = Ingest(host)
        text = role.config(secrets_dir=str(tmp_path))
        values = {
            "db.password": "db-secret",
            "api-db.password": "api-secret",
            "mqtt.password": "mqtt-secret",
            "api-hmac.key": "k" * 64,
        }
    for name, value in values.items():
        (tmp_path / name).write_text(value + "\n")
        (tmp_path / name).chmod(0o640)
    path = tmp_path / "ingest.toml"
    path.write_text(text)
    cfg = ingest_config.load(path)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls, cfg.mqtt.password) == ("127.0.0.1", 1883, False, "mqtt-secret")
    assert cfg.mqtt.client_id == "ingest-lab" and cfg.mqtt.shared_group == "ingest"
    assert cfg.ingest.batch_max_messages == 500 and cfg.ingest.shutdown_timeout_s == 15.0
    assert cfg.api.enabled and cfg.api.hmac_key == b"k" * 64 and "user=provisioner" in cfg.api.conninfo
    assert "user=ingest" in cfg.database.conninfo and "password=db-secret" in cfg.database.conninfo
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8081)
    # the service's own check of the file, as the deploy runs it (check-config)
    proc = subprocess.run(
        [sys.executable, "-m", "ingest.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_lock_lines_are_pinned_with_hashes(tmp_path: Path) -> None:
    wheel = tmp_path / "paho_mqtt-2.2.0-py3-none-any.whl"
    wheel.write_bytes(b"x")
    assert lock_text([wheel]) == f"paho-mqtt==2.2.0 --hash=sha256:{hashlib.sha256(b'x').hexdigest()}\n"
