//! The PostgreSQL side of the sink: one transaction per batch with its rows, dead letters and
//! offsets.

use std::collections::{HashMap, HashSet};

use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::event::Event;

use super::decode::Item;

const STAGE: &str = "
SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS stage_events (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_objects (LIKE objects) ON COMMIT DELETE ROWS;";
/// The COPY statements for `events` and `objects` rows, into the real tables or into the
/// transaction's staging tables: one column list each, so the two cannot drift apart.
macro_rules! copy_events {
    ($table:literal) => {
        concat!("COPY ", $table, " (event_id, device_id, seq, captured_at, kind, model_name, model_sha256, frame_width, frame_height, detections, kafka_topic, kafka_partition, kafka_offset) FROM STDIN BINARY")
    };
}
macro_rules! copy_objects {
    ($table:literal) => {
        concat!("COPY ", $table, " (event_id, idx, device_id, captured_at, label, class_id, confidence, x1, y1, x2, y2) FROM STDIN BINARY")
    };
}

/// Where a batch's rows are COPYed.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Straight into `events` / `objects` (the fast path, and the raw baseline).
    Tables,
    /// Into the temporary staging tables, merged with `ON CONFLICT DO NOTHING` afterwards.
    Staging,
}

impl Target {
    fn statements(self) -> (&'static str, &'static str) {
        match self {
            Target::Tables => (copy_events!("events"), copy_objects!("objects")),
            Target::Staging => (copy_events!("stage_events"), copy_objects!("stage_objects")),
        }
    }
}

/// Staged events whose `event_id` is stored already with other content (any event column but
/// the Kafka position, or any of its objects): a second, different event under a taken id.
/// Run before the merge, so the rows this batch inserts are not compared with themselves.
const FIND_CONFLICTS: &str = "
SELECT s.kafka_partition, s.kafka_offset, s.event_id FROM stage_events s JOIN events e USING (event_id)
WHERE (s.device_id, s.seq, s.captured_at, s.kind, s.model_name, s.model_sha256, s.frame_width, s.frame_height, s.detections)
      IS DISTINCT FROM
      (e.device_id, e.seq, e.captured_at, e.kind, e.model_name, e.model_sha256, e.frame_width, e.frame_height, e.detections)
   OR EXISTS (SELECT 1 FROM stage_objects so LEFT JOIN objects o ON o.event_id = so.event_id AND o.idx = so.idx
              WHERE so.event_id = s.event_id
                AND (so.label, so.class_id, so.confidence, so.x1, so.y1, so.x2, so.y2)
                    IS DISTINCT FROM (o.label, o.class_id, o.confidence, o.x1, o.y1, o.x2, o.y2))";
/// Conflicting events leave the staging tables (they are dead-lettered instead).
const UNSTAGE: &str = "
WITH e AS (DELETE FROM stage_events WHERE event_id = ANY($1))
DELETE FROM stage_objects WHERE event_id = ANY($1)";
/// Events not stored yet, and the objects of exactly those events: an object row is written
/// only together with the event row that owns it. Returns (events, objects) inserted.
const MERGE: &str = "
WITH ev AS (INSERT INTO events SELECT * FROM stage_events ON CONFLICT (event_id) DO NOTHING RETURNING event_id),
     ob AS (INSERT INTO objects SELECT o.* FROM stage_objects o WHERE o.event_id IN (SELECT event_id FROM ev)
            ON CONFLICT (event_id, idx) DO NOTHING RETURNING 1)
SELECT (SELECT count(*) FROM ev), (SELECT count(*) FROM ob)";
const INSERT_HEALTH: &str = "INSERT INTO device_health (event_id, device_id, captured_at, kind, message, evicted) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING";
/// A dead letter, keyed by its position in the partition's current log epoch (`offsets`).
const INSERT_DEAD: &str = "
INSERT INTO dead_letters (kafka_topic, kafka_partition, log_epoch, kafka_offset, payload, error)
VALUES ($1, $2, COALESCE((SELECT log_epoch FROM sink_offsets WHERE kafka_topic = $1 AND kafka_partition = $2), 0), $3, $4, $5)
ON CONFLICT DO NOTHING";
const UPSERT_OFFSET: &str = "INSERT INTO sink_offsets (kafka_topic, kafka_partition, next_offset) VALUES ($1, $2, $3)
     ON CONFLICT (kafka_topic, kafka_partition) DO UPDATE SET next_offset = GREATEST(sink_offsets.next_offset, EXCLUDED.next_offset), updated_at = now()";

/// An event's numbers as its columns store them (`bigint`, `integer`), converted with checks
/// when the message is decoded: a value a column cannot hold dead-letters the message instead
/// of being wrapped into another number.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: i64,
    pub frame: Option<(i32, i32)>,
    pub detections: i32,
    /// Each detection's `class_id`, in order.
    pub class_ids: Vec<i32>,
}

