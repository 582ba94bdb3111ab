"""The service's small HTTP server: /healthz, /metrics, POST /v1/devices/register.

It binds to loopback by default and is meant to sit behind nginx (TLS, rate limits, body size).
Standard library only: three endpoints do not justify a web framework in the ingest process.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingest.metrics import IngestMetrics
from ingest.registration import AuthError, Registrar, Verifier

log = logging.getLogger("ingest.http")
REGISTER_PATH = "/v1/devices/register"


class ApiServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: IngestMetrics,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        verifier: Verifier | None = None,
        registrar: Registrar | None = None,
        max_body_bytes: int = 4096,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.verifier = verifier
        self.registrar = registrar
        self.max_body_bytes = max_body_bytes
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "ingest"
            sys_version = ""

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj: Any) -> None:
                self._send(status, json.dumps(obj).encode() + b"\n")

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    ok, detail = server.health()
                    self._json(200 if ok else 503, {"ok": ok, **detail})
                elif path == "/metrics":
                    self._send(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                path = self.path.split("?", 1)[0]
                if path != REGISTER_PATH or server.verifier is None or server.registrar is None:
                    self._json(404, {"error": "not found"})
                    return
                length_text = self.headers.get("Content-Length", "")
                if not length_text.isdigit():
                    self._json(411, {"error": "Content-Length required"})
                    return
                length = int(length_text)
                if length > server.max_body_bytes:
                    self.close_connection = True
                    server.metrics.api_requests.labels("too_large").inc()
                    self._json(413, {"error": f"body over {server.max_body_bytes} bytes"})
                    return
                body = self.rfile.read(length)
                try:
                    # The raw path as sent is what was signed: no normalisation that could let two
                    # different requests share a signature.
                    server.verifier.verify("POST", self.path, self.headers, body)  # type: ignore[arg-type]
                except AuthError as exc:
                    log.warning("registration refused from %s: %s", self.client_address[0], exc)
                    server.metrics.api_requests.labels("unauthorized").inc()
                    self._json(401, {"error": "unauthorized"})
                    return
                try:
                    result = server.registrar.register(body)
                except Exception:
                    log.exception("registration failed")
                    server.metrics.api_requests.labels("error").inc()
                    self._json(503, {"error": "provisioning database unavailable"})
                    return
                server.metrics.api_requests.labels(str(result.status)).inc()
                if result.status == 201:
                    log.info("registered device %s", result.body.get("device_id"))
                self._json(result.status, result.body)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ingest-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.registrar is not None:
            self.registrar.close()
