//! The uplink: drains the outbox to Kafka and deletes rows only after the broker has them.
//!
//! An explicit state machine, one async fn per state, the state logged at every change and
//! published on a `watch` channel for status and metrics:
//!
//! * [`State::Online`] — deliveries succeed and the backlog is small: fresh events go out as
//!   they arrive.
//! * [`State::Backlogged`] — deliveries succeed but a backlog is queued: a wider window of
//!   messages in flight, live events first (configurable) while the backlog drains behind.
//! * [`State::Offline`] — the last deliveries failed (broker unreachable, timed out, refused):
//!   nothing new is sent; after a growing backoff one small probe batch is tried.
//! * [`State::ShuttingDown`] — no new sends; in-flight deliveries are awaited until a
//!   deadline; their rows are acknowledged, the rest stay in the outbox.
//!
//! Nothing is ever dropped because librdkafka gave up: a failed or timed-out delivery leaves
//! its row in the outbox and it is sent again later. `QueueFull` is backpressure (wait for
//! deliveries, then continue). The fatal errors are named and handled one by one: a message
//! the broker or client says is too large goes to the outbox's dead-letter table (counted,
//! never retried, never blocking the rest); authorisation failures keep every row and retry
//! on the slowest backoff with an error in the log; a fatal idempotent-producer error rebuilds
//! the producer.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, watch};

use crate::outbox::{Outbox, OutboxReader, Pending};

/// Where the uplink is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Online,
    Backlogged,
    Offline,
    ShuttingDown,
}

pub use crate::kafka::Security;

/// Uplink settings (`[uplink]` of the agent's configuration).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UplinkConfig {
    /// Bootstrap brokers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topic the events go to.
    pub topic: String,
    /// `zstd`, `lz4`, `snappy`, `gzip` or `none`.
    pub compression: String,
    pub linger_ms: u32,
    /// Most messages in flight at once (bounds memory while offline).
    pub max_in_flight: usize,
    /// librdkafka gives a message up after this; we then send it again ourselves.
    pub message_timeout_ms: u32,
    /// Largest message librdkafka accepts (bigger events are dead-lettered).
    pub message_max_bytes: u32,
    /// Send events younger than `live_window_ms` before the backlog.
    pub live_first: bool,
    pub live_window_ms: u64,
    /// Outbox depth from which we call it a backlog.
    pub backlog_threshold: u64,
    /// Bandwidth cap for metered links (bytes of payload per second).
    pub max_bytes_per_sec: Option<u64>,
    /// Longest wait between probes while offline.
    pub max_backoff_ms: u64,
    /// How long shutdown waits for in-flight deliveries.
    pub shutdown_deadline_ms: u64,
    #[serde(default)]
    pub security: Security,
    /// Any other librdkafka producer property, passed through verbatim.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self::new("127.0.0.1:9092", "edge-vision.events")
    }
}

impl UplinkConfig {
    pub fn new(brokers: &str, topic: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            compression: "zstd".into(),
            linger_ms: 20,
            max_in_flight: 5000,
            message_timeout_ms: 30_000,
            message_max_bytes: 1_000_000,
            live_first: true,
            live_window_ms: 10_000,
            backlog_threshold: 1000,
            max_bytes_per_sec: None,
            max_backoff_ms: 30_000,
            shutdown_deadline_ms: 10_000,
            security: Security::default(),
            librdkafka: BTreeMap::new(),
        }
    }
}

/// Why the uplink could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("kafka client configuration: {0}")]
    Config(#[source] KafkaError),
    #[error("cannot read secret {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("outbox: {0}")]
    Outbox(#[from] rusqlite::Error),
    #[error("outbox lock poisoned")]
    Poisoned,
}

/// What a run did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct UplinkStatus {
    pub state: Option<State>,
    pub delivered: u64,
    pub failed_deliveries: u64,
    pub dead_lettered: u64,
    pub producer_rebuilds: u64,
    pub last_delivery_ms: Option<i64>,
    pub outbox_depth: u64,
}