impl Stored {
    /// The checked conversions; the error names the field and the value.
    pub fn of(ev: &Event) -> Result<Self, String> {
        let int = |what: &str, v: u64| {
            i32::try_from(v).map_err(|_| format!("{what} {v} does not fit an integer column"))
        };
        Ok(Self {
            seq: i64::try_from(ev.seq)
                .map_err(|_| format!("seq {} does not fit a bigint column", ev.seq))?,
            frame: match ev.frame {
                Some(f) => Some((
                    int("frame.width", u64::from(f.width))?,
                    int("frame.height", u64::from(f.height))?,
                )),
                None => None,
            },
            detections: i32::try_from(ev.detections.len()).map_err(|_| {
                format!(
                    "{} detections do not fit an integer column",
                    ev.detections.len()
                )
            })?,
            class_ids: ev
                .detections
                .iter()
                .map(|d| int("detections[].class_id", u64::from(d.class_id)))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// COPY BINARY of events and their objects into `target`.
async fn copy_rows<'a, I>(
    tx: &tokio_postgres::Transaction<'_>,
    target: Target,
    topic: &str,
    rows: I,
) -> Result<(u64, u64), tokio_postgres::Error>
where
    I: Iterator<Item = (&'a Event, &'a Stored, i32, i64)> + Clone,
{
    let mut n_ev = 0u64;
    let mut n_obj = 0u64;
    {
        let sink = tx.copy_in(target.statements().0).await?;
        let types = [
            Type::UUID,
            Type::TEXT,
            Type::INT8,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::INT4,
            Type::INT4,
            Type::TEXT,
            Type::INT4,
            Type::INT8,
        ];
        let w = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(w);
        for (ev, stored, partition, offset) in rows.clone() {
            let (mn, ms) = match &ev.model {
                Some(m) => (Some(m.name.as_str()), Some(m.sha256.as_str())),
                None => (None, None),
            };
            let (fw, fh) = stored.frame.unzip();
            w.as_mut()
                .write(&[
                    &ev.event_id,
                    &ev.device_id,
                    &stored.seq,
                    &ev.captured_at,
                    &ev.kind.as_str(),
                    &mn,
                    &ms,
                    &fw,
                    &fh,
                    &stored.detections,
                    &topic,
                    &partition,
                    &offset,
                ])
                .await?;
            n_ev += 1;
        }
        w.finish().await?;
    }
    {
        let sink = tx.copy_in(target.statements().1).await?;
        let types = [
            Type::UUID,
            Type::INT4,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::INT4,
            Type::FLOAT4,
            Type::FLOAT4,
            Type::FLOAT4,
            Type::FLOAT4,
            Type::FLOAT4,
        ];
        let w = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(w);
        for (ev, stored, _, _) in rows {
            for ((idx, d), class_id) in (0i32..).zip(&ev.detections).zip(&stored.class_ids) {
                w.as_mut()
                    .write(&[
                        &ev.event_id,
                        &idx,
                        &ev.device_id,
                        &ev.captured_at,
                        &d.label,
                        class_id,
                        &d.confidence,
                        &d.bbox[0],
                        &d.bbox[1],
                        &d.bbox[2],
                        &d.bbox[3],
                    ])
                    .await?;
                n_obj += 1;
            }
        }
        w.finish().await?;
    }
    Ok((n_ev, n_obj))
}

/// The physical limit the sink is measured against: the same rows COPY BINARY'd straight into
/// `events` and `objects`, one transaction per `batch` events, with no staging, no dedupe, no
/// offsets and no Kafka. Events whose numbers no column can hold are left out. Returns (event
/// rows, object rows).
pub async fn copy_baseline(
    client: &mut Client,
    topic: &str,
    events: &[Event],
    batch: usize,
) -> Result<(u64, u64), tokio_postgres::Error> {
    let rows: Vec<(&Event, Stored)> = events
        .iter()
        .filter_map(|e| Stored::of(e).ok().map(|s| (e, s)))
        .collect();
    let (mut ne, mut no) = (0, 0);
    let mut offset = 0i64;
    for chunk in rows.chunks(batch.max(1)) {
        let tx = client.transaction().await?;
        let rows = chunk
            .iter()
            .zip(offset..)
            .map(|((e, s), o)| (*e, s, 0i32, o));
        offset = offset.saturating_add(i64::try_from(chunk.len()).unwrap_or(i64::MAX));
        let (a, b) = copy_rows(&tx, Target::Tables, topic, rows).await?;
        tx.commit().await?;
        ne += a;
        no += b;
    }
    Ok((ne, no))
}

/// What one committed batch wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Event rows inserted (re-deliveries of stored events are not counted).
    pub events: u64,
    /// Object rows inserted.
    pub objects: u64,
    /// Messages dead-lettered (conflicts included).
    pub dead: u64,
    /// Events whose id was stored already with other content (dead-lettered, not merged).
    pub conflicts: u64,
    /// True when the batch went through staging (it held a re-delivery or a conflict).
    pub deduped: bool,
}

impl std::ops::AddAssign for Written {
    fn add_assign(&mut self, o: Self) {
        self.events += o.events;
        self.objects += o.objects;
        self.dead += o.dead;
        self.conflicts += o.conflicts;
        self.deduped |= o.deduped;
    }
}

/// The dead-letter reason of an event whose id is taken by another event.
fn conflict_reason(ev: &Event) -> String {
    format!(
        "conflict: event_id {} is stored already with different content (this message was not merged; payload re-encoded from the decoded event)",
        ev.event_id
    )
}

/// Writes one batch and its offsets in one transaction.
pub(super) async fn write_batch(
    client: &mut Client,
    topic: &str,
    items: &[Item],
) -> Result<Written, tokio_postgres::Error> {
    let mut tx = client.transaction().await?;
    let mut w = Written::default();
    let good = items.iter().filter_map(|it| match it {
        Item::Good {
            ev,
            stored,
            partition,
            offset,
        } => Some((ev, stored, *partition, *offset)),
        Item::Bad { .. } | Item::Repeat { .. } => None,
    });
    // Fast path: COPY straight into the tables, inside a savepoint. Duplicates are rare (an
    // agent's re-send after a lost acknowledgement, a sink restart); when one is in the batch
    // the unique index refuses the COPY, the savepoint rolls back, and the batch goes through
    // staging instead, where conflicts are found and only new events (with their objects) are
    // merged. Either way the rows and the offsets commit together below.
    let direct = {
        let sp = tx.savepoint("direct_copy").await?;
        match copy_rows(&sp, Target::Tables, topic, good.clone()).await {
            Ok(counts) => {
                sp.commit().await?;
                Some(counts)
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                sp.rollback().await?;
                None
            }
            Err(e) => return Err(e),
        }
    };
    // (partition, offset) of each conflicting message.
    let mut conflicts: HashSet<(i32, i64)> = HashSet::new();
    match direct {
        Some((e, o)) => (w.events, w.objects) = (e, o),
        None => {
            w.deduped = true;
            tx.batch_execute(STAGE).await?;
            copy_rows(&tx, Target::Staging, topic, good).await?;
            let mut ids = Vec::new();
            for r in tx.query(FIND_CONFLICTS, &[]).await? {
                conflicts.insert((r.try_get(0)?, r.try_get(1)?));
                ids.push(r.try_get::<_, uuid::Uuid>(2)?);
            }
            if !ids.is_empty() {
                tx.execute(UNSTAGE, &[&ids]).await?;
            }
            let r = tx.query_one(MERGE, &[]).await?;
            let count = |i: usize| {
                r.try_get::<_, i64>(i)
                    .map(|n| u64::try_from(n).unwrap_or(0))
            };
            (w.events, w.objects) = (count(0)?, count(1)?);
        }
    }
    let health = tx.prepare(INSERT_HEALTH).await?;
    let dead = tx.prepare(INSERT_DEAD).await?;
    let mut next: HashMap<i32, i64> = HashMap::new();
    for it in items {
        let (partition, offset) = it.position();
        match it {
            Item::Good { ev, .. } if conflicts.contains(&(partition, offset)) => {
                let payload = serde_json::to_vec(ev).ok();
                tx.execute(
                    &dead,
                    &[&topic, &partition, &offset, &payload, &conflict_reason(ev)],
                )
                .await?;
                w.dead += 1;
                w.conflicts += 1;
            }
            Item::Good { ev, .. } => {
                if ev.kind.is_health() {
                    let h = ev.health.clone().unwrap_or_default();
                    let evicted = h.evicted.and_then(|e| serde_json::to_value(e).ok());
                    tx.execute(
                        &health,
                        &[
                            &ev.event_id,
                            &ev.device_id,
                            &ev.captured_at,
                            &ev.kind.as_str(),
                            &h.message,
                            &evicted,
                        ],
                    )
                    .await?;
                }
            }
            Item::Bad { payload, error, .. } => {
                tx.execute(&dead, &[&topic, &partition, &offset, payload, error])
                    .await?;
                w.dead += 1;
            }
            Item::Repeat { .. } => {}
        }
        let e = next.entry(partition).or_insert(0);
        *e = (*e).max(offset + 1);
    }
    let up = tx.prepare(UPSERT_OFFSET).await?;
    for (p, o) in &next {
        tx.execute(&up, &[&topic, p, o]).await?;
    }
    tx.commit().await?;
    Ok(w)
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::testkit::Synthetic;

    #[test]
    fn numbers_no_column_can_hold_are_refused_not_wrapped() {
        let ev = Synthetic::new("d").event(1, 2);
        let s = Stored::of(&ev).unwrap();
        assert_eq!((s.detections, s.class_ids.len()), (2, 2));
        let mut e = ev.clone();
        e.seq = u64::MAX;
        assert!(Stored::of(&e).unwrap_err().contains("bigint"));
        let mut e = ev.clone();
        e.detections[1].class_id = u32::MAX;
        assert!(Stored::of(&e).unwrap_err().contains("class_id 4294967295"));
        let mut e = ev;
        if let Some(f) = e.frame.as_mut() {
            f.height = 1 << 31;
        }
        assert!(Stored::of(&e).unwrap_err().contains("frame.height"));
    }
}
