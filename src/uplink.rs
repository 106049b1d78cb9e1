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

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio::sync::watch;

use crate::outbox::{Outbox, Pending};

/// Where the uplink is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Online,
    Backlogged,
    Offline,
    ShuttingDown,
}

/// TLS and SASL settings passed through to librdkafka. Secrets are read from files.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    /// File holding the SASL password (e.g. a systemd credential).
    pub sasl_password_file: Option<PathBuf>,
    pub ssl_ca_location: Option<PathBuf>,
    pub ssl_certificate_location: Option<PathBuf>,
    pub ssl_key_location: Option<PathBuf>,
    /// File holding the private key's password.
    pub ssl_key_password_file: Option<PathBuf>,
}

/// Uplink settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    pub brokers: String,
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

fn read_secret(path: &PathBuf) -> Result<String, UplinkError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| UplinkError::Secret {
            path: path.clone(),
            source,
        })
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
    let s = &cfg.security;
    if let Some(p) = &s.protocol {
        c.set("security.protocol", p);
    }
    if let Some(m) = &s.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &s.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(f) = &s.sasl_password_file {
        c.set("sasl.password", read_secret(f)?);
    }
    for (key, path) in [
        ("ssl.ca.location", &s.ssl_ca_location),
        ("ssl.certificate.location", &s.ssl_certificate_location),
        ("ssl.key.location", &s.ssl_key_location),
    ] {
        if let Some(p) = path {
            c.set(key, p.display().to_string());
        }
    }
    if let Some(f) = &s.ssl_key_password_file {
        c.set("ssl.key.password", read_secret(f)?);
    }
    for (k, v) in &cfg.librdkafka {
        c.set(k, v);
    }
    Ok(c)
}

/// How one delivery ended.
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

type Delivery = std::pin::Pin<Box<dyn Future<Output = (u64, Outcome)> + Send>>;

/// The drain loop's state and the things each state function works on.
struct Uplink {
    /// The queue we drain.
    outbox: Arc<Mutex<Outbox>>,
    cfg: UplinkConfig,
    /// Rebuilt after a fatal producer error.
    producer: FutureProducer,
    /// Rows sent and not yet resolved (never read again while here).
    in_flight: HashSet<u64>,
    /// Their delivery futures.
    deliveries: FuturesUnordered<Delivery>,
    /// Delivered rows waiting for the next batched delete.
    to_ack: Vec<u64>,
    /// Failures since the last success (drives Offline).
    failures: u32,
    /// The last failure indicated bad credentials or ACLs.
    unauthorized: bool,
    /// Offline backoff, doubled per failed probe.
    backoff: Duration,
    /// Probes that failed in a row; after a few the producer is rebuilt (an idempotent
    /// producer whose messages timed out can stay wedged on brokers without epoch bumps).
    failed_probes: u32,
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

    /// Sends up to `window` more rows. Returns false when the producer queue is full.
    fn fill(&mut self, window: usize) -> Result<(), UplinkError> {
        let room = window.saturating_sub(self.in_flight.len());
        if room == 0 {
            return Ok(());
        }
        let live = self
            .cfg
            .live_first
            .then(|| chrono::Utc::now().timestamp_millis() - self.cfg.live_window_ms as i64);
        let batch = self.outbox()?.next_batch(room, &self.in_flight, live)?;
        for p in batch {
            if let Some(b) = &mut self.bucket {
                if !b.take(p.payload.len() as u64) {
                    break;
                }
            }
            if !self.send(p)? {
                break;
            }
        }
        Ok(())
    }