/// The librdkafka producer configuration this uplink uses.
pub fn client_config(cfg: &UplinkConfig) -> Result<ClientConfig, UplinkError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("message.max.bytes", cfg.message_max_bytes.to_string())
        .set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight * 2).max(1000).to_string(),
        )
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "2000")
        .set("socket.keepalive.enable", "true")
        .set("log_level", "3");
    cfg.security
        .apply(&mut c)
        .map_err(|e| UplinkError::Secret {
            path: e.path,
            source: e.source,
        })?;
    for (k, v) in &cfg.librdkafka {
        c.set(k, v);
    }
    Ok(c)
}

/// How one delivery ended.
#[derive(Debug)]
enum Outcome {
    Delivered,
    /// Not delivered now; the row stays and goes again later.
    Retry(String),
    /// Never deliverable: dead-letter it.
    Fatal(&'static str),
    /// The credentials or ACLs refuse us: keep everything, back off hard.
    Unauthorized(String),
}

fn classify(e: &KafkaError) -> Outcome {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => Outcome::Fatal("message too large"),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication,
        ) => Outcome::Unauthorized(e.to_string()),
        _ => Outcome::Retry(e.to_string()),
    }
}

/// What one `send` did.
enum Sent {
    /// Queued in librdkafka; a delivery report will follow.
    Queued,
    /// Queue full or bandwidth cap reached: try again after some deliveries.
    Backpressure,
    /// Refused outright (too large, bad configuration, ...).
    Failed(KafkaError),
}

/// Hands one row to librdkafka (which copies key and payload), minding the bandwidth cap.
fn send_one(
    producer: &Kafka,
    topic: &str,
    bucket: &mut Option<Bucket>,
    seq: u64,
    key: &str,
    payload: &[u8],
) -> Sent {
    if let Some(b) = bucket {
        if !b.take(payload.len() as u64) {
            return Sent::Backpressure;
        }
    }
    let record = BaseRecord::with_opaque_to(topic, Box::new(seq))
        .key(key.as_bytes())
        .payload(payload);
    match producer.send(record) {
        Ok(()) => Sent::Queued,
        Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
            Sent::Backpressure
        }
        Err((e, _)) => Sent::Failed(e),
    }
}

/// librdkafka calls `delivery` (on the producer's polling thread) for every message; the
/// outcome and the row's seq go to the drain loop over a channel.
struct Reports {
    tx: mpsc::UnboundedSender<(u64, Outcome)>,
}

/// Sent on the report channel instead of a seq when librdkafka reports every broker down.
const LINK_DOWN: u64 = u64::MAX;

impl ClientContext for Reports {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            let _ = self
                .tx
                .send((LINK_DOWN, Outcome::Retry(reason.to_string())));
        } else {
            tracing::warn!("librdkafka: {error}: {reason}");
        }
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Outcome::Delivered,
            Err((e, _)) => classify(e),
        };
        let _ = self.tx.send((*seq, outcome));
    }
}

type Kafka = ThreadedProducer<Reports>;

fn producer(
    cfg: &UplinkConfig,
    tx: &mpsc::UnboundedSender<(u64, Outcome)>,
) -> Result<Kafka, UplinkError> {
    client_config(cfg)?
        .create_with_context(Reports { tx: tx.clone() })
        .map_err(UplinkError::Config)
}

/// A cheap hasher for seq numbers (the in-flight set is touched twice per message).
#[derive(Clone, Copy, Default)]
struct SeqHash;

impl std::hash::BuildHasher for SeqHash {
    type Hasher = SeqHasher;
    fn build_hasher(&self) -> SeqHasher {
        SeqHasher(0)
    }
}

#[derive(Default)]
struct SeqHasher(u64);

impl std::hash::Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100000001b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

enum AckJob {
    Delete(Vec<u64>),
    Sync(std::sync::mpsc::Sender<()>),
}

/// The ack thread: deletes delivered rows in batched transactions, off the drain loop.
struct Acker {
    jobs: std::sync::mpsc::Sender<AckJob>,
    /// Rows deleted so far.
    done: Arc<AtomicU64>,
    /// The last delete error, for the drain loop to log.
    error: Arc<Mutex<Option<String>>>,
}

