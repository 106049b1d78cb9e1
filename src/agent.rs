//! `edge-agent run`: camera to Kafka as one pipeline.
//!
//! ```text
//!  capture thread ──slot──▶ inference thread ──events (bounded)──▶ writer thread ──▶ outbox
//!   (FrameSource)  newest     (Candle, CPU)                        (group commit)     │
//!                  wins                                                               ▼
//!                                                            uplink task (tokio) ──▶ Kafka
//! ```
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
//! * The camera going away is not fatal: capture backs off (up to `source.retry_max_ms`),
//!   reopens, and writes `camera_lost` / `camera_recovered` health events.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::detect::{Detection, Detector, DetectorConfig};
use crate::event::{Event, FrameSize, Health, Kind, ModelRef, Object};
use crate::metrics::{self, Counter, Gauge, Histogram, LabelledCounter, Registry};
use crate::notify::Notifier;
use crate::outbox::{Durability, Outbox, OutboxConfig};
use crate::settings::ConfigError;
use crate::source::{self, Frame, FrameSource, PixelFormat, SourceError};
use crate::uplink::{self, UplinkConfig, UplinkStatus};

/// Which kind of frame source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Camera,
    Images,
    Synthetic,
}

/// `[source]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Camera: an index or `/dev/videoN`.
    pub camera: String,
    /// Requested camera resolution; synthetic frame size.
    pub width: u32,
    pub height: u32,
    /// Camera frame rate; pacing of image and synthetic sources (0 = as fast as they go).
    pub fps: f64,
    /// Camera pixel format: `auto` (MJPEG if offered), `mjpeg`, `yuyv`.
    pub format: PixelFormat,
    /// Images: a directory or a glob such as `/data/frames/*.jpg`.
    pub images: String,
    /// Images: start again after the last file.
    #[serde(rename = "loop")]
    pub repeat: bool,
    /// Stop after this many frames (0 = never): tests, demos.
    pub max_frames: u64,
    /// Longest pause between attempts to reopen a lost camera.
    pub retry_max_ms: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::Camera,
            camera: "/dev/video0".into(),
            width: 1280,
            height: 720,
            fps: 15.0,
            format: PixelFormat::Auto,
            images: String::new(),
            repeat: false,
            max_frames: 0,
            retry_max_ms: 30_000,
        }
    }
}

/// `[detector]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorSettings {
    /// Safetensors model (`edge-agent model import` / `model fetch`).
    pub model: PathBuf,
    /// Class names file for models that carry none.
    pub names: Option<PathBuf>,
    /// Network input side (multiple of 32).
    pub input_size: usize,
    /// Minimum confidence of a detection.
    pub confidence: f32,
    /// NMS IoU threshold.
    pub iou: f32,
    /// Keep only these labels (empty: all).
    pub classes: Vec<String>,
    /// Most frames per second sent through the network (0 = as many as it can take).
    pub max_fps: f64,
    /// Skip frames whose detections match the previous frame's (same labels, boxes IoU >= 0.5).
    pub emit_on_change: bool,
    /// Inference threads (0 = all cores).
    pub threads: usize,
    /// Largest image accepted, in pixels.
    pub max_pixels: u64,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        let d = DetectorConfig::default();
        Self {
            model: "/var/lib/edge-agent/models/model.safetensors".into(),
            names: None,
            input_size: d.input_size,
            confidence: d.conf,
            iou: d.iou,
            classes: Vec::new(),
            max_fps: 0.0,
            emit_on_change: false,
            threads: 0,
            max_pixels: d.max_pixels,
        }
    }
}

/// `[snapshots]`: JPEGs of frames with detections, in a bounded directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Where to write them (unset: no snapshots).
    pub dir: Option<PathBuf>,
    /// Oldest snapshots are deleted beyond this many bytes.
    pub max_bytes: u64,
    /// JPEG quality, 1-100.
    pub quality: u8,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 256 * 1024 * 1024,
            quality: 80,
        }
    }
}

/// `[outbox]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    pub path: PathBuf,
    /// Cap for the database and its WAL.
    pub max_bytes: u64,
    /// Events older than this are dropped, counted (0 = keep until the cap needs room).
    pub max_age_s: u64,
    /// `full` (fsync every commit) or `normal` (fsync at checkpoints).
    pub durability: Durability,
    /// Events per transaction at most ...
    pub batch_max: usize,
    /// ... and the longest an event waits for its batch.
    pub batch_ms: u64,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            path: "/var/lib/edge-agent/outbox.sqlite".into(),
            max_bytes: 512 * 1024 * 1024,
            max_age_s: 0,
            durability: Durability::Full,
            batch_max: 64,
            batch_ms: 100,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` for `/metrics` and `/healthz` (empty: off).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// `[watchdog]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchdogConfig {
    /// A stage silent this long counts as stalled: `/healthz` answers 503 and systemd's
    /// watchdog pings stop (0: systemd's `WatchdogSec`, or 60 s outside systemd).
    pub stall_ms: u64,
}

/// The agent's whole configuration (`systemd/edge-agent.toml` documents every key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This device's identity: Kafka key and `device_id` of every event. Empty: the contents
    /// of `/etc/machine-id`.
    pub device_id: String,
    pub source: SourceConfig,
    pub detector: DetectorSettings,
    pub snapshots: SnapshotConfig,
    pub outbox: OutboxSettings,
    pub uplink: UplinkConfig,
    pub metrics: MetricsConfig,
    pub watchdog: WatchdogConfig,
}

