"""ops role: ops.yml the real scripts accept, a cron file a strict parser accepts and whose every job
names a console script that exists, units and drop-ins that `systemd-analyze verify` accepts with empty
stderr, and the start/stop order they give together with the other roles' units."""

from __future__ import annotations

import importlib
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from roles._base import RoleError
from roles.broker_emqx import broker_emqx
from roles.broker_mosquitto import broker_mosquitto
from roles.database_postgresql import database_postgresql
from roles.database_timescaledb import database_timescaledb
from roles.ops import (
    BOOT_UNIT,
    CRON_FILE,
    DB_PASSWORD_FILE,
    DEBIAN_PG_EXECSTOP,
    KEY_FILE,
    MQTT_HEALTH_PASSWORD_FILE,
    OPS_CONFIG,
    SMTP_PASSWORD_FILE,
    database_address,
    execstop_lines,
    ops,
    schedule,
)
from roles.plan import all_roles
from roles.secrets import clear_cache, decrypt_file, encrypt_mapping
from roles.stack import render_unit
from scripts import _archive as arc
from scripts import backup, boot_check
from tests.support import deploy_validators as v
from tests.support.deploy_fake import (
    LIVE_HOST,
    NO_SYSTEMD_HOST,
    REPO,
    TEST_VAULT_DIR,
    TEST_VAULT_PASSWORD,
    HostResult,
    run_deploys,
)

VENV_BIN = "/opt/telemetry/venv/bin"
SYSTEMD = "/etc/systemd/system"
LAB = "lab.telemetry.test"
# What the health-account fact prints when the account is already as wanted.
ACCOUNT_CURRENT = {"ensure-service healthcheck": ['{"username": "healthcheck", "up_to_date": true}']}
LOGIN_OK = {"SELECT 1": ["login=ok"]}


def everything() -> None:
    from pyinfra.context import host

    for role in all_roles(host):
        role()


def deploy(inventory: str = "lab", responses: dict[str, Any] | None = None, **override: Any) -> HostResult:
    results = run_deploys(inventory, [ops], override=override or None, responses=responses)
    assert len(results) == 1
    return next(iter(results.values()))


def ops_yml(r: HostResult) -> dict[str, Any]:
    data = yaml.safe_load(r.files[OPS_CONFIG])
    assert isinstance(data, dict)
    return data


# --- cron: a strict parser for /etc/cron.d files ------------------------------------------------
# Written here rather than taken from croniter or python-crontab: those parse schedules, but what
# breaks a cron.d file is cron.d's own syntax -- the user column, `%` meaning newline, NAME=value
# lines, the final newline cron needs -- which they do not check. No extra dependency either.

_MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, start=1)}
DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, DAYS),  # 0 and 7 are both Sunday
)
_PART = re.compile(r"^(?:(\*)|([0-9a-z]+)(?:-([0-9a-z]+))?)(?:/([0-9]+))?$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S.*$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]*$")


class CronError(AssertionError):
    pass


def parse_field(text: str, name: str, lo: int, hi: int, names: dict[str, int]) -> set[int]:
    def value(token: str) -> int:
        if token.isdigit():
            number = int(token)
        elif token in names:
            number = names[token]
        else:
            raise CronError(f"{name}: {token!r} is neither a number nor a name")
        if not lo <= number <= hi:
            raise CronError(f"{name}: {number} outside {lo}-{hi}")
        return number

    out: set[int] = set()
    for part in text.split(","):
        m = _PART.match(part)
        if not m:
            raise CronError(f"{name}: cannot parse {part!r}")
        star, first, last, step = m.groups()
        if step is not None and int(step) < 1:
            raise CronError(f"{name}: step must be at least 1")
        if step is not None and not star and last is None:
            raise CronError(f"{name}: a step needs * or a range ({part!r})")
        a, b = (lo, hi) if star else (value(first), value(last) if last else value(first))
        if a > b:
            raise CronError(f"{name}: range {a}-{b} runs backwards")
        out |= set(range(a, b + 1, int(step or 1)))
    return out


@dataclass
class CronJob:
    schedule: tuple[set[int], ...]
    user: str
    command: str
    comment: list[str]


