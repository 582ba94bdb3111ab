"""Run ``pyinfra inventories/lab.py deploys/all.py`` against the lab target and read its JSON results.

pyinfra 3.10's ``--json`` prints the plan and per-operation results on stdout (``results.operations``
with ``success`` = hosts where the operation changed something, ``no_change``, ``error``); the log
stays on stderr for the human. Counting changes from that document, not from log text, is what lets
the end-to-end test assert that a second deploy changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.lab.target import LAB_DIR, REPO, LabError, LabState

VAULT_PASSWORD_FILE = REPO / "tests/fixtures/vault/password"  # the lab uses the CI vault (group_data/lab.py)
INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/all.py"


@dataclass
class DeployResult:
    returncode: int
    seconds: float
    changed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    operations: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.errors


def pyinfra_bin() -> str:
    venv = REPO / ".venv/bin/pyinfra"
    return str(venv) if venv.exists() else str(Path(sys.executable).parent / "pyinfra")


def deploy_env(state: LabState) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TELEMETRY_VAULT_PASSWORD_FILE", str(VAULT_PASSWORD_FILE))
    # The inventory reads the state file too; the environment wins, so be explicit.
    env["LAB_SSH_PORT"] = str(state.ssh_port)
    env["LAB_SSH_KEY"] = state.ssh_key
    return env


def parse_results(document: dict[str, Any]) -> tuple[list[str], list[str], int]:
    results = document.get("results") or {}
    changed: list[str] = []
    errors: list[str] = []
    ops = results.get("operations") or []
    for op in ops:
        if op.get("success"):
            changed.append(str(op.get("name")))
        if op.get("error"):
            errors.append(str(op.get("name")))
    errors += [f"host failed: {h}" for h in results.get("failed_hosts") or []]
    return changed, errors, len(ops)


def run_deploy(state: LabState, label: str = "deploy") -> DeployResult:
    """Deploy once; the JSON document is kept as .cache/lab/<label>.json for inspection."""
    start = time.monotonic()
    proc = subprocess.run(
        [pyinfra_bin(), "--yes", "--json", INVENTORY, DEPLOY],
        cwd=REPO,
        env=deploy_env(state),
        stdout=subprocess.PIPE,
        stderr=None,  # pyinfra's log goes straight to the terminal
        text=True,
        check=False,
    )
    seconds = time.monotonic() - start
    out = LAB_DIR / f"{label}.json"
    out.write_text(proc.stdout)
    try:
        document = json.loads(proc.stdout)
    except ValueError as exc:
        if proc.returncode == 0:
            raise LabError(f"pyinfra printed no JSON results (see {out})") from exc
        return DeployResult(proc.returncode, seconds, errors=[f"pyinfra exited {proc.returncode}"])
    changed, errors, operations = parse_results(document)
    if proc.returncode != 0 and not errors:
        errors.append(f"pyinfra exited {proc.returncode}")
    return DeployResult(proc.returncode, seconds, changed, errors, operations, document)
