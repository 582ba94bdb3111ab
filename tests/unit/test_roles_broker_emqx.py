"""broker_emqx: operations and files for prod, lab-like and cluster inventories, validated for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.schema import EMQX_AUTHN_QUERY, EMQX_AUTHZ_QUERY
from roles._base import RoleError
from roles.broker_emqx import broker_emqx, password_hash_hocon
from roles.stack import compose_project  # noqa: F401 -- the role's unit comes from here
from tests.support import deploy_validators as v
from tests.support.deploy_fake import in_group, load_inventory_data, run_deploys

D = "/srv/telemetry/emqx"


def project_files(files: dict[str, str]) -> dict[str, str]:
    return {
        "compose.yaml": files[f"{D}/compose.yaml"],
        "secrets.env": files[f"{D}/secrets.env"],
        "dashboard.env": files[f"{D}/dashboard.env"],
    }


@pytest.fixture(scope="module")
def prod() -> dict[str, str]:
    (result,) = run_deploys("prod", [broker_emqx]).values()
    return result.files


@pytest.fixture(scope="module")
def cluster() -> dict[str, dict[str, str]]:
    results = run_deploys("cluster-example", [in_group("brokers", broker_emqx)])
    return {name: r.files for name, r in results.items() if f"{D}/etc/emqx.conf" in r.files}


def test_prod_files_pass_the_contract(prod: dict[str, str], tmp_path: Path) -> None:
    env = {**v.env_file(prod[f"{D}/secrets.env"]), **v.env_file(prod[f"{D}/dashboard.env"])}
    conf = v.emqx_contract_ok(prod[f"{D}/etc/emqx.conf"], prod[f"{D}/etc/base.hocon"], env)
    assert conf.get("node.name") == "emqx@telemetry.example.net"
    assert conf.get("cluster.discovery_strategy") == "manual"
    assert conf.get("authentication")[0]["query"] == EMQX_AUTHN_QUERY
    assert conf.get("authorization.sources")[0]["query"] == EMQX_AUTHZ_QUERY
    assert conf.get("dashboard.listeners.http.bind") == "127.0.0.1:18083"
    assert conf.get("listeners.ssl.default.bind") == "0.0.0.0:8883"
    assert conf.get("listeners.wss.default.bind") == "0.0.0.0:8084"
    assert conf.get("listeners.ws.default.enable") is False
    assert conf.get("mqtt.max_inflight") >= 2 * 500
    assert conf.get("authentication")[0]["password_hash_algorithm"]["name"] == "sha256"
    v.compose_env_escaped(prod[f"{D}/compose.yaml"])
    v.compose_config_ok(project_files(prod), tmp_path)


def test_compose_pins_the_image_and_health(prod: dict[str, str]) -> None:
    import yaml

    svc = yaml.safe_load(prod[f"{D}/compose.yaml"])["services"]["emqx"]
    assert svc["image"] == "emqx/emqx:5.8.8"
    assert svc["healthcheck"]["test"] == ["CMD", "/opt/emqx/bin/emqx", "ctl", "status"]
    assert svc["environment"]["EMQX_NODE_NAME"] == "emqx@telemetry.example.net"
    assert "ports" not in svc  # host networking: bind addresses in emqx.conf are the truth


def test_secrets_are_not_in_world_readable_files(prod: dict[str, str]) -> None:
    cookie = v.env_file(prod[f"{D}/secrets.env"])["EMQX_NODE__COOKIE"]
    for path, content in prod.items():
        if cookie in content:
            assert path == f"{D}/secrets.env"
    key_line = prod[f"{D}/etc/api_keys.txt"].strip()
    assert key_line.endswith(":administrator") and key_line.count(":") == 2


def test_modes_of_secret_files() -> None:
    (result,) = run_deploys("prod", [broker_emqx]).values()
    for op in result.ops:
        for path in op.uploads:
            if path.endswith((".env", "api_keys.txt")):
                assert any("chmod 600" in c for c in op.commands), path


def test_cluster_has_static_seeds(cluster: dict[str, dict[str, str]], tmp_path: Path) -> None:
    assert len(cluster) == 3
    seeds = None
    for files in cluster.values():
        env = {**v.env_file(files[f"{D}/secrets.env"]), **v.env_file(files[f"{D}/dashboard.env"])}
        conf = v.emqx_contract_ok(files[f"{D}/etc/emqx.conf"], files[f"{D}/etc/base.hocon"], env)
        assert conf.get("cluster.discovery_strategy") == "static"
        seeds = seeds or conf.get("cluster.static.seeds")
        assert conf.get("cluster.static.seeds") == seeds
        assert conf.get("node.name") in seeds
        # the database is on another host: its private address
        assert conf.get("authentication")[0]["server"] == "10.0.0.31:5432"
    assert seeds is not None and len(seeds) == 3
    v.compose_config_ok(project_files(next(iter(cluster.values()))), tmp_path)


def test_unit_validates(prod: dict[str, str], tmp_path: Path) -> None:
    v.systemd_verify_ok({"telemetry-emqx.service": prod["/etc/systemd/system/telemetry-emqx.service"]}, tmp_path)


def test_one_setting_changes_only_its_files(prod: dict[str, str]) -> None:
    (changed,) = run_deploys("prod", [broker_emqx], override={"emqx_log_level": "debug"}).values()
    diff = {p for p in prod if prod[p] != changed.files.get(p)}
    assert diff == {f"{D}/etc/base.hocon"}


def test_dashboard_password_rotation_is_explicit() -> None:
    (result,) = run_deploys("prod", [broker_emqx]).values()
    (cmd,) = [c for c in result.commands if "admins passwd" in c]
    assert "$EMQX_DASHBOARD__DEFAULT_PASSWORD" in cmd  # read inside the container, not on argv


@pytest.mark.parametrize("spec", ["sha256:suffix", "bcrypt", "pbkdf2:sha512:4096:64", "plain:disable"])
def test_hash_specs_render_valid_hocon(spec: str) -> None:
    tree = v.parse_hocon("a = " + password_hash_hocon(spec))
    assert tree.get("a.name") == spec.split(":")[0]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(RoleError, match="mqtt_max_inflight"):
        run_deploys("prod", [broker_emqx], override={"mqtt_max_inflight": 100})
    with pytest.raises(RoleError, match="no digit before @"):
        run_deploys("prod", [broker_emqx], override={"emqx_node_short_name": "emqx1"})
    with pytest.raises(RoleError, match="emqx_password_hash"):
        run_deploys("prod", [broker_emqx], override={"emqx_password_hash": "rot13"})


def test_broker_hash_matches_the_provisioning_default() -> None:
    from ingest.hashing import DEFAULT_ALGORITHM

    ((_, data),) = load_inventory_data("prod").values()
    assert data["emqx_password_hash"] == DEFAULT_ALGORITHM.spec