def parse_cron_d(text: str) -> tuple[dict[str, str], list[CronJob]]:
    """NAME=value lines and jobs (5 fields, user, command), each job with the comment block right
    above it. Anything else is an error, as are a missing final newline (cron drops the last line)
    and an unescaped % (cron turns it into a newline)."""
    if not text.endswith("\n"):
        raise CronError("no newline at the end: cron ignores the last line")
    env: dict[str, str] = {}
    jobs: list[CronJob] = []
    comment: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            comment = []
        elif stripped.startswith("#"):
            comment.append(stripped)
        elif _ENV.match(stripped) and " " not in stripped.partition("=")[0]:
            name, _, value = stripped.partition("=")
            env[name] = value
        else:
            fields = stripped.split(None, 6)
            if len(fields) < 7:
                raise CronError(f"line {number}: expected 5 time fields, a user and a command: {line!r}")
            sched = tuple(
                parse_field(f, n, lo, hi, names) for f, (n, lo, hi, names) in zip(fields, FIELDS, strict=False)
            )
            if not _USER.match(fields[5]):
                raise CronError(f"line {number}: {fields[5]!r} is not a user name")
            if re.search(r"(?<!\\)%", fields[6]):
                raise CronError(f"line {number}: unescaped % (cron makes it a newline)")
            jobs.append(CronJob(sched, fields[5], fields[6], comment))
            comment = []
    return env, jobs


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("60 3 * * * root /bin/true", "outside"),
        ("5 3 * * root /bin/echo hi", "neither a number"),
        ("5 3 * * *", "expected 5"),
        ("5/2 3 * * * root /bin/true", "step needs"),
        ("5 3 * * mon-sun root /bin/true", "backwards"),
        ("5 3 * * * root date +%F", "unescaped %"),
        ("5 3 * * * Root /bin/true", "user name"),
    ],
)
def test_the_parser_is_strict(line: str, problem: str) -> None:
    with pytest.raises(CronError, match=problem):
        parse_cron_d(line + "\n")
    with pytest.raises(CronError, match="newline"):
        parse_cron_d("5 3 * * * root /bin/true")
    env, (job,) = parse_cron_d("A=b\n# why\n*/15 1-3,5 * jan-mar 1-5 root /bin/true \\%F\n")
    assert env == {"A": "b"}
    assert job.schedule[0] == {0, 15, 30, 45} and job.schedule[1] == {1, 2, 3, 5} and job.schedule[3] == {1, 2, 3}
    assert job.comment == ["# why"]