impl AgentConfig {
    /// Checks values serde cannot (ranges, combinations). `origin` names where the
    /// configuration came from, for the error.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            origin: origin.into(),
            message,
        };
        let d = &self.detector;
        if d.input_size == 0 || !d.input_size.is_multiple_of(32) {
            return Err(bad(
                "detector.input_size",
                format!("{} is not a positive multiple of 32", d.input_size),
            ));
        }
        if !(0.0..=1.0).contains(&d.confidence) {
            return Err(bad(
                "detector.confidence",
                format!("{} is not in [0, 1]", d.confidence),
            ));
        }
        if !(0.0..=1.0).contains(&d.iou) {
            return Err(bad("detector.iou", format!("{} is not in [0, 1]", d.iou)));
        }
        if d.max_fps < 0.0 || !d.max_fps.is_finite() {
            return Err(bad("detector.max_fps", "must be >= 0".into()));
        }
        if self.source.fps < 0.0 || !self.source.fps.is_finite() {
            return Err(bad("source.fps", "must be >= 0".into()));
        }
        if self.source.kind == SourceKind::Images && self.source.images.is_empty() {
            return Err(bad(
                "source.images",
                "source.kind = \"images\" needs a directory or glob".into(),
            ));
        }
        if self.outbox.max_bytes < 256 * 1024 {
            return Err(bad(
                "outbox.max_bytes",
                format!("{} is below the minimum of 262144", self.outbox.max_bytes),
            ));
        }
        if self.outbox.batch_max == 0 {
            return Err(bad("outbox.batch_max", "must be at least 1".into()));
        }
        if !(1..=100).contains(&self.snapshots.quality) {
            return Err(bad("snapshots.quality", "must be 1-100".into()));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(bad(
                "metrics.listen",
                format!("{:?} is not host:port", self.metrics.listen),
            ));
        }
        if self.uplink.brokers.is_empty() {
            return Err(bad("uplink.brokers", "must not be empty".into()));
        }
        if self.uplink.topic.is_empty() {
            return Err(bad("uplink.topic", "must not be empty".into()));
        }
        Ok(())
    }

    /// `device_id`, else `/etc/machine-id`.
    pub fn resolve_device_id(&self, machine_id_file: &Path) -> Result<String, ConfigError> {
        if !self.device_id.is_empty() {
            return Ok(self.device_id.clone());
        }
        crate::settings::machine_id(machine_id_file).ok_or_else(|| ConfigError::Invalid {
            key: "device_id".into(),
            origin: "configuration".into(),
            message: format!(
                "empty, and {} is missing or empty: set device_id",
                machine_id_file.display()
            ),
        })
    }
}

/// Why `run` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model: {0}")]
    Model(#[from] crate::detect::LoadError),
    #[error("model file {path}: {source}")]
    ModelRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Outbox(#[from] crate::outbox::OpenError),
    #[error("source: {0}")]
    Source(SourceError),
    #[error("uplink: {0}")]
    Uplink(#[from] crate::uplink::UplinkError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl RunError {
    /// The process exit code (see the binary's docs): 2 configuration, 3 bad input, 1 other.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Metrics(_) => 2,
            RunError::Source(SourceError::Config(_)) => 2,
            RunError::Model(crate::detect::LoadError::Config(_)) => 2,
            RunError::Model(_) | RunError::ModelRead { .. } | RunError::Outbox(_) => 3,
            _ => 1,
        }
    }
}

/// What one committed event was, for `--progress` (tests read these lines).
#[derive(Debug, Clone, Serialize)]
pub struct Committed {
    pub seq: u64,
    pub event_id: String,
    pub kind: Kind,
    pub detections: usize,
    pub origin: String,
}

/// Called with each committed batch (see [`Control::on_commit`]).
pub type CommitHook = Box<dyn Fn(&[Committed]) + Send>;

/// Totals of one run, printed at exit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    pub frames_captured: u64,
    pub frames_dropped: u64,
    pub frames_bad: u64,
    pub frames_processed: u64,
    pub frames_unchanged: u64,
    pub frames_sampled_out: u64,
    pub events_enqueued: u64,
    pub detections: u64,
    pub seconds: f64,
    /// Frames processed per second, from the first processed frame to the last (start-up and
    /// shutdown excluded): compare with `edge-agent bench --images`.
    pub pipeline_fps: f64,
    /// From the start of `run` to the first committed detection event.
    pub first_detection_ms: Option<u64>,
    pub uplink: UplinkStatus,
    /// Rows still in the outbox at exit (sent on the next start).
    pub outbox_depth: u64,
}

/// The agent's metrics, registered once.
struct AgentMetrics {
    frames_captured: Arc<Counter>,
    frames_dropped: Arc<Counter>,
    frames_bad: Arc<Counter>,
    frames_processed: Arc<Counter>,
    frames_unchanged: Arc<Counter>,
    frames_sampled_out: Arc<Counter>,
    inference: Arc<Histogram>,
    detections: Arc<LabelledCounter>,
    events: Arc<Counter>,
    enqueue_errors: Arc<Counter>,
    snapshots: Arc<Counter>,
    camera_up: Arc<Gauge>,
    /// ms since start of the first and last processed frame (-1: none yet), for `pipeline_fps`.
    first_processed_ms: AtomicI64,
    last_processed_ms: AtomicI64,
    /// ms since start of the first committed detection event (-1: none yet).
    first_event_ms: AtomicI64,
}

