"""Build, start and remove the lab target: a systemd-booted Debian 12 container on a private dockerd.

Why this shape (shared/lab-target.md records what was tried): no image registry is reachable, so the
image is a debootstrapped rootfs fed to ``docker import``; ``--privileged`` fails in this sandbox, so
the container gets every capability but SYS_RESOURCE; KVM hangs and TCG is slow, so no VM.

Everything this module starts is written to ``.cache/lab/state.json`` (pids, port, what existed
before) so that :func:`down` removes exactly that, by process id, and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The rootfs and its .deb cache are shared by every lab instance of this checkout.
CACHE_DIR = REPO / ".cache/lab"
DEBS = CACHE_DIR / "debs"
# One lab instance: its state, key, ssh config and Docker data root. The end-to-end test uses an
# instance of its own (TELEMETRY_LAB_DIR, TELEMETRY_LAB_RUN_DIR, TELEMETRY_LAB_BRIDGE*) so that it
# neither reuses nor tears down a lab a developer has up.
LAB_DIR = Path(os.environ.get("TELEMETRY_LAB_DIR") or CACHE_DIR)
STATE_FILE = LAB_DIR / "state.json"
SSH_KEY = LAB_DIR / "id_ed25519"
SSH_CONFIG = LAB_DIR / "ssh_config"
# Images survive a `lab-down`: the next `make lab` re-imports nothing.
DATA_ROOT = LAB_DIR / "docker"
# Unix sockets are limited to 108 bytes and containerd nests its sockets under the exec root, so
# runtime paths stay short and off the (possibly deep) checkout path.
RUN_DIR = Path(os.environ.get("TELEMETRY_LAB_RUN_DIR", "/run/telemetry-lab"))
EXEC_ROOT = RUN_DIR / "x"
SOCKET = RUN_DIR / "docker.sock"
PIDFILE = RUN_DIR / "dockerd.pid"
DOCKERD_LOG = LAB_DIR / "dockerd.log"

# A bridge of our own (not docker0): a system Docker may own docker0, and a bridge we create is one
# we know we may delete. 172.31.254.0/24 is private and unlikely to be a host's LAN.
BRIDGE = os.environ.get("TELEMETRY_LAB_BRIDGE", "tlab0")
BRIDGE_ADDRESS = os.environ.get("TELEMETRY_LAB_BRIDGE_ADDRESS", "172.31.254.1/24")
CONTAINER = "telemetry-lab"
HOSTNAME = "lab"
IMAGE_REPO = "telemetry-lab/debian"
SUITE = "bookworm"
# What a Debian 12 server has that minbase lacks, and no more: the deploy installs the rest, which is
# the point of the lab (a fresh host, provisioned by pyinfra alone).
PACKAGES = (
    "systemd-sysv",
    "udev",
    "openssh-server",
    "python3",
    "sudo",
    "ca-certificates",
    "iproute2",
    "ifupdown",
    "kmod",
)
# Bump when the rootfs recipe below changes: the cached tarball's name includes it.
RECIPE_VERSION = "1"
SSH_WAIT_SECONDS = 120.0


class LabError(Exception):
    """Something an operator can act on; printed without a traceback by the CLI."""


# --- output -------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Print each phase's duration: the issue asks for it, and it shows where a slow run spends time."""
    say(f"{name} ...")
    start = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - start
        if timings is not None:
            timings[name] = elapsed
        say(f"{name}: {elapsed:.1f} s")


def run(cmd: list[str], *, check: bool = True, capture: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, text=True, capture_output=capture, check=False, **kwargs)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip()[-2000:] if capture else ""
        raise LabError(f"{' '.join(cmd[:4])} ... failed with exit {result.returncode}: {detail}")
    return result


