"""The role framework: change tracking drives restarts, systemd ops vanish without systemd."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from pyinfra.api.deploy import add_deploy
from pyinfra.api.operations import run_ops

from roles._base import Role, RoleError, render, role_deploy
from tests.support.deploy_fake import LIVE_HOST, NO_SYSTEMD_HOST, collect, fake_state, vault_env

CONTENT = "setting = 1\n"
# systemctl show answers: the unit is running and enabled, so only a restart can appear.
RUNNING = {
    "--property SubState demo.service": ["Id=demo.service", "SubState=running"],
    "--property UnitFileState demo.service": ["Id=demo.service", "UnitFileState=enabled"],
}


class Demo(Role):
    name = "demo"

    def configure(self) -> None:
        self.put(CONTENT, "/etc/demo.conf", key="config")

    def activate(self) -> None:
        self.service("demo", restart_if=self.changed("config"))


def _executed(responses: dict[str, Any]) -> list[str]:
    """Run the Demo role for real against the fake connector; return the commands it executed."""
    with vault_env():
        state = fake_state("lab", responses=responses)
        add_deploy(state, role_deploy(Demo))
        run_ops(state)
        host = next(iter(state.inventory))
        return list(host.connector.executed_commands)


def test_restart_follows_a_changed_file() -> None:
    commands = _executed({**LIVE_HOST, **RUNNING})
    assert any("systemctl restart demo.service" in c for c in commands)


def test_nothing_restarts_when_the_file_is_unchanged() -> None:
    sha1 = hashlib.sha1(CONTENT.encode()).hexdigest()  # noqa: S324 -- pyinfra's own file checksum
    responses = {
        **LIVE_HOST,
        **RUNNING,
        # the remote file exists with identical content, so files.put has nothing to do
        re.compile(r"stat -c .* /etc/demo\.conf"): [
            "user=root group=root mode=-rw-r--r-- atime=0 mtime=0 ctime=0 size=12 '/etc/demo.conf'"
        ],
        re.compile(r"sha1sum .*/etc/demo\.conf"): [f"{sha1}  /etc/demo.conf"],
        re.compile(r"stat -c .* /etc( |$)"): [
            "user=root group=root mode=drwxr-xr-x atime=0 mtime=0 ctime=0 size=12 '/etc'"
        ],
    }
    commands = _executed(responses)
    assert not any("/etc/demo.conf" in c and "chmod" in c for c in commands)  # nothing uploaded
    assert any("SubState demo.service" in c for c in commands)  # the service op did run
    assert not any("restart demo" in c for c in commands)


def test_service_operations_are_skipped_without_systemd() -> None:
    with vault_env():
        state = fake_state("lab", responses=NO_SYSTEMD_HOST)
        add_deploy(state, role_deploy(Demo))
        (result,) = collect(state).values()
    assert not any("systemctl" in c for c in result.commands)
    assert "/etc/demo.conf" in result.files


def test_secret_files_refuse_wide_modes() -> None:
    class Leaky(Role):
        name = "leaky"

        def configure(self) -> None:
            self.put("x", "/etc/leak", key="s", mode="0644", secret=True)

    with vault_env(), pytest.raises(RoleError, match="max 0640"):
        state = fake_state("lab")
        add_deploy(state, role_deploy(Leaky))


def test_templates_fail_on_missing_variables() -> None:
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        render("base/sudoers.j2")
