//! Eviction by value when a batch would not fit under the cap, and expiry by age.

use rusqlite::params;

use crate::event::Evictions;

use super::files::now_ms;
use super::schema::*;
use super::{EnqueueError, Outbox};

impl Outbox {
    /// Evicts until `incoming` more bytes fit with some headroom; returns what was evicted
    /// (not yet recorded: the caller records it with the batch, atomically).
    pub(super) fn make_room(&mut self, incoming: u64) -> Result<Evictions, EnqueueError> {
        let mut total = Evictions::default();
        if let Some(age) = self.cfg.max_age {
            total.expired += self.expire(now_ms() - age.as_millis() as i64)?;
        }
        // Pages the batch needs (rows + index entries), with slack.
        let needed = (incoming * 2).div_ceil(self.page_size) + 8;
        let limit = self.max_pages * 90 / 100;
        let mut used = self.used_pages()?;
        while used + needed > limit {
            let depth = self.depth;
            if depth == 0 {
                break;
            }
            // Evict towards 75% of the cap, at least a few rows per round.
            let over = (used + needed).saturating_sub(self.max_pages * 75 / 100);
            let avg_row_pages = (used as f64 / depth as f64).max(1e-3);
            let n = ((over as f64 / avg_row_pages).ceil() as u64).clamp(1, depth);
            let ev = self.evict(n)?;
            add(&mut total, ev);
            let after = self.used_pages()?;
            if after >= used && ev.total() == 0 {
                break;
            }
            used = after;
        }
        if total.total() > 0 {
            tracing::warn!(?total, "outbox at its cap: evicted events by value");
        }
        Ok(total)
    }

    /// Drops events (not health events) created before `cutoff_ms`. `created_at` grows with
    /// `seq`, so the scan walks from the oldest row and stops at the first young one; no
    /// index on `created_at` is needed (it would cost every insert and delete).
    pub(super) fn expire(&mut self, cutoff_ms: i64) -> rusqlite::Result<u64> {
        let tx = self.conn.transaction()?;
        let mut n = 0u64;
        {
            let mut scan = tx.prepare_cached(
                "SELECT seq, created_at, class FROM events ORDER BY seq LIMIT 1000",
            )?;
            let mut del = tx.prepare_cached(DELETE_EVENT)?;
            let rows: Vec<(i64, i64, i64)> = scan
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            for (seq, created, class) in rows {
                if created >= cutoff_ms {
                    break;
                }
                if class != 2 {
                    del.execute(params![seq])?;
                    n += 1;
                }
            }
        }
        tx.commit()?;
        self.depth = self.depth.saturating_sub(n);
        Ok(n)
    }

    /// Deletes the `n` lowest-value events; returns counts by reason.
    pub(super) fn evict(&mut self, n: u64) -> rusqlite::Result<Evictions> {
        let tx = self.conn.transaction()?;
        let victims: Vec<(i64, i64)> = {
            let mut stmt = tx.prepare_cached(EVICTION_ORDER)?;
            let rows = stmt.query_map(params![n as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut ev = Evictions::default();
        {
            let mut del = tx.prepare_cached(DELETE_EVENT)?;
            for (seq, class) in &victims {
                del.execute(params![seq])?;
                match class {
                    0 => ev.no_detections += 1,
                    1 => ev.low_confidence += 1,
                    _ => ev.oldest += 1,
                }
            }
        }
        tx.commit()?;
        self.depth = self.depth.saturating_sub(victims.len() as u64);
        Ok(ev)
    }
}

pub(super) fn add(into: &mut Evictions, ev: Evictions) {
    into.no_detections += ev.no_detections;
    into.low_confidence += ev.low_confidence;
    into.oldest += ev.oldest;
    into.expired += ev.expired;
}

pub(super) fn counter_pairs(ev: &Evictions) -> [(&'static str, u64); 4] {
    [
        ("evicted_no_detections", ev.no_detections),
        ("evicted_low_confidence", ev.low_confidence),
        ("evicted_oldest", ev.oldest),
        ("evicted_expired", ev.expired),
    ]
}