impl Acker {
    fn start(outbox: Arc<Mutex<Outbox>>) -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<AckJob>();
        let done = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (d, e) = (done.clone(), error.clone());
        std::thread::Builder::new()
            .name("outbox-acker".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let mut seqs = Vec::new();
                    let mut syncs = Vec::new();
                    for job in std::iter::once(job).chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    {
                        match job {
                            AckJob::Delete(s) => seqs.extend(s),
                            AckJob::Sync(reply) => syncs.push(reply),
                        }
                    }
                    if !seqs.is_empty() {
                        let result = match outbox.lock() {
                            Ok(mut ob) => ob.ack(&seqs).map_err(|err| err.to_string()),
                            Err(_) => Err("outbox lock poisoned".to_string()),
                        };
                        match result {
                            Ok(_) => {
                                d.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                            }
                            Err(msg) => {
                                if let Ok(mut slot) = e.lock() {
                                    *slot = Some(msg);
                                }
                            }
                        }
                    }
                    for reply in syncs {
                        let _ = reply.send(());
                    }
                }
            })
            .map(|_| ())
            .unwrap_or_else(|err| tracing::error!(%err, "cannot start the ack thread"));
        Self { jobs, done, error }
    }

    fn delete(&self, seqs: Vec<u64>) {
        let _ = self.jobs.send(AckJob::Delete(seqs));
    }

    fn sync(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.jobs.send(AckJob::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// A token bucket for the bandwidth cap.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, n: u64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate.max(n as f64));
        self.last = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

/// The drain loop's state and the things each state function works on.
struct Uplink {
    /// The queue we drain (writes: dead letters; the ack thread deletes through it too).
    outbox: Arc<Mutex<Outbox>>,
    /// Our own read connection, so reads never wait for the writer's commits.
    reader: OutboxReader,
    cfg: UplinkConfig,
    /// Rebuilt after a fatal or wedged producer.
    producer: Kafka,
    /// Delivery reports from the producer's context.
    reports_tx: mpsc::UnboundedSender<(u64, Outcome)>,
    reports: mpsc::UnboundedReceiver<(u64, Outcome)>,
    /// Rows handed to librdkafka and not yet reported on.
    in_flight: HashSet<u64, SeqHash>,
    /// Every row with a seq at or below this was sent once (oldest-first cursor).
    backlog_cursor: u64,
    /// Same for the live (newest-first) pass.
    live_cursor: u64,
    /// Rows whose delivery failed, to send again first.
    retry: BTreeSet<u64>,
    /// Rows the live pass sent ahead of the backlog cursor (the backlog pass skips them).
    live_sent: BTreeSet<u64>,
    /// (when, highest queued seq then): tells live rows from backlog without an index on
    /// creation time.
    seq_samples: std::collections::VecDeque<(Instant, u64)>,
    /// Delivered rows waiting to be handed to the ack thread.
    to_ack: Vec<u64>,
    /// Deletes acknowledged rows on its own thread (overlaps SQLite work with sending).
    acker: Acker,
    /// Failures since the last success (drives Offline).
    failures: u32,
    /// The last failure indicated bad credentials or ACLs.
    unauthorized: bool,
    /// Offline backoff, doubled per failed probe.
    backoff: Duration,
    /// Outbox depth and when it was read (COUNT(*) is not free on a big backlog).
    depth: (u64, Instant),
    bucket: Option<Bucket>,
    status: watch::Sender<UplinkStatus>,
}

impl Uplink {
    fn outbox(&self) -> Result<std::sync::MutexGuard<'_, Outbox>, UplinkError> {
        self.outbox.lock().map_err(|_| UplinkError::Poisoned)
    }

    fn set_state(&mut self, s: State) {
        let old = self.status.borrow().state;
        if old != Some(s) {
            tracing::info!(from = ?old, to = ?s, "uplink state");
            self.status.send_modify(|st| st.state = Some(s));
        }
    }

    /// Sends up to `window - in_flight` more rows: retries first, then (live-first) rows
    /// younger than the live window, then the backlog, oldest first. Each pass keeps its own
    /// cursor and moves it only past rows it handed over (or found already in flight or
    /// waiting for a retry), so every row is sent, and normally sent once.
    fn fill(&mut self, window: usize) -> Result<(), UplinkError> {
        let mut room = window.saturating_sub(self.in_flight.len());
        if room == 0 {
            return Ok(());
        }
        if !self.retry.is_empty() {
            let seqs: Vec<u64> = self.retry.iter().take(room).copied().collect();
            for s in &seqs {
                self.retry.remove(s);
            }
            let rows = self.reader.rows_by_seq(&seqs)?;
            let mut rows = rows.into_iter();
            while let Some(p) = rows.next() {
                if !self.try_send(&p)? {
                    self.retry.insert(p.seq);
                    self.retry.extend(rows.map(|r| r.seq));
                    return Ok(());
                }
                room = room.saturating_sub(1);
            }
        }
        if room > 0 && self.cfg.live_first {
            let after = self
                .live_cursor
                .max(self.backlog_cursor)
                .max(self.live_boundary()?);
            let rows = self.reader.rows_after(after, room)?;
            for p in rows {
                if !self.try_send(&p)? {
                    return Ok(());
                }
                self.live_cursor = p.seq;
                self.live_sent.insert(p.seq);
                room = room.saturating_sub(1);
            }
        }
        if room > 0 {
            // The hot path of a backlog drain: each payload goes from SQLite's page straight to
            // librdkafka (which copies it once), no intermediate buffer. Send errors other than
            // backpressure are collected and handled after the scan.
            let mut failed: Vec<(u64, KafkaError)> = Vec::new();
            let (producer, topic) = (&self.producer, &self.cfg.topic);
            let (bucket, in_flight) = (&mut self.bucket, &mut self.in_flight);
            let (live_sent, retry) = (&mut self.live_sent, &self.retry);
            let cursor = &mut self.backlog_cursor;
            self.reader.visit_after(
                *cursor,
                room,
                |seq, key, payload| -> Result<bool, UplinkError> {
                    // Rows the live pass already sent stay visible until their delete commits.
                    let skip =
                        live_sent.remove(&seq) || in_flight.contains(&seq) || retry.contains(&seq);
                    if !skip {
                        match send_one(producer, topic, bucket, seq, key, payload) {
                            Sent::Queued => {
                                in_flight.insert(seq);
                            }
                            Sent::Backpressure => return Ok(false),
                            Sent::Failed(e) => failed.push((seq, e)),
                        }
                    }
                    *cursor = seq;
                    Ok(true)
                },
            )?;
            for (seq, e) in failed {
                self.send_failed(seq, &e)?;
            }
            let cursor = self.backlog_cursor;
            self.live_sent.retain(|&s| s > cursor);
        }
        Ok(())
    }

    /// The seq below which rows count as backlog: the highest seq that was queued
    /// `live_window` ago (sampled every 250 ms; `seq` grows with enqueue time).
    fn live_boundary(&mut self) -> Result<u64, UplinkError> {
        let now = Instant::now();
        if self
            .seq_samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(250))
        {
            let max = self.reader.max_seq()?;
            self.seq_samples.push_back((now, max));
        }
        let window = Duration::from_millis(self.cfg.live_window_ms);
        while self.seq_samples.len() > 1 && now.duration_since(self.seq_samples[1].0) >= window {
            self.seq_samples.pop_front();
        }
        Ok(self
            .seq_samples
            .front()
            .map(|(t, s)| {
                if now.duration_since(*t) >= window {
                    *s
                } else {
                    0
                }
            })
            .unwrap_or(0))
    }

    /// Hands one row to librdkafka unless the bandwidth cap or a full queue says wait
    /// (returns false: backpressure). A row that cannot be sent now goes to the retry set;
    /// one that can never be sent is dead-lettered.
    fn try_send(&mut self, p: &Pending) -> Result<bool, UplinkError> {
        match send_one(
            &self.producer,
            &self.cfg.topic,
            &mut self.bucket,
            p.seq,
            &p.device_id,
            &p.payload,
        ) {
            Sent::Queued => {
                self.in_flight.insert(p.seq);
                Ok(true)
            }
            Sent::Backpressure => Ok(false),
            Sent::Failed(e) => {
                self.send_failed(p.seq, &e)?;
                Ok(true)
            }
        }
    }

    /// A send librdkafka refused outright: dead-letter what can never go, retry the rest.
    fn send_failed(&mut self, seq: u64, e: &KafkaError) -> Result<(), UplinkError> {
        self.settle_failure(seq, classify(e))
    }

    /// A row that did not get through: dead-lettered when it never can, else kept for retry.
    fn settle_failure(&mut self, seq: u64, outcome: Outcome) -> Result<(), UplinkError> {
        match outcome {
            Outcome::Fatal(reason) => {
                tracing::warn!(seq, reason, "dead-lettering event");
                self.outbox()?.dead_letter(seq, reason)?;
                self.status.send_modify(|s| s.dead_lettered += 1);
            }
            other => {
                self.retry.insert(seq);
                self.fail(other);
            }
        }
        Ok(())
    }

    fn fail(&mut self, o: Outcome) {
        self.failures += 1;
        if let Outcome::Unauthorized(msg) = &o {
            tracing::error!(error = %msg, "broker refuses our credentials or ACLs; keeping every event and retrying slowly");
            self.unauthorized = true;
        } else if let Outcome::Retry(msg) = &o {
            tracing::debug!(error = %msg, "delivery failed; will retry");
        }
        self.status.send_modify(|s| s.failed_deliveries += 1);
    }

    fn resolve(&mut self, seq: u64, outcome: Outcome) -> Result<(), UplinkError> {
        if seq == LINK_DOWN {
            // librdkafka lost every broker connection: offline now, not after the message
            // timeout (in-flight messages still resolve on their own).
            tracing::debug!("all brokers down");
            self.failures += 1;
            return Ok(());
        }
        if !self.in_flight.remove(&seq) {
            return Ok(()); // a report from a producer we already replaced
        }
        match outcome {
            Outcome::Delivered => {
                self.to_ack.push(seq);
                self.failures = 0;
                self.unauthorized = false;
            }
            failed => self.settle_failure(seq, failed)?,
        }
        Ok(())
    }

    /// Hands delivered rows to the ack thread and publishes what it has deleted so far.
    fn flush_acks(&mut self) -> Result<(), UplinkError> {
        if !self.to_ack.is_empty() {
            let acks = std::mem::take(&mut self.to_ack);
            self.acker.delete(acks);
        }
        self.publish_acked();
        Ok(())
    }

    fn publish_acked(&mut self) {
        let done = self.acker.done.load(Ordering::Relaxed);
        let before = self.status.borrow().delivered;
        if done > before {
            self.depth.0 = self.depth.0.saturating_sub(done - before);
            let depth = self.depth.0;
            self.status.send_modify(|s| {
                s.delivered = done;
                s.last_delivery_ms = Some(chrono::Utc::now().timestamp_millis());
                s.outbox_depth = depth;
            });
        }
    }

    /// Waits until every delete handed to the ack thread has committed.
    fn sync_acks(&mut self) -> Result<(), UplinkError> {
        self.flush_acks()?;
        self.acker.sync();
        if let Some(e) = self
            .acker
            .error
            .lock()
            .map_err(|_| UplinkError::Poisoned)?
            .take()
        {
            tracing::error!(error = %e, "outbox delete failed; those events will be sent again after a restart");
        }
        self.publish_acked();
        Ok(())
    }

    /// Waits for a delivery report (or a short tick), resolves every report that is ready,
    /// and deletes the delivered rows in one transaction.
    async fn pump(&mut self) -> Result<(), UplinkError> {
        let first = if self.in_flight.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            None
        } else {
            tokio::time::timeout(Duration::from_millis(50), self.reports.recv())
                .await
                .ok()
                .flatten()
        };
        if let Some((seq, o)) = first {
            self.resolve(seq, o)?;
        }
        while let Ok((seq, o)) = self.reports.try_recv() {
            self.resolve(seq, o)?;
        }
        self.flush_acks()
    }

    fn rebuild_if_fatal(&mut self) -> Result<(), UplinkError> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::error!(?code, reason, "fatal producer error");
            self.rebuild("fatal producer error")?;
        }
        Ok(())
    }

    /// Replaces the producer. Its queued messages are purged; their rows go to the retry set
    /// and are sent again by the new producer.
    fn rebuild(&mut self, why: &str) -> Result<(), UplinkError> {
        tracing::warn!(
            why,
            in_flight = self.in_flight.len(),
            "rebuilding the Kafka producer"
        );
        let fresh = producer(&self.cfg, &self.reports_tx)?;
        drop(std::mem::replace(&mut self.producer, fresh));
        while let Ok((seq, o)) = self.reports.try_recv() {
            self.resolve(seq, o)?;
        }
        let orphans: Vec<u64> = self.in_flight.drain().collect();
        self.retry.extend(orphans);
        self.flush_acks()?;
        self.status.send_modify(|s| s.producer_rebuilds += 1);
        Ok(())
    }

    /// Outbox depth, re-counted at most every second.
    fn depth(&mut self) -> Result<u64, UplinkError> {
        if self.depth.1.elapsed() > Duration::from_secs(1) {
            let d = self.outbox()?.depth()?;
            self.depth = (d, Instant::now());
        }
        Ok(self.depth.0)
    }

    /// Exact depth (for the exit-when-empty check).
    fn depth_now(&mut self) -> Result<u64, UplinkError> {
        let d = self.outbox()?.depth()?;
        self.depth = (d, Instant::now());
        Ok(d)
    }

    fn next_drain_state(&mut self) -> Result<State, UplinkError> {
        let s = if self.depth()? >= self.cfg.backlog_threshold {
            State::Backlogged
        } else {
            State::Online
        };
        self.set_state(s);
        Ok(s)
    }

    fn window(&self, s: State) -> usize {
        if s == State::Backlogged {
            self.cfg.max_in_flight
        } else {
            self.cfg.max_in_flight.min(1000)
        }
    }

    /// `Online` and `Backlogged`: keep the window full, resolve deliveries.
    async fn draining(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        exit_when_empty: bool,
    ) -> Result<State, UplinkError> {
        loop {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            let state = self.next_drain_state()?;
            self.fill(self.window(state))?;
            self.pump().await?;
            if self.failures > 0 {
                return Ok(State::Offline);
            }
            if exit_when_empty && self.in_flight.is_empty() && self.retry.is_empty() {
                self.sync_acks()?;
                if self.depth_now()? == 0 {
                    return Ok(State::ShuttingDown);
                }
            }
        }
    }

    /// `Offline`: let in-flight messages resolve, back off, then probe with a small batch.
    async fn offline(&mut self, stop: &mut watch::Receiver<bool>) -> Result<State, UplinkError> {
        self.set_state(State::Offline);
        self.rebuild_if_fatal()?;
        let max = Duration::from_millis(if self.unauthorized {
            self.cfg.max_backoff_ms * 4
        } else {
            self.cfg.max_backoff_ms
        });
        let deadline = Instant::now() + self.backoff;
        while Instant::now() < deadline || !self.in_flight.is_empty() {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            let before = self.status.borrow().delivered;
            self.pump().await?;
            if self.status.borrow().delivered > before && self.in_flight.is_empty() {
                // Stragglers got through: the link is back.
                self.failures = 0;
                return Ok(State::Online);
            }
        }
        self.backoff = (self.backoff * 2).min(max);
        // Probe.
        self.failures = 0;
        self.fill(10)?;
        if self.in_flight.is_empty() && self.retry.is_empty() {
            // Nothing to send: a metadata request tells whether the brokers are back.
            return Ok(if self.metadata_probe() {
                self.backoff = Duration::from_millis(250);
                State::Online
            } else {
                State::Offline
            });
        }
        while !self.in_flight.is_empty() {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            self.pump().await?;
        }
        if self.failures == 0 {
            self.backoff = Duration::from_millis(250);
            Ok(State::Online)
        } else {
            // An idempotent producer whose messages timed out can stay wedged on brokers
            // without epoch bumps: start a fresh one for the next probe.
            self.rebuild("probe failed")?;
            Ok(State::Offline)
        }
    }

    /// Asks the cluster for the topic's metadata (at most 2 s): can we reach a broker?
    fn metadata_probe(&self) -> bool {
        let ask = || {
            self.producer
                .client()
                .fetch_metadata(
                    Some(&self.cfg.topic),
                    Timeout::After(Duration::from_secs(2)),
                )
                .is_ok()
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(ask),
            _ => ask(),
        }
    }

    /// `ShuttingDown`: no new sends; wait for in-flight deliveries until the deadline.
    async fn shutting_down(&mut self) -> Result<(), UplinkError> {
        self.set_state(State::ShuttingDown);
        let deadline = Instant::now() + Duration::from_millis(self.cfg.shutdown_deadline_ms);
        while !self.in_flight.is_empty() && Instant::now() < deadline {
            self.pump().await?;
        }
        self.flush_acks()?;
        let left = Duration::from_millis(self.cfg.shutdown_deadline_ms / 10);
        let _ = self.producer.flush(Timeout::After(left));
        while let Ok((seq, o)) = self.reports.try_recv() {
            self.resolve(seq, o)?;
        }
        self.sync_acks()?;
        if !self.in_flight.is_empty() {
            tracing::warn!(
                unacknowledged = self.in_flight.len(),
                "shutdown deadline reached; those events stay in the outbox and go next time"
            );
        }
        Ok(())
    }
}

