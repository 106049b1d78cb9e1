//! `edge-sink`: Kafka -> PostgreSQL, one transaction per batch, offsets kept in PostgreSQL.
//!
//! # Invariants
//!
//! * **Rows and offsets commit together.** Each batch is one PostgreSQL transaction: rows,
//!   dead letters, and the next offset of every partition in the batch. Rows go in by COPY
//!   BINARY straight into `events` / `objects` inside a savepoint; if the batch holds a
//!   duplicate the unique index refuses it, the savepoint rolls back and the batch goes through
//!   temporary staging tables and `INSERT ... ON CONFLICT DO NOTHING` instead (measured: the
//!   direct COPY is what lets the sink run at 0.67x raw COPY; staging alone gave 0.47x). Kafka
//!   offsets are committed afterwards, for lag monitoring only.
//! * **Nothing doubled.** `event_id` is the key of `events`, `(event_id, idx)` of `objects`:
//!   re-deliveries (the agent is at-least-once) and replays after a crash insert nothing.
//! * **Nothing skipped.** On every assignment the sink reads its offsets from PostgreSQL and
//!   assigns the partitions at exactly those offsets (in librdkafka's rebalance callback);
//!   messages below the stored offset are dropped as already written.
//! * **Bad input never blocks a partition.** A message that is not a valid event goes to
//!   `dead_letters` with the reason, in the same transaction as its offset.
//! * **An unreachable database pauses, never drops.** Connection errors keep the batch in
//!   memory, stop consuming, and retry with backoff until PostgreSQL is back;
//!   nothing goes to the dead-letter table for them and no offset moves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::pin_mut;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::database::{self, Database};
use crate::event::{self, Event};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Largest message accepted; larger ones are dead-lettered.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Sink settings (`systemd/edge-sink.toml` documents every key).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// Bootstrap brokers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topic the agents write to.
    pub topic: String,
    /// Consumer group: run more instances with the same group to scale out.
    pub group_id: String,
    /// libpq connection string (`host=... user=... dbname=... sslmode=verify-full
    /// sslrootcert=...`); TLS options as libpq's (src/database.rs).
    pub database_url: String,
    /// The database password, read from this file (its first line) at start-up; keeps the
    /// secret out of the config file (systemd credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_password_file: Option<std::path::PathBuf>,
    /// A batch closes at this many messages ...
    pub batch_size: usize,
    /// ... or this long after its first message.
    pub batch_ms: u64,
    /// Messages larger than this are dead-lettered ("oversized").
    pub max_message_bytes: usize,
    /// `/metrics` and `/healthz` address (empty: off).
    pub metrics_listen: String,
    /// TLS/SASL to Kafka; passwords come from files.
    #[serde(default)]
    pub security: crate::kafka::Security,
    /// Any other librdkafka consumer property.
    #[serde(default)]
    pub librdkafka: std::collections::BTreeMap<String, String>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self::new(
            "127.0.0.1:9092",
            "edge-vision.events",
            "edge-sink",
            "host=127.0.0.1 user=edge_sink dbname=edge_vision",
        )
    }
}