fn pipeline_fps(m: &AgentMetrics) -> f64 {
    let (a, b) = (
        m.first_processed_ms.load(Ordering::Relaxed),
        m.last_processed_ms.load(Ordering::Relaxed),
    );
    let n = m.frames_processed.get();
    if a < 0 || b <= a || n < 2 {
        return 0.0;
    }
    (((n - 1) as f64 / ((b - a) as f64 / 1000.0)) * 100.0).round() / 100.0
}

impl AgentMetrics {
    fn register(r: &Registry) -> Self {
        Self {
            frames_captured: r.counter(
                "edge_agent_frames_captured_total",
                "Frames read from the source.",
            ),
            frames_dropped: r.counter(
                "edge_agent_frames_dropped_total",
                "Frames replaced by a newer one before inference could take them.",
            ),
            frames_bad: r.counter(
                "edge_agent_frames_bad_total",
                "Frames that could not be decoded (skipped).",
            ),
            frames_processed: r.counter(
                "edge_agent_frames_processed_total",
                "Frames that went through the detector.",
            ),
            frames_unchanged: r.counter(
                "edge_agent_frames_unchanged_total",
                "Processed frames not emitted because nothing changed (emit_on_change).",
            ),
            frames_sampled_out: r.counter(
                "edge_agent_frames_sampled_out_total",
                "Frames skipped to stay under detector.max_fps.",
            ),
            inference: r.histogram(
                "edge_agent_inference_seconds",
                "Detector latency per frame (letterbox, forward, NMS).",
                &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            detections: r.labelled_counter(
                "edge_agent_detections_total",
                "Detections emitted, by label.",
                "label",
            ),
            events: r.counter(
                "edge_agent_events_enqueued_total",
                "Events committed to the outbox.",
            ),
            enqueue_errors: r.counter(
                "edge_agent_enqueue_errors_total",
                "Failed outbox commits (retried; nothing dropped).",
            ),
            snapshots: r.counter("edge_agent_snapshots_total", "JPEG snapshots written."),
            camera_up: r.gauge(
                "edge_agent_source_up",
                "1 while the frame source delivers, 0 while it is lost.",
            ),
            first_processed_ms: AtomicI64::new(-1),
            last_processed_ms: AtomicI64::new(-1),
            first_event_ms: AtomicI64::new(-1),
        }
    }
}

/// Per-stage progress stamps (ms since the run started) for the watchdog.
#[derive(Debug, Default)]
struct Beats {
    capture: AtomicI64,
    inference: AtomicI64,
    writer: AtomicI64,
}

/// One-frame hand-off between capture and inference.
struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

#[derive(Default)]
struct SlotState {
    frame: Option<Frame>,
    closed: bool,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: Mutex::new(SlotState::default()),
            cv: Condvar::new(),
        }
    }

    /// Puts a frame: replaces the waiting one (returns true: one dropped) or, with `wait`,
    /// waits until it was taken. Returns false without putting when closed.
    fn put(&self, frame: Frame, wait: bool, beat: &dyn Fn()) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        if wait {
            while st.frame.is_some() && !st.closed {
                beat();
                st = match self.cv.wait_timeout(st, Duration::from_millis(200)) {
                    Ok((g, _)) => g,
                    Err(_) => return false,
                };
            }
        }
        let dropped = st.frame.replace(frame).is_some();
        self.cv.notify_all();
        dropped
    }

    /// Takes the waiting frame; `Err(())` once closed and empty, `Ok(None)` on timeout.
    fn take(&self, timeout: Duration) -> Result<Option<Frame>, ()> {
        let Ok(mut st) = self.state.lock() else {
            return Err(());
        };
        if st.frame.is_none() && !st.closed {
            st = match self.cv.wait_timeout(st, timeout) {
                Ok((g, _)) => g,
                Err(_) => return Err(()),
            };
        }
        match st.frame.take() {
            Some(f) => {
                self.cv.notify_all();
                Ok(Some(f))
            }
            None if st.closed => Err(()),
            None => Ok(None),
        }
    }

    fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
        }
        self.cv.notify_all();
    }
}

/// What the configured source is, for logs and the `agent_started` event.
pub fn describe_source(cfg: &AgentConfig) -> String {
    let s = &cfg.source;
    match s.kind {
        SourceKind::Images => format!("images {}", s.images),
        SourceKind::Synthetic => format!("synthetic {}x{}", s.width, s.height),
        SourceKind::Camera => format!("camera {} {}x{}@{}", s.camera, s.width, s.height, s.fps),
    }
}

/// Checks the configured source now (no images match, a bad camera name) and returns a factory
/// that opens it on the capture thread. A camera is not touched until then: one that is missing
/// at start is retried like one unplugged later.
pub fn source_factory(cfg: &AgentConfig) -> Result<source::SourceFactory, SourceError> {
    let s = cfg.source.clone();
    let max_pixels = cfg.detector.max_pixels;
    Ok(match s.kind {
        SourceKind::Images => {
            let files = source::ImageFiles::open(&s.images, s.repeat, s.fps, max_pixels)?;
            Box::new(move || Ok(Box::new(files) as Box<dyn FrameSource>))
        }
        SourceKind::Synthetic => Box::new(move || {
            Ok(Box::new(source::Synthetic::new(s.width, s.height, s.fps)) as Box<dyn FrameSource>)
        }),
        SourceKind::Camera => {
            source::camera_index(&s.camera)?;
            Box::new(move || {
                source::Camera::new(&s.camera, s.width, s.height, s.fps, s.format, max_pixels)
                    .map(|c| Box::new(c) as Box<dyn FrameSource>)
            })
        }
    })
}

