"""pytest-testinfra suite of a deployed host: read-only checks of what the deploy promised.

Runs against any host (``--hosts`` is testinfra's option); expectations come from the inventory and
group data the deploy used, loaded the way pyinfra's CLI loads them:

    pytest tests/infra --hosts=ssh://root@127.0.0.1:PORT --ssh-config=.cache/lab/ssh_config   # the lab
    pytest tests/infra --hosts=ssh://ops@server --sudo --inventory=prod --inventory-host=server  # prod

Without ``--hosts`` every test is skipped: this tier is not part of the plain ``pytest`` run (it is
not in ``testpaths`` either); tests/lab runs it against the lab target.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tools.lab.inventory import InventoryHost, load_host


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("telemetry infra")
    group.addoption("--inventory", default="lab", help="inventories/<NAME>.py the host was deployed from")
    group.addoption("--inventory-host", default=None, help="host name in that inventory (if it has several)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("hosts", default=None):
        return
    skip = pytest.mark.skip(reason="tests/infra checks a deployed host: pass --hosts=ssh://USER@HOST[:PORT]")
    for item in items:
        if "tests/infra" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def expected(pytestconfig: pytest.Config) -> InventoryHost:
    """The deployed host's inventory entry: groups, merged group data, roles, firewall ports."""
    return load_host(pytestconfig.getoption("inventory"), pytestconfig.getoption("inventory_host"))


@pytest.fixture(scope="session")
def data(expected: InventoryHost) -> dict[str, Any]:
    return expected.data


@pytest.fixture(scope="module")
def in_container(host: Any) -> bool:
    """Some promises cannot hold in a container (time sync, sysctl): those checks say so and skip."""
    return bool(host.run("systemd-detect-virt --container --quiet").rc == 0)