    /// Hands one row to librdkafka. Returns false on `QueueFull` (backpressure).
    fn send(&mut self, p: Pending) -> Result<bool, UplinkError> {
        let record = FutureRecord::to(&self.cfg.topic)
            .key(p.device_id.as_bytes())
            .payload(&p.payload);
        match self.producer.send_result(record) {
            Ok(fut) => {
                let seq = p.seq;
                self.in_flight.insert(seq);
                self.deliveries.push(Box::pin(async move {
                    let outcome = match fut.await {
                        Ok(Ok(_)) => Outcome::Delivered,
                        Ok(Err((e, _))) => classify(&e),
                        Err(_) => Outcome::Retry("producer dropped the message".into()),
                    };
                    (seq, outcome)
                }));
                Ok(true)
            }
            Err((e, _)) => match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::QueueFull) => Ok(false),
                _ => {
                    match classify(&e) {
                        Outcome::Fatal(reason) => {
                            tracing::warn!(seq = p.seq, event_id = %p.event_id, reason, "dead-lettering event");
                            self.outbox()?.dead_letter(p.seq, reason)?;
                            self.status.send_modify(|s| s.dead_lettered += 1);
                        }
                        other => self.fail(other),
                    }
                    Ok(true)
                }
            },
        }
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
        self.in_flight.remove(&seq);
        match outcome {
            Outcome::Delivered => {
                self.to_ack.push(seq);
                self.failures = 0;
                self.unauthorized = false;
            }
            Outcome::Fatal(reason) => {
                tracing::warn!(seq, reason, "dead-lettering event");
                self.outbox()?.dead_letter(seq, reason)?;
                self.status.send_modify(|s| s.dead_lettered += 1);
            }
            other => self.fail(other),
        }
        Ok(())
    }

    fn flush_acks(&mut self) -> Result<(), UplinkError> {
        if self.to_ack.is_empty() {
            return Ok(());
        }
        let acks = std::mem::take(&mut self.to_ack);
        let depth = {
            let mut ob = self.outbox()?;
            ob.ack(&acks)?;
            ob.stats()?.depth
        };
        let n = acks.len() as u64;
        self.status.send_modify(|s| {
            s.delivered += n;
            s.last_delivery_ms = Some(chrono::Utc::now().timestamp_millis());
            s.outbox_depth = depth;
        });
        Ok(())
    }

    /// Waits for one delivery (or a short tick), then resolves every delivery that is ready.
    async fn pump(&mut self) -> Result<(), UplinkError> {
        if self.deliveries.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else if let Ok(Some((seq, o))) =
            tokio::time::timeout(Duration::from_millis(50), self.deliveries.next()).await
        {
            self.resolve(seq, o)?;
        }
        while let Some(Some((seq, o))) = futures::FutureExt::now_or_never(self.deliveries.next()) {
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

    /// Replaces the producer. Its queued messages are purged; their rows stay in the outbox
    /// and are sent again by the new producer.
    fn rebuild(&mut self, why: &str) -> Result<(), UplinkError> {
        tracing::warn!(
            why,
            in_flight = self.in_flight.len(),
            "rebuilding the Kafka producer"
        );
        let fresh: FutureProducer = client_config(&self.cfg)?
            .create()
            .map_err(UplinkError::Config)?;
        drop(std::mem::replace(&mut self.producer, fresh));
        self.status.send_modify(|s| s.producer_rebuilds += 1);
        Ok(())
    }

    fn depth(&self) -> Result<u64, UplinkError> {
        Ok(self.outbox()?.stats()?.depth)
    }

    /// `Online` and `Backlogged`: keep the window full, resolve deliveries.
    async fn draining(&mut self, stop: &mut watch::Receiver<bool>) -> Result<State, UplinkError> {
        loop {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            let depth = self.depth()?;
            let state = if depth >= self.cfg.backlog_threshold {
                State::Backlogged
            } else {
                State::Online
            };
            self.set_state(state);
            let window = if state == State::Backlogged {
                self.cfg.max_in_flight
            } else {
                self.cfg.max_in_flight.min(1000)
            };
            self.fill(window)?;
            self.pump().await?;
            if self.failures > 0 {
                return Ok(State::Offline);
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
        while Instant::now() < deadline || !self.deliveries.is_empty() {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            self.pump().await?;
            if self.failures == 0 && self.deliveries.is_empty() {
                // A straggler delivery succeeded: the link is back.
                break;
            }
        }
        self.backoff = (self.backoff * 2).min(max);
        // Probe.
        self.failures = 0;
        self.fill(10)?;
        while !self.deliveries.is_empty() {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            self.pump().await?;
        }
        if self.failures == 0 {
            self.backoff = Duration::from_millis(250);
            self.failed_probes = 0;
            Ok(State::Online)
        } else {
            self.failed_probes += 1;
            if self.failed_probes >= 1 {
                self.rebuild("probes keep failing")?;
                self.failed_probes = 0;
            }
            Ok(State::Offline)
        }
    }

    /// `ShuttingDown`: no new sends; wait for in-flight deliveries until the deadline.
    async fn shutting_down(&mut self) -> Result<(), UplinkError> {
        self.set_state(State::ShuttingDown);
        let deadline = Instant::now() + Duration::from_millis(self.cfg.shutdown_deadline_ms);
        while !self.deliveries.is_empty() && Instant::now() < deadline {
            self.pump().await?;
        }
        self.flush_acks()?;
        let left = Duration::from_millis(self.cfg.shutdown_deadline_ms / 10);
        let _ = self.producer.flush(Timeout::After(left));
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
    let producer: FutureProducer = client_config(&cfg)?.create().map_err(UplinkError::Config)?;
    let bucket = cfg.max_bytes_per_sec.map(|r| Bucket {
        rate: r as f64,
        tokens: r as f64,
        last: Instant::now(),
    });
    let mut up = Uplink {
        outbox,
        cfg,
        producer,
        in_flight: HashSet::new(),
        deliveries: FuturesUnordered::new(),
        to_ack: Vec::new(),
        failures: 0,
        unauthorized: false,
        backoff: Duration::from_millis(250),
        failed_probes: 0,
        bucket,
        status,
    };
    let mut state = State::Online;
    loop {
        if exit_when_empty && up.in_flight.is_empty() && up.depth()? == 0 {
            up.shutting_down().await?;
            return Ok(());
        }
        state = match state {
            State::Online | State::Backlogged => {
                if exit_when_empty {
                    // One round at a time so emptiness is noticed.
                    up.fill(up.cfg.max_in_flight)?;
                    up.pump().await?;
                    if *stop.borrow() {
                        State::ShuttingDown
                    } else if up.failures > 0 {
                        State::Offline
                    } else {
                        let d = up.depth()?;
                        let s = if d >= up.cfg.backlog_threshold {
                            State::Backlogged
                        } else {
                            State::Online
                        };
                        up.set_state(s);
                        s
                    }
                } else {
                    up.draining(&mut stop).await?
                }
            }
            State::Offline => up.offline(&mut stop).await?,
            State::ShuttingDown => {
                up.shutting_down().await?;
                return Ok(());
            }
        };
    }
}