/// Hooks for the caller: a line per committed event, and a stop signal.
pub struct Control {
    /// Turns true to stop (SIGTERM).
    pub stop: watch::Receiver<bool>,
    /// Called after each commit with what was committed.
    pub on_commit: Option<CommitHook>,
    /// systemd notifications.
    pub notifier: Notifier,
    /// How often the heartbeat runs (systemd's watchdog period / 2, or 1 s).
    pub heartbeat: Duration,
    /// A stage silent for this long counts as stalled.
    pub stall_after: Duration,
}

fn now_ms(t0: Instant) -> i64 {
    t0.elapsed().as_millis() as i64
}

/// Runs the pipeline until `control.stop` or the end of a finite source. `source` is passed in
/// (see [`open_source`]) so tests can drive the pipeline with a source of their own.
pub fn run(
    cfg: AgentConfig,
    device_id: String,
    source: source::SourceFactory,
    control: Control,
) -> Result<RunReport, RunError> {
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edge-agent-io")
        .enable_all()
        .build()?;

    // The detector first: a missing or corrupt model stops us before anything else starts.
    let dcfg = DetectorConfig {
        input_size: cfg.detector.input_size,
        conf: cfg.detector.confidence,
        iou: cfg.detector.iou,
        max_pixels: cfg.detector.max_pixels,
        ..DetectorConfig::default()
    };
    let detector = Detector::load(
        &cfg.detector.model,
        cfg.detector.names.as_deref(),
        &candle_core::Device::Cpu,
        dcfg,
    )?;
    let model_ref = ModelRef {
        name: cfg
            .detector
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        sha256: sha256_file(&cfg.detector.model)?,
    };

    let mut ocfg = OutboxConfig::new(&cfg.outbox.path, &device_id);
    ocfg.max_bytes = cfg.outbox.max_bytes;
    ocfg.max_age = (cfg.outbox.max_age_s > 0).then(|| Duration::from_secs(cfg.outbox.max_age_s));
    ocfg.durability = cfg.outbox.durability;
    if let Some(dir) = cfg
        .outbox
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)?;
    }
    let (outbox, report) = Outbox::open(ocfg)?;
    if let Some(q) = &report.quarantined {
        tracing::error!(moved_to = %q.display(), "outbox was corrupt; kept aside, started a fresh one");
    }
    let outbox = Arc::new(Mutex::new(outbox));

    let registry = Arc::new(Registry::default());
    let m = Arc::new(AgentMetrics::register(&registry));
    let beats = Arc::new(Beats::default());
    let (stop_uplink_tx, stop_uplink_rx) = watch::channel(false);
    let (status_tx, status_rx) = watch::channel(UplinkStatus::default());
    register_outbox_metrics(&registry, &outbox, &cfg.outbox.path, status_rx.clone());

    // Started event, committed before anything else.
    let started = Event::health(
        &device_id,
        Kind::AgentStarted,
        Health {
            message: Some(format!(
                "edge-agent {} source {} model {}",
                crate::VERSION,
                describe_source(&cfg),
                model_ref.name
            )),
            evicted: None,
        },
    );
    let mut on_commit = control.on_commit;
    commit(
        &outbox,
        vec![(started, String::new())],
        &m,
        &mut on_commit,
        &beats.writer,
        t0,
    );

    // Uplink and metrics on the runtime.
    let uplink_task = rt.spawn(uplink::run(
        outbox.clone(),
        cfg.uplink.clone(),
        stop_uplink_rx,
        status_tx,
        false,
    ));
    let (stop_http_tx, stop_http_rx) = watch::channel(false);
    if !cfg.metrics.listen.is_empty() {
        let listener = rt
            .block_on(metrics::bind(&cfg.metrics.listen))
            .map_err(RunError::Metrics)?;
        let beats_h = beats.clone();
        let stall = control.stall_after;
        let health: metrics::HealthFn = Arc::new(move || stalled(&beats_h, t0, stall));
        rt.spawn(metrics::serve(
            listener,
            registry.clone(),
            health,
            stop_http_rx,
        ));
    }

    // Threads. Every stage starts with a fresh beat (model loading is not a stall).
    for b in [&beats.capture, &beats.inference, &beats.writer] {
        b.store(now_ms(t0), Ordering::Relaxed);
    }
    let stop_capture = Arc::new(AtomicBool::new(false));
    let slot = Arc::new(Slot::new());
    let (ev_tx, ev_rx) = mpsc::sync_channel::<(Event, String)>(256);
    let live = cfg.source.kind != SourceKind::Images;
    let capture = {
        let (slot, m, beats, stop, ev_tx) = (
            slot.clone(),
            m.clone(),
            beats.clone(),
            stop_capture.clone(),
            ev_tx.clone(),
        );
        let (device_id, max_frames, retry_max) = (
            device_id.clone(),
            cfg.source.max_frames,
            Duration::from_millis(cfg.source.retry_max_ms.max(100)),
        );
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || {
                capture_loop(
                    source, &slot, &m, &beats, &stop, &ev_tx, &device_id, max_frames, retry_max,
                    live, t0,
                )
            })?
    };
    let inference = {
        let (slot, m, beats) = (slot.clone(), m.clone(), beats.clone());
        let settings = cfg.detector.clone();
        let snapshots = cfg.snapshots.clone();
        let device_id = device_id.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                inference_loop(
                    detector, &settings, &snapshots, model_ref, &device_id, &slot, &m, &beats,
                    ev_tx, t0,
                )
            })?
    };
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = {
        let (outbox, m, beats) = (outbox.clone(), m.clone(), beats.clone());
        let stop = stop_writer.clone();
        let (batch_max, batch_ms) = (cfg.outbox.batch_max, cfg.outbox.batch_ms);
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || {
                writer_loop(
                    ev_rx, &outbox, &m, &beats, batch_max, batch_ms, on_commit, &stop, t0,
                )
            })?
    };

    // Heartbeat and stop signal.
    control.notifier.notify("READY=1");
    let mut stop = control.stop;
    let notifier = control.notifier;
    let (hb, stall) = (control.heartbeat, control.stall_after);
    let state_file = state_file_path(&cfg.outbox.path);
    let finished = rt.block_on(async {
        let mut tick = tokio::time::interval(hb);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if capture.is_finished() {
                        return false;
                    }
                    write_state(&state_file, &m, &status_rx.borrow());
                    match stalled(&beats, t0, stall) {
                        Ok(()) => notifier.notify("WATCHDOG=1"),
                        Err(why) => tracing::error!("pipeline stalled: {why}; withholding the watchdog ping"),
                    }
                }
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return true;
                    }
                }
            }
        }
    });
    tracing::info!(signalled = finished, "stopping: capture first");
    notifier.notify("STOPPING=1");
    stop_capture.store(true, Ordering::Relaxed);
    // A source blocked in a read (a hung camera driver, a FIFO) must not hold shutdown hostage:
    // wait a little, then leave that thread behind.
    let waited = Instant::now();
    while !capture.is_finished() && waited.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let capture_result = if capture.is_finished() {
        capture.join().ok()
    } else {
        tracing::warn!("capture did not stop (blocked in the source); leaving it behind");
        None
    };
    slot.close();
    let _ = inference.join();
    stop_writer.store(true, Ordering::Relaxed);
    let writer_on_commit = writer.join().ok().flatten();

    // Last words, then give the uplink until its deadline to deliver what is queued.
    let mut on_commit = writer_on_commit;
    let stopping = Event::health(&device_id, Kind::AgentStopping, Health::default());
    commit(
        &outbox,
        vec![(stopping, String::new())],
        &m,
        &mut on_commit,
        &beats.writer,
        t0,
    );
    let deadline = Instant::now() + Duration::from_millis(cfg.uplink.shutdown_deadline_ms);
    let mut status_watch = status_rx.clone();
    rt.block_on(async {
        while Instant::now() < deadline {
            let (depth, state) = {
                let st = status_watch.borrow_and_update();
                (st.outbox_depth, st.state)
            };
            let depth_now = outbox
                .lock()
                .map(|o| o.depth().unwrap_or(depth))
                .unwrap_or(depth);
            if depth_now == 0 || state == Some(uplink::State::Offline) {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), status_watch.changed()).await;
        }
    });
    let _ = stop_uplink_tx.send(true);
    let uplink_result = rt.block_on(uplink_task);
    let _ = stop_http_tx.send(true);
    if let Ok(ob) = outbox.lock() {
        let _ = ob.checkpoint();
    }
    let capture_error = match capture_result {
        Some(Err(e)) => Some(e),
        _ => None,
    };
    match uplink_result {
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => tracing::error!("uplink task: {e}"),
        Ok(Ok(())) => {}
    }
    if let Some(e) = capture_error {
        return Err(RunError::Source(e));
    }
    let secs = t0.elapsed().as_secs_f64();
    let uplink_status = status_rx.borrow().clone();
    let outbox_depth = outbox.lock().map(|o| o.depth().unwrap_or(0)).unwrap_or(0);
    Ok(RunReport {
        frames_captured: m.frames_captured.get(),
        frames_dropped: m.frames_dropped.get(),
        frames_bad: m.frames_bad.get(),
        frames_processed: m.frames_processed.get(),
        frames_unchanged: m.frames_unchanged.get(),
        frames_sampled_out: m.frames_sampled_out.get(),
        events_enqueued: m.events.get(),
        detections: m.detections.snapshot().values().sum(),
        seconds: (secs * 1000.0).round() / 1000.0,
        pipeline_fps: pipeline_fps(&m),
        first_detection_ms: u64::try_from(m.first_event_ms.load(Ordering::Relaxed)).ok(),
        uplink: uplink_status,
        outbox_depth,
    })
}