impl SinkConfig {
    pub fn new(brokers: &str, topic: &str, group_id: &str, database_url: &str) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            group_id: group_id.into(),
            database_url: database_url.into(),
            database_password_file: None,
            batch_size: 5000,
            batch_ms: 500,
            max_message_bytes: MAX_MESSAGE_BYTES,
            metrics_listen: "127.0.0.1:9465".into(),
            security: Default::default(),
            librdkafka: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] refinery::Error),
    #[error("the schema is behind and this role cannot migrate it ({0}): run `edge-sink migrate` as the database owner (docs/sink.md)")]
    SchemaBehind(#[source] refinery::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka security: {0}")]
    Secret(#[from] crate::kafka::SecretError),
    #[error(transparent)]
    DbConfig(#[from] database::DatabaseConfigError),
    #[error("database TLS refused (fix the certificate settings in database_url): {0}")]
    DbTls(#[source] tokio_postgres::Error),
}

/// What the sink has done, for logs, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SinkStatus {
    pub batches: u64,
    pub events: u64,
    pub objects: u64,
    pub dead_letters: u64,
    pub skipped_already_written: u64,
    /// Messages that arrived past a hole in their partition's offsets (see `run`).
    pub offset_gaps: u64,
    pub db_retries: u64,
    /// Batches that held a duplicate and went through staging + ON CONFLICT (the rest are
    /// COPYed straight into the tables).
    pub dedupe_batches: u64,
    /// Consumer errors (broker unreachable, transport) that were waited out.
    pub broker_errors: u64,
    /// Wall time of the last batch's transaction, in milliseconds.
    pub last_batch_ms: u64,
    /// Messages behind the high watermarks, summed over assigned partitions (librdkafka's
    /// statistics, refreshed every 5 s; `None` until the first report).
    pub lag: Option<i64>,
}

/// Applies the migrations in `migrations/` (refinery, history in `refinery_schema_history`).
pub async fn migrate(client: &mut Client) -> Result<usize, SinkError> {
    let report = embedded::migrations::runner().run_async(client).await?;
    Ok(report.applied_migrations().len())
}

/// True when every embedded migration is already in the history table. Checked with one
/// `SELECT`, so a least-privilege role (no `CREATE`: docs/sink.md) can start once the owner
/// has run `edge-sink migrate`; refinery itself always issues DDL first.
pub async fn schema_is_current(client: &Client) -> Result<bool, SinkError> {
    let rows = match client.query(SELECT_APPLIED_VERSIONS, &[]).await {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Ok(false)
        }
        Err(e) => return Err(e.into()),
    };
    let applied: std::collections::HashSet<i64> =
        rows.iter().map(|r| i64::from(r.get::<_, i32>(0))).collect();
    Ok(embedded::migrations::runner()
        .get_migrations()
        .iter()
        .all(|m| applied.contains(&i64::from(m.version()))))
}

/// Connects with a libpq connection string, TLS as its `sslmode` says (no password file).
pub async fn connect(url: &str) -> Result<Client, SinkError> {
    Ok(Database::new(url, None)?.connect().await?)
}

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
    fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, String> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let db = self.database.clone();
        let topic = topic.to_string();
        tokio::task::block_in_place(|| {
            handle.block_on(async move {
                let c = db.connect().await.map_err(|e| e.to_string())?;
                let rows = c
                    .query(SELECT_OFFSETS, &[&topic])
                    .await
                    .map_err(|e| e.to_string())?;
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
enum Item {
    Good {
        ev: Event,
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
    match event::decode(payload) {
        Ok(ev) => Item::Good {
            ev,
            partition,
            offset,
        },
        Err(e) => Item::Bad {
            partition,
            offset,
            payload: Some(payload.to_vec()),
            error: e.to_string(),
        },
    }
}

const STAGE: &str = "
SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS stage_events (LIKE events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_objects (LIKE objects) ON COMMIT DELETE ROWS;";
const COPY_EVENTS: &str = "COPY stage_events (event_id, device_id, seq, captured_at, kind, model_name, model_sha256, frame_width, frame_height, detections, kafka_topic, kafka_partition, kafka_offset) FROM STDIN BINARY";
const COPY_OBJECTS: &str = "COPY stage_objects (event_id, idx, device_id, captured_at, label, class_id, confidence, x1, y1, x2, y2) FROM STDIN BINARY";
const MERGE_EVENTS: &str =
    "INSERT INTO events SELECT * FROM stage_events ON CONFLICT (event_id) DO NOTHING";
const MERGE_OBJECTS: &str =
    "INSERT INTO objects SELECT * FROM stage_objects ON CONFLICT (event_id, idx) DO NOTHING";
const INSERT_HEALTH: &str = "INSERT INTO device_health (event_id, device_id, captured_at, kind, message, evicted) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING";
const INSERT_DEAD: &str = "INSERT INTO dead_letters (kafka_topic, kafka_partition, kafka_offset, payload, error) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
const UPSERT_OFFSET: &str = "INSERT INTO sink_offsets (kafka_topic, kafka_partition, next_offset) VALUES ($1, $2, $3)
     ON CONFLICT (kafka_topic, kafka_partition) DO UPDATE SET next_offset = GREATEST(sink_offsets.next_offset, EXCLUDED.next_offset), updated_at = now()";
const SELECT_APPLIED_VERSIONS: &str = "SELECT version FROM refinery_schema_history";
const SELECT_OFFSETS: &str =
    "SELECT kafka_partition, next_offset FROM sink_offsets WHERE kafka_topic = $1";

/// COPY BINARY of events and their objects through the given COPY statements (staging tables
/// for the sink, the real tables for the baseline).
async fn copy_rows<'a, I>(
    tx: &tokio_postgres::Transaction<'_>,
    copy_events: &str,
    copy_objects: &str,
    topic: &str,
    rows: I,
) -> Result<(u64, u64), tokio_postgres::Error>
where
    I: Iterator<Item = (&'a Event, i32, i64)> + Clone,
{
    let mut n_ev = 0u64;
    let mut n_obj = 0u64;
    {
        let sink = tx.copy_in(copy_events).await?;
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
        let sink = tx.copy_in(copy_objects).await?;
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

const BASELINE_EVENTS: &str = "COPY events (event_id, device_id, seq, captured_at, kind, model_name, model_sha256, frame_width, frame_height, detections, kafka_topic, kafka_partition, kafka_offset) FROM STDIN BINARY";
const BASELINE_OBJECTS: &str = "COPY objects (event_id, idx, device_id, captured_at, label, class_id, confidence, x1, y1, x2, y2) FROM STDIN BINARY";

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
        let (a, b) = copy_rows(&tx, BASELINE_EVENTS, BASELINE_OBJECTS, topic, rows).await?;
        tx.commit().await?;
        ne += a;
        no += b;
    }
    Ok((ne, no))
}

/// Writes one batch and its offsets in one transaction.
async fn write_batch(
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
        match copy_rows(&sp, BASELINE_EVENTS, BASELINE_OBJECTS, topic, good.clone()).await {
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
            let counts = copy_rows(&tx, COPY_EVENTS, COPY_OBJECTS, topic, good).await?;
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
fn is_transient(e: &tokio_postgres::Error) -> bool {
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

/// The consumer's librdkafka configuration: our settings, TLS/SASL (secrets read from their
/// files now), then the pass-through properties.
pub fn consumer_config(cfg: &SinkConfig) -> Result<ClientConfig, SinkError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("queued.max.messages.kbytes", "65536")
        .set("statistics.interval.ms", "5000");
    cfg.security.apply(&mut cc)?;
    for (k, v) in &cfg.librdkafka {
        cc.set(k, v);
    }
    Ok(cc)
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
mod config_tests {
    use super::*;

    #[test]
    fn kafka_secrets_come_from_files_and_overrides_win() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("kafka-password");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let mut cfg = SinkConfig::new("k:9093", "t", "g", "host=db");
        cfg.security = crate::kafka::Security {
            protocol: Some("sasl_ssl".into()),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("edge-sink".into()),
            sasl_password_file: Some(pw),
            ..Default::default()
        };
        cfg.librdkafka
            .insert("session.timeout.ms".into(), "30000".into());
        let c = consumer_config(&cfg).unwrap();
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("session.timeout.ms"), Some("30000"));
        cfg.security.sasl_password_file = Some(dir.path().join("missing"));
        let err = consumer_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
