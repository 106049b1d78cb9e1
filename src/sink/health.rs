//! The sink's metrics on `/metrics`, `/healthz` and the systemd watchdog, all read off its
//! status channel, so the three say the same thing:
//!
//! | phase | `/healthz` | watchdog |
//! |---|---|---|
//! | consuming | 200 `ok` | pinged |
//! | waiting for the database (down, restarting, read-only, full) | 200 `waiting for the database ...` | pinged: healthy waiting, a restart would not help |
//! | the database refuses every row | 503 `database refuses every row ...` | pinged (a restart would not help either) |
//! | partitions held (`stored_offset_past_end = "hold"`) | 503 naming them | pinged (an operator must act) |
//! | the loop has not run for [`STALL`] | 503 `stalled ...` | withheld: systemd restarts the sink |

use std::sync::Arc;

use tokio::sync::watch;

use std::time::Duration;

use super::{Phase, SinkStatus};
use crate::metrics::{self, Registry};

/// A metric read off the status: name, help, getter.
type Field = (&'static str, &'static str, fn(&SinkStatus) -> f64);

const FIELDS: [Field; 18] = [
    (
        "edge_sink_messages_total",
        "Messages taken from Kafka into batches (written, repeated or dead-lettered).",
        |s| s.messages as f64,
    ),
    (
        "edge_sink_skipped_already_written_total",
        "Messages below the offset stored in PostgreSQL, dropped as written already (re-deliveries after a rebalance or restart).",
        |s| s.skipped_already_written as f64,
    ),
    (
        "edge_sink_refused_total",
        "Messages PostgreSQL refused although it accepts other rows, dead-lettered with the SQL error.",
        |s| s.refused as f64,
    ),
    (
        "edge_sink_conflicts_total",
        "Events whose event_id was stored already with other content (dead-lettered, not merged).",
        |s| s.conflicts as f64,
    ),
    (
        "edge_sink_assignments_total",
        "Partition assignments made (rebalances, and resumptions after a database outage).",
        |s| s.assignments as f64,
    ),
    (
        "edge_sink_waiting_for_database",
        "1 while the database is unavailable or refuses every row (batch kept, fetching paused).",
        |s| match s.phase {
            Phase::WaitingForDatabase { .. } | Phase::DatabaseRefusing { .. } => 1.0,
            _ => 0.0,
        },
    ),
    (
        "edge_sink_up",
        "1 while the consumer loop runs (it beat within the stall limit).",
        |s| f64::from(u8::from(alive(s).is_ok())),
    ),
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
        "edge_sink_offsets_rewound_total",
        "Stored offsets past the end of a re-created partition's log, reset to its start (sink_health rows).",
        |s| s.rewound as f64,
    ),
    (
        "edge_sink_partitions_truncated_total",
        "Partitions started past records deleted before the sink read them (sink_health rows).",
        |s| s.truncated as f64,
    ),
    (
        "edge_sink_partitions_held",
        "Owned partitions not fetched because their stored offset is past the log's end (stored_offset_past_end = hold).",
        |s| s.held.len() as f64,
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
    let status_for_health = status.clone();
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
    let rx = status_for_health;
    let health: metrics::HealthFn = Arc::new(move || report(&rx.borrow()));
    tokio::spawn(metrics::serve(listener, registry, health, stop));
    Ok(())
}

/// A loop that has not beaten for this long is stalled (a batch or callback that hangs).
pub const STALL: Duration = Duration::from_secs(30);

/// Whether the loop runs: `Err` with the reason when it has not beaten within [`STALL`].
pub fn alive(s: &SinkStatus) -> Result<(), String> {
    match s.last_beat {
        None => Ok(()), // starting: the phase says what it does
        Some(t) if t.elapsed() <= STALL => Ok(()),
        Some(t) => Err(format!(
            "stalled: the consumer loop has not run for {} s (last phase: {})",
            t.elapsed().as_secs(),
            phase_text(&s.phase)
        )),
    }
}

/// What the phase means to an operator.
pub fn phase_text(p: &Phase) -> String {
    match p {
        Phase::Starting => "starting".into(),
        Phase::Consuming => "ok".into(),
        Phase::WaitingForDatabase { seconds, reason } => {
            format!("waiting for the database for {seconds} s (batch kept, nothing lost): {reason}")
        }
        Phase::DatabaseRefusing { seconds, reason } => {
            format!("for {seconds} s: {reason}")
        }
    }
}

/// `/healthz`: 200 with the phase while the loop runs and the database takes rows or is
/// being waited for; 503 when the loop stalled or the database refuses every row.
pub fn report(s: &SinkStatus) -> Result<String, String> {
    alive(s)?;
    if !s.held.is_empty() {
        return Err(format!("partitions not fetched: {}", s.held.join("; ")));
    }
    match &s.phase {
        Phase::DatabaseRefusing { .. } => Err(phase_text(&s.phase)),
        p => Ok(phase_text(p)),
    }
}

/// Whether the watchdog may be pinged: the loop runs (whatever the database does).
pub fn watchdog_ok(s: &SinkStatus) -> bool {
    alive(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn health_and_watchdog_follow_the_loop_and_the_phase() {
        let mut s = SinkStatus {
            phase: Phase::Consuming,
            last_beat: Some(Instant::now()),
            ..SinkStatus::default()
        };
        assert_eq!(report(&s), Ok("ok".into()));
        s.phase = Phase::WaitingForDatabase {
            seconds: 3,
            reason: "database unavailable: connection refused".into(),
        };
        assert!(report(&s)
            .unwrap()
            .starts_with("waiting for the database for 3 s"));
        assert!(watchdog_ok(&s));
        s.phase = Phase::DatabaseRefusing {
            seconds: 1,
            reason: "database refuses every row: SQLSTATE 42501".into(),
        };
        assert!(report(&s).unwrap_err().contains("42501"));
        assert!(watchdog_ok(&s), "a restart would not help");
        s.phase = Phase::Consuming;
        s.held = vec!["partition 2: stored offset 9 is past the end 3".into()];
        assert!(report(&s).unwrap_err().contains("partition 2"));
        assert!(watchdog_ok(&s), "an operator must act, not systemd");
        s.held.clear();
        let Some(old) = Instant::now().checked_sub(STALL + Duration::from_secs(1)) else {
            return; // a machine up for less than STALL: nothing to check
        };
        s.last_beat = Some(old);
        assert!(report(&s).unwrap_err().starts_with("stalled"));
        assert!(!watchdog_ok(&s));
    }
}
