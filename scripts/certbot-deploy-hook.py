#!/usr/bin/python3
"""certbot deploy hook: put a new certificate in front of nginx and the MQTT broker (README, "TLS: nginx and certbot").

certbot runs it after each successful renewal with ``RENEWED_LINEAGE=/etc/letsencrypt/live/<name>``;
the certbot role also runs it once after the first ``certonly`` (certbot runs deploy hooks on renewals
only). Settings come from a JSON file the role writes (``/etc/telemetry/certbot-hook.json``, or
``$TELEMETRY_CERTBOT_HOOK_CONFIG``).

For the lineage's key type (ECDSA or RSA) it:
1. copies fullchain/privkey/chain into nginx's directory for that key type, runs ``nginx -t``, and
   reloads nginx. If the test fails, the previous files are put back, nginx is not reloaded (it keeps
   serving the old certificate) and the hook exits 1 with nginx's message.
2. for the broker's key type, copies fullchain/privkey into the broker's TLS directory with the
   owner the broker reads them as, then restarts EMQX's TLS listeners (``emqx ctl listeners restart``
   in its container) or sends SIGHUP to Mosquitto. A broker that is not running is left alone: it
   reads the files when it starts.
Every step is logged (stderr, which certbot keeps in its log, and the hook's own log file).

Python 3 standard library only: certbot itself depends on python3, so it is on every host that runs
this hook.
"""

from __future__ import annotations

import datetime as dt
import grp
import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "/etc/telemetry/certbot-hook.json"
NGINX_FILES = ("fullchain.pem", "privkey.pem", "chain.pem")
BROKER_FILES = ("fullchain.pem", "privkey.pem")
COMMAND_TIMEOUT_S = 60


class HookError(Exception):
    pass


class Log:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} certbot-deploy-hook: {message}"
        print(line, file=sys.stderr, flush=True)
        if self.path:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError as exc:
                print(f"certbot-deploy-hook: cannot write {self.path}: {exc}", file=sys.stderr)


def _uid(value: int | str) -> int:
    return value if isinstance(value, int) else pwd.getpwnam(value).pw_uid


def _gid(value: int | str) -> int:
    return value if isinstance(value, int) else grp.getgrnam(value).gr_gid


def write_atomic(dest: Path, data: bytes, *, mode: int, uid: int, gid: int) -> None:
    """Write ``dest`` through a temporary file in the same directory: readers (nginx, the broker)
    see the old file or the new one, never half of one, and a key is never briefly world-readable."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if (uid, gid) != (os.geteuid(), os.getegid()):
                os.fchown(f.fileno(), uid, gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(argv: list[str], log: Log, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    log(f"run: {' '.join(argv)}")
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False, cwd=cwd)


def update_nginx(lineage: Path, key_type: str, conf: dict[str, Any], log: Log) -> None:
    target = Path(conf["nginx_tls_dir"]) / key_type
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    new = {name: (lineage / name).read_bytes() for name in NGINX_FILES}
    old = {name: (target / name).read_bytes() for name in NGINX_FILES if (target / name).exists()}
    for name, data in new.items():
        write_atomic(target / name, data, mode=0o600 if name == "privkey.pem" else 0o644, uid=0, gid=0)
    log(f"nginx: installed {lineage.name} into {target}")
    test = run(conf["nginx_test"], log)
    if test.returncode != 0:
        for name, data in old.items():
            write_atomic(target / name, data, mode=0o600 if name == "privkey.pem" else 0o644, uid=0, gid=0)
        raise HookError(
            f"nginx -t failed, previous certificate files restored, nginx not reloaded: "
            f"{(test.stderr or test.stdout).strip()}"
        )
    reload = run(conf["nginx_reload"], log)
    if reload.returncode != 0:
        raise HookError(f"nginx reload failed: {(reload.stderr or reload.stdout).strip()}")
    log("nginx: configuration test passed, reloaded")


def update_broker(lineage: Path, broker: dict[str, Any], log: Log) -> None:
    target = Path(broker["tls_dir"])
    target.mkdir(mode=0o750, parents=True, exist_ok=True)
    uid, gid = _uid(broker["owner"]), _gid(broker["group"])
    for name in BROKER_FILES:
        mode = int(broker["key_mode" if name == "privkey.pem" else "cert_mode"], 8)
        write_atomic(target / name, (lineage / name).read_bytes(), mode=mode, uid=uid, gid=gid)
    log(f"broker: installed {lineage.name} into {target} (owner {uid}:{gid})")
    if broker["kind"] == "emqx":
        reload_emqx(broker, log)
    elif broker["kind"] == "mosquitto":
        reload_mosquitto(broker, log)
    else:
        raise HookError(f"unknown broker kind {broker['kind']!r}")


def reload_emqx(broker: dict[str, Any], log: Log) -> None:
    docker = broker.get("docker", "docker")
    # Compose v1 and v2 both label containers with project and service: no container-name guessing.
    ps = run(
        [
            docker,
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={broker['compose_project']}",
            "--filter",
            f"label=com.docker.compose.service={broker['compose_service']}",
        ],
        log,
    )
    if ps.returncode != 0:
        raise HookError(f"docker ps failed: {ps.stderr.strip()}")
    containers = ps.stdout.split()
    if not containers:
        log("broker: EMQX is not running; it loads the new certificate when it starts")
        return
    for container in containers:
        for listener in broker["listeners"]:
            proc = run([docker, "exec", container, "emqx", "ctl", "listeners", "restart", listener], log)
            if proc.returncode != 0:
                raise HookError(f"EMQX listener {listener} restart failed: {(proc.stderr or proc.stdout).strip()}")
            log(f"broker: EMQX listener {listener} restarted in {container}")


def reload_mosquitto(broker: dict[str, Any], log: Log) -> None:
    pid_file = Path(broker["pid_file"])
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        log(f"broker: Mosquitto is not running ({pid_file}); it loads the new certificate when it starts")
        return
    os.kill(pid, signal.SIGHUP)
    log(f"broker: SIGHUP sent to Mosquitto (pid {pid}) to reload its certificate")


def main() -> int:
    conf_path = os.environ.get("TELEMETRY_CERTBOT_HOOK_CONFIG", DEFAULT_CONFIG)
    try:
        conf = json.loads(Path(conf_path).read_text())
    except (OSError, ValueError) as exc:
        print(f"certbot-deploy-hook: cannot read {conf_path}: {exc}", file=sys.stderr)
        return 2
    log = Log(conf.get("log_file"))
    lineage_env = os.environ.get("RENEWED_LINEAGE")
    if not lineage_env:
        log("RENEWED_LINEAGE is not set: run by certbot, or by hand as RENEWED_LINEAGE=<live dir> <hook>")
        return 2
    lineage = Path(lineage_env)
    key_type = conf["lineages"].get(lineage.name)
    if key_type is None:
        log(f"{lineage.name}: not a lineage of this platform, nothing to do")
        return 0
    log(f"{lineage.name}: {key_type} certificate renewed or issued")
    try:
        update_nginx(lineage, key_type, conf, log)
        broker = conf.get("broker")
        if broker and broker["key_type"] == key_type:
            update_broker(lineage, broker, log)
    except (HookError, OSError, KeyError, subprocess.TimeoutExpired) as exc:
        log(f"FAILED: {exc}")
        return 1
    log(f"{lineage.name}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
