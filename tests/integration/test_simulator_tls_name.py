"""`simulate run --tls-server-name`: a broker reached at an address its certificate does not name (the
lab's broker behind a port forwarded on 127.0.0.1) is still verified -- against the name given."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.db import PsycopgSession
from tests.integration.test_simulator import finish, provision, start
from tests.support.mosquitto import MosquittoBroker
from tests.support.pki import create_pki

NAME = "broker.lab.test"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    # A certificate for NAME and 127.0.0.1 (the fixture's own readiness probe dials that), not localhost.
    pki = create_pki(tmp_path / "pki", server_hostnames=(NAME,), server_ips=("127.0.0.1",))
    broker = MosquittoBroker(tmp_path / "mosquitto", pki)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_certificate_checked_against_the_given_name(
    db: PsycopgSession, broker: MosquittoBroker, tmp_path: Path
) -> None:
    pki = broker.pki
    creds = provision(db, broker, ["tlsname-1"], tmp_path / "creds.json")
    base = ["run", "--broker", f"mqtts://localhost:{broker.tls_port}", "--ca", str(pki.ca_cert),
            "--devices", str(creds), "--duration", "1s", "--rate", "1", "--mqtt", "3.1.1"]  # fmt: skip

    rc, _, err = finish(start(base, uuid.uuid4().hex), 60)
    assert rc == 2 and "localhost" in err, err  # the dialled name is not in the certificate

    rc, _, err = finish(start([*base, "--tls-server-name", "other.lab.test"], uuid.uuid4().hex), 60)
    assert rc == 2 and "not trusted" in err, err  # verification is not switched off

    rc, _, err = finish(start([*base, "--tls-server-name", NAME], uuid.uuid4().hex), 60)
    assert rc == 0, err


def test_server_name_needs_tls(tmp_path: Path) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text('[{"device_id": "d", "username": "d", "password": "p"}]')
    rc, _, err = finish(
        start(["run", "--broker", "mqtt://127.0.0.1:1", "--devices", str(creds), "--tls-server-name", NAME], "x"), 30
    )
    assert rc == 2 and "--tls-server-name" in err, err