/// The small JSON file the running agent refreshes for `edge-agent status`: next to the outbox.
pub fn state_file_path(outbox: &Path) -> PathBuf {
    outbox.with_file_name("agent-state.json")
}

/// What `edge-agent status` reads about a running agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    pub updated_ms: i64,
    pub source_up: bool,
    pub uplink_state: Option<uplink::State>,
    pub frames_processed: u64,
    pub events_enqueued: u64,
}

fn write_state(path: &Path, m: &AgentMetrics, st: &UplinkStatus) {
    let state = AgentState {
        pid: std::process::id(),
        updated_ms: chrono::Utc::now().timestamp_millis(),
        source_up: m.camera_up.get() > 0.5,
        uplink_state: st.state,
        frames_processed: m.frames_processed.get(),
        events_enqueued: m.events.get(),
    };
    let tmp = path.with_extension("json.tmp");
    let ok = serde_json::to_vec(&state)
        .ok()
        .and_then(|b| std::fs::write(&tmp, b).ok())
        .and_then(|_| std::fs::rename(&tmp, path).ok());
    if ok.is_none() {
        tracing::debug!(path = %path.display(), "could not write the state file");
    }
}

/// `Err(reason)` when a stage has not beaten for `stall`.
fn stalled(beats: &Beats, t0: Instant, stall: Duration) -> Result<(), String> {
    let now = now_ms(t0);
    let limit = stall.as_millis() as i64;
    for (name, b) in [
        ("capture", &beats.capture),
        ("inference", &beats.inference),
        ("outbox writer", &beats.writer),
    ] {
        let age = now - b.load(Ordering::Relaxed);
        if age > limit {
            return Err(format!("{name} silent for {age} ms"));
        }
    }
    Ok(())
}

