"""The shape of every runbook: run checks (read-only), say what was checked and found, name the
likely cause and the exact next command; with ``--fix``, propose safe, reversible actions and run
each only after confirmation (``--yes`` for unattended use).

Exit codes: 0 nothing wrong found; 1 fault found; 2 configuration error; 3 a fix failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from scripts import _common as common
from scripts import healthcheck as hc


@dataclass
class Fix:
    description: str
    command: list[str]


@dataclass
class Finding:
    check: str
    status: str
    detail: str


@dataclass
class Diagnosis:
    checked: list[Finding] = field(default_factory=list)
    cause: str = ""
    next_command: str = ""
    fixes: list[Fix] = field(default_factory=list)

    def add(self, results: Sequence[hc.CheckResult]) -> None:
        self.checked += [Finding(r.name, r.status, r.detail) for r in results]

    @property
    def faults(self) -> list[Finding]:
        return [f for f in self.checked if f.status in (hc.WARN, hc.CRIT)]


@dataclass
class Context:
    config: common.Config
    readings: hc.Readings
    now: dt.datetime

    def checks(self, *names: str) -> list[hc.CheckResult]:
        return hc.run_checks(self.config, self.readings, self.now, set(names))


Diagnose = Callable[[Context], Diagnosis]


def main(name: str, summary: str, diagnose: Diagnose, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=name, description=summary + " Read-only unless --fix.")
    common.add_common_arguments(parser)
    parser.add_argument("--fix", action="store_true", help="offer the safe fixes, each after confirmation")
    parser.add_argument("--yes", action="store_true", help="with --fix: confirm every fix (unattended)")
    parser.add_argument("--reading", action="append", default=[], help="inject disk:/path=PERCENT or memory=PERCENT")
    args = parser.parse_args(argv)
    try:
        config = common.config_from_args(args)
        logger = common.setup_logging(f"runbook.{name}", common.log_file_from(args, config, "runbook"), args.verbose)
        ctx = Context(config, hc.Readings.parse(args.reading), common.utcnow())
    except common.ConfigError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    d = diagnose(ctx)
    faults = d.faults
    if not faults and not d.cause:
        d.cause = "no fault found by these checks"
    fixed: list[dict[str, Any]] = []
    if args.fix and faults:
        for fix in d.fixes:
            if not args.yes:
                answer = input(f"{fix.description}\n  $ {' '.join(fix.command)}\nRun it? [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    fixed.append({"fix": fix.description, "ran": False})
                    continue
            logger.warning("runbook %s: running fix: %s", name, " ".join(fix.command))
            result = subprocess.run(fix.command, capture_output=True, text=True, timeout=300, check=False)
            fixed.append({"fix": fix.description, "ran": True, "exit": result.returncode})
            if result.returncode != 0:
                print(f"fix failed ({result.returncode}): {result.stderr.strip()[:500]}", file=sys.stderr)
                common.emit(args, {"runbook": name, **asdict(d), "fixes_run": fixed}, "fix failed")
                return 3
    lines = [f"{name}: {summary}", "checked:"]
    lines += [f"  {f.status.upper():<8} {f.check}: {f.detail}" for f in d.checked]
    lines.append("found: " + ("; ".join(f"{f.check} {f.status}" for f in faults) if faults else "nothing wrong"))
    lines.append(f"likely cause: {d.cause}")
    if d.next_command:
        lines.append(f"next: {d.next_command}")
    if d.fixes and not args.fix and faults:
        lines.append(f"safe fixes available: rerun with --fix ({'; '.join(f.description for f in d.fixes)})")
    common.emit(
        args,
        {"runbook": name, "faults": [asdict(f) for f in faults], **asdict(d), "fixes_run": fixed},
        "\n".join(lines),
    )
    for f in faults:
        logger.info("runbook %s found %s %s: %s", name, f.check, f.status, f.detail)
    return common.EXIT_FAILED if faults else common.EXIT_OK
