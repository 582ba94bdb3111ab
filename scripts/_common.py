"""Shared plumbing of the host scripts: configuration file, logging, exit codes, JSON output,
Prometheus textfile metrics and alert delivery.

The configuration is one YAML (or JSON) file, by default ``/etc/telemetry/ops.yml`` (``$TELEMETRY_OPS_CONFIG``),
rendered by the deploy; every script reads only its own sections. Passwords never appear in it:
only paths of files that hold them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import logging.handlers
import os
import smtplib
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from ingest.files import write_atomic

DEFAULT_CONFIG = Path("/etc/telemetry/ops.yml")

# Exit codes shared by every script, so cron wrappers and the healthcheck can tell them apart.
EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed (database down, drill mismatch, check critical)
EXIT_USAGE = 2  # configuration or usage problem (missing key file, bad option)
EXIT_INTEGRITY = 3  # an archive failed authentication: tampered, truncated or wrong key
EXIT_PARTIAL = 4  # done locally, a secondary step failed (off-site copy); or a warning-level check


class ConfigError(Exception):
    """One-line, operator-facing configuration problem (exit code 2)."""


Config = dict[str, Any]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help=f"operations config file, YAML or JSON (default: $TELEMETRY_OPS_CONFIG or {DEFAULT_CONFIG}, "
        "if it exists; otherwise options only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--log-file", type=Path, help="log file (default: the config's log_file; none: stderr only)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def load_config(path: Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return data


def config_from_args(args: argparse.Namespace) -> Config:
    """The file named by --config (must exist), else $TELEMETRY_OPS_CONFIG or the default path if
    present, else empty: every script can also run from its command-line options alone."""
    if args.config is not None:
        return load_config(args.config)
    implicit = Path(os.environ.get("TELEMETRY_OPS_CONFIG", str(DEFAULT_CONFIG)))
    return load_config(implicit) if implicit.exists() else {}


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    return value


def setup_logging(name: str, log_file: Path | None, verbose: bool = False) -> logging.Logger:
    """Log to ``log_file`` (WatchedFileHandler: reopens the file after logrotate moved it, so no
    copytruncate and no lost lines) and warnings to stderr, where cron mails them."""
    logger = logging.getLogger(f"telemetry.{name}")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.DEBUG if verbose else logging.WARNING)
    err.setFormatter(fmt)
    logger.addHandler(err)
    return logger


def log_file_from(args: argparse.Namespace, config: Mapping[str, Any], section_name: str) -> Path | None:
    if args.log_file is not None:
        return Path(args.log_file)
    value = section(config, section_name).get("log_file") or config.get("log_file")
    return Path(value) if value else None


def emit(args: argparse.Namespace, result: Mapping[str, Any], human: str) -> None:
    """The one output of a command: JSON on request, else a human summary."""
    if getattr(args, "json", False):
        print(json.dumps(result, default=str, sort_keys=True))
    else:
        print(human)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_time(text: str) -> dt.datetime:
    """ISO 8601; a naive time is taken as UTC (the injected clock of tests and drills)."""
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def write_textfile_metrics(directory: Path, filename: str, metrics: Mapping[str, tuple[str, float]]) -> Path:
    """Write ``{name: (help, value)}`` as a node-exporter textfile, atomically (node exporter must
    never read half a file). The exposition format comes from prometheus-client, not by hand."""
    registry = CollectorRegistry()
    for name, (help_text, value) in metrics.items():
        Gauge(name, help_text, registry=registry).set(value)
    path = Path(directory) / filename
    write_atomic(path, generate_latest(registry).decode("utf-8"), 0o644)
    return path


def read_textfile_metrics(path: Path) -> dict[str, float]:
    """Values of a textfile written by :func:`write_textfile_metrics` (missing file: empty)."""
    values: dict[str, float] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return values
    for line in lines:
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


# --- alerts -----------------------------------------------------------------------------------


class AlertError(Exception):
    pass


def send_webhook(url: str, payload: Mapping[str, Any], timeout: float = 10.0, headers: Mapping[str, str] = {}) -> None:
    if not url.startswith(("http://", "https://")):
        raise AlertError(f"webhook URL must be http(s): {url}")
    body = json.dumps(payload, default=str).encode("utf-8")
    request = urllib.request.Request(  # noqa: S310 -- scheme checked above
        url, data=body, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            if response.status >= 300:
                raise AlertError(f"webhook answered HTTP {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise AlertError(f"webhook {url} failed: {exc}") from None


def send_email(smtp: Mapping[str, Any], subject: str, body: str) -> None:
    """Send through the configured relay; STARTTLS unless ``starttls: false`` (a local relay)."""
    message = EmailMessage()
    message["From"] = smtp["from"]
    recipients = smtp["to"] if isinstance(smtp["to"], list) else [smtp["to"]]
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message.set_content(body)
    password = None
    if smtp.get("password_file"):
        password = Path(smtp["password_file"]).read_text(encoding="utf-8").strip()
    try:
        with smtplib.SMTP(smtp.get("host", "localhost"), int(smtp.get("port", 25)), timeout=15) as client:
            if smtp.get("starttls", True):
                client.starttls()
            if smtp.get("username") and password:
                client.login(smtp["username"], password)
            client.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise AlertError(f"SMTP via {smtp.get('host', 'localhost')} failed: {exc}") from None


def deliver_alert(alerts: Mapping[str, Any], subject: str, payload: Mapping[str, Any], logger: logging.Logger) -> bool:
    """Send to every configured channel; True if at least one accepted it (one channel down must
    not silence the other)."""
    delivered = False
    webhook = alerts.get("webhook")
    if webhook:
        url = webhook if isinstance(webhook, str) else webhook["url"]
        try:
            send_webhook(url, {"subject": subject, **payload})
            delivered = True
        except AlertError as exc:
            logger.error("alert not delivered: %s", exc)
    smtp = alerts.get("smtp")
    if smtp:
        try:
            send_email(smtp, subject, json.dumps(payload, indent=2, default=str))
            delivered = True
        except (AlertError, OSError, KeyError) as exc:
            logger.error("alert e-mail not delivered: %s", exc)
    return delivered
