"""Payload profiles and fault payloads.

Telemetry is a JSON object ``{"ts": <epoch ms>, <metric>: <number>, ...}``: the shape the ingest
service parses (one row per numeric metric, ``ts`` as the row time). Every profile keeps its state
per device, so values drift plausibly instead of jumping between unrelated random numbers.
"""

from __future__ import annotations

import abc
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROFILES = ("thermalog", "generic", "template")


class PayloadError(ValueError):
    """A template that cannot work; the message is one line for the operator."""


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Profile(abc.ABC):
    """Per-device payload generator."""

    __slots__ = ()

    @abc.abstractmethod
    def telemetry(self, ts_ms: int, seq: int) -> dict[str, Any]:
        """The telemetry object for message number ``seq`` at ``ts_ms``."""


class Thermalog(Profile):
    """The Thermalog temperature/humidity sensor: an Ornstein-Uhlenbeck walk around a per-device set
    point (indoor rooms differ by a few degrees), humidity loosely anti-correlated with temperature,
    and a battery that only ever discharges."""

    __slots__ = ("_rng", "battery", "humidity", "rh_mean", "t_mean", "temperature")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.t_mean = rng.uniform(18.0, 24.0)
        self.rh_mean = rng.uniform(35.0, 55.0)
        self.temperature = self.t_mean + rng.gauss(0, 0.5)
        self.humidity = self.rh_mean + rng.gauss(0, 2.0)
        self.battery = rng.uniform(85.0, 100.0)

    def telemetry(self, ts_ms: int, seq: int) -> dict[str, Any]:
        rng = self._rng
        dt = self.temperature - self.t_mean
        self.temperature += -0.05 * dt + rng.gauss(0, 0.08)
        self.humidity += -0.05 * (self.humidity - self.rh_mean) - 0.6 * (-0.05 * dt) + rng.gauss(0, 0.3)
        self.humidity = min(100.0, max(0.0, self.humidity))
        self.battery = max(0.0, self.battery - rng.uniform(0.0, 0.002))
        return {
            "ts": ts_ms,
            "temperature": round(self.temperature, 2),
            "humidity": round(self.humidity, 1),
            "battery": round(self.battery, 2),
        }


class Generic(Profile):
    """A multi-metric device (gateway, controller): smooth load curves, a counter, a radio."""

    __slots__ = ("_rng", "cpu", "energy", "mem", "phase", "rssi", "uptime0", "voltage")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.cpu = rng.uniform(5, 40)
        self.mem = rng.uniform(20, 60)
        self.voltage = rng.uniform(11.8, 12.4)
        self.rssi = rng.uniform(-85, -55)
        self.energy = rng.uniform(0, 1000)
        self.phase = rng.uniform(0, 2 * math.pi)
        self.uptime0 = rng.randint(0, 86400 * 30)

    def telemetry(self, ts_ms: int, seq: int) -> dict[str, Any]:
        rng = self._rng
        self.cpu = min(100.0, max(0.0, self.cpu + rng.gauss(0, 2.0) + 0.5 * math.sin(ts_ms / 60000 + self.phase)))
        self.mem = min(100.0, max(0.0, self.mem + rng.gauss(0, 0.3)))
        self.voltage += -0.02 * (self.voltage - 12.1) + rng.gauss(0, 0.01)
        self.rssi += -0.1 * (self.rssi + 70) + rng.gauss(0, 1.0)
        current = max(0.0, 0.8 + self.cpu / 100 + rng.gauss(0, 0.05))
        self.energy += current * self.voltage / 360.0
        return {
            "ts": ts_ms,
            "cpu_load": round(self.cpu, 1),
            "mem_used_pct": round(self.mem, 1),
            "voltage": round(self.voltage, 3),
            "current": round(current, 3),
            "rssi": round(self.rssi),
            "energy_wh": round(self.energy, 2),
            "uptime_s": self.uptime0 + ts_ms // 1000 % 10_000_000,
            "seq": seq,
        }


# -- user template --------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)((?::[^}]*)?)\s*\}\}")
_TEMPLATE_HELP = (
    "{{device_id}} {{seq}} {{ts}} (epoch ms) {{ts_s}} {{iso}} {{rand:MIN:MAX}} {{randint:MIN:MAX}} "
    "{{walk:MIN:MAX}} (bounded random walk) {{choice:A|B|C}}"
)
TEMPLATE_HELP = _TEMPLATE_HELP

# A value node: given (device context) returns the JSON value.
Ctx = dict[str, Any]
Node = Callable[[Ctx], Any]