fn register_outbox_metrics(
    r: &Registry,
    outbox: &Arc<Mutex<Outbox>>,
    path: &Path,
    status: watch::Receiver<UplinkStatus>,
) {
    let ob = outbox.clone();
    r.gauge_fn(
        "edge_agent_outbox_depth",
        "Events waiting in the outbox.",
        Box::new(move || {
            let d = ob.lock().map(|o| o.depth().unwrap_or(0)).unwrap_or(0);
            vec![(String::new(), d as f64)]
        }),
    );
    let p = path.to_path_buf();
    r.gauge_fn(
        "edge_agent_outbox_bytes",
        "Outbox database plus WAL on disk.",
        Box::new(move || vec![(String::new(), crate::outbox::file_bytes(&p) as f64)]),
    );
    let ob = outbox.clone();
    r.gauge_fn(
        "edge_agent_outbox_evictions",
        "Events the outbox evicted to stay under its cap, by reason.",
        Box::new(move || {
            let Ok(Ok(e)) = ob.lock().map(|o| o.evictions()) else {
                return Vec::new();
            };
            vec![
                ("reason=\"no_detections\"".into(), e.no_detections as f64),
                ("reason=\"low_confidence\"".into(), e.low_confidence as f64),
                ("reason=\"oldest\"".into(), e.oldest as f64),
                ("reason=\"expired\"".into(), e.expired as f64),
            ]
        }),
    );
    let s = status.clone();
    r.gauge_fn(
        "edge_agent_uplink_state",
        "1 for the uplink's current state.",
        Box::new(move || {
            let cur = s.borrow().state;
            [
                uplink::State::Online,
                uplink::State::Backlogged,
                uplink::State::Offline,
                uplink::State::ShuttingDown,
            ]
            .iter()
            .map(|st| {
                let name = serde_json::to_value(st)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                (
                    format!("state=\"{name}\""),
                    f64::from(u8::from(cur == Some(*st))),
                )
            })
            .collect()
        }),
    );
    let s = status;
    r.gauge_fn(
        "edge_agent_uplink_delivered",
        "Events the broker acknowledged since start (a counter read from the uplink).",
        Box::new(move || vec![(String::new(), s.borrow().delivered as f64)]),
    );
}

/// Capture stage. Returns an error only for a source that cannot work at all.
#[allow(clippy::too_many_arguments)]
fn capture_loop(
    source: source::SourceFactory,
    slot: &Slot,
    m: &AgentMetrics,
    beats: &Beats,
    stop: &AtomicBool,
    health: &SyncSender<(Event, String)>,
    device_id: &str,
    max_frames: u64,
    retry_max: Duration,
    live: bool,
    t0: Instant,
) -> Result<(), SourceError> {
    let beat = || beats.capture.store(now_ms(t0), Ordering::Relaxed);
    let mut source = source()?;
    let mut lost: Option<String> = None;
    let mut backoff = Duration::from_millis(250);
    let mut frames = 0u64;
    m.camera_up.set(1.0);
    while !stop.load(Ordering::Relaxed) {
        beat();
        if max_frames > 0 && frames >= max_frames {
            return Ok(());
        }
        match source.next_frame() {
            Ok(frame) => {
                if let Some(why) = lost.take() {
                    tracing::info!(source = %source.describe(), "source recovered");
                    m.camera_up.set(1.0);
                    let ev = Event::health(
                        device_id,
                        Kind::CameraRecovered,
                        Health {
                            message: Some(format!("{} back after: {why}", source.describe())),
                            evicted: None,
                        },
                    );
                    let _ = health.send((ev, String::new()));
                    backoff = Duration::from_millis(250);
                }
                frames += 1;
                m.frames_captured.inc();
                if slot.put(frame, !live, &beat) {
                    m.frames_dropped.inc();
                }
            }
            Err(SourceError::BadFrame { origin, reason }) => {
                m.frames_bad.inc();
                tracing::warn!(%origin, "bad frame skipped: {reason}");
            }
            Err(SourceError::Ended) => return Ok(()),
            Err(SourceError::Config(e)) => return Err(SourceError::Config(e)),
            Err(SourceError::Unavailable(why)) => {
                if lost.is_none() {
                    tracing::warn!(source = %source.describe(), "source lost: {why}");
                    m.camera_up.set(0.0);
                    let ev = Event::health(
                        device_id,
                        Kind::CameraLost,
                        Health {
                            message: Some(why.clone()),
                            evicted: None,
                        },
                    );
                    let _ = health.send((ev, String::new()));
                    lost = Some(why);
                }
                // Sleep in small steps so stop and the heartbeat stay responsive.
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    beat();
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(retry_max);
                if let Err(e) = source.reopen() {
                    tracing::debug!("reopen failed: {e}");
                }
            }
        }
    }
    Ok(())
}