/// Runs the uplink until `stop` turns true (or `exit_when_empty` and the outbox is drained).
pub async fn run(
    outbox: Arc<Mutex<Outbox>>,
    cfg: UplinkConfig,
    mut stop: watch::Receiver<bool>,
    status: watch::Sender<UplinkStatus>,
    exit_when_empty: bool,
) -> Result<(), UplinkError> {
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let producer = producer(&cfg, &reports_tx)?;
    let bucket = cfg.max_bytes_per_sec.map(|r| Bucket {
        rate: r as f64,
        tokens: r as f64,
        last: Instant::now(),
    });
    let (depth, reader) = {
        let ob = outbox.lock().map_err(|_| UplinkError::Poisoned)?;
        (ob.depth()?, ob.reader()?)
    };
    let outbox_for_acks = outbox.clone();
    let mut up = Uplink {
        outbox,
        reader,
        cfg,
        producer,
        reports_tx,
        reports,
        in_flight: HashSet::with_hasher(SeqHash),
        backlog_cursor: 0,
        live_cursor: 0,
        retry: BTreeSet::new(),
        live_sent: BTreeSet::new(),
        seq_samples: std::collections::VecDeque::new(),
        to_ack: Vec::new(),
        acker: Acker::start(outbox_for_acks),
        failures: 0,
        unauthorized: false,
        backoff: Duration::from_millis(250),
        depth: (depth, Instant::now()),
        bucket,
        status,
    };
    let mut state = State::Online;
    loop {
        state = match state {
            State::Online | State::Backlogged => up.draining(&mut stop, exit_when_empty).await?,
            State::Offline => up.offline(&mut stop).await?,
            State::ShuttingDown => {
                up.shutting_down().await?;
                return Ok(());
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_files_and_missing_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("sasl-password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let mut cfg = UplinkConfig::new("broker:9093", "t");
        cfg.security = Security {
            protocol: Some("sasl_ssl".into()),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("edge".into()),
            sasl_password_file: Some(pw),
            ssl_ca_location: Some("/etc/ssl/ca.pem".into()),
            ..Security::default()
        };
        cfg.librdkafka.insert("client.id".into(), "pi-7".into());
        let c = client_config(&cfg).unwrap();
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/ssl/ca.pem"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("client.id"), Some("pi-7"));
        cfg.security.sasl_password_file = Some(dir.path().join("nope"));
        let err = client_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn the_bucket_limits_bytes_per_second() {
        let mut b = Bucket {
            rate: 1000.0,
            tokens: 1000.0,
            last: Instant::now(),
        };
        assert!(b.take(800));
        assert!(!b.take(800), "only 200 bytes of credit left");
        std::thread::sleep(Duration::from_millis(700));
        assert!(b.take(800), "refilled at 1000 B/s");
    }
}
