"""Run a deploy in-process against pyinfra's ``@fake`` connector and read back what it would do.

The inventory is loaded the way the CLI loads it (``pyinfra_cli.inventory.make_inventory``, so
``group_data/`` applies), then every host is re-created as ``@fake/<name>`` carrying its merged data,
so roles see exactly the operator's data but nothing leaves the process. Facts come from
``fake_responses`` (substring -> output); unmatched commands print nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from io import StringIO
from pathlib import Path
from typing import Any

from pyinfra.api.command import FileUploadCommand, StringCommand
from pyinfra.api.config import Config
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State
from pyinfra.context import ctx_host, ctx_state

REPO = Path(__file__).resolve().parents[2]
TEST_VAULT_DIR = "tests/fixtures/vault"
TEST_VAULT_PASSWORD = REPO / "tests/fixtures/vault/password"

# A live Debian 12 host with systemd, 4 GiB of memory and a writable /proc/sys.
LIVE_HOST: dict[str, Any] = {
    "test -e /run/systemd/system": [
        "user=root group=root mode=drwxr-xr-x atime=0 mtime=0 ctime=0 size=40 '/run/systemd/system'"
    ],
    "/proc/sys/net/core/somaxconn": ["writable"],
    "/proc/meminfo": ["4096"],
}
# A chroot / image build: no systemd, read-only /proc/sys, no meminfo.
NO_SYSTEMD_HOST: dict[str, Any] = {
    "/proc/sys/net/core/somaxconn": ["read-only"],
}


@dataclass
class Op:
    names: set[str]
    commands: list[str] = field(default_factory=list)
    uploads: dict[str, str] = field(default_factory=dict)  # remote path -> content

    @property
    def name(self) -> str:
        return sorted(self.names)[0]


@dataclass
class HostResult:
    name: str
    data: dict[str, Any]
    ops: list[Op]

    @property
    def files(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for op in self.ops:
            out.update(op.uploads)
        return out

    @property
    def commands(self) -> list[str]:
        return [c for op in self.ops for c in op.commands]

    def op_names(self) -> list[str]:
        """Reliable for single-host inventories only: in API mode pyinfra hashes operations by their
        position, so hosts with different operation lists share hashes and their names mix."""
        return [op.name for op in self.ops]


@contextmanager
def vault_env(password_file: Path = TEST_VAULT_PASSWORD) -> Iterator[None]:
    old = os.environ.get("TELEMETRY_VAULT_PASSWORD_FILE")
    os.environ["TELEMETRY_VAULT_PASSWORD_FILE"] = str(password_file)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TELEMETRY_VAULT_PASSWORD_FILE", None)
        else:
            os.environ["TELEMETRY_VAULT_PASSWORD_FILE"] = old


def load_inventory_data(
    inventory: str, override: dict[str, Any] | None = None
) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """``{host name: (groups, merged data)}`` as the CLI would build them."""
    from pyinfra_cli.inventory import make_inventory  # type: ignore[import-untyped]

    with ctx_state.use(State()):
        inv = make_inventory(str(REPO / "inventories" / f"{inventory}.py"), cwd=str(REPO))
    out = {}
    for host in inv:
        data = dict(host.data.dict())
        data.update(override or {})
        out[host.name] = (list(host.groups), data)
    return out


def fake_state(
    inventory: str,
    *,
    override: dict[str, Any] | None = None,
    responses: dict[str, Any] | None = None,
) -> State:
    hosts = load_inventory_data(inventory, {"vault_dir": TEST_VAULT_DIR, **(override or {})})
    host_list = []
    groups: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for name, (host_groups, data) in hosts.items():
        data = {
            **data,
            "fqdn": data.get("fqdn") or name,
            "fake_delay": 0,
            "fake_delay_jitter": 0,
            "fake_responses": dict(LIVE_HOST if responses is None else responses),
        }
        host_list.append((f"@fake/{name}", data))
        for g in host_groups:
            groups.setdefault(g, ([], {}))[0].append(f"@fake/{name}")
    inv = Inventory((host_list, {}), **groups)  # type: ignore[no-untyped-call]
    state = State(inv, Config())  # type: ignore[no-untyped-call]
    connect_all(state)
    return state


def _command_text(cmd: Any) -> str:
    if isinstance(cmd, StringCommand):
        return str(cmd.get_raw_value())
    return repr(cmd)


def collect(state: State) -> dict[str, HostResult]:
    results = {}
    for host in state.inventory:
        ops = []
        for op_hash in host.op_hash_order:
            op_data = state.get_op_data_for_host(host, op_hash)
            op = Op(names=set(state.get_op_meta(op_hash).names))
            with ctx_state.use(state), ctx_host.use(host):
                for cmd in op_data.command_generator():
                    if isinstance(cmd, FileUploadCommand):
                        src = cmd.src
                        if isinstance(src, StringIO):
                            op.uploads[cmd.dest] = src.getvalue()
                        else:
                            raw = Path(str(src)).read_bytes()
                            try:
                                op.uploads[cmd.dest] = raw.decode()
                            except UnicodeDecodeError:  # a wheel, an archive: its digest stands in
                                op.uploads[cmd.dest] = f"<binary: {len(raw)} bytes, sha256 {sha256(raw).hexdigest()}>"
                    else:
                        op.commands.append(_command_text(cmd))
            ops.append(op)
        data = dict(host.data.dict())  # type: ignore[no-untyped-call]
        results[host.name.removeprefix("@fake/")] = HostResult(host.name, data, ops)
    return results


def run_deploys(
    inventory: str,
    deploys: list[Callable[[], Any]],
    *,
    override: dict[str, Any] | None = None,
    responses: dict[str, Any] | None = None,
) -> dict[str, HostResult]:
    """Build the state, add each deploy for every host it applies to, return per-host results."""
    with vault_env():
        state = fake_state(inventory, override=override, responses=responses)
        for fn in deploys:
            add_deploy(state, fn)
        return collect(state)


def in_group(group: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """Apply a role deploy only to hosts of ``group`` (as deploys/ does through roles.plan)."""
    from pyinfra.context import host

    def _deploy() -> None:
        if group in host.groups:
            fn()

    return _deploy
