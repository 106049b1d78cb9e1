#!/usr/bin/env python3
"""Writes tests/fixtures/outbox_v1.sqlite: an outbox as the first release (schema version 1)
left it, with 25 pending events (10 with detections, 13 without, 2 health). The SQL is the
first release's schema verbatim (`SCHEMA_V1` in src/outbox.rs); newer agents must open and
drain this file. Run once; the file is committed."""
import json, sqlite3, sys, uuid, os

SCHEMA_V1 = """
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT    NOT NULL UNIQUE,
    device_id  TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('next_seq', 1);
"""

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/outbox_v1.sqlite"
if os.path.exists(out):
    os.remove(out)
db = sqlite3.connect(out)
db.executescript(SCHEMA_V1)
db.execute("PRAGMA user_version = 1")
base_ms = 1_764_000_000_000
for seq in range(1, 26):
    # Fixed UUIDv7-shaped ids so the fixture is reproducible.
    eid = str(uuid.UUID(int=(0x019A << 112) | (seq << 64) | (0x7 << 76) | (0x8 << 60) | seq))
    kind = "agent_started" if seq in (1, 25) else "detection"
    ev = {"schema_version": 1, "event_id": eid, "device_id": "legacy-device", "seq": seq,
          "captured_at": "2025-11-24T16:00:%02d.000Z" % seq, "kind": kind}
    if kind == "detection":
        ev["model"] = {"name": "yolov8n-coco", "sha256": "0" * 64}
        ev["frame"] = {"width": 640, "height": 480}
        ev["detections"] = ([{"label": "person", "class_id": 0, "confidence": 0.3 + seq / 100,
                              "bbox": [1.0, 2.0, 30.0, 40.0]}] if seq % 2 == 0 else [])
    else:
        ev["detections"] = []
        ev["health"] = {"message": "started"}
    db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
               (seq, eid, "legacy-device", json.dumps(ev).encode(), base_ms + seq * 1000))
db.execute("UPDATE meta SET value = 26 WHERE key = 'next_seq'")
db.commit()
db.execute("VACUUM")
db.close()
print(out)
