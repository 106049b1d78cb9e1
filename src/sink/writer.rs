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

/// COPY BINARY of events and their objects into `target`.
async fn copy_rows<'a, I>(
    tx: &tokio_postgres::Transaction<'_>,
    target: Target,
    topic: &str,
    rows: I,
) -> Result<(u64, u64), tokio_postgres::Error>
where
    I: Iterator<Item = (&'a Event, i32, i64)> + Clone,
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
        for (ev, partition, offset) in rows.clone() {
            let (mn, ms) = match &ev.model {
                Some(m) => (Some(m.name.as_str()), Some(m.sha256.as_str())),
                None => (None, None),
            };
            let (fw, fh) = match ev.frame {
                Some(f) => (Some(f.width as i32), Some(f.height as i32)),
                None => (None, None),
            };
            w.as_mut()
                .write(&[
                    &ev.event_id,
                    &ev.device_id,
                    &(ev.seq as i64),
                    &ev.captured_at,
                    &ev.kind.as_str(),
                    &mn,
                    &ms,
                    &fw,
                    &fh,
                    &(ev.detections.len() as i32),
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
        for (ev, _, _) in rows {
            for (i, d) in ev.detections.iter().enumerate() {
                w.as_mut()
                    .write(&[
                        &ev.event_id,
                        &(i as i32),
                        &ev.device_id,
                        &ev.captured_at,
                        &d.label,
                        &(d.class_id as i32),
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
/// offsets and no Kafka. Returns (event rows, object rows).
pub async fn copy_baseline(
    client: &mut Client,
    topic: &str,
    events: &[Event],
    batch: usize,
) -> Result<(u64, u64), tokio_postgres::Error> {
    let (mut ne, mut no) = (0, 0);
    for (k, chunk) in events.chunks(batch.max(1)).enumerate() {
        let tx = client.transaction().await?;
        let base = (k * batch) as i64;
        let rows = chunk
            .iter()
            .enumerate()
            .map(|(i, e)| (e, 0i32, base + i as i64));
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
            partition,
            offset,
        } => Some((ev, *partition, *offset)),
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