def project_scripts() -> dict[str, str]:
    return dict(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def console_script(binary: str) -> str:
    """The ``module:function`` a venv binary runs; it must exist and be callable."""
    name = binary.removeprefix(VENV_BIN + "/")
    scripts = project_scripts()
    assert binary.startswith(VENV_BIN + "/") and name in scripts, f"{binary} is no [project.scripts] entry"
    module, _, function = scripts[name].partition(":")
    assert callable(getattr(importlib.import_module(module), function)), scripts[name]
    return scripts[name]


def jobs_of(r: HostResult) -> dict[str, CronJob]:
    """Jobs by what they run: the console script's module, or "docker"."""
    env, jobs = parse_cron_d(r.files[CRON_FILE])
    assert env["SHELL"] == "/bin/sh" and env["PATH"].startswith("/usr/sbin:/usr/bin")
    out = {}
    for job in jobs:
        assert job.user == "root"
        # Every job says what it does and why, in the comment right above it.
        assert job.comment and len(" ".join(job.comment)) > 80, job
        binaries = [t for t in shlex.split(job.command) if t.startswith(VENV_BIN + "/")]
        if binaries:
            (binary,) = binaries
            out[console_script(binary).partition(":")[0]] = job
        else:
            out["docker"] = job
    return out


def test_lab_cron_jobs_parse_and_name_existing_scripts(tmp_path: Path) -> None:
    r = deploy()
    jobs = jobs_of(r)
    assert set(jobs) == {"scripts.backup", "scripts.healthcheck", "scripts.restore", "docker"}
    minute = schedule(LAB)
    backup_job, health, drill, docker = (
        jobs[k] for k in ("scripts.backup", "scripts.healthcheck", "scripts.restore", "docker")
    )
    everyday = (set(range(1, 32)), set(range(1, 13)), set(range(0, 8)))
    assert backup_job.schedule == ({minute}, {3}, *everyday)
    assert health.schedule == (set(range(0, 60, 2)), set(range(24)), *everyday)
    assert drill.schedule == ({minute}, {5}, set(range(1, 32)), set(range(1, 13)), {0})
    assert docker.schedule == ({minute}, {4}, *everyday)
    assert "--latest --drill" in drill.command and f"--config {OPS_CONFIG}" in backup_job.command
    # The real shell parses every command; shellcheck finds nothing to complain about.
    for i, job in enumerate(jobs.values()):
        proc = v.run(["sh", "-n", "-c", job.command])
        assert proc.returncode == 0, proc.stderr
        v.shellcheck_ok(job.command + "\n", tmp_path, f"job{i}.sh")


def test_docker_cleanup_never_touches_volumes_or_used_images() -> None:
    command = jobs_of(deploy())["docker"].command
    # Guarded: on a host where Docker is gone the job ends quietly instead of mailing every day.
    guard, _, rest = command.partition("; ")
    assert guard == "[ -x /usr/bin/docker ] || exit 0"
    words = shlex.split(rest)
    runs = [words[i + 1 : i + 3] for i, w in enumerate(words) if w == "/usr/bin/docker"]
    assert runs == [["container", "prune"], ["image", "prune"], ["builder", "prune"]]
    for forbidden in ("--volumes", "-a", "--all", "system", "volume", "docker"):
        assert forbidden not in words, forbidden
    # A compose project's stopped container keeps its logs; only strays are removed.
    assert "label!=com.docker.compose.project" in words


def test_cron_per_host_of_the_cluster() -> None:
    results = run_deploys("cluster-example", [ops])
    db = jobs_of(results["db-a.cluster.example.net"])
    broker = jobs_of(results["broker-a.cluster.example.net"])
    ingest = jobs_of(results["ingest-a.cluster.example.net"])
    # Backups and drills where the database is; Docker cleanup where compose stacks run.
    assert set(db) == {"scripts.backup", "scripts.restore", "scripts.healthcheck", "docker"}
    assert set(broker) == {"scripts.healthcheck", "docker"}
    assert set(ingest) == {"scripts.healthcheck"}
    minutes = {next(iter(jobs_of(r)["scripts.healthcheck"].schedule[0])) for r in results.values()}
    assert minutes == {0}  # */2
    spread = {schedule(name) for name in results}
    assert len(spread) > 1, "daily jobs of different hosts start at different minutes"


def test_schedule_is_stable_per_host() -> None:
    first, second = deploy(), deploy()
    assert first.files[CRON_FILE] == second.files[CRON_FILE]
    assert schedule(LAB) == schedule(LAB) and 0 <= schedule(LAB) < 60


def test_mailto_only_with_an_alert_address() -> None:
    env, _ = parse_cron_d(deploy().files[CRON_FILE])
    assert "MAILTO" not in env
    env, _ = parse_cron_d(deploy(alert_email=["ops@example.org", "oncall@example.org"]).files[CRON_FILE])
    assert env["MAILTO"] == "ops@example.org,oncall@example.org"


# --- ops.yml ------------------------------------------------------------------------------------


def test_lab_ops_yml_is_what_the_scripts_read(tmp_path: Path) -> None:
    r = deploy()
    cfg = ops_yml(r)
    settings = backup.Settings.from_config(cfg, backup.build_parser().parse_args([]))
    assert settings.directory == Path("/var/backups/telemetry") and settings.key_file == Path(KEY_FILE)
    assert (settings.daily, settings.weekly) == (7, 4)
    assert settings.dsn == "host=127.0.0.1 port=5432 dbname=telemetry user=postgres"
    assert settings.password_file == Path(DB_PASSWORD_FILE) and settings.pg_bindir == "/usr/lib/postgresql/15/bin"
    assert settings.textfile_dir == Path("/var/lib/prometheus/node-exporter")
    assert settings.paths == {
        "config": ["/etc/telemetry", "/etc/postgresql/15/main"],
        "certs": ["/etc/letsencrypt", "/etc/nginx/tls"],
    }
    assert settings.broker == {
        "kind": "mosquitto",
        "files": ["/etc/mosquitto"],
        "persistence": "/var/lib/mosquitto/mosquitto.db",
    }
    backup._check_key_outside(settings)  # the key file is in none of the backed-up paths
    assert not settings.offsite
    health = cfg["health"]
    assert health["broker"] == {
        "kind": "mosquitto",
        "host": "127.0.0.1",
        "port": 1883,
        "tls": False,
        "username": "healthcheck",
        "password_file": MQTT_HEALTH_PASSWORD_FILE,
        "timeout": 5,
    }
    assert health["ingest"]["url"] == "http://127.0.0.1:8081/healthz"
    assert health["disk"] == {"paths": ["/", "/var/lib/postgresql"], "warn": 70, "crit": 85}
    assert health["memory"] == {"warn": 60, "crit": 85}
    assert health["certificates"]["warn_days"] == 21 and health["certificates"]["crit_days"] == 7
    assert health["backup"] == {"max_age_hours": 26} and "docker" not in health
    assert cfg["alerts"] == {}
    # every log file lands where logrotate rotates *.log
    logs = [cfg["log_file"], cfg["backup"]["log_file"], health["log_file"], cfg["boot_check"]["log_file"]]
    assert all(re.fullmatch(r"/var/log/telemetry/[a-z-]+\.log", p) for p in logs), logs
    assert cfg["runbook"]["ingest_unit"] == "telemetry-ingest"
    # The boot check builds its checks from the same file (without running them).
    components, timing = boot_check.load_components(cfg)
    assert [(c.name, c.unit) for c in components] == [
        ("database", "postgresql@15-main.service"),
        ("broker", "mosquitto.service"),
        ("ingest", "telemetry-ingest.service"),
    ]
    assert timing == boot_check.Timing(wait_seconds=180, interval_seconds=5, restarts=2)


def test_prod_ops_yml_for_timescaledb_and_emqx() -> None:
    cfg = ops_yml(deploy("prod"))
    assert cfg["broker"] == {
        "kind": "emqx",
        "container": "emqx-emqx-1",
        "docker": "/usr/bin/docker",
        "files": ["/srv/telemetry/emqx/compose.yaml", "/srv/telemetry/emqx/etc"],
    }
    paths = cfg["backup"]["paths"]
    assert paths["secrets"] == [
        "/srv/telemetry/timescaledb/postgres_password",
        "/srv/telemetry/timescaledb/roles.sql",
        "/srv/telemetry/emqx/secrets.env",
        "/srv/telemetry/emqx/dashboard.env",
    ]
    assert "/srv/telemetry/timescaledb/data" not in str(paths), "the raw data directory is never copied"
    health = cfg["health"]
    assert health["broker"] == {"kind": "emqx", "url": "http://127.0.0.1:18083/api/v5/status"}
    assert health["docker"]["containers"] == ["timescaledb-timescaledb-1", "emqx-emqx-1"]
    assert health["disk"]["paths"] == ["/", "/srv/telemetry/timescaledb/data"]
    components, _ = boot_check.load_components(cfg)
    assert [c.unit for c in components] == [
        "telemetry-timescaledb.service",
        "telemetry-emqx.service",
        "telemetry-ingest.service",
    ]
    # Debian's compose v1 names containers with underscores.
    debian = ops_yml(deploy("prod", docker_source="debian"))
    assert debian["health"]["docker"]["containers"] == ["timescaledb_timescaledb_1", "emqx_emqx_1"]


def test_cluster_hosts_get_only_their_sections() -> None:
    results = run_deploys("cluster-example", [ops])
    db = ops_yml(results["db-a.cluster.example.net"])
    # listens on 0.0.0.0 there: the backup still connects over loopback
    assert db["database"]["dsn"].startswith("host=127.0.0.1 ")
    assert "broker" not in db and "broker" not in db["health"]
    broker = ops_yml(results["broker-a.cluster.example.net"])
    assert "database" not in broker and "backup" not in broker and "backup" not in broker["health"]
    ingest = ops_yml(results["ingest-a.cluster.example.net"])
    assert [c["name"] for c in ingest["boot_check"]["components"]] == ["ingest"]
    for r in results.values():
        assert (KEY_FILE in r.files) == ("database" in ops_yml(r))


def test_database_address() -> None:
    assert database_address("127.0.0.1") == "127.0.0.1"
    assert database_address("0.0.0.0") == "127.0.0.1"  # noqa: S104 -- a listen address, not a bind
    assert database_address("10.0.0.31, 127.0.0.1") == "127.0.0.1"
    assert database_address("::") == "::1"
    assert database_address("10.0.0.31") == "10.0.0.31"


def test_alerts_offsite_and_thresholds_flow_from_group_data() -> None:
    cfg = ops_yml(
        deploy(
            alert_email="ops@example.org",
            alert_webhook_url="https://hooks.example.org/telemetry",
            alert_smtp_host="smtp.example.org",
            alert_smtp_port=587,
            alert_smtp_starttls=True,
            alert_email_from="telemetry@example.org",
            alert_disk_warn_percent=60,
            alert_cert_warn_days=30,
            backup_keep_daily=3,
            backup_keep_weekly=0,
            backup_offsite_target="backup@offsite.example.org:/srv/telemetry/",
        )
    )
    assert cfg["alerts"] == {
        "webhook": "https://hooks.example.org/telemetry",
        "smtp": {
            "host": "smtp.example.org",
            "port": 587,
            "starttls": True,
            "from": "telemetry@example.org",
            "to": ["ops@example.org"],
        },
    }
    assert cfg["health"]["disk"]["warn"] == 60 and cfg["health"]["certificates"]["warn_days"] == 30
    assert cfg["backup"]["retention"] == {"daily": 3, "weekly": 0}
    assert cfg["backup"]["offsite"] == {
        "target": "backup@offsite.example.org:/srv/telemetry/",
        "ssh_key": "/root/.ssh/telemetry_backup_ed25519",
        "known_hosts": "/root/.ssh/known_hosts_telemetry_backup",
    }
    # Without a sender, one per host.
    cfg = ops_yml(deploy(alert_email=["ops@example.org"]))
    assert cfg["alerts"]["smtp"]["from"] == f"telemetry@{LAB}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"alert_email": "ops at example.org"}, "alert_email"),
        ({"alert_webhook_url": "ftp://hooks.example.org/x"}, "alert_webhook_url"),
        ({"backup_keep_daily": 0}, "backup_keep_daily"),
        ({"backup_hour": 24}, "backup_hour"),
        ({"restore_drill_weekday": 7}, "restore_drill_weekday"),
        ({"backup_dir": "relative/dir"}, "backup_dir"),
        ({"backup_offsite_target": "host:/path; rm -rf /"}, "backup_offsite_target"),
        ({"boot_check_restarts": 11}, "boot_check_restarts"),
        ({"alert_disk_crit_percent": 0}, "alert_disk_crit_percent"),
    ],
)
def test_bad_settings_are_refused(override: dict[str, Any], message: str) -> None:
    with pytest.raises(RoleError, match=message):
        deploy(**override)


