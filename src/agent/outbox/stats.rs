//! The outbox's counters, read through any connection: the writer's own, or a read-only one
//! for `edge-agent status` ([`read_stats`]), which must never change a live outbox.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::files::file_bytes;
use super::schema::{READ_COUNTER, SCHEMA_VERSION, STATS};
use super::OutboxStats;
use crate::event::Evictions;

/// Why an outbox file could not be read for `status`.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no outbox at {0}")]
    Missing(PathBuf),
    #[error("outbox {path} has schema version {found}, this build reads {SCHEMA_VERSION} (the agent migrates it when it next starts)")]
    Version { path: PathBuf, found: i64 },
    #[error("outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// Rows, payload bytes and the oldest row's creation time.
pub(super) fn counts(conn: &Connection) -> rusqlite::Result<(u64, u64, Option<i64>)> {
    conn.query_row(STATS, [], |r| {
        Ok((
            u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
            u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            r.get(2)?,
        ))
    })
}

/// One persistent counter of the `meta` table (0 when it was never written).
pub(super) fn counter(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    let v = conn
        .query_row(READ_COUNTER, params![key], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0);
    Ok(u64::try_from(v).unwrap_or(0))
}

/// The persistent eviction counters: four key lookups, no table scan.
pub(super) fn evictions(conn: &Connection) -> rusqlite::Result<Evictions> {
    Ok(Evictions {
        no_detections: counter(conn, "evicted_no_detections")?,
        low_confidence: counter(conn, "evicted_low_confidence")?,
        oldest: counter(conn, "evicted_oldest")?,
        expired: counter(conn, "evicted_expired")?,
    })
}

/// Depth, bytes and counters of the outbox at `path` through `conn`.
pub(super) fn of(conn: &Connection, path: &Path) -> rusqlite::Result<OutboxStats> {
    let (depth, payload_bytes, oldest) = counts(conn)?;
    let dead: i64 = conn.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
    Ok(OutboxStats {
        depth,
        payload_bytes,
        file_bytes: file_bytes(path),
        oldest_created_ms: oldest,
        evictions: evictions(conn)?,
        dead_letters: u64::try_from(dead).unwrap_or(0),
        quarantined: counter(conn, "quarantined")?,
        next_seq: counter(conn, "next_seq")?,
        last_ack_ms: conn
            .query_row(READ_COUNTER, params!["last_ack_ms"], |r| r.get::<_, i64>(0))
            .optional()?,
    })
}

/// The counters of the outbox at `path`, read without changing anything: a read-only
/// connection (WAL readers neither wait for nor block the running agent's writer), no
/// migration, no reserve file, no integrity check and never a quarantine. Those are the
/// agent's business when it opens its outbox.
pub fn read_stats(path: &Path) -> Result<OutboxStats, ReadError> {
    if !path.exists() {
        return Err(ReadError::Missing(path.to_path_buf()));
    }
    let sq = |source| ReadError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sq)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sq)?;
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sq)?;
    if found != SCHEMA_VERSION {
        return Err(ReadError::Version {
            path: path.to_path_buf(),
            found,
        });
    }
    of(&conn, path).map_err(sq)
}