# --- state --------------------------------------------------------------------------------------
@dataclass
class LabState:
    ssh_port: int = 0
    # Target port -> 127.0.0.1 port on this machine, for the inventory's public ports (TLS MQTT, HTTPS).
    published: dict[str, int] = field(default_factory=dict)
    ssh_key: str = str(SSH_KEY)
    ssh_config: str = str(SSH_CONFIG)
    container: str = CONTAINER
    image: str = ""
    socket: str = str(SOCKET)
    # Only what we started / created ourselves; None or False = it was there before, leave it alone.
    dockerd_pid: int | None = None
    bridge_created: bool = False
    ip_forward_before: str | None = None
    iptables_before: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        LAB_DIR.mkdir(parents=True, exist_ok=True)
        tmp = STATE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(STATE_FILE)

    @classmethod
    def load(cls) -> LabState | None:
        try:
            raw = json.loads(STATE_FILE.read_text())
        except (OSError, ValueError):
            return None
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# --- rootfs -------------------------------------------------------------------------------------
def apt_mirrors() -> tuple[str, str]:
    """(Debian mirror, security mirror) that apt on this machine already uses: whatever reaches the
    registry here reaches it from the target too. TELEMETRY_DEBIAN_MIRROR overrides."""
    main = os.environ.get("TELEMETRY_DEBIAN_MIRROR")
    security = os.environ.get("TELEMETRY_DEBIAN_SECURITY_MIRROR")
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text())
    uris = re.findall(r"(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+)", "\n".join(texts), re.MULTILINE)
    for uri in uris:
        uri = uri.rstrip("/")
        if uri.endswith("/debian-security") and not security:
            security = uri
        elif uri.endswith("/debian") and not main:
            main = uri
    return main or "http://deb.debian.org/debian", security or "http://deb.debian.org/debian-security"


def rootfs_tarball() -> Path:
    """The cached rootfs tarball, built with debootstrap on first use (a few minutes, then reused)."""
    mirror, security = apt_mirrors()
    key = hashlib.sha256(f"{RECIPE_VERSION} {SUITE} {mirror} {security} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    tarball = CACHE_DIR / f"rootfs-{SUITE}-{key}.tar"
    if tarball.exists():
        say(f"rootfs: reusing {tarball}")
        return tarball
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise LabError("debootstrap is not installed: run `make deps`")
    DEBS.mkdir(parents=True, exist_ok=True)  # debootstrap refuses a missing --cache-dir
    build = CACHE_DIR / "rootfs.build"
    shutil.rmtree(build, ignore_errors=True)
    say(f"rootfs: debootstrap {SUITE} from {mirror} (cached in {DEBS})")
    run(
        [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", f"--cache-dir={DEBS}",
         SUITE, str(build), mirror],
        timeout=1800,
    )  # fmt: skip
    (build / "etc/apt/sources.list").write_text(
        f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\ndeb {security} {SUITE}-security main\n"
    )
    (build / "etc/hostname").write_text(f"{HOSTNAME}\n")
    (build / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}.telemetry.test {HOSTNAME}\n")
    # systemd creates a fresh machine-id on first boot when the file is empty (not when missing).
    (build / "etc/machine-id").write_text("")
    run(["chroot", str(build), "apt-get", "clean"])
    tmp = tarball.with_suffix(".tmp")
    run(["tar", "-C", str(build), "--numeric-owner", "-cf", str(tmp), "."])
    tmp.replace(tarball)
    shutil.rmtree(build, ignore_errors=True)
    for old in CACHE_DIR.glob(f"rootfs-{SUITE}-*.tar"):
        if old != tarball:
            old.unlink()
    return tarball


# --- ssh ----------------------------------------------------------------------------------------
def ensure_ssh_key() -> Path:
    if not SSH_KEY.exists():
        LAB_DIR.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "telemetry-lab", "-f", str(SSH_KEY)])
    return SSH_KEY


