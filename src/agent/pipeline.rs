//! The wiring of `edge-agent run`: loads the model, opens the outbox, starts the stages as
//! threads joined by bounded channels, the uplink and metrics on a small tokio runtime, beats
//! the watchdog, and shuts everything down in order (see the module doc of [`super`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::capture::{capture_loop, describe_source, Slot};
use super::config::{AgentConfig, SourceKind};
use super::detect::{Detector, DetectorConfig};
use super::health::{now_ms, pipeline_fps, register_outbox_metrics, stalled, AgentMetrics, Beats};
use super::inference::{inference_loop, sha256_file};
use super::outbox::{Outbox, OutboxConfig};
use super::source::{self, SourceError};
use super::status::{state_file_path, write_state};
use super::uplink::{self, UplinkStatus};
use super::writer::{commit, writer_loop, CommitHook};
use crate::event::{Event, Health, Kind, ModelRef};
use crate::exit::{self, ExitStatus};
use crate::metrics::{self, Registry};
use crate::notify::Notifier;
use crate::settings::ConfigError;

/// Why `run` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model: {0}")]
    Model(#[from] crate::agent::detect::LoadError),
    #[error("model file {path}: {source}")]
    ModelRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Outbox(#[from] crate::agent::outbox::OpenError),
    #[error("source: {0}")]
    Source(SourceError),
    #[error("uplink: {0}")]
    Uplink(#[from] crate::agent::uplink::UplinkError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::BindError),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl ExitStatus for RunError {
    fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Metrics(_) => exit::USAGE,
            RunError::Source(SourceError::Config(_)) => exit::USAGE,
            RunError::Model(crate::agent::detect::LoadError::Config(_)) => exit::USAGE,
            RunError::Model(_) | RunError::ModelRead { .. } | RunError::Outbox(_) => exit::INPUT,
            _ => exit::INTERNAL,
        }
    }
}

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
    /// shutdown excluded): compare with `edge-vision-dev bench --images`.
    pub pipeline_fps: f64,
    /// From the start of `run` to the first committed detection event.
    pub first_detection_ms: Option<u64>,
    pub uplink: UplinkStatus,
    /// Rows still in the outbox at exit (sent on the next start).
    pub outbox_depth: u64,
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

/// Runs the pipeline until `control.stop` or the end of a finite source. `source` is passed in
/// (see [`super::source_factory`]) so tests can drive the pipeline with a source of their own.
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
    beats.uplink.store(now_ms(t0), Ordering::Relaxed);
    let uplink_task = rt.spawn(supervise_uplink(
        outbox.clone(),
        cfg.uplink.clone(),
        stop_uplink_rx,
        status_tx,
        beats.clone(),
        m.clone(),
        t0,
    ));
    let (stop_http_tx, stop_http_rx) = watch::channel(false);
    if !cfg.metrics.listen.is_empty() {
        let listener = rt.block_on(metrics::bind(&cfg.metrics.listen))?;
        let beats_h = beats.clone();
        let stall = control.stall_after;
        let health: metrics::HealthFn =
            Arc::new(move || stalled(&beats_h, t0, stall).map(|()| "ok".to_string()));
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

/// Runs the uplink and restarts it with backoff (1 s doubling to 30 s) whenever it fails, so
/// one error never ends delivery for good. While it is down, `/healthz` answers 503 and the
/// watchdog ping is withheld (`health::stalled`), `edge_agent_uplink_up` is 0 and each restart
/// is counted; a failure that outlasts systemd's `WatchdogSec` gets the agent restarted. A
/// failure while stopping is returned.
async fn supervise_uplink(
    outbox: Arc<Mutex<Outbox>>,
    cfg: uplink::UplinkConfig,
    stop: watch::Receiver<bool>,
    status: watch::Sender<UplinkStatus>,
    beats: Arc<Beats>,
    m: Arc<AgentMetrics>,
    t0: Instant,
) -> Result<(), uplink::UplinkError> {
    let mut backoff = Duration::from_secs(1);
    loop {
        let b = beats.clone();
        let beat: uplink::Beat = Arc::new(move || b.uplink_beat(t0));
        m.uplink_up.set(1.0);
        let started = Instant::now();
        let result = uplink::run_with(
            outbox.clone(),
            cfg.clone(),
            stop.clone(),
            status.clone(),
            false,
            beat,
        )
        .await;
        let Err(e) = result else {
            return Ok(());
        };
        m.uplink_up.set(0.0);
        if *stop.borrow() {
            return Err(e);
        }
        m.uplink_restarts.inc();
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tracing::error!(error = %e, retry_in = ?backoff, "uplink failed; restarting it");
        if let Ok(mut down) = beats.uplink_down.lock() {
            *down = Some(e.to_string());
        }
        let mut stopping = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopping.changed() => {}
        }
        if *stop.borrow() {
            return Err(e);
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