# --- secret files --------------------------------------------------------------------------------


def mode_of(r: HostResult, path: str) -> str:
    (mode,) = [c.split()[1] for c in r.commands if c.startswith("chmod ") and c.endswith(" " + path)]
    return mode


def test_secret_files_are_root_0600_and_the_key_is_the_vaults(tmp_path: Path) -> None:
    r = deploy()
    vault = decrypt_file(REPO / TEST_VAULT_DIR / "all.vault.yml", TEST_VAULT_PASSWORD.read_bytes().strip())
    assert r.files[KEY_FILE] == vault["backup_encryption_key"] + "\n"
    assert r.files[DB_PASSWORD_FILE] == vault["db_superuser_password"] + "\n"
    for path in (KEY_FILE, DB_PASSWORD_FILE):
        assert mode_of(r, path) == "600"
        assert f"chown root:root {path}" in r.commands
    assert mode_of(r, OPS_CONFIG) == "640"
    # ops.yml names secret files, never holds a secret
    for secret in vault.values():
        assert secret not in r.files[OPS_CONFIG]
    # The backup reads the key file exactly as the deploy writes it.
    key = tmp_path / "key"
    key.write_text(r.files[KEY_FILE])
    key.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert arc.load_key(key) == bytes.fromhex(vault["backup_encryption_key"])
    # no database here: no key, no database password
    broker = run_deploys("cluster-example", [ops])["broker-a.cluster.example.net"]
    assert KEY_FILE not in broker.files and DB_PASSWORD_FILE not in broker.files


