//! What tells the truth about the pipeline: per-stage heartbeats (systemd's watchdog and
//! `/healthz` both read [`stalled`]) and the agent's Prometheus metrics.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::outbox::Outbox;
use super::uplink::{self, UplinkStatus};
use crate::metrics::{Counter, Gauge, Histogram, LabelledCounter, Registry};

/// The agent's metrics, registered once.
pub(super) struct AgentMetrics {
    pub(super) frames_captured: Arc<Counter>,
    pub(super) frames_dropped: Arc<Counter>,
    pub(super) frames_bad: Arc<Counter>,
    pub(super) frames_processed: Arc<Counter>,
    pub(super) frames_unchanged: Arc<Counter>,
    pub(super) frames_sampled_out: Arc<Counter>,
    pub(super) inference: Arc<Histogram>,
    pub(super) detections: Arc<LabelledCounter>,
    pub(super) events: Arc<Counter>,
    pub(super) enqueue_errors: Arc<Counter>,
    pub(super) snapshots: Arc<Counter>,
    pub(super) camera_up: Arc<Gauge>,
    pub(super) uplink_up: Arc<Gauge>,
    pub(super) uplink_restarts: Arc<Counter>,
    /// ms since start of the first and last processed frame (-1: none yet), for `pipeline_fps`.
    pub(super) first_processed_ms: AtomicI64,
    pub(super) last_processed_ms: AtomicI64,
    /// ms since start of the first committed detection event (-1: none yet).
    pub(super) first_event_ms: AtomicI64,
}

pub(super) fn pipeline_fps(m: &AgentMetrics) -> f64 {
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
    pub(super) fn register(r: &Registry) -> Self {
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
            uplink_up: r.gauge(
                "edge_agent_uplink_up",
                "1 while the uplink task runs, 0 while it is down and waits to be restarted.",
            ),
            uplink_restarts: r.counter(
                "edge_agent_uplink_restarts_total",
                "Times the uplink failed and was restarted by its supervisor.",
            ),
            first_processed_ms: AtomicI64::new(-1),
            last_processed_ms: AtomicI64::new(-1),
            first_event_ms: AtomicI64::new(-1),
        }
    }
}

/// Per-stage progress stamps (ms since the run started) for the watchdog.
#[derive(Debug, Default)]
pub(super) struct Beats {
    pub(super) capture: AtomicI64,
    pub(super) inference: AtomicI64,
    pub(super) writer: AtomicI64,
    /// Every turn of the uplink's loop (`uplink::Beat`).
    pub(super) uplink: AtomicI64,
    /// Why the uplink is down while its supervisor waits to restart it; cleared by the
    /// restarted uplink's first beat.
    pub(super) uplink_down: Mutex<Option<String>>,
}

impl Beats {
    /// The uplink's beat: a fresh stamp, and the end of any "down" it was in.
    pub(super) fn uplink_beat(&self, t0: Instant) {
        self.uplink.store(now_ms(t0), Ordering::Relaxed);
        if let Ok(mut down) = self.uplink_down.try_lock() {
            if down.is_some() {
                *down = None;
            }
        }
    }
}

pub(super) fn now_ms(t0: Instant) -> i64 {
    t0.elapsed().as_millis() as i64
}

/// `Err(reason)` when a stage has not beaten for `stall`.
/// Extra silence allowed to the uplink: it may block in a metadata probe (2 s) or while it
/// rebuilds its producer, both while the broker is unreachable, which is no stall.
const UPLINK_GRACE_MS: i64 = 5_000;

pub(super) fn stalled(beats: &Beats, t0: Instant, stall: Duration) -> Result<(), String> {
    if let Some(why) = beats.uplink_down.lock().ok().and_then(|d| d.clone()) {
        return Err(format!("uplink down, restarting: {why}"));
    }
    let now = now_ms(t0);
    let limit = i64::try_from(stall.as_millis()).unwrap_or(i64::MAX);
    for (name, b, grace) in [
        ("capture", &beats.capture, 0),
        ("inference", &beats.inference, 0),
        ("outbox writer", &beats.writer, 0),
        ("uplink", &beats.uplink, UPLINK_GRACE_MS),
    ] {
        let age = now - b.load(Ordering::Relaxed);
        if age > limit.saturating_add(grace) {
            return Err(format!("{name} silent for {age} ms"));
        }
    }
    Ok(())
}

pub(super) fn register_outbox_metrics(
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
        Box::new(move || vec![(String::new(), crate::agent::outbox::file_bytes(&p) as f64)]),
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
        "edge_agent_uplink_parked_total",
        "Events the broker refused while it took others, parked in the outbox's dead-letter table (since start).",
        Box::new(move || vec![(String::new(), s.borrow().dead_lettered as f64)]),
    );
    let ob = outbox.clone();
    r.gauge_fn(
        "edge_agent_outbox_dead_letters_dropped",
        "Oldest dead letters dropped to keep the dead-letter table inside its share of the cap (ever).",
        Box::new(move || {
            let n = ob
                .lock()
                .map(|o| o.dead_letters_dropped().unwrap_or(0))
                .unwrap_or(0);
            vec![(String::new(), n as f64)]
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
    let s = status.clone();
    r.gauge_fn(
        "edge_agent_uplink_ack_errors",
        "Deletes of acknowledged rows that failed (those rows are sent again after a restart).",
        Box::new(move || vec![(String::new(), s.borrow().ack_errors as f64)]),
    );
    let s = status;
    r.gauge_fn(
        "edge_agent_uplink_delivered",
        "Events the broker acknowledged since start (a counter read from the uplink).",
        Box::new(move || vec![(String::new(), s.borrow().delivered as f64)]),
    );
}
