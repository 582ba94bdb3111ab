# The local throwaway target (a later issue builds it): a Debian 12 system container reached through
# SSH on a port published on 127.0.0.1. LAB_SSH_PORT / LAB_SSH_KEY override the defaults.
import json
import os
from pathlib import Path

# `make lab` (tools/lab) picks a free port and writes it, with its key, to this state file.
try:
    _lab = json.loads((Path(__file__).resolve().parents[1] / ".cache/lab/state.json").read_text())
except (OSError, ValueError):
    _lab = {}

_host = (
    "lab.telemetry.test",
    {
        "ssh_hostname": "127.0.0.1",
        "ssh_port": int(os.environ.get("LAB_SSH_PORT") or _lab.get("ssh_port") or 2222),
        "ssh_user": "root",
        "ssh_key": os.environ.get("LAB_SSH_KEY") or _lab.get("ssh_key") or ".cache/lab/id_ed25519",
        "ssh_known_hosts_file": "/dev/null",
        "ssh_strict_host_key_checking": "no",
    },
)

brokers = [_host]
databases = [_host]
ingest = [_host]
lab = [_host]
