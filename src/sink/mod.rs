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
//!   `dead_letters` with the reason, in the same transaction as its offset; so does one that
//!   PostgreSQL refuses although it takes other rows (`triage`), and an event whose id is
//!   stored already with other content (a conflict: never merged).
//! * **An unreachable database pauses, never drops.** Connection errors keep the batch in
//!   memory, stop fetching (the consumer still polls, so the group keeps the member), and
//!   retry with backoff until PostgreSQL is back; nothing goes to the dead-letter table for
//!   them and no offset moves. `/healthz` and the watchdog say so (`health`).
//!
//! # Layout
//!
//! A message travels [`consumer`] (batches, the rebalance callback that assigns partitions at
//! PostgreSQL's offsets, the wait while the database is unavailable) -> `decode` (event or
//! dead letter; repeats and conflicts within a batch) -> `triage` (commit, or find the message
//! PostgreSQL refuses) -> [`writer`] (one transaction: COPY, conflicts, dead letters, offsets)
//! -> PostgreSQL, whose schema is [`schema`] (refinery migrations in `migrations/`) and whose
//! connections are [`database`] (libpq strings, `sslmode` over OpenSSL). [`config`] holds every
//! key of `sink.toml`, `health` the sink's metrics.

pub mod commands;
pub mod config;
pub mod consumer;
pub mod database;
mod decode;
pub(crate) mod health;
pub mod offsets;
pub mod schema;
mod triage;
pub mod writer;

pub use config::{consumer_config, SinkConfig};
pub use consumer::run;
pub use schema::{connect, migrate, schema_is_current};

/// Largest message accepted; larger ones are dead-lettered.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// One Kafka message through the sink's decoding, validation and column conversions, as a
/// batch takes it (twice, the second time as a repeat): `Ok(event_id)` for an event the sink
/// writes, `Err(reason)` for a dead letter, the reason as stored. For fuzzing
/// (`fuzz/`) and tests; the sink itself works on batches.
pub fn judge(payload: &[u8]) -> Result<uuid::Uuid, String> {
    let mut batch = decode::Batch::default();
    for offset in 0..2 {
        if let Some(carried) = batch.push(0, offset, Some(payload), MAX_MESSAGE_BYTES) {
            return Err(format!("a message differs from itself: {carried:?}"));
        }
    }
    match &batch.items[..] {
        [decode::Item::Good { ev, .. }, decode::Item::Repeat { .. }] => Ok(ev.event_id),
        [decode::Item::Bad { error: a, .. }, decode::Item::Bad { error: b, .. }] if a == b => {
            Err(a.clone())
        }
        other => Err(format!("inconsistent decoding: {other:?}")),
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
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    #[error(transparent)]
    Print(#[from] crate::settings::PrintError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::BindError),
    #[error("librdkafka: {0}")]
    Protected(#[from] crate::kafka::ProtectedError),
    #[error("output: {0}")]
    Json(#[from] serde_json::Error),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

impl crate::exit::ExitStatus for SinkError {
    fn exit_code(&self) -> u8 {
        match self {
            SinkError::Config(_)
            | SinkError::DbConfig(_)
            | SinkError::Metrics(_)
            | SinkError::Protected(_) => crate::exit::USAGE,
            _ => crate::exit::INTERNAL,
        }
    }
}

/// What the sink's loop is doing.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting, migrating, subscribing.
    #[default]
    Starting,
    /// Consuming and committing batches.
    Consuming,
    /// The database is unavailable; the batch is kept and retried (healthy waiting).
    WaitingForDatabase { seconds: u64, reason: String },
    /// The database refuses even a probe row (a grant, a trigger, a full table): retried,
    /// but an operator must act.
    DatabaseRefusing { seconds: u64, reason: String },
}

/// What the sink has done, for logs, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SinkStatus {
    pub phase: Phase,
    /// When the loop last ran (liveness for `/healthz` and the watchdog).
    #[serde(skip)]
    pub last_beat: Option<std::time::Instant>,
    /// Messages dead-lettered because PostgreSQL refused them (found by splitting a batch).
    pub refused: u64,
    /// Events whose id was stored (or earlier in the batch) with other content.
    pub conflicts: u64,
    /// Partition assignments made (rebalances and resumptions after a database outage).
    pub assignments: u64,
    /// Stored offsets reset to the start of a re-created partition's log (`offsets`).
    pub rewound: u64,
    /// Partitions started past records deleted before the sink read them.
    pub truncated: u64,
    /// Owned partitions not fetched (`stored_offset_past_end = "hold"`), with why.
    pub held: Vec<String>,
    /// Messages taken into batches (each one is written, repeated or dead-lettered).
    pub messages: u64,
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
    /// The latest broker-side error (a TLS certificate refused, a SASL login failed, brokers
    /// down); kept after recovery.
    pub last_broker_error: Option<String>,
    /// Wall time of the last batch's transaction, in milliseconds.
    pub last_batch_ms: u64,
    /// Messages behind the high watermarks, summed over assigned partitions (librdkafka's
    /// statistics, refreshed every 5 s; `None` until the first report).
    pub lag: Option<i64>,
}
