-- edge-sink schema, version 2: a partition's offsets restart at 0 when its topic is deleted and
-- re-created. The sink then resets its stored offset (src/sink/offsets.rs) and counts a new
-- log epoch, which keys the dead letters, so the new log's dead letters do not collide with
-- the old log's at the same offsets; every such decision leaves a row in sink_health.

ALTER TABLE sink_offsets ADD COLUMN log_epoch integer NOT NULL DEFAULT 0;

ALTER TABLE dead_letters ADD COLUMN log_epoch integer NOT NULL DEFAULT 0;
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_pkey;
ALTER TABLE dead_letters ADD PRIMARY KEY (kafka_topic, kafka_partition, log_epoch, kafka_offset);

-- What the sink decided about a partition's start (a log truncated under it, a stored offset
-- past the end of a re-created topic): one row per decision.
CREATE TABLE sink_health (
    at              timestamptz NOT NULL DEFAULT now(),
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kind            text        NOT NULL,  -- truncated | rewound | held
    stored_offset   bigint      NOT NULL,
    low_watermark   bigint      NOT NULL,
    high_watermark  bigint      NOT NULL,
    start_offset    bigint,                -- NULL: not fetched (held)
    message         text        NOT NULL
);
CREATE INDEX sink_health_latest ON sink_health (kafka_topic, kafka_partition, at DESC);
