//! Reading rows to send without the writer's lock: the uplink's own connection.

use rusqlite::{params, Connection, OptionalExtension};

use super::schema::*;
use super::Pending;

pub(super) fn pending_row(r: &rusqlite::Row) -> rusqlite::Result<Pending> {
    Ok(Pending {
        seq: r.get::<_, i64>(0)? as u64,
        event_id: r.get(1)?,
        device_id: r.get(2)?,
        payload: r.get(3)?,
    })
}

/// A second, read-only connection to an open outbox, for the uplink: in WAL mode its reads
/// neither wait for nor block the writer's commits and checkpoints.
pub struct OutboxReader {
    pub(super) conn: Connection,
}

impl OutboxReader {
    /// Up to `limit` rows with `seq > after`, oldest first (`event_id` left empty).
    pub fn rows_after(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<Pending>> {
        let mut stmt = self.conn.prepare_cached(SELECT_TO_SEND)?;
        let rows = stmt.query_map(params![after as i64, limit as i64], pending_row)?;
        rows.collect()
    }

    /// Calls `f(seq, key, payload)` for up to `limit` rows with `seq > after`, oldest first,
    /// with the key and payload borrowed from SQLite (no copy); stops when `f` returns false.
    pub fn visit_after<E: From<rusqlite::Error>>(
        &self,
        after: u64,
        limit: usize,
        mut f: impl FnMut(u64, &str, &[u8]) -> Result<bool, E>,
    ) -> Result<(), E> {
        let mut stmt = self.conn.prepare_cached(SELECT_TO_SEND)?;
        let mut rows = stmt.query(params![after as i64, limit as i64])?;
        while let Some(r) = rows.next()? {
            let seq = r.get::<_, i64>(0)? as u64;
            let key = r.get_ref(2)?.as_str().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, e.into())
            })?;
            let payload = r.get_ref(3)?.as_blob().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Blob, e.into())
            })?;
            if !f(seq, key, payload)? {
                break;
            }
        }
        Ok(())
    }

    /// The rows with these seqs that still exist.
    pub fn rows_by_seq(&self, seqs: &[u64]) -> rusqlite::Result<Vec<Pending>> {
        let mut stmt = self.conn.prepare_cached(SELECT_BY_SEQ)?;
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            if let Some(p) = stmt.query_row(params![*s as i64], pending_row).optional()? {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Highest seq queued (0 when empty).
    pub fn max_seq(&self) -> rusqlite::Result<u64> {
        self.conn
            .query_row("SELECT coalesce(max(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|v| v as u64)
    }
}
