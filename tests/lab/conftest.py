"""Prints the end-to-end phases' durations at the end of the run (the issue asks for them)."""

from __future__ import annotations

import pytest

from tests.lab.phases import PHASES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not PHASES:
        return
    terminalreporter.section("lab end-to-end phases")
    for name, seconds in PHASES:
        terminalreporter.write_line(f"{name:<48} {seconds:7.1f} s")
    terminalreporter.write_line(f"{'total':<48} {sum(s for _, s in PHASES):7.1f} s")
