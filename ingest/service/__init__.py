"""The ingest service (``ingest run``): see app.py for the design, README, "Ingest service" for operators."""

from __future__ import annotations

import logging
import sys
from typing import Any

from ingest.config import Config
from ingest.http_api import ApiServer
from ingest.metrics import IngestMetrics
from ingest.registration import Registrar, Verifier
from ingest.service.app import IngestService

log = logging.getLogger("ingest")


def run(cfg: Config) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = IngestMetrics()
    service = IngestService(cfg, metrics)

    def health() -> tuple[bool, dict[str, Any]]:
        h = service.health()
        return h.ok, {"buffered": h.buffered, "oldest_wait_s": h.oldest_wait_s, **h.detail}

    verifier = registrar = None
    if cfg.api.enabled:
        verifier = Verifier(cfg.api.hmac_key, cfg.api.replay_window_s)
        registrar = Registrar(cfg.api.conninfo, cfg.api.device_type)
    api = ApiServer(cfg.http.host, cfg.http.port, metrics, health, verifier, registrar, cfg.api.max_body_bytes)
    api.start()
    log.info(
        "ingest starting: broker %s:%d (MQTT %s, client id %s, topics %s), http %s:%d",
        cfg.mqtt.host,
        cfg.mqtt.port,
        cfg.mqtt.protocol,
        cfg.mqtt.client_id,
        ", ".join(cfg.mqtt.topics()),
        cfg.http.host,
        api.port,
    )
    try:
        return service.run_forever()
    finally:
        api.stop()


__all__ = ["IngestService", "run"]
