-- edge-sink schema, version 1. Applied by refinery at start-up and by `edge-sink migrate`
-- (history in refinery_schema_history). See docs/sink.md for the least-privilege role.

-- One row per event (detection or health); event_id is the idempotency key.
CREATE TABLE events (
    event_id        uuid        PRIMARY KEY,
    device_id       text        NOT NULL,
    seq             bigint      NOT NULL,
    captured_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    kind            text        NOT NULL,
    model_name      text,
    model_sha256    text,
    frame_width     integer,
    frame_height    integer,
    detections      integer     NOT NULL,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL
);
-- "Latest event per device".
CREATE INDEX events_device_latest ON events (device_id, captured_at DESC);

-- One row per detected object; (event_id, idx) makes re-deliveries idempotent.
CREATE TABLE objects (
    event_id    uuid        NOT NULL,
    idx         integer     NOT NULL,
    device_id   text        NOT NULL,
    captured_at timestamptz NOT NULL,
    label       text        NOT NULL,
    class_id    integer     NOT NULL,
    confidence  real        NOT NULL,
    x1 real NOT NULL, y1 real NOT NULL, x2 real NOT NULL, y2 real NOT NULL,
    PRIMARY KEY (event_id, idx)
);
-- "Detections per device per minute": range scans by device and time.
CREATE INDEX objects_device_time ON objects (device_id, captured_at);

-- Health events (agent started/stopping, camera lost/recovered, outbox evictions).
CREATE TABLE device_health (
    event_id    uuid        PRIMARY KEY,
    device_id   text        NOT NULL,
    captured_at timestamptz NOT NULL,
    kind        text        NOT NULL,
    message     text,
    evicted     jsonb
);
CREATE INDEX device_health_latest ON device_health (device_id, captured_at DESC);

-- Messages that are not valid events, kept with the reason; one row per Kafka message.
CREATE TABLE dead_letters (
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    payload         bytea,
    error           text        NOT NULL,
    first_seen      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);

-- The sink's own offsets: written in the same transaction as the rows they cover. On
-- assignment the consumer seeks here; Kafka's committed offsets are only for lag monitoring.
CREATE TABLE sink_offsets (
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    next_offset     bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kafka_topic, kafka_partition)
);
