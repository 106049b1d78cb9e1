//! The PostgreSQL side of the sink: one transaction per batch with its rows, dead letters and
//! offsets.

use std::collections::HashMap;

use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::event::Event;

use super::consumer::Item;

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

const MERGE_EVENTS: &str =
    "INSERT INTO events SELECT * FROM stage_events ON CONFLICT (event_id) DO NOTHING";
const MERGE_OBJECTS: &str =
    "INSERT INTO objects SELECT * FROM stage_objects ON CONFLICT (event_id, idx) DO NOTHING";
const INSERT_HEALTH: &str = "INSERT INTO device_health (event_id, device_id, captured_at, kind, message, evicted) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING";
const INSERT_DEAD: &str = "INSERT INTO dead_letters (kafka_topic, kafka_partition, kafka_offset, payload, error) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
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

/// Writes one batch and its offsets in one transaction.
pub(super) async fn write_batch(
    client: &mut Client,
    topic: &str,
    items: &[Item],
) -> Result<(u64, u64, u64, bool), tokio_postgres::Error> {
    let mut tx = client.transaction().await?;
    let mut n_dead = 0u64;
    let good = items.iter().filter_map(|it| match it {
        Item::Good {
            ev,
            stored,
            partition,
            offset,
        } => Some((ev, stored, *partition, *offset)),
        Item::Bad { .. } => None,
    });
    // Fast path: COPY straight into the tables, inside a savepoint. Duplicates are rare (an
    // agent's re-send after a lost acknowledgement, a sink restart); when one is in the batch
    // the unique index refuses the COPY, the savepoint rolls back, and the batch goes through
    // staging + ON CONFLICT DO NOTHING instead. Either way the rows and the offsets commit
    // together below.
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
    let (n_ev, n_obj) = match direct {
        Some(counts) => counts,
        None => {
            tx.batch_execute(STAGE).await?;
            let counts = copy_rows(&tx, Target::Staging, topic, good).await?;
            tx.execute(MERGE_EVENTS, &[]).await?;
            tx.execute(MERGE_OBJECTS, &[]).await?;
            counts
        }
    };
    let health = tx.prepare(INSERT_HEALTH).await?;
    let dead = tx.prepare(INSERT_DEAD).await?;
    let mut next: HashMap<i32, i64> = HashMap::new();
    for it in items {
        match it {
            Item::Good {
                ev,
                partition,
                offset,
                ..
            } => {
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
                let e = next.entry(*partition).or_insert(0);
                *e = (*e).max(offset + 1);
            }
            Item::Bad {
                partition,
                offset,
                payload,
                error,
            } => {
                tx.execute(&dead, &[&topic, partition, offset, payload, error])
                    .await?;
                n_dead += 1;
                let e = next.entry(*partition).or_insert(0);
                *e = (*e).max(offset + 1);
            }
        }
    }
    let up = tx.prepare(UPSERT_OFFSET).await?;
    for (p, o) in &next {
        tx.execute(&up, &[&topic, p, o]).await?;
    }
    tx.commit().await?;
    Ok((n_ev, n_obj, n_dead, direct.is_none()))
}

/// True for errors where retrying later can succeed (connection lost, server restarting).
pub(super) fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true, // I/O or protocol: the connection is gone
        Some(c) => {
            let s = c.code();
            s.starts_with("08")
                || s.starts_with("57P")
                || s == "40001"
                || s == "40P01"
                || s == "53300"
        }
    }
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