@pytest.fixture
def vault_with_smtp(tmp_path: Path) -> Iterator[str]:
    """A copy of the test vault plus alert_smtp_password, in a temporary folder."""
    password = TEST_VAULT_PASSWORD.read_bytes().strip()
    values = decrypt_file(REPO / TEST_VAULT_DIR / "all.vault.yml", password)
    (tmp_path / "all.vault.yml").write_bytes(encrypt_mapping({**values, "alert_smtp_password": "relay-pw"}, password))
    clear_cache()
    yield str(tmp_path)
    clear_cache()


def test_smtp_login_password_file(vault_with_smtp: str) -> None:
    r = deploy(vault_dir=vault_with_smtp, alert_email="ops@example.org", alert_smtp_username="telemetry")
    assert ops_yml(r)["alerts"]["smtp"]["username"] == "telemetry"
    assert ops_yml(r)["alerts"]["smtp"]["password_file"] == SMTP_PASSWORD_FILE
    assert r.files[SMTP_PASSWORD_FILE] == "relay-pw\n" and mode_of(r, SMTP_PASSWORD_FILE) == "600"


def test_bad_backup_key_is_refused(tmp_path: Path) -> None:
    password = TEST_VAULT_PASSWORD.read_bytes().strip()
    values = decrypt_file(REPO / TEST_VAULT_DIR / "all.vault.yml", password)
    (tmp_path / "all.vault.yml").write_bytes(encrypt_mapping({**values, "backup_encryption_key": "short"}, password))
    clear_cache()
    try:
        with pytest.raises(RoleError, match="backup_encryption_key"):
            deploy(vault_dir=str(tmp_path))
    finally:
        clear_cache()


