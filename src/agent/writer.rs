//! Stage 3, the outbox writer: batches events into outbox transactions (group commit). A
//! failed commit is retried with backoff while the batch is held, so nothing enqueued by the
//! stages before it is lost; the bounded channel makes them wait meanwhile.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::health::{now_ms, AgentMetrics, Beats};
use super::outbox::Outbox;
use crate::event::{Event, Kind};

/// What one committed event was, for `--progress` (tests read these lines).
#[derive(Debug, Clone, Serialize)]
pub struct Committed {
    pub seq: u64,
    pub event_id: String,
    pub kind: Kind,
    pub detections: usize,
    pub origin: String,
}

/// Called with each committed batch (see [`super::Control::on_commit`]).
pub type CommitHook = Box<dyn Fn(&[Committed]) + Send>;

/// Writer stage: batches events into outbox transactions. A failed commit is retried with
/// backoff, holding the batch (and, through the bounded channel, the stages before it).
#[allow(clippy::too_many_arguments)]
pub(super) fn writer_loop(
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
pub(super) fn commit(
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
