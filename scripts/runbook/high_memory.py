"""high_memory: memory use and the largest processes (read-only; restarting is the operator's call)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import os

from scripts import healthcheck as hc
from scripts.runbook._base import Context, Diagnosis, Finding, main


def top_processes(n: int = 5) -> list[tuple[int, str, int]]:
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss = int(fields.get("VmRSS", "0 kB").split()[0])
        procs.append((rss, fields.get("Name", "?").strip(), int(pid)))
    return [(pid, name, rss) for rss, name, pid in sorted(procs, reverse=True)[:n]]


def diagnose(ctx: Context) -> Diagnosis:
    d = Diagnosis()
    d.add(ctx.checks("memory"))
    for pid, name, rss in top_processes():
        d.checked.append(Finding(f"process:{name}", hc.OK, f"pid {pid} uses {rss / 1024:.0f} MiB"))
    if d.faults:
        d.cause = "memory is high: usually PostgreSQL work_mem x connections, EMQX sessions, or a leaking process"
        d.next_command = "ps -eo pid,rss,comm --sort=-rss | head; docker stats --no-stream"
    return d


if __name__ == "__main__":
    sys.exit(main("high_memory", "High memory use.", diagnose))