/// Do two frames' detections match (same labels, each box IoU >= 0.5 with a partner)?
fn same_detections(a: &[Object], b: &[Object]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut used = vec![false; b.len()];
    a.iter().all(|x| {
        let hit = b.iter().enumerate().position(|(i, y)| {
            !used[i]
                && x.class_id == y.class_id
                && crate::detect::postprocess::iou(&x.bbox, &y.bbox) >= 0.5
        });
        if let Some(i) = hit {
            used[i] = true;
        }
        hit.is_some()
    })
}

/// Inference stage.
#[allow(clippy::too_many_arguments)]
fn inference_loop(
    detector: Detector,
    settings: &DetectorSettings,
    snapshots: &SnapshotConfig,
    model: ModelRef,
    device_id: &str,
    slot: &Slot,
    m: &AgentMetrics,
    beats: &Beats,
    events: SyncSender<(Event, String)>,
    t0: Instant,
) {
    let min_gap = (settings.max_fps > 0.0).then(|| Duration::from_secs_f64(1.0 / settings.max_fps));
    let mut last_run: Option<Instant> = None;
    let mut previous: Option<Vec<Object>> = None;
    let mut snaps = snapshots.dir.as_ref().and_then(|d| {
        match SnapshotDir::open(d, snapshots.max_bytes, snapshots.quality) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(dir = %d.display(), "snapshots disabled: {e}");
                None
            }
        }
    });
    loop {
        beats.inference.store(now_ms(t0), Ordering::Relaxed);
        let frame = match slot.take(Duration::from_millis(200)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(()) => return,
        };
        if let (Some(gap), Some(last)) = (min_gap, last_run) {
            if last.elapsed() < gap {
                m.frames_sampled_out.inc();
                continue;
            }
        }
        last_run = Some(Instant::now());
        let result = match detector.detect(&frame.image) {
            Ok(r) => r,
            Err(e) => {
                m.frames_bad.inc();
                tracing::warn!(origin = %frame.origin, "inference failed: {e}");
                continue;
            }
        };
        let done = now_ms(t0);
        let _ =
            m.first_processed_ms
                .compare_exchange(-1, done, Ordering::Relaxed, Ordering::Relaxed);
        m.last_processed_ms.store(done, Ordering::Relaxed);
        m.frames_processed.inc();
        m.inference.observe(result.inference_ms / 1000.0);
        let objects: Vec<Object> = result
            .detections
            .iter()
            .filter(|d| settings.classes.is_empty() || settings.classes.contains(&d.label))
            .map(to_object)
            .collect();
        if settings.emit_on_change {
            if previous
                .as_deref()
                .is_some_and(|p| same_detections(&objects, p))
            {
                m.frames_unchanged.inc();
                continue;
            }
            previous = Some(objects.clone());
        }
        for o in &objects {
            m.detections.add(&o.label, 1);
        }
        let mut ev = Event::detection(
            device_id,
            model.clone(),
            FrameSize {
                width: result.width,
                height: result.height,
            },
            objects,
        );
        ev.event_id = frame.id;
        ev.captured_at = frame.captured_at;
        if let Some(s) = snaps.as_mut() {
            if !ev.detections.is_empty() {
                match s.write(&ev.event_id.to_string(), &frame.image) {
                    Ok(()) => m.snapshots.inc(),
                    Err(e) => tracing::warn!("snapshot: {e}"),
                }
            }
        }
        if events.send((ev, frame.origin)).is_err() {
            return;
        }
    }
}

fn to_object(d: &Detection) -> Object {
    Object {
        label: d.label.clone(),
        class_id: d.class_id as u32,
        confidence: d.confidence,
        bbox: d.bbox,
    }
}

/// Writer stage: batches events into outbox transactions. A failed commit is retried with
/// backoff, holding the batch (and, through the bounded channel, the stages before it).
#[allow(clippy::too_many_arguments)]
fn writer_loop(
    rx: Receiver<(Event, String)>,
    outbox: &Mutex<Outbox>,
    m: &AgentMetrics,
    beats: &Beats,
    batch_max: usize,
    batch_ms: u64,
    mut on_commit: Option<CommitHook>,
    stop: &AtomicBool,
    t0: Instant,
) -> Option<CommitHook> {
    let mut closed = false;
    while !closed {
        beats.writer.store(now_ms(t0), Ordering::Relaxed);
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => e,
            // Stopped and nothing left: every sender that matters (inference) is gone.
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Relaxed) => break,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = vec![first];
        let until = Instant::now() + Duration::from_millis(batch_ms);
        while batch.len() < batch_max {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(e) => batch.push(e),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        commit(outbox, batch, m, &mut on_commit, &beats.writer, t0);
    }
    on_commit
}

