//! The sink's metrics on `/metrics` (and `/healthz`), read off its status channel.

use std::sync::Arc;

use tokio::sync::watch;

use super::SinkStatus;
use crate::metrics::{self, Registry};

/// A metric read off the status: name, help, getter.
type Field = (&'static str, &'static str, fn(&SinkStatus) -> f64);

const FIELDS: [Field; 8] = [
    ("edge_sink_events_total", "Event rows written.", |s| {
        s.events as f64
    }),
    ("edge_sink_objects_total", "Object rows written.", |s| {
        s.objects as f64
    }),
    (
        "edge_sink_dead_letters_total",
        "Messages dead-lettered.",
        |s| s.dead_letters as f64,
    ),
    ("edge_sink_batches_total", "Batches committed.", |s| {
        s.batches as f64
    }),
    (
        "edge_sink_db_retries_total",
        "Batch writes retried after a database error.",
        |s| s.db_retries as f64,
    ),
    (
        "edge_sink_broker_errors_total",
        "Consumer errors waited out (broker unreachable, transport).",
        |s| s.broker_errors as f64,
    ),
    (
        "edge_sink_offset_gaps_total",
        "Messages that arrived past a hole in their partition's offsets (records lost upstream).",
        |s| s.offset_gaps as f64,
    ),
    (
        "edge_sink_lag_messages",
        "Messages behind the high watermarks (librdkafka statistics).",
        |s| s.lag.map(|l| l as f64).unwrap_or(f64::NAN),
    ),
];

/// Binds `addr` and serves the sink's metrics from its status channel until `stop`.
pub async fn serve(
    addr: &str,
    status: watch::Receiver<SinkStatus>,
    stop: watch::Receiver<bool>,
) -> Result<(), metrics::BindError> {
    let listener = metrics::bind(addr).await?;
    let registry = Arc::new(Registry::default());
    for (name, help, f) in FIELDS {
        let rx = status.clone();
        registry.gauge_fn(
            name,
            help,
            Box::new(move || vec![(String::new(), f(&rx.borrow()))]),
        );
    }
    let hist = registry.histogram(
        "edge_sink_batch_seconds",
        "Time to write one batch (COPY, insert, offsets, commit).",
        &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0],
    );
    let mut rx = status;
    tokio::spawn(async move {
        let mut seen = 0;
        while rx.changed().await.is_ok() {
            let (b, ms) = {
                let s = rx.borrow_and_update();
                (s.batches, s.last_batch_ms)
            };
            if b > seen {
                seen = b;
                hist.observe(ms as f64 / 1000.0);
            }
        }
    });
    let health: metrics::HealthFn = Arc::new(|| Ok(()));
    tokio::spawn(metrics::serve(listener, registry, health, stop));
    Ok(())
}
