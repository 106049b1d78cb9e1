//! Parking: a row the broker refuses for itself (while it takes the others) leaves the queue
//! for the `dead_letters` table, so it never holds back the rows behind it.
//!
//! # Invariants
//!
//! * **Parking is one transaction**: the copy into `dead_letters`, the delete from `events`,
//!   the trim of old dead letters and the `event_parked` health event that tells the data
//!   centre commit together or not at all.
//! * **The dead-letter table stays inside the cap**: its payloads may take
//!   1/[`DEAD_LETTER_SHARE`] of `max_bytes`; the oldest beyond that are dropped and counted
//!   (`dead_letters_dropped`).
//! * **No announcement loop**: parking a health event (an `event_parked` among them) announces
//!   nothing, so a broker that refuses health events cannot make the outbox announce forever.

use rusqlite::{params, OptionalExtension};

use super::schema::*;
use super::{insert_row, now_ms, Outbox, CLASS_HEALTH};
use crate::event::{Event, Health, Kind};

/// Longest broker reason quoted in an `event_parked` message, in bytes.
const MAX_REASON_BYTES: usize = 1024;

impl Outbox {
    /// Moves a row to the dead-letter table (it will never be sent again) and, unless the row
    /// is itself a health event, queues an `event_parked` health event naming it.
    pub fn dead_letter(&mut self, seq: u64, reason: &str) -> rusqlite::Result<()> {
        let seq =
            i64::try_from(seq).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let budget = i64::try_from(self.cfg.max_bytes / DEAD_LETTER_SHARE).unwrap_or(i64::MAX);
        let device = self.cfg.device_id.clone();
        let tx = self.conn.transaction()?;
        let parked: Option<(i64, String)> = tx
            .query_row(SELECT_PARKED, params![seq], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        tx.execute(DEAD_LETTER, params![seq, reason, now_ms()])?;
        let gone = tx.execute(DELETE_EVENT, params![seq])?;
        let dropped = tx.execute(TRIM_DEAD_LETTERS, params![budget])?;
        if dropped > 0 {
            tx.execute(
                BUMP_DROPPED_DEAD_LETTERS,
                params![i64::try_from(dropped).unwrap_or(i64::MAX)],
            )?;
            tracing::warn!(
                dropped,
                "outbox dead-letter table at its share of the cap: oldest dead letters dropped"
            );
        }
        let mut announced = 0;
        if let Some((_, event_id)) = parked.filter(|(class, _)| *class != CLASS_HEALTH) {
            let mut ev = Event::health(
                &device,
                Kind::EventParked,
                Health {
                    message: Some(message(seq, &event_id, reason)),
                    evicted: None,
                },
            );
            let next: i64 = tx.query_row(NEXT_SEQ, [], |r| r.get(0))?;
            insert_row(
                &mut tx.prepare_cached(INSERT_EVENT)?,
                next,
                &mut ev,
                now_ms(),
            )?;
            tx.execute(SET_NEXT_SEQ, params![next + 1])?;
            announced = 1;
        }
        tx.commit()?;
        self.depth = self.depth.saturating_sub(gone as u64) + announced;
        Ok(())
    }

    /// Dead letters dropped to keep the table inside its share of the cap, ever.
    pub fn dead_letters_dropped(&self) -> rusqlite::Result<u64> {
        let n: Option<i64> = self
            .conn
            .query_row(READ_DROPPED_DEAD_LETTERS, [], |r| r.get(0))
            .optional()?;
        Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
    }
}

/// `seq N (event ID) parked: REASON`, the reason cut at a character boundary.
fn message(seq: i64, event_id: &str, reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("seq {seq} (event {event_id}) parked: {}", &reason[..end])
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_cuts_long_reasons_at_a_character_boundary() {
        let reason = "é".repeat(super::MAX_REASON_BYTES);
        let m = super::message(7, "id", &reason);
        assert!(m.starts_with("seq 7 (event id) parked: é"));
        assert!(m.len() <= 40 + super::MAX_REASON_BYTES, "{}", m.len());
    }
}
