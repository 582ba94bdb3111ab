"""The naive baseline the issue compares against: one paho MQTT 3.1.1 subscriber, stdlib json,
COPY batches of 1000 rows, automatic acknowledgements (at-most-once: a crash loses the batch).

Usage: naive_baseline.py --host H --port P --username U --password-file F --dsn DSN --table T
       --expect N [--client-id ID]   (exits once N messages were written; prints one JSON line)
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ap = argparse.ArgumentParser()
for flag in ("--host", "--username", "--password-file", "--dsn", "--table", "--client-id"):
    ap.add_argument(flag, required=flag != "--client-id", default="naive")
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--expect", type=int, required=True)
args = ap.parse_args()

conn = psycopg.connect(args.dsn, autocommit=True)
devices = dict(conn.execute("SELECT device_id, id FROM devices").fetchall())
metrics = dict(conn.execute("SELECT name, id FROM metrics").fetchall())
rows: list[tuple[datetime, int, int, float]] = []
state = {"messages": 0, "first": 0.0}


def flush() -> None:
    with conn.cursor() as cur, cur.copy(f"COPY {args.table} (time, device, metric, value) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    rows.clear()


def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
    if not state["first"]:
        state["first"] = time.monotonic()
    device = devices[msg.topic.split("/")[1]]
    data = json.loads(msg.payload)
    ts = datetime.fromtimestamp(data.pop("ts") / 1000, tz=UTC)
    for name, value in data.items():
        if name not in metrics:
            metrics[name] = conn.execute(
                "INSERT INTO metrics (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name "
                "RETURNING id",
                [name],
            ).fetchone()[0]  # type: ignore[index]
        rows.append((ts, device, metrics[name], value))
    state["messages"] += 1
    if len(rows) >= 1000:
        flush()


client = mqtt.Client(
    callback_api_version=CallbackAPIVersion.VERSION2,
    client_id=args.client_id,
    protocol=MQTTProtocolVersion.MQTTv311,
    clean_session=False,
)
client.username_pw_set(args.username, Path(args.password_file).read_text().strip())
client.on_message = on_message
client.on_connect = lambda c, *a: c.subscribe("devices/+/telemetry", 1)
client.connect(args.host, args.port)
deadline = time.monotonic() + 600
while state["messages"] < args.expect and time.monotonic() < deadline:
    client.loop(0.05)
if rows:
    flush()
elapsed = time.monotonic() - state["first"]
client.disconnect()
print(json.dumps({"messages": state["messages"], "seconds": round(elapsed, 2),
                  "msg_per_s": round(state["messages"] / elapsed)}))  # fmt: skip
