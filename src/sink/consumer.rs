//! The Kafka side of the sink: partitions assigned at the offsets stored in PostgreSQL,
//! batches collected by size or time, messages decoded or rejected, each batch handed to the
//! writer and retried while the database is unavailable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::event::{self, Event};
use crate::sink::database::{self, Database};

use super::config::{consumer_config, SinkConfig};
use super::schema::{migrate, schema_is_current};
use super::writer::{is_transient, write_batch, Stored};
use super::{SinkError, SinkStatus};

/// Why the rebalance callback could not read the stored offsets (it retries).
#[derive(Debug, thiserror::Error)]
enum OffsetsError {
    #[error("no tokio runtime in the rebalance callback: {0}")]
    Runtime(#[from] tokio::runtime::TryCurrentError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

const SELECT_OFFSETS: &str =
    "SELECT kafka_partition, next_offset FROM sink_offsets WHERE kafka_topic = $1";

/// Starts every newly assigned partition exactly at PostgreSQL's stored offset: the
/// assignment is made by us, with those offsets, inside librdkafka's rebalance callback (a
/// seek after the fact can fail while the fetcher starts, and the fetch would then begin at
/// Kafka's committed offset). The loop also learns the offsets, to drop anything older.
struct Ctx {
    assigned: Arc<Mutex<Vec<(i32, i64)>>>,
    /// Where the offsets live (the callback opens its own connection).
    database: Database,
    /// Total consumer lag from the last statistics report (-1: none yet).
    lag: Arc<std::sync::atomic::AtomicI64>,
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.lag.store(lag, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Ctx {
    fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, OffsetsError> {
        let handle = tokio::runtime::Handle::try_current()?;
        let db = self.database.clone();
        let topic = topic.to_string();
        tokio::task::block_in_place(|| {
            handle.block_on(async move {
                let c = db.connect().await?;
                let rows = c.query(SELECT_OFFSETS, &[&topic]).await?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
                    .collect())
            })
        })
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr;
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            tracing::info!("partitions revoked");
            let _ = base.unassign();
            return;
        }
        let topics: std::collections::BTreeSet<String> = tpl
            .elements()
            .iter()
            .map(|e| e.topic().to_string())
            .collect();
        let mut fresh = Vec::new();
        let mut with_offsets = TopicPartitionList::new();
        for topic in topics {
            // The database must answer before we consume: retry until it does.
            let stored = loop {
                match self.stored_offsets(&topic) {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read stored offsets; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            };
            for e in tpl.elements_for_topic(&topic) {
                let o = stored.get(&e.partition()).copied().unwrap_or(0);
                let _ = with_offsets.add_partition_offset(&topic, e.partition(), Offset::Offset(o));
                fresh.push((e.partition(), o));
            }
        }
        tracing::info!(
            ?fresh,
            "partitions assigned at the offsets stored in PostgreSQL"
        );
        if let Err(e) = base.assign(&with_offsets) {
            tracing::error!(error = %e, "assign failed");
        }
        if let Ok(mut a) = self.assigned.lock() {
            a.extend(fresh);
        }
    }
}

/// One decoded or rejected message of a batch.
// Nearly every item is `Good`; boxing it would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Item {
    Good {
        ev: Event,
        /// Its numbers as the columns store them, checked.
        stored: Stored,
        partition: i32,
        offset: i64,
    },
    Bad {
        partition: i32,
        offset: i64,
        payload: Option<Vec<u8>>,
        error: String,
    },
}

fn classify(m: &BorrowedMessage<'_>, max_bytes: usize) -> Item {
    let (partition, offset) = (m.partition(), m.offset());
    let Some(payload) = m.payload() else {
        return Item::Bad {
            partition,
            offset,
            payload: None,
            error: "empty message".into(),
        };
    };
    if payload.len() > max_bytes {
        return Item::Bad {
            partition,
            offset,
            payload: None,
            error: format!("oversized: {} bytes", payload.len()),
        };
    }
    let decoded = event::decode(payload)
        .map_err(|e| e.to_string())
        .and_then(|ev| Stored::of(&ev).map(|stored| (ev, stored)));
    match decoded {
        Ok((ev, stored)) => Item::Good {
            ev,
            stored,
            partition,
            offset,
        },
        Err(error) => Item::Bad {
            partition,
            offset,
            payload: Some(payload.to_vec()),
            error: storable(&error),
        },
    }
}

/// Longest dead-letter reason kept (the rest is cut, marked with `...`).
const MAX_REASON_CHARS: usize = 2000;

/// A dead-letter reason PostgreSQL can store: decoders quote the offending input, which may
/// hold NUL (no `text` column can) and be of any length.
fn storable(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect();
    if reason.chars().nth(MAX_REASON_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

/// Runs the sink until `stop` turns true.
pub async fn run(
    cfg: SinkConfig,
    mut stop: watch::Receiver<bool>,
    status: watch::Sender<SinkStatus>,
) -> Result<(), SinkError> {
    let db = Database::new(&cfg.database_url, cfg.database_password_file.as_deref())?;
    tracing::info!(sslmode = ?db.ssl_mode(), "database settings");
    let mut client = loop {
        match db.connect().await {
            Ok(c) => break c,
            // A refused certificate will not fix itself: say so and stop.
            Err(e) if database::is_tls_refusal(&e) => return Err(SinkError::DbTls(e)),
            Err(e) => {
                tracing::warn!(error = %e, "database unreachable at start; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if *stop.borrow() {
                    return Ok(());
                }
            }
        }
    };
    if !schema_is_current(&client).await? {
        match migrate(&mut client).await {
            Ok(n) => tracing::info!(applied = n, "migrations applied"),
            Err(SinkError::Migrate(e)) => return Err(SinkError::SchemaBehind(e)),
            Err(e) => return Err(e),
        }
    }
    let assigned = Arc::new(Mutex::new(Vec::new()));
    let cc = consumer_config(&cfg)?;
    let lag = Arc::new(std::sync::atomic::AtomicI64::new(-1));
    let consumer: StreamConsumer<Ctx> = cc.create_with_context(Ctx {
        assigned: assigned.clone(),
        database: db.clone(),
        lag: lag.clone(),
    })?;
    consumer.subscribe(&[&cfg.topic])?;
    // Next offset to write per partition, from PostgreSQL; messages below it are written already.
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut st = SinkStatus::default();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        // Collect a batch (size or time).
        let mut items: Vec<Item> = Vec::new();
        // Next offset expected per partition within this batch.
        let mut batch_next: HashMap<i32, i64> = HashMap::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        while items.len() < cfg.batch_size {
            let wait = match deadline {
                Some(d) => d,
                None => tokio::time::Instant::now() + Duration::from_millis(200),
            };
            tokio::select! {
                m = consumer.recv() => {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            // Broker down, transport errors: librdkafka reconnects by itself.
                            // Keep the batch so far and keep polling; offsets only move with
                            // rows in PostgreSQL, so nothing is lost or doubled.
                            st.broker_errors += 1;
                            status.send_replace(st.clone());
                            tracing::warn!(error = %e, "consumer error; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    };
                    for (p, o) in take_assignments(&assigned) {
                        next.insert(p, o);
                    }
                    if let Some(&n) = next.get(&m.partition()) {
                        if m.offset() < n {
                            st.skipped_already_written += 1;
                            continue;
                        }
                        // Offsets are contiguous in a plain topic written without transactions;
                        // a jump means records this sink will never see (compaction, retention,
                        // or a broker serving the wrong batch). Say so loudly; the rows that
                        // did arrive are still written exactly once.
                        let expected = n.max(*batch_next.get(&m.partition()).unwrap_or(&n));
                        if m.offset() > expected {
                            st.offset_gaps += 1;
                            tracing::warn!(partition = m.partition(), expected, got = m.offset(), "offset gap: records missing from the topic");
                        }
                    }
                    batch_next.insert(m.partition(), m.offset() + 1);
                    items.push(classify(&m, cfg.max_message_bytes));
                    if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + Duration::from_millis(cfg.batch_ms));
                    }
                }
                _ = tokio::time::sleep_until(wait) => {
                    if deadline.is_some() { break; }
                    for (p, o) in take_assignments(&assigned) {
                        next.insert(p, o);
                    }
                }
                _ = stop.changed() => return Ok(()),
            }
        }
        if items.is_empty() {
            continue;
        }
        // Write it; connection errors retry forever. We do not poll meanwhile, so the only
        // buffering is librdkafka's prefetch queue, bounded by `queued.max.messages.kbytes`.
        // (Explicit pause/resume was tried: librdkafka purges the fetch queue on pause and
        // resumed past it, skipping messages.)
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        let (ev, obj, dead, deduped) = loop {
            match write_batch(&mut client, &cfg.topic, &items).await {
                Ok(r) => break r,
                Err(e) if is_transient(&e) => {
                    st.db_retries += 1;
                    status.send_replace(st.clone());
                    tracing::warn!(error = %e, "database unavailable; batch kept, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if let Ok(c) = db.connect().await {
                        client = c;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        // Offsets are now durable in PostgreSQL; tell Kafka too (lag monitoring only).
        let mut tpl = TopicPartitionList::new();
        for it in &items {
            let (p, o) = match it {
                Item::Good {
                    partition, offset, ..
                }
                | Item::Bad {
                    partition, offset, ..
                } => (*partition, *offset),
            };
            let n = next.entry(p).or_insert(0);
            *n = (*n).max(o + 1);
        }
        for (p, o) in &next {
            let _ = tpl.add_partition_offset(&cfg.topic, *p, Offset::Offset(*o));
        }
        let _ = consumer.commit(&tpl, CommitMode::Async);
        st.batches += 1;
        st.events += ev;
        st.objects += obj;
        st.dead_letters += dead;
        st.dedupe_batches += u64::from(deduped);
        st.last_batch_ms = started.elapsed().as_millis() as u64;
        let l = lag.load(std::sync::atomic::Ordering::Relaxed);
        st.lag = (l >= 0).then_some(l);
        status.send_replace(st.clone());
        tracing::debug!(
            events = ev,
            objects = obj,
            dead,
            ms = started.elapsed().as_millis() as u64,
            "batch written"
        );
    }
}

fn take_assignments(a: &Arc<Mutex<Vec<(i32, i64)>>>) -> Vec<(i32, i64)> {
    a.lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_reasons_are_storable() {
        assert_eq!(
            storable("unknown field `a\0b`"),
            "unknown field `a\u{FFFD}b`"
        );
        let long = "x".repeat(MAX_REASON_CHARS + 10);
        let s = storable(&long);
        assert!(s.ends_with("...") && s.chars().count() == MAX_REASON_CHARS + 3);
        assert_eq!(storable("short"), "short");
    }
}