# --- database login and the Mosquitto health account ---------------------------------------------


def test_postgres_password_is_set_only_when_the_login_fails_or_the_vault_changed() -> None:
    first = deploy()
    (op,) = [o for o in first.ops if "postgres password" in o.name]
    assert op.name.endswith("(login failed)")
    (command,) = op.commands
    # the password travels through a pipe from its file, never on a command line
    assert f'"$(cat {DB_PASSWORD_FILE})"' in command and "runuser -u postgres -- psql" in command
    again = deploy(responses={**LIVE_HOST, **LOGIN_OK, **ACCOUNT_CURRENT})
    (op,) = [o for o in again.ops if "postgres password" in o.name]
    assert op.name.endswith("(vault changed)")  # guarded by _if: runs only when the file changed
    # TimescaleDB's image sets the superuser password from the same vault key itself
    assert not [o for o in deploy("prod").ops if "postgres password" in o.name]


def test_health_account_is_provisioned_until_current() -> None:
    first = deploy()
    (generate,) = [o for o in first.ops if "password of the MQTT health account" in o.name]
    assert generate.commands[0].startswith("umask 077 && ")
    (op,) = [o for o in first.ops if "MQTT health account" in o.name and o is not generate]
    (command,) = op.commands
    assert "ensure-service healthcheck" in command and "--subscribe '$SYS/broker/uptime'" in command
    assert "--hash 'sha256:prefix'" in command  # the same hashing the broker role verifies with
    assert "export-mosquitto" in command and command.index("ensure-service") < command.index("systemctl reload")
    # second run: password file exists, account current -> nothing
    stat_line = f"user=root group=root mode=-rw------- atime=0 mtime=0 ctime=0 size=64 '{MQTT_HEALTH_PASSWORD_FILE}'"
    again = deploy(responses={**LIVE_HOST, **LOGIN_OK, **ACCOUNT_CURRENT, MQTT_HEALTH_PASSWORD_FILE: [stat_line]})
    assert not [o for o in again.ops if "MQTT health account" in o.name]
    # no account name: no account, and the boot check probes for a CONNACK instead
    r = deploy(health_mqtt_user="")
    cfg = ops_yml(r)
    assert "broker" not in cfg["health"]
    assert cfg["boot_check"]["components"][1] == {
        "name": "broker",
        "unit": "mosquitto.service",
        "probe": {"host": "127.0.0.1", "port": 1883},
    }
    assert not [o for o in r.ops if "MQTT health account" in o.name]


