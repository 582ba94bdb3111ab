"""The base and database roles deployed for real onto a debootstrapped Debian 12 root, twice.

Proves the roles run where systemd is not PID 1 (an image build) and that a second deploy changes
nothing. Slow (debootstrap once, then apt inside the root): set TELEMETRY_SKIP_CHROOT=1 to skip it in
quick local runs; CI runs it. The minbase root is cached as .cache/chroot/bookworm-minbase.tar.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.inventory import Inventory
from pyinfra.api.operations import run_ops
from pyinfra.api.state import State

from roles import secrets as vault
from roles.base import base
from roles.database_postgresql import database_postgresql
from tests.support.deploy_fake import REPO, TEST_VAULT_DIR, load_inventory_data, vault_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.environ.get("TELEMETRY_SKIP_CHROOT") == "1", reason="TELEMETRY_SKIP_CHROOT=1"),
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot and debootstrap need root"),
]

CACHE = REPO / ".cache/chroot"
TARBALL = CACHE / "bookworm-minbase.tar"
MIRROR = os.environ.get("TELEMETRY_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def _rootfs_tarball() -> Path:
    if TARBALL.exists():
        return TARBALL
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    assert Path(debootstrap).exists(), "debootstrap not installed: run `make deps`"
    (CACHE / "debs").mkdir(parents=True, exist_ok=True)  # debootstrap refuses a missing cache dir
    build = CACHE / "build"
    shutil.rmtree(build, ignore_errors=True)
    subprocess.run(
        [debootstrap, "--variant=minbase", "--include=ca-certificates", f"--cache-dir={CACHE / 'debs'}",
         "bookworm", str(build), MIRROR],
        check=True, capture_output=True, timeout=1200,
    )  # fmt: skip
    (build / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} bookworm main\ndeb {MIRROR} bookworm-updates main\n"
        "deb http://deb.debian.org/debian-security bookworm-security main\n"
    )
    subprocess.run(["chroot", str(build), "apt-get", "clean"], check=True, capture_output=True)
    tmp = TARBALL.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        tar.add(build, arcname=".")
    tmp.rename(TARBALL)
    shutil.rmtree(build, ignore_errors=True)
    return TARBALL


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("chroot")
    with tarfile.open(_rootfs_tarball()) as tar:
        tar.extractall(target, filter="fully_trusted")  # noqa: S202 -- our own tarball
    # What an image build does: package scripts must not start services, and DNS must work.
    policy = target / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    shutil.copy("/etc/resolv.conf", target / "etc/resolv.conf")
    return target


def _deploy(root: Path) -> tuple[int, list[str]]:
    """One full deploy of base + database_postgresql; returns (changed ops, their names)."""
    ((_, data),) = load_inventory_data("lab", {"vault_dir": TEST_VAULT_DIR}).values()
    # the lab's SSH connection settings mean nothing to the chroot connector
    connector = {"ssh_hostname", "ssh_port", "ssh_user", "ssh_key", "ssh_known_hosts_file"}
    data = {k: val for k, val in data.items() if k not in connector and k != "ssh_strict_host_key_checking"}
    name = f"@chroot{root}"
    inventory = Inventory(([(name, data)], {}), databases=([name], {}), lab=([name], {}))  # type: ignore[no-untyped-call]
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    vault.clear_cache()
    with vault_env():
        connect_all(state)
        add_deploy(state, base)
        add_deploy(state, database_postgresql)
        run_ops(state)
    (host,) = list(state.inventory)
    assert state.get_results_for_host(host).error_ops == 0
    changed = []
    for op_hash in host.op_hash_order:
        meta: Any = state.get_op_data_for_host(host, op_hash).operation_meta
        if meta.did_change():
            changed.append(sorted(state.get_op_meta(op_hash).names)[0])
    return len(changed), changed


def test_deploy_twice_second_run_changes_nothing(root: Path) -> None:
    first, _ = _deploy(root)
    assert first > 0
    assert (root / "etc/ssh/sshd_config.d/10-telemetry.conf").is_file()
    assert (root / "etc/postgresql/15/main/pg_hba.conf").is_file()
    assert oct((root / "etc/telemetry/database-roles.sql").stat().st_mode & 0o777) == "0o600"
    status = (root / "var/lib/dpkg/status").read_text()
    for package in ("postgresql-15", "fail2ban", "ufw", "openssh-server", "unattended-upgrades"):
        assert f"Package: {package}\nStatus: install ok installed" in status, package
    assert "\nops:" in "\n" + (root / "etc/passwd").read_text()
    second, names = _deploy(root)
    assert second == 0, names
