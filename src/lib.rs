//! # edge-vision
//!
//! An edge gateway for Jetson and Raspberry Pi class devices: a YOLOv8 detector written in
//! Candle runs on camera frames on the device, and the service behind it stores what was seen.
//!
//! # Layout
//!
//! The folders are the architecture. A frame travels, one module per stage, in this order:
//!
//! ```text
//!  agent/source ─▶ agent/capture ─▶ agent/inference ─▶ agent/writer ─▶ agent/outbox
//!                                  (agent/detect)                          │ SQLite
//!                                                                          ▼
//!  PostgreSQL ◀── sink/writer ◀── sink/consumer ◀── Kafka ◀────────── agent/uplink
//! ```
//!
//! * [`agent`] — the device side, `edge-agent` (feature `agent`): [`agent::source`] (V4L2
//!   cameras through `nokhwa`, image directories, a synthetic pattern), the capture,
//!   inference and writer stages joined by bounded channels, [`agent::detect`] (the YOLOv8
//!   network in `candle-nn` with our CPU fast path; `Device::Cpu` today, see the `cuda`
//!   feature below), [`agent::outbox`] (the bounded, crash-safe SQLite queue) and
//!   [`agent::uplink`] (drains it to Kafka, deleting rows only after the broker's
//!   acknowledgement), plus its configuration, health and `status`.
//! * [`sink`] — the data-centre side, `edge-sink` (feature `sink`): [`sink::consumer`] (Kafka,
//!   partitions assigned at PostgreSQL's offsets), [`sink::writer`] (rows, dead letters and
//!   offsets in one transaction), [`sink::schema`], [`sink::database`] (libpq strings with
//!   libpq's `sslmode` over OpenSSL), its configuration and metrics.
//! * Shared by both sides: [`event`] (the versioned event schema, `docs/schema.md`),
//!   [`settings`] (layered configuration whose errors name the key and the file or
//!   variable), [`kafka`] (TLS/SASL settings, secrets read from files), [`metrics`]
//!   (Prometheus text and `/healthz`), [`notify`] (systemd's `sd_notify`), [`exit`] (exit
//!   codes, one table for every binary).
//! * [`testkit`] — developer tooling (feature `testkit`, not in the device package): the one
//!   synthetic-event generator of tests, benches and tools, and the benchmark commands.
//! * `src/bin/edge-agent.rs`, `src/bin/edge-sink.rs`, `src/bin/edge-vision-dev.rs` — argument
//!   parsing (flags folded into the config struct) and one library call per subcommand.
//!
//! Which module may call which is in `docs/architecture.md`: the agent and the sink never
//! call each other; both call the shared modules; nothing calls `testkit` but tools and tests.
//!
//! Cargo features keep the device build lean: `agent` pulls in Candle and image codecs,
//! `sink` the data-centre dependencies, `testkit` both (tools and tests), `cuda` Candle's GPU
//! kernels (builds Candle for CUDA; the detector still runs on `Device::Cpu` until the GPU
//! path selects the device).

#[cfg(feature = "agent")]
pub mod agent;
pub mod event;
pub mod exit;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "kafka")]
pub mod metrics;
pub mod notify;
pub mod settings;
#[cfg(feature = "sink")]
pub mod sink;
#[cfg(feature = "testkit")]
pub mod testkit;

/// Version of the crate, printed by every binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
