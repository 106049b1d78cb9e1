//! The outbox's SQL: the versioned schema, its migrations, and every statement by name.

use super::Outbox;

/// Schema version this build writes.
pub const SCHEMA_VERSION: i64 = 2;

/// Version 1: the first release's schema (kept verbatim: migrations start from it).
pub(super) const SCHEMA_V1: &str = "
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT    NOT NULL UNIQUE,
    device_id  TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('next_seq', 1);
";

/// Version 1 -> 2: value columns for eviction, dead letters, persistent counters. The table is
/// rebuilt without v1's UNIQUE index on `event_id`: ids are UUIDv7 made once per event, and
/// that index cost every insert and delete a b-tree update. For the same reason there is no
/// index on the value columns: eviction is rare (it frees 15% of the cap per round) and
/// sorts with a bounded heap over one table scan, while every delivered event's delete
/// would have paid for the index.
pub(super) const MIGRATE_V1_V2: &str = "
CREATE TABLE events_v2 (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT    NOT NULL,
    device_id  TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    class      INTEGER NOT NULL,
    max_conf   REAL    NOT NULL,
    bytes      INTEGER NOT NULL
);
INSERT INTO events_v2 (seq, event_id, device_id, payload, created_at, class, max_conf, bytes)
SELECT seq, event_id, device_id, payload, created_at,
    CASE
        WHEN json_extract(payload, '$.kind') != 'detection' THEN 2
        WHEN json_array_length(payload, '$.detections') > 0 THEN 1
        ELSE 0 END,
    coalesce((SELECT max(json_extract(value, '$.confidence'))
              FROM json_each(payload, '$.detections')), 0),
    length(payload)
FROM events;
DROP TABLE events;
ALTER TABLE events_v2 RENAME TO events;
CREATE TABLE dead_letters (
    seq      INTEGER PRIMARY KEY,
    event_id TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    reason   TEXT    NOT NULL,
    at       INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES
    ('evicted_no_detections', 0), ('evicted_low_confidence', 0), ('evicted_oldest', 0),
    ('evicted_expired', 0), ('quarantined', 0);
";

pub(super) const INSERT_EVENT: &str =
    "INSERT INTO events (seq, event_id, device_id, payload, created_at, class, max_conf, bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
pub(super) const NEXT_SEQ: &str = "SELECT value FROM meta WHERE key = 'next_seq'";
pub(super) const SET_NEXT_SEQ: &str = "UPDATE meta SET value = ?1 WHERE key = 'next_seq'";
pub(super) const BUMP_COUNTER: &str = "UPDATE meta SET value = value + ?2 WHERE key = ?1";
pub(super) const READ_COUNTER: &str = "SELECT value FROM meta WHERE key = ?1";
/// When the broker last acknowledged a row (for `edge-agent status` without the agent).
pub(super) const SET_LAST_ACK: &str =
    "INSERT INTO meta (key, value) VALUES ('last_ack_ms', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value";
pub(super) const EVICTION_ORDER: &str =
    "SELECT seq, class FROM events ORDER BY class, max_conf, seq LIMIT ?1";
pub(super) const DELETE_EVENT: &str = "DELETE FROM events WHERE seq = ?1";
pub(super) const DELETE_RANGE: &str = "DELETE FROM events WHERE seq >= ?1 AND seq <= ?2";
pub(super) const SELECT_OLDEST: &str =
    "SELECT seq, event_id, device_id, payload FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2";
pub(super) const SELECT_NEWEST_SINCE: &str =
    "SELECT seq, event_id, device_id, payload FROM events WHERE created_at >= ?1 ORDER BY seq LIMIT ?2";
pub(super) const SELECT_TO_SEND: &str =
    "SELECT seq, '', device_id, payload FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2";
pub(super) const SELECT_BY_SEQ: &str =
    "SELECT seq, event_id, device_id, payload FROM events WHERE seq = ?1";
/// The class and event id of a row about to be parked.
pub(super) const SELECT_PARKED: &str = "SELECT class, event_id FROM events WHERE seq = ?1";
pub(super) const DEAD_LETTER: &str =
    "INSERT OR REPLACE INTO dead_letters (seq, event_id, payload, reason, at)
     SELECT seq, event_id, payload, ?2, ?3 FROM events WHERE seq = ?1";
/// The dead-letter table's payloads may take 1/this of the outbox's `max_bytes` (5%).
pub const DEAD_LETTER_SHARE: u64 = 20;
/// Keeps the newest dead letters whose payloads fit `?1` bytes, drops the older ones.
pub(super) const TRIM_DEAD_LETTERS: &str = "
DELETE FROM dead_letters WHERE seq <= (
    SELECT max(seq) FROM (
        SELECT seq, sum(length(payload)) OVER (ORDER BY seq DESC) AS newer_bytes FROM dead_letters
    ) WHERE newer_bytes > ?1)";
pub(super) const BUMP_DROPPED_DEAD_LETTERS: &str =
    "INSERT INTO meta (key, value) VALUES ('dead_letters_dropped', ?1)
     ON CONFLICT(key) DO UPDATE SET value = value + excluded.value";
pub(super) const READ_DROPPED_DEAD_LETTERS: &str =
    "SELECT value FROM meta WHERE key = 'dead_letters_dropped'";
pub(super) const STATS: &str =
    "SELECT count(*), coalesce(sum(bytes), 0), min(created_at) FROM events";

impl Outbox {
    pub(super) fn migrate(&mut self) -> Result<i64, MigrateError> {
        let found: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(MigrateError::TooNew(found));
        }
        let tx = self.conn.transaction()?;
        if found < 1 {
            tx.execute_batch(SCHEMA_V1)?;
        }
        if found < 2 {
            tx.execute_batch(MIGRATE_V1_V2)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(found)
    }
}

pub(super) enum MigrateError {
    Sqlite(rusqlite::Error),
    TooNew(i64),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}
