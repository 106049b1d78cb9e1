//! The device side: `edge-agent`. One module per stage, in the order a frame travels.
//!
//! ```text
//!  source ─▶ capture thread ──slot──▶ inference thread ──events (bounded)──▶ writer thread
//!  (camera,   (capture.rs)   newest    (inference.rs,                          (writer.rs)
//!   images,                   wins      detect/: Candle)                           │
//!   synthetic)                                                                     ▼
//!                                            Kafka ◀── uplink task (tokio) ◀── outbox (SQLite)
//!                                                       (uplink/)                (outbox/)
//! ```
//!
//! Read in this order:
//!
//! 1. [`source`] — frame sources behind one trait: V4L2 cameras through `nokhwa` (MJPEG and
//!    YUYV decoded here), image directories, a synthetic pattern.
//! 2. `capture` — the capture stage: the newest frame into a one-frame slot; a lost camera is
//!    retried with `camera_lost` / `camera_recovered` health events.
//! 3. [`detect`] — the YOLOv8 detector in Candle (model, CPU fast path, letterbox, NMS, model
//!    files, the native checkpoint importer, model download).
//! 4. `inference` — the inference stage: detector, class filter, rate cap, change
//!    detection, `snapshots`; one detection event per frame.
//! 5. [`track`] — identities across frames (a ByteTrack-style tracker with a Kalman filter
//!    per track) and what tracks do in the camera's zones and lines (`track::scene`). Not
//!    wired into the pipeline yet (issue 14).
//! 6. `writer` — the outbox writer stage: group commit, retried until it is in.
//! 7. [`outbox`] — the bounded, crash-safe SQLite queue (its module doc states the invariants).
//! 8. [`uplink`] — drains the outbox to Kafka; rows are deleted only after the broker's
//!    acknowledgement; an explicit state machine.
//!
//! Around them: [`config`] (every key of `agent.toml`), `pipeline` (the wiring of `run`,
//! shutdown order), `health` (heartbeats for the watchdog and `/healthz`, metrics),
//! [`status`] (`edge-agent status`), [`commands`] (each subcommand of the binary as one call).
//!
//! * The capture→inference hand-off is a one-frame slot. For live sources (camera, synthetic)
//!   the newest frame wins and the replaced one is counted as dropped; for files the capture
//!   waits instead, so a replay processes every frame.
//! * CPU-heavy work (decoding, inference, SQLite) runs on plain threads; the tokio runtime only
//!   carries the uplink, the metrics server, signals and the heartbeat.
//! * Every stage beats a heartbeat while it works or waits. The heartbeat task sends systemd's
//!   `WATCHDOG=1` only while all beats are fresh, so a stalled stage gets the unit restarted.
//! * Shutdown (SIGTERM/SIGINT, or a finite source running out): capture stops, the frame in
//!   inference is finished, the writer commits what it holds, an `agent_stopping` event is
//!   written, the uplink gets until `uplink.shutdown_deadline_ms` to deliver what is queued, and
//!   whatever is left stays in the outbox for the next start. Nothing enqueued is ever lost.

pub mod source;

mod capture;

pub mod detect;

mod inference;
mod snapshots;

pub mod track;

mod writer;

pub mod outbox;

pub mod uplink;

pub mod commands;
pub mod config;
mod health;
mod pipeline;
pub mod status;

pub use capture::{describe_source, source_factory};
pub use config::{
    AgentConfig, DetectorSettings, MetricsConfig, OutboxSettings, SnapshotConfig, SourceConfig,
    SourceKind, WatchdogConfig,
};
pub use pipeline::{run, Control, RunError, RunReport};
pub use status::{state_file_path, AgentState};
pub use writer::{CommitHook, Committed};
