"""Inventories and group data: shapes, documentation, and nothing exported by accident."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pyinfra.api import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import _get_group_data

from tests.support.deploy_fake import REPO, load_inventory_data

GROUP_DATA = sorted((REPO / "group_data").glob("*.py"))
PLAIN = (str, int, float, bool, list, dict, type(None))


@pytest.mark.parametrize("path", GROUP_DATA, ids=lambda p: p.name)
def test_group_data_exports_only_plain_settings(path: Path) -> None:
    with ctx_state.use(State()):
        data = _get_group_data(str(path))[path.stem]
    assert data, f"{path.name} exports nothing"
    for key, value in data.items():
        assert not key.startswith("_"), f"{path.name}: temporary {key} would become host data"
        assert isinstance(value, PLAIN), f"{path.name}: {key} is a {type(value).__name__}"


@pytest.mark.parametrize("path", GROUP_DATA, ids=lambda p: p.name)
def test_every_setting_has_a_comment(path: Path) -> None:
    lines = path.read_text().splitlines()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{path.name}:{node.lineno}: only assignments belong here"
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        same = lines[node.lineno - 1]
        documented = above.startswith("#") or "#" in same
        # a setting directly below another documented one of the same block shares its comment
        if not documented and node.lineno > 1:
            documented = bool(above) and not above.startswith("#")
        assert documented, f"{path.name}:{node.lineno}: {ast.unparse(node.targets[0])} has no comment"


@pytest.mark.parametrize(
    ("inventory", "counts"),
    [
        ("prod", {"brokers": 1, "databases": 1, "ingest": 1}),
        ("staging", {"brokers": 1, "databases": 1, "ingest": 1}),
        ("lab", {"brokers": 1, "databases": 1, "ingest": 1}),
        ("cluster-example", {"brokers": 3, "databases": 1, "ingest": 2}),
    ],
)
def test_inventory_shapes(inventory: str, counts: dict[str, int]) -> None:
    hosts = load_inventory_data(inventory)
    for group, n in counts.items():
        assert sum(group in groups for groups, _ in hosts.values()) == n
    for name, (_, data) in hosts.items():
        assert "." in name, "host names are FQDNs: the EMQX node name is built from them"
        assert data["environment"] == inventory


def test_lab_uses_the_small_site_stack() -> None:
    ((_, data),) = load_inventory_data("lab").values()
    assert (data["broker_backend"], data["database_backend"], data["docker_source"]) == (
        "mosquitto",
        "postgresql",
        "debian",
    )
