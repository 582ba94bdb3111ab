"""Durations of the end-to-end phases, shared by the test and the terminal summary hook.

A module of its own: pytest may import conftest.py under a second name, and a list defined there
would then exist twice (the test filling one, the hook printing the other, empty)."""

from __future__ import annotations

PHASES: list[tuple[str, float]] = []
