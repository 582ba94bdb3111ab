"""The shape every role follows: install, configure, activate.

``configure`` renders templates and uploads them through :meth:`Role.put`, which remembers each
upload's operation under a *change key* (``"config"``, ``"secrets"``, ``"unit"``, ...). ``activate``
then restarts or reloads only what depends on keys that changed, with ``_if=role.changed(...)``: the
decision is taken at execution time from ``OperationMeta.did_change`` (pyinfra 3), so a deploy that
uploads nothing new restarts nothing and reports zero changes.

Service operations go through :meth:`Role.service` and :meth:`Role.daemon_reload`, which do nothing
(with a warning) where systemd is not PID 1 -- a chroot or an image build -- so the same roles run
there. ``/run/systemd/system`` is the test systemd itself documents (``sd_booted(3)``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import jinja2
from pyinfra.api.deploy import deploy
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.context import host as current_host
from pyinfra.facts.files import Directory
from pyinfra.operations import files, systemd

from roles.facts import InContainer, ProcSysWritable

logger = logging.getLogger("roles")

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = REPO_ROOT / "templates"

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    # A missing variable is a bug in the role or the group data, never an empty string on a host.
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,  # noqa: S701 -- config files and shell, not HTML
)


def hocon_string(value: object) -> str:
    """A HOCON double-quoted string (JSON escaping is valid HOCON). Single quotes are a scan error in
    EMQX (contract section 1), so templates never write string literals by hand."""
    return json.dumps(str(value))


def sql_literal(value: object) -> str:
    """A PostgreSQL string literal (standard_conforming_strings: only ' needs doubling)."""
    return "'" + str(value).replace("'", "''") + "'"


_ENV.filters["hocon"] = hocon_string
_ENV.filters["sql"] = sql_literal


def render(template: str, **context: Any) -> str:
    """Render ``templates/<template>``; pure, so tests can call it without a host."""
    return _ENV.get_template(template).render(**context)


class RoleError(Exception):
    """A problem in the inventory or group data that a role refuses to deploy."""


class Role:
    """Base class: subclasses override the three stages; :meth:`run` calls them in order."""

    #: Used in operation names and log lines.
    name = "role"

    def __init__(self, host: Host | None = None) -> None:
        self.host: Host = host if host is not None else current_host
        self._changes: dict[str, list[OperationMeta]] = defaultdict(list)

    # --- stages -------------------------------------------------------------------------------
    def install(self) -> None:
        """Packages, users and directories."""

    def configure(self) -> None:
        """Render and upload files through :meth:`put`."""

    def activate(self) -> None:
        """Start, restart or reload what changed."""

    def run(self) -> None:
        self.install()
        self.configure()
        self.activate()

    # --- data ---------------------------------------------------------------------------------
    def data(self, key: str) -> Any:
        """A group-data setting; every one has a default in ``group_data/all.py``, so a missing key
        means the data files were not loaded (wrong working directory) -- say so instead of
        rendering a half-empty file."""
        value = self.host.data.get(key)
        if value is None:
            raise RoleError(
                f"{self.name}: setting {key!r} is missing for host {self.host.name}; run pyinfra from "
                "the repository root so group_data/ is loaded"
            )
        return value

    def opt(self, key: str, default: Any = None) -> Any:
        """A setting that may legitimately be absent (per-host extras)."""
        return self.host.data.get(key, default)

    # --- change tracking ------------------------------------------------------------------------
    def record(self, key: str, op: OperationMeta) -> OperationMeta:
        self._changes[key].append(op)
        return op

    def changed(self, *keys: str) -> Callable[[], bool]:
        """An ``_if`` callable: did any operation recorded under ``keys`` change the host?"""
        ops = [op for key in keys for op in self._changes.get(key, [])]
        return lambda: any(op.did_change() for op in ops)

    @staticmethod
    def any_of(*checks: Callable[[], bool]) -> Callable[[], bool]:
        return lambda: any(check() for check in checks)

    def put(
        self,
        content: str,
        dest: str,
        *,
        key: str,
        mode: str = "0644",
        user: str | int = "root",
        group: str | int = "root",
        secret: bool = False,
    ) -> OperationMeta:
        """Upload ``content`` to ``dest`` and record the operation under ``key``.

        ``secret=True`` refuses modes wider than 0640 (world bits or group write): the one rule about
        secrets on hosts, enforced where every secret file passes."""
        if secret and (int(mode, 8) & 0o027):
            raise RoleError(f"{self.name}: secret file {dest} must not have mode {mode} (max 0640)")
        op = files.put(
            # A fixed name keeps file contents (secrets) out of the operation's printed arguments.
            name=f"{self.name}: {dest}",
            src=StringIO(content),
            dest=dest,
            user=str(user),
            group=str(group),
            mode=mode,
        )
        return self.record(key, op)

    def template(self, template: str, dest: str, *, key: str, mode: str = "0644", **context: Any) -> OperationMeta:
        return self.put(render(template, **context), dest, key=key, mode=mode)

    # --- host capabilities ----------------------------------------------------------------------
    @property
    def has_systemd(self) -> bool:
        return bool(self.host.get_fact(Directory, "/run/systemd/system"))

    @property
    def in_container(self) -> bool:
        return bool(self.host.get_fact(InContainer))

    @property
    def proc_sys_writable(self) -> bool:
        return bool(self.host.get_fact(ProcSysWritable))

    def warn_once(self, message: str) -> None:
        logger.warning("%s: %s: %s", self.host.name, self.name, message)

    # --- systemd, wrapped -------------------------------------------------------------------
    def daemon_reload(self, _if: Callable[[], bool]) -> OperationMeta | None:
        """``systemd.daemon_reload`` only when a unit changed. ``systemd.service(daemon_reload=True)``
        would count as a change on every run and break the zero-change second deploy."""
        if not self.has_systemd:
            return None
        return systemd.daemon_reload(name=f"{self.name}: systemctl daemon-reload", _if=_if)

    def service(
        self,
        unit: str,
        *,
        restart_if: Callable[[], bool] | None = None,
        reload_if: Callable[[], bool] | None = None,
        enabled: bool = True,
        running: bool = True,
    ) -> None:
        """Keep ``unit`` enabled and running; restart or reload it when its inputs changed."""
        if not self.has_systemd:
            self.warn_once(f"systemd is not PID 1 here: {unit} left alone (enable it on first boot)")
            return
        systemd.service(
            name=f"{self.name}: {unit} enabled and running",
            service=unit,
            running=running,
            enabled=enabled,
        )
        if restart_if is not None:
            systemd.service(
                name=f"{self.name}: restart {unit} (configuration changed)",
                service=unit,
                running=running,
                restarted=True,
                _if=restart_if,
            )
        if reload_if is not None:
            systemd.service(
                name=f"{self.name}: reload {unit} (configuration changed)",
                service=unit,
                running=running,
                reloaded=True,
                _if=reload_if,
            )


def role_deploy(role_cls: type[Role]) -> Callable[[], Any]:
    """Wrap a role class as a pyinfra ``@deploy()`` named after it (for partial runs and names)."""

    @deploy(role_cls.name)
    def _run() -> None:
        role_cls().run()

    return _run