def test_without_systemd_files_are_written_and_nothing_runs() -> None:
    r = deploy(responses=NO_SYSTEMD_HOST)
    assert {OPS_CONFIG, CRON_FILE, f"{SYSTEMD}/{BOOT_UNIT}"} <= set(r.files)
    assert not [c for c in r.commands if c.startswith("systemctl")]
    assert not [o for o in r.ops if "postgres password" in o.name or "ensure-service" in " ".join(o.commands)]


def test_boot_unit_is_enabled_not_started() -> None:
    r = deploy()
    assert "systemctl enable telemetry-boot-check.service" in r.commands
    assert not [c for c in r.commands if re.match(r"systemctl (start|restart) telemetry-boot-check", c)]


# --- units and drop-ins --------------------------------------------------------------------------

STUBS = [
    "usr/bin/pg_ctlcluster",
    "usr/sbin/mosquitto",
    "bin/mkdir",
    "bin/chown",
    "bin/kill",
    "usr/bin/timeout",
    "usr/sbin/runuser",
    "usr/lib/postgresql/15/bin/psql",
    "opt/telemetry/venv/bin/telemetry-boot-check",
]


def verify_in_root(files: dict[str, str], units: list[str], tmp: Path) -> dict[str, str]:
    """Lay ``/etc/systemd/system/...`` files (units and drop-ins) over a copy of this machine's units
    and run ``systemd-analyze verify`` on each named unit; returns stderr per unit."""
    root = tmp / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil_copy = v.run(["cp", "-a", "/usr/lib/systemd/system", str(root / "usr/lib/systemd/")])
    assert shutil_copy.returncode == 0, shutil_copy.stderr
    for rel in [*STUBS, "usr/bin/docker", "usr/bin/docker-compose"]:
        stub = root / rel
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    (etc / "docker.service").write_text("[Unit]\nDescription=stub\n[Service]\nExecStart=/usr/bin/docker\n")
    for path, content in files.items():
        if path.startswith(SYSTEMD + "/"):
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
    out = {}
    for unit in units:
        proc = v.run([v.tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", unit])
        out[unit] = proc.stderr.strip() if proc.returncode == 0 or proc.stderr.strip() else f"exit {proc.returncode}"
    return out


@pytest.mark.parametrize(
    ("inventory", "roles", "units"),
    [
        (
            "lab",
            [database_postgresql, broker_mosquitto],
            [BOOT_UNIT, "mosquitto.service", "postgresql@15-main.service"],
        ),
        (
            "prod",
            [database_timescaledb, broker_emqx],
            [BOOT_UNIT, "telemetry-emqx.service", "telemetry-timescaledb.service"],
        ),
    ],
)
def test_units_and_dropins_pass_systemd_analyze_verify(
    inventory: str, roles: list[Callable[[], Any]], units: list[str], tmp_path: Path
) -> None:
    """With the units the database and broker roles write (the compose projects'), and Debian's."""
    (r,) = run_deploys(inventory, [*roles, ops]).values()
    dropins = [p for p in r.files if p.startswith(SYSTEMD) and ".service.d/telemetry-" in p]
    assert len(dropins) == 2, dropins  # the broker's order, the database's checkpoint
    assert verify_in_root(r.files, units, tmp_path) == dict.fromkeys(units, "")


def test_verify_would_see_a_broken_dropin(tmp_path: Path) -> None:
    """Negative control: the drop-ins are really loaded by the verification above."""
    (r,) = run_deploys("lab", [ops]).values()
    path = f"{SYSTEMD}/postgresql@15-main.service.d/telemetry-checkpoint.conf"
    broken = {path: r.files[path] + "TimeoutStopSec=banana\n"}
    stderr = verify_in_root(broken, ["postgresql@15-main.service"], tmp_path)["postgresql@15-main.service"]
    assert "banana" in stderr


def test_checkpoint_runs_before_the_units_own_stop() -> None:
    lab = deploy().files[f"{SYSTEMD}/postgresql@15-main.service.d/telemetry-checkpoint.conf"]
    packaged = Path("/usr/lib/systemd/system/postgresql@.service").read_text()
    # The drop-in resets ExecStop, runs the CHECKPOINT (its failure ignored), then Debian's own stop.
    assert execstop_lines(packaged) == [DEBIAN_PG_EXECSTOP]
    stops = execstop_lines(lab)
    assert stops[0] == "" and stops[2:] == execstop_lines(packaged)
    assert stops[1].startswith("-/usr/bin/timeout 600 /usr/sbin/runuser -u postgres -- ")
    assert stops[1].endswith("-p 5432 -d postgres -c CHECKPOINT")
    for source in ("docker-ce", "debian"):
        prod = deploy("prod", docker_source=source).files[
            f"{SYSTEMD}/telemetry-timescaledb.service.d/telemetry-checkpoint.conf"
        ]
        own = execstop_lines(render_unit("timescaledb", "/srv/telemetry/timescaledb", source))
        stops = execstop_lines(prod)
        assert stops[0] == "" and stops[2:] == own
        compose = "/usr/bin/docker compose" if source == "docker-ce" else "/usr/bin/docker-compose"
        assert stops[1] == (
            f"-/usr/bin/timeout 600 {compose} --project-name timescaledb exec -T timescaledb "
            "psql -X -q -U postgres -d postgres -c CHECKPOINT"
        )
        assert "TimeoutStopSec=900" in prod


def after_graph(files: dict[str, str]) -> dict[str, set[str]]:
    """Unit -> units it starts after, from the units and drop-ins a deploy writes."""
    graph: dict[str, set[str]] = {}
    for path, content in files.items():
        m = re.match(rf"{SYSTEMD}/([^/]+\.service)(?:\.d/[^/]+\.conf)?$", path)
        if not m:
            continue
        for line in content.splitlines():
            if line.startswith("After="):
                graph.setdefault(m.group(1), set()).update(line.removeprefix("After=").split())
    return graph


@pytest.mark.parametrize(
    ("inventory", "database", "broker"),
    [
        ("lab", "postgresql@15-main.service", "mosquitto.service"),
        ("prod", "telemetry-timescaledb.service", "telemetry-emqx.service"),
    ],
)
def test_start_and_stop_order_of_the_whole_plan(inventory: str, database: str, broker: str) -> None:
    """Started database -> broker -> ingest -> boot check; systemd stops in reverse: the boot check,
    ingest (flushing), the broker, then the database (after its CHECKPOINT)."""
    (r,) = run_deploys(inventory, [everything]).values()
    graph = after_graph(r.files)
    assert database in graph[broker]
    assert {database, broker, "telemetry-ingest.service", "nginx.service"} <= graph[BOOT_UNIT]
    if "telemetry-ingest.service" in graph:  # the ingest role's own unit, where it is in the plan
        assert {database, broker} <= graph["telemetry-ingest.service"]


def test_boot_unit_bounds_its_own_run() -> None:
    unit = deploy(boot_check_wait_seconds=60, boot_check_restarts=1).files[f"{SYSTEMD}/{BOOT_UNIT}"]
    # 3 components x (1 + 1 restart) x (60 s + 5 s interval) + 60 s
    assert "TimeoutStartSec=450\n" in unit
    assert "Type=oneshot\n" in unit and "RemainAfterExit=yes\n" in unit
    assert f"ExecStart={VENV_BIN}/telemetry-boot-check --config {OPS_CONFIG}\n" in unit
    assert unit.rstrip().endswith("[Install]\nWantedBy=multi-user.target")
    console_script(f"{VENV_BIN}/telemetry-boot-check")


def test_ingest_unit_name_is_the_ingest_roles() -> None:
    ingest = pytest.importorskip("roles.ingest")
    assert ingest.UNIT == "telemetry-ingest.service"


def test_boot_check_help_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.boot_check", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "restart" in proc.stdout
