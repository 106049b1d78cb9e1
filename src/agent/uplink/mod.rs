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

mod acker;
mod machine;
mod producer;

pub use producer::client_config;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use tokio::sync::{mpsc, watch};

use crate::agent::outbox::Outbox;

use acker::{Acker, Bucket};
use machine::Uplink;
use producer::{producer, SeqHash};

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
    #[error("uplink.librdkafka: {0}")]
    Protected(#[from] crate::kafka::ProtectedError),
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
    /// Deletes of acknowledged rows that failed (those rows are sent again after a restart;
    /// the sink dedupes them).
    pub ack_errors: u64,
    /// The latest reason a delivery failed or the client could not talk to the broker (a TLS
    /// certificate refused, a SASL login failed, the broker unreachable); kept after recovery.
    pub last_error: Option<String>,
}

/// Called on every turn of the uplink's loop (at least every 50 ms while it runs, whatever its
/// state): the agent's watchdog and `/healthz` read it.
pub type Beat = Arc<dyn Fn() + Send + Sync>;

/// [`run_with`] without a heartbeat (`edge-agent outbox drain`, tests).
pub async fn run(
    outbox: Arc<Mutex<Outbox>>,
    cfg: UplinkConfig,
    stop: watch::Receiver<bool>,
    status: watch::Sender<UplinkStatus>,
    exit_when_empty: bool,
) -> Result<(), UplinkError> {
    run_with(outbox, cfg, stop, status, exit_when_empty, Arc::new(|| {})).await
}

/// Runs the uplink until `stop` turns true (or `exit_when_empty` and the outbox is drained).
pub async fn run_with(
    outbox: Arc<Mutex<Outbox>>,
    cfg: UplinkConfig,
    mut stop: watch::Receiver<bool>,
    status: watch::Sender<UplinkStatus>,
    exit_when_empty: bool,
    beat: Beat,
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
        last_delivered: None,
        backoff: Duration::from_millis(250),
        depth: (depth, Instant::now()),
        bucket,
        status,
        beat,
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
