"""disk_full: usage per configured path, the biggest known consumers, and safe space to reclaim."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import shutil
import subprocess

from scripts import _common as common
from scripts import healthcheck as hc
from scripts.runbook._base import Context, Diagnosis, Finding, Fix, main


def diagnose(ctx: Context) -> Diagnosis:
    d = Diagnosis()
    d.add(ctx.checks("disk"))
    if d.faults:
        worst = d.faults[0].check.split(":", 1)[1]
        d.cause = f"{worst} is above its threshold: PostgreSQL and the broker's persistence stop writing when it fills"
        d.next_command = f"du -xh --max-depth=2 {worst} | sort -h | tail -20"
        if shutil.which("journalctl"):
            d.fixes.append(Fix("shrink the systemd journal to 7 days", ["journalctl", "--vacuum-time=7d"]))
        if shutil.which("docker"):
            d.fixes.append(
                Fix("remove dangling Docker images (never running ones' data)", ["docker", "image", "prune", "-f"])
            )
        backup = common.section(ctx.config, "backup")
        if backup.get("dir"):
            out = subprocess.run(["du", "-sh", str(backup["dir"])], capture_output=True, text=True, check=False)
            d.checked.append(Finding("backups", hc.OK, out.stdout.strip() or out.stderr.strip()))
    return d


if __name__ == "__main__":
    sys.exit(main("disk_full", "Disk full or filling up.", diagnose))