/// Commits one batch, retrying until it is in (the outbox evicts to make room; only a broken
/// disk keeps failing, and then nothing later can be written either).
fn commit(
    outbox: &Mutex<Outbox>,
    batch: Vec<(Event, String)>,
    m: &AgentMetrics,
    on_commit: &mut Option<CommitHook>,
    beat: &AtomicI64,
    t0: Instant,
) {
    let (mut events, origins): (Vec<Event>, Vec<String>) = batch.into_iter().unzip();
    let mut backoff = Duration::from_millis(100);
    let seqs = loop {
        beat.store(now_ms(t0), Ordering::Relaxed);
        let result = match outbox.lock() {
            Ok(mut ob) => ob.enqueue(&mut events),
            Err(_) => {
                tracing::error!("outbox lock poisoned; events kept in memory, retrying");
                std::thread::sleep(backoff);
                continue;
            }
        };
        match result {
            Ok(seqs) => break seqs,
            Err(e) => {
                m.enqueue_errors.inc();
                tracing::error!(events = events.len(), "outbox commit failed, retrying: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    m.events.add(seqs.len() as u64);
    if events.iter().any(|e| e.kind == Kind::Detection) {
        let _ =
            m.first_event_ms
                .compare_exchange(-1, now_ms(t0), Ordering::Relaxed, Ordering::Relaxed);
    }
    if let Some(f) = on_commit.as_ref() {
        let lines: Vec<Committed> = events
            .iter()
            .zip(seqs)
            .zip(origins)
            .map(|((e, seq), origin)| Committed {
                seq,
                event_id: e.event_id.to_string(),
                kind: e.kind,
                detections: e.detections.len(),
                origin,
            })
            .collect();
        f(&lines);
    }
}

/// A directory of JPEG snapshots kept under a byte cap (oldest deleted first; names are
/// UUIDv7 event ids, so name order is time order).
struct SnapshotDir {
    dir: PathBuf,
    max_bytes: u64,
    quality: u8,
    /// (name, bytes), oldest first.
    files: VecDeque<(PathBuf, u64)>,
    total: u64,
}

impl SnapshotDir {
    fn open(dir: &Path, max_bytes: u64, quality: u8) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "jpg"))
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
            .collect();
        files.sort();
        let total = files.iter().map(|f| f.1).sum();
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            quality,
            files: files.into(),
            total,
        })
    }

    fn write(&mut self, name: &str, img: &image::DynamicImage) -> Result<(), String> {
        let mut bytes = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, self.quality);
        img.to_rgb8()
            .write_with_encoder(enc)
            .map_err(|e| format!("encoding: {e}"))?;
        let path = self.dir.join(format!("{name}.jpg"));
        let tmp = self.dir.join(format!(".{name}.jpg.tmp"));
        std::fs::write(&tmp, &bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.total += bytes.len() as u64;
        self.files.push_back((path, bytes.len() as u64));
        while self.total > self.max_bytes {
            let Some((old, n)) = self.files.pop_front() else {
                break;
            };
            let _ = std::fs::remove_file(&old);
            self.total -= n;
        }
        Ok(())
    }
}

fn sha256_file(path: &Path) -> Result<String, RunError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|source| RunError::ModelRead {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(class_id: u32, x: f32) -> Object {
        Object {
            label: format!("c{class_id}"),
            class_id,
            confidence: 0.9,
            bbox: [x, 10.0, x + 100.0, 200.0],
        }
    }

    #[test]
    fn change_detection_compares_labels_and_boxes() {
        assert!(same_detections(&[], &[]));
        assert!(same_detections(&[obj(0, 10.0)], &[obj(0, 15.0)]));
        assert!(!same_detections(&[obj(0, 10.0)], &[obj(1, 10.0)]));
        assert!(!same_detections(&[obj(0, 10.0)], &[obj(0, 300.0)]));
        assert!(!same_detections(&[obj(0, 10.0)], &[]));
        assert!(same_detections(
            &[obj(0, 10.0), obj(0, 500.0)],
            &[obj(0, 505.0), obj(0, 12.0)]
        ));
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = AgentConfig::default();
        c.detector.input_size = 100;
        let e = c.validate("file x.toml").unwrap_err().to_string();
        assert!(
            e.contains("detector.input_size") && e.contains("x.toml"),
            "{e}"
        );
        let mut c = AgentConfig::default();
        c.source.kind = SourceKind::Images;
        let e = c.validate("env").unwrap_err().to_string();
        assert!(e.contains("source.images"), "{e}");
        assert!(AgentConfig::default().validate("defaults").is_ok());
    }

    #[test]
    fn snapshot_dir_stays_under_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 7])
        }));
        let mut s = SnapshotDir::open(dir.path(), 4000, 90).unwrap();
        for i in 0..20 {
            s.write(&format!("{i:04}"), &img).unwrap();
        }
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 4000, "{on_disk}");
        assert!(dir.path().join("0019.jpg").exists(), "newest kept");
        assert!(!dir.path().join("0000.jpg").exists(), "oldest deleted");
    }

    #[test]
    fn the_slot_keeps_the_newest_frame_or_waits() {
        let slot = Slot::new();
        let frame = |i| Frame {
            image: image::DynamicImage::new_rgb8(2, 2),
            captured_at: chrono::Utc::now(),
            index: i,
            origin: String::new(),
            id: uuid::Uuid::now_v7(),
        };
        assert!(!slot.put(frame(0), false, &|| {}));
        assert!(slot.put(frame(1), false, &|| {}), "replacing counts a drop");
        let got = slot.take(Duration::from_millis(10)).unwrap().unwrap();
        assert_eq!(got.index, 1);
        assert!(slot.take(Duration::from_millis(10)).unwrap().is_none());
        slot.close();
        assert!(slot.take(Duration::from_millis(10)).is_err());
    }
}