def _num(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PayloadError(f"template placeholder {spec!r}: {text!r} is not a number") from None


def _placeholder(name: str, args: str, spec: str, walk_index: list[int]) -> Node:
    parts = args[1:].split(":") if args else []

    def want(n: int) -> None:
        if len(parts) != n:
            raise PayloadError(f"template placeholder {spec!r} takes {n} argument(s)")

    if name in ("device_id", "seq", "ts", "ts_s", "iso"):
        want(0)
        return lambda c: c[name]
    if name in ("rand", "randint", "walk"):
        want(2)
        lo, hi = _num(parts[0], spec), _num(parts[1], spec)
        if lo > hi:
            raise PayloadError(f"template placeholder {spec!r}: MIN is greater than MAX")
        if name == "rand":
            return lambda c: round(c["rng"].uniform(lo, hi), 2)
        if name == "randint":
            return lambda c: c["rng"].randint(int(lo), int(hi))
        slot = walk_index[0]
        walk_index[0] += 1
        step = (hi - lo) / 50 or 1.0

        def walk(c: Ctx) -> float:
            state: list[float] = c["walks"]
            while len(state) <= slot:
                state.append(c["rng"].uniform(lo, hi))
            state[slot] = min(hi, max(lo, state[slot] + c["rng"].gauss(0, step)))
            return round(state[slot], 2)

        return walk
    if name == "choice":
        options = args[1:].split("|") if args else []
        if not options or options == [""]:
            raise PayloadError(f"template placeholder {spec!r} needs options: {{{{choice:A|B}}}}")
        return lambda c: c["rng"].choice(options)
    raise PayloadError(f"unknown template placeholder {spec!r}; known: {_TEMPLATE_HELP}")


def _compile(value: Any, walk_index: list[int]) -> Node:
    if isinstance(value, dict):
        items = [(k, _compile(v, walk_index)) for k, v in value.items()]
        return lambda c: {k: f(c) for k, f in items}
    if isinstance(value, list):
        nodes = [_compile(v, walk_index) for v in value]
        return lambda c: [f(c) for f in nodes]
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value.strip())
        if whole:  # the whole string is one placeholder: keep the value's own type (a number stays a number)
            return _placeholder(whole.group(1), whole.group(2), whole.group(0), walk_index)
        pieces: list[str | Node] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(value):
            pieces.append(value[pos : m.start()])
            pieces.append(_placeholder(m.group(1), m.group(2), m.group(0), walk_index))
            pos = m.end()
        if not pieces:
            return lambda c: value
        pieces.append(value[pos:])
        return lambda c: "".join(p if isinstance(p, str) else str(p(c)) for p in pieces)
    return lambda c: value


@dataclass(frozen=True)
class Template:
    root: Node
    source: str

    @classmethod
    def load(cls, path: Path) -> Template:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PayloadError(f"--template {path}: {exc.strerror or exc}") from None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise PayloadError(f"--template {path} is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise PayloadError(f"--template {path} must be a JSON object")
        return cls(_compile(doc, [0]), str(path))


class TemplateProfile(Profile):
    __slots__ = ("_ctx", "_template")

    def __init__(self, rng: random.Random, template: Template, device_id: str) -> None:
        self._template = template
        self._ctx: Ctx = {"rng": rng, "walks": [], "device_id": device_id}

    def telemetry(self, ts_ms: int, seq: int) -> dict[str, Any]:
        c = self._ctx
        c["seq"] = seq
        c["ts"] = ts_ms
        c["ts_s"] = ts_ms // 1000
        c["iso"] = _iso(ts_ms)
        out = self._template.root(c)
        assert isinstance(out, dict)
        return out


def _iso(ts_ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_profile(name: str, rng: random.Random, device_id: str, template: Template | None) -> Profile:
    if name == "thermalog":
        return Thermalog(rng)
    if name == "generic":
        return Generic(rng)
    if name == "template":
        if template is None:
            raise PayloadError("--profile template needs --template FILE")
        return TemplateProfile(rng, template, device_id)
    raise PayloadError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")


# -- fault payloads ---------------------------------------------------------------------------------

_MALFORMED: tuple[Callable[[int], bytes], ...] = (
    lambda ts: b'{"ts": %d, "temperature": 21.' % ts,  # truncated JSON
    lambda ts: b"\xff\xfe\x00garbage\x80",  # not UTF-8
    lambda ts: b"[1, 2, 3]",  # JSON, but not an object
    lambda ts: b'{"ts": "yesterday", "temperature": "warm"}',  # wrong types
    lambda ts: b"",  # empty
)


def malformed(rng: random.Random, ts_ms: int) -> bytes:
    return rng.choice(_MALFORMED)(ts_ms)


def oversized(ts_ms: int, size: int) -> bytes:
    head = b'{"ts":%d,"temperature":21.5,"blob":"' % ts_ms
    pad = max(0, size - len(head) - 2)
    return head + b"x" * pad + b'"}'
