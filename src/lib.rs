//! # edge-vision
//!
//! An edge gateway for Jetson and Raspberry Pi class devices: a YOLOv8 detector written in
//! Candle runs on camera frames on the device, and the service behind it stores what was seen.
//!
//! # Layout
//!
//! * [`detect`] — the detector (feature `agent`): the YOLOv8 network in `candle-nn`
//!   ([`detect::model`]), the CPU fast path for its convolutions (BatchNorm folded, GEMM with
//!   fused bias + SiLU), image input and letterboxing ([`detect::image_io`]), decoding and NMS
//!   ([`detect::postprocess`]), model files ([`detect::weights`]), the native importer of
//!   Ultralytics checkpoints ([`detect::import`]) and box drawing ([`detect::annotate`]).
//! * [`fetch`] — `edge-agent model fetch`: downloads a model from `models/manifest.toml` with a
//!   checksum (feature `agent`).
//! * [`event`] — the versioned event schema shared by agent and sink (`docs/schema.md`).
//! * [`outbox`] — the bounded, crash-safe SQLite store-and-forward queue on the device.
//! * [`uplink`] — drains the outbox to Kafka (rdkafka), deleting rows only after the broker's
//!   acknowledgement; an explicit state machine (`Online`, `Backlogged`, `Offline`,
//!   `ShuttingDown`).
//! * [`sink`] — `edge-sink`: Kafka -> PostgreSQL in one transaction per batch (COPY BINARY,
//!   falling back to staging + `ON CONFLICT DO NOTHING` for batches with duplicates), offsets
//!   stored with the rows (feature `sink`).
//! * [`database`] — PostgreSQL connections: libpq connection strings with libpq's `sslmode`
//!   semantics over OpenSSL, password from a file (feature `sink`).
//! * [`source`] — frame sources behind one trait: V4L2 cameras through `nokhwa` (MJPEG and
//!   YUYV decoded here), image directories, a synthetic pattern (feature `agent`).
//! * [`agent`] — `edge-agent run`: capture -> inference -> outbox writer -> uplink as threads
//!   joined by bounded channels, with heartbeats for systemd's watchdog (feature `agent`).
//! * [`settings`] — layered configuration (embedded defaults, TOML file, environment) whose
//!   errors name the key and the file or variable.
//! * [`kafka`] — TLS/SASL settings shared by uplink and sink, secrets read from files.
//! * [`metrics`] — Prometheus text exposition and `/healthz` on a local address.
//! * [`notify`] — systemd's `sd_notify` protocol (`READY=1`, `WATCHDOG=1`).
//! * `src/bin/edge-agent.rs` — the device agent's command line; thin, over this library.
//! * `src/bin/edge-sink.rs` — the Kafka -> PostgreSQL sink (feature `sink`).
//!
//! Cargo features keep the device build lean: `agent` pulls in Candle and image codecs,
//! `sink` the data-centre dependencies, `cuda` Candle's GPU kernels for Jetson.

#[cfg(feature = "agent")]
pub mod agent;
#[cfg(feature = "sink")]
pub mod database;
#[cfg(feature = "agent")]
pub mod detect;
pub mod event;
#[cfg(feature = "agent")]
pub mod fetch;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "kafka")]
pub mod metrics;
pub mod notify;
#[cfg(feature = "agent")]
pub mod outbox;
pub mod settings;
#[cfg(feature = "sink")]
pub mod sink;
#[cfg(feature = "agent")]
pub mod source;
#[cfg(feature = "agent")]
pub mod uplink;

/// Version of the crate, printed by both binaries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