def write_ssh_config(port: int) -> Path:
    # A file of its own, passed with -F / --ssh-config: nothing in ~/.ssh changes. Host keys are not
    # checked because the target is rebuilt at will and reachable on 127.0.0.1 only.
    SSH_CONFIG.write_text(
        f"Host lab {HOSTNAME}.telemetry.test 127.0.0.1\n"
        "  HostName 127.0.0.1\n"
        f"  Port {port}\n"
        "  User root\n"
        f"  IdentityFile {SSH_KEY}\n"
        "  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
        "  LogLevel ERROR\n"
        "  ConnectTimeout 10\n"
    )
    return SSH_CONFIG


def ssh(command: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(["ssh", "-F", str(SSH_CONFIG), "lab", command], check=check, timeout=timeout)


def _ssh_banner(port: int) -> bool:
    """docker-proxy accepts a TCP connection before sshd is up, then closes it: only a banner counts."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.settimeout(3)
            return conn.recv(16).startswith(b"SSH-")
    except OSError:
        return False


def wait_for_ssh(port: int, timeout: float = SSH_WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ssh_banner(port) and ssh("true", check=False, timeout=20).returncode == 0:
            return
        time.sleep(0.5)
    raise LabError(f"sshd did not answer on 127.0.0.1:{port} within {timeout:.0f} s (docker logs {CONTAINER})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- docker -------------------------------------------------------------------------------------
def docker_bin() -> str:
    # Debian's docker.io client matches its daemon; another `docker` earlier on PATH may be newer and
    # negotiate an API version the 20.10 daemon lacks.
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")


def docker(*args: str, check: bool = True, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}"}
    return run([docker_bin(), *args], check=check, timeout=timeout, env=env, **kwargs)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): count it as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def _daemon_answers() -> bool:
    return (
        SOCKET.exists()
        and docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10).returncode == 0
    )


def _iptables_save() -> str:
    return run(["iptables-save"], check=False).stdout


def ensure_bridge(state: LabState) -> None:
    if run(["ip", "link", "show", BRIDGE], check=False).returncode == 0:
        return
    run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    state.bridge_created = True
    state.save()
    run(["ip", "addr", "add", BRIDGE_ADDRESS, "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def start_dockerd(state: LabState) -> None:
    """Our own dockerd: own data root, exec root, socket and bridge, so a system Docker (if any) and
    this lab never see each other's containers, and teardown can stop it by pid."""
    if _pid_alive(state.dockerd_pid) and _daemon_answers():
        say(f"dockerd: reusing pid {state.dockerd_pid}")
        return
    if not shutil.which("dockerd"):
        raise LabError("dockerd is not installed (Debian package docker.io): run `make deps`")
    if PIDFILE.exists():
        stale = int(PIDFILE.read_text().strip() or 0)
        if _pid_alive(stale):
            raise LabError(f"a dockerd (pid {stale}) already uses {PIDFILE}: run `make lab-down` first")
        PIDFILE.unlink()
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    if state.iptables_before is None:
        state.iptables_before = _iptables_save()
    if state.ip_forward_before is None:
        state.ip_forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    state.save()
    ensure_bridge(state)
    log = DOCKERD_LOG.open("ab")
    proc = subprocess.Popen(
        ["dockerd", "--data-root", str(DATA_ROOT), "--exec-root", str(EXEC_ROOT), "-H", f"unix://{SOCKET}",
         "--pidfile", str(PIDFILE), "--bridge", BRIDGE, "--log-level", "warn"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        # Its own session: a Ctrl-C in `make lab` must not kill the daemon under a running target.
        start_new_session=True,
    )  # fmt: skip
    state.dockerd_pid = proc.pid
    state.save()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"dockerd exited with {proc.returncode}; see {DOCKERD_LOG}")
        if _daemon_answers():
            return
        time.sleep(0.3)
    raise LabError(f"dockerd did not answer on {SOCKET} within 60 s; see {DOCKERD_LOG}")


def ensure_image(tarball: Path) -> str:
    tag = f"{IMAGE_REPO}:{tarball.stem.removeprefix('rootfs-')}"
    if docker("image", "inspect", tag, check=False).returncode == 0:
        say(f"image: reusing {tag}")
        return tag
    with tarball.open("rb") as stream:
        env = {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}"}
        result = subprocess.run(
            [docker_bin(), "import", "-", tag], stdin=stream, env=env, capture_output=True, text=True
        )
    if result.returncode != 0:
        raise LabError(f"docker import failed: {result.stderr.strip()}")
    return tag


def _authorized_keys_tar() -> bytes:
    """/root/.ssh with our public key, as a tar stream for `docker cp`: the key is not baked into the
    image, so a new key never invalidates the cached image."""
    public = (SSH_KEY.with_suffix(".pub")).read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo(".ssh")
        d.type, d.mode, d.uid, d.gid = tarfile.DIRTYPE, 0o700, 0, 0
        tar.addfile(d)
        f = tarfile.TarInfo(".ssh/authorized_keys")
        f.size, f.mode, f.uid, f.gid = len(public), 0o600, 0, 0
        tar.addfile(f, io.BytesIO(public))
    return buf.getvalue()


def run_container(image: str, port: int, published: dict[str, int]) -> str:
    """The recipe of shared/lab-target.md, plus a stop signal systemd understands (SIGRTMIN+3 is its
    'halt'), so `docker restart` shuts services down cleanly instead of waiting 10 s and killing."""
    docker("rm", "-f", "-v", CONTAINER, check=False)
    cid = docker(
        "create", "--name", CONTAINER, "--hostname", HOSTNAME,
        "--cap-add=ALL", "--cap-drop=SYS_RESOURCE",
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--tmpfs", "/run", "--tmpfs", "/run/lock",
        "-v", "/var/lib/docker",
        "-p", f"127.0.0.1:{port}:22",
        *[f"-p=127.0.0.1:{host_port}:{target_port}" for target_port, host_port in sorted(published.items())],
        "--stop-signal", "SIGRTMIN+3",
        image, "/sbin/init",
    ).stdout.strip()  # fmt: skip
    env = {**os.environ, "DOCKER_HOST": f"unix://{SOCKET}"}
    subprocess.run(
        [docker_bin(), "cp", "-", f"{CONTAINER}:/root/"], input=_authorized_keys_tar(), env=env, check=True,
        capture_output=True,
    )  # fmt: skip
    docker("start", CONTAINER)
    return cid


def restart_container(state: LabState) -> None:
    docker("restart", "-t", "30", state.container, timeout=120)
    wait_for_ssh(state.ssh_port)


# --- up / down ----------------------------------------------------------------------------------
def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (dockerd, bridge, iptables): run it as root or with sudo")
    if not Path("/sys/fs/cgroup").is_dir():
        raise LabError("/sys/fs/cgroup is missing: systemd in the target needs it")


def up(public_ports: list[int], timings: dict[str, float] | None = None) -> LabState:
    """Bring the target up (or reuse a running one) and return its state. ``public_ports`` are the
    target ports published on 127.0.0.1 besides SSH (what the inventory opens to the world)."""
    require_root()
    state = LabState.load() or LabState()
    with phase("ssh key", timings):
        ensure_ssh_key()
    with phase("rootfs (debootstrap, cached)", timings):
        tarball = rootfs_tarball()
    with phase("dockerd", timings):
        start_dockerd(state)
    with phase("image (docker import, cached)", timings):
        state.image = ensure_image(tarball)
        state.save()
    running = docker("inspect", "-f", "{{.State.Running}} {{.Config.Image}}", CONTAINER, check=False).stdout.strip()
    wanted = sorted(str(p) for p in public_ports)
    same_ports = sorted(state.published) == wanted
    if state.ssh_port and same_ports and running == f"true {state.image}" and _ssh_banner(state.ssh_port):
        say(f"target: reusing container {CONTAINER} on 127.0.0.1:{state.ssh_port}")
        write_ssh_config(state.ssh_port)
        return state
    with phase("target container boot + sshd", timings):
        state.ssh_port = int(os.environ.get("LAB_SSH_PORT") or free_port())
        state.published = {port: free_port() for port in wanted}
        state.save()
        write_ssh_config(state.ssh_port)
        run_container(state.image, state.ssh_port, state.published)
        wait_for_ssh(state.ssh_port)
    say(f"target up: ssh -F {SSH_CONFIG} lab")
    return state


def _iptables_cleanup(before: str) -> None:
    """Remove what dockerd added to the host's netfilter: rules and DOCKER* chains that were not in the
    snapshot taken before it started and that are Docker's (chain names, our bridge) -- nothing else."""
    table = ""
    before_lines = set(before.splitlines())
    rules: list[tuple[str, str]] = []
    chains: list[tuple[str, str]] = []
    for line in _iptables_save().splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line in before_lines:
            continue
        elif line.startswith("-A ") and ("DOCKER" in line or BRIDGE in line):
            rules.append((table, line[3:]))
        elif line.startswith(":DOCKER"):
            chains.append((table, line[1:].split()[0]))
    for tbl, rule in rules:
        run(["iptables", "-t", tbl, "-D", *_split_rule(rule)], check=False)
    # dockerd sets the FORWARD policy to DROP when it turns on forwarding: put back what was there.
    table = ""
    for line in before.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif m := re.match(r"^:(INPUT|FORWARD|OUTPUT|PREROUTING|POSTROUTING) (ACCEPT|DROP) ", line):
            run(["iptables", "-t", table, "-P", m.group(1), m.group(2)], check=False)
    for tbl, chain in chains:
        run(["iptables", "-t", tbl, "-F", chain], check=False)
    for tbl, chain in chains:
        run(["iptables", "-t", tbl, "-X", chain], check=False)


def _split_rule(rule: str) -> list[str]:
    import shlex

    return shlex.split(rule)


def _reap(pid: int) -> None:
    # When this very process started the daemon (the end-to-end test), it must reap it too.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _stop_pid(pid: int, timeout: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        _reap(pid)
        time.sleep(0.2)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap(pid)


def down() -> None:
    """Remove the container, stop the dockerd we started (by pid), undo its bridge and netfilter rules."""
    state = LabState.load()
    if state is None:
        say("nothing to tear down (no .cache/lab/state.json)")
        return
    with phase("remove target container"):
        if _pid_alive(state.dockerd_pid) and _daemon_answers():
            docker("rm", "-f", "-v", state.container, check=False, timeout=120)
    with phase("stop dockerd"):
        if state.dockerd_pid:
            _stop_pid(state.dockerd_pid)
    with phase("host network cleanup"):
        if state.iptables_before is not None:
            _iptables_cleanup(state.iptables_before)
        if state.bridge_created:
            run(["ip", "link", "delete", BRIDGE], check=False)
        if state.ip_forward_before is not None:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(state.ip_forward_before + "\n")
    # Leftovers of a killed daemon would make the next start refuse (stale pidfile, socket).
    for path in (PIDFILE, SOCKET):
        path.unlink(missing_ok=True)
    if state.dockerd_pid and not _pid_alive(state.dockerd_pid):
        shutil.rmtree(EXEC_ROOT, ignore_errors=True)
        with contextlib.suppress(OSError):
            RUN_DIR.rmdir()
    STATE_FILE.unlink(missing_ok=True)
    say("lab down: no container, no dockerd, bridge and iptables rules removed (image cache kept in .cache/lab)")


def status() -> dict[str, Any]:
    state = LabState.load()
    if state is None:
        return {"up": False}
    running = _pid_alive(state.dockerd_pid) and _daemon_answers()
    container = (
        docker("inspect", "-f", "{{.State.Status}}", state.container, check=False).stdout.strip() if running else ""
    )
    return {"up": container == "running", "dockerd": running, "container": container or None, **asdict(state)}
