//! The uplink's state machine: one fn per state (see the module doc of [`super`]).

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;
use tokio::sync::{mpsc, watch};

use crate::agent::outbox::{Outbox, OutboxReader, Pending};

use super::acker::{Acker, Bucket};
use super::producer::*;
use super::{State, UplinkConfig, UplinkError, UplinkStatus};

/// How recent a delivery must be for a refused row to be parked rather than kept.
pub(super) const PARK_PROOF: Duration = Duration::from_secs(60);

/// The drain loop's state and the things each state function works on.
pub(super) struct Uplink {
    /// Proof of life for the agent's watchdog, called on every turn of [`Uplink::pump`].
    pub(super) beat: super::Beat,
    /// The queue we drain (writes: dead letters; the ack thread deletes through it too).
    pub(super) outbox: Arc<Mutex<Outbox>>,
    /// Our own read connection, so reads never wait for the writer's commits.
    pub(super) reader: OutboxReader,
    pub(super) cfg: UplinkConfig,
    /// Rebuilt after a fatal or wedged producer.
    pub(super) producer: Kafka,
    /// Delivery reports from the producer's context.
    pub(super) reports_tx: mpsc::UnboundedSender<(u64, Outcome)>,
    pub(super) reports: mpsc::UnboundedReceiver<(u64, Outcome)>,
    /// Rows handed to librdkafka and not yet reported on.
    pub(super) in_flight: HashSet<u64, SeqHash>,
    /// Every row with a seq at or below this was sent once (oldest-first cursor).
    pub(super) backlog_cursor: u64,
    /// Same for the live (newest-first) pass.
    pub(super) live_cursor: u64,
    /// Rows whose delivery failed, to send again first.
    pub(super) retry: BTreeSet<u64>,
    /// Rows the live pass sent ahead of the backlog cursor (the backlog pass skips them).
    pub(super) live_sent: BTreeSet<u64>,
    /// (when, highest queued seq then): tells live rows from backlog without an index on
    /// creation time.
    pub(super) seq_samples: std::collections::VecDeque<(Instant, u64)>,
    /// Delivered rows waiting to be handed to the ack thread.
    pub(super) to_ack: Vec<u64>,
    /// Deletes acknowledged rows on its own thread (overlaps SQLite work with sending).
    pub(super) acker: Acker,
    /// Failures since the last success (drives Offline).
    pub(super) failures: u32,
    /// The last failure indicated bad credentials or ACLs.
    pub(super) unauthorized: bool,
    /// When the broker last acknowledged a row: a refused row is parked only while others
    /// are delivered.
    pub(super) last_delivered: Option<Instant>,
    /// Offline backoff, doubled per failed probe.
    pub(super) backoff: Duration,
    /// Outbox depth and when it was read (COUNT(*) is not free on a big backlog).
    pub(super) depth: (u64, Instant),
    pub(super) bucket: Option<Bucket>,
    pub(super) status: watch::Sender<UplinkStatus>,
}

impl Uplink {
    pub(super) fn outbox(&self) -> Result<std::sync::MutexGuard<'_, Outbox>, UplinkError> {
        self.outbox.lock().map_err(|_| UplinkError::Poisoned)
    }

    pub(super) fn set_state(&mut self, s: State) {
        let old = self.status.borrow().state;
        if old != Some(s) {
            tracing::info!(from = ?old, to = ?s, "uplink state");
            self.status.send_modify(|st| st.state = Some(s));
        }
    }

    /// Sends up to `window - in_flight` more rows: retries first, then (live-first) rows
    /// younger than the live window, then the backlog, oldest first. Each pass keeps its own
    /// cursor and moves it only past rows it handed over (or found already in flight or
    /// waiting for a retry), so every row is sent, and normally sent once.
    pub(super) fn fill(&mut self, window: usize) -> Result<(), UplinkError> {
        let mut room = window.saturating_sub(self.in_flight.len());
        if room == 0 {
            return Ok(());
        }
        if !self.retry.is_empty() {
            let seqs: Vec<u64> = self.retry.iter().take(room).copied().collect();
            for s in &seqs {
                self.retry.remove(s);
            }
            let rows = self.reader.rows_by_seq(&seqs)?;
            let mut rows = rows.into_iter();
            while let Some(p) = rows.next() {
                if !self.try_send(&p)? {
                    self.retry.insert(p.seq);
                    self.retry.extend(rows.map(|r| r.seq));
                    return Ok(());
                }
                room = room.saturating_sub(1);
            }
        }
        if room > 0 && self.cfg.live_first {
            let after = self
                .live_cursor
                .max(self.backlog_cursor)
                .max(self.live_boundary()?);
            let rows = self.reader.rows_after(after, room)?;
            for p in rows {
                if !self.try_send(&p)? {
                    return Ok(());
                }
                self.live_cursor = p.seq;
                self.live_sent.insert(p.seq);
                room = room.saturating_sub(1);
            }
        }
        if room > 0 {
            // The hot path of a backlog drain: each payload goes from SQLite's page straight to
            // librdkafka (which copies it once), no intermediate buffer. Send errors other than
            // backpressure are collected and handled after the scan.
            let mut failed: Vec<(u64, KafkaError)> = Vec::new();
            let (producer, topic) = (&self.producer, &self.cfg.topic);
            let (bucket, in_flight) = (&mut self.bucket, &mut self.in_flight);
            let (live_sent, retry) = (&mut self.live_sent, &self.retry);
            let cursor = &mut self.backlog_cursor;
            self.reader.visit_after(
                *cursor,
                room,
                |seq, key, payload| -> Result<bool, UplinkError> {
                    // Rows the live pass already sent stay visible until their delete commits.
                    let skip =
                        live_sent.remove(&seq) || in_flight.contains(&seq) || retry.contains(&seq);
                    if !skip {
                        match send_one(producer, topic, bucket, seq, key, payload) {
                            Sent::Queued => {
                                in_flight.insert(seq);
                            }
                            Sent::Backpressure => return Ok(false),
                            Sent::Failed(e) => failed.push((seq, e)),
                        }
                    }
                    *cursor = seq;
                    Ok(true)
                },
            )?;
            for (seq, e) in failed {
                self.send_failed(seq, &e)?;
            }
            let cursor = self.backlog_cursor;
            self.live_sent.retain(|&s| s > cursor);
        }
        Ok(())
    }

    /// The seq below which rows count as backlog: the highest seq that was queued
    /// `live_window` ago (sampled every 250 ms; `seq` grows with enqueue time).
    pub(super) fn live_boundary(&mut self) -> Result<u64, UplinkError> {
        let now = Instant::now();
        if self
            .seq_samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(250))
        {
            let max = self.reader.max_seq()?;
            self.seq_samples.push_back((now, max));
        }
        let window = Duration::from_millis(self.cfg.live_window_ms);
        while self.seq_samples.len() > 1 && now.duration_since(self.seq_samples[1].0) >= window {
            self.seq_samples.pop_front();
        }
        Ok(self
            .seq_samples
            .front()
            .map(|(t, s)| {
                if now.duration_since(*t) >= window {
                    *s
                } else {
                    0
                }
            })
            .unwrap_or(0))
    }

    /// Hands one row to librdkafka unless the bandwidth cap or a full queue says wait
    /// (returns false: backpressure). A row that cannot be sent now goes to the retry set;
    /// one that can never be sent is dead-lettered.
    pub(super) fn try_send(&mut self, p: &Pending) -> Result<bool, UplinkError> {
        match send_one(
            &self.producer,
            &self.cfg.topic,
            &mut self.bucket,
            p.seq,
            &p.device_id,
            &p.payload,
        ) {
            Sent::Queued => {
                self.in_flight.insert(p.seq);
                Ok(true)
            }
            Sent::Backpressure => Ok(false),
            Sent::Failed(e) => {
                self.send_failed(p.seq, &e)?;
                Ok(true)
            }
        }
    }

    /// A send librdkafka refused outright: dead-letter what can never go, retry the rest.
    pub(super) fn send_failed(&mut self, seq: u64, e: &KafkaError) -> Result<(), UplinkError> {
        self.settle_failure(seq, classify(e))
    }

    /// A row that did not get through: parked when the broker refuses it while other rows
    /// are delivered (it would otherwise go first into every retry and throttle the link),
    /// else kept for retry. A refusal while nothing is delivered says nothing about the row
    /// (a topic policy, a broker that refuses everything): the row is kept and retried.
    pub(super) fn settle_failure(&mut self, seq: u64, outcome: Outcome) -> Result<(), UplinkError> {
        match outcome {
            Outcome::Refused(reason) if self.delivering() => {
                tracing::warn!(seq, reason, "broker refuses this event while others go through: parked in the outbox's dead-letter table");
                self.outbox()?.dead_letter(seq, &reason)?;
                self.status.send_modify(|s| s.dead_lettered += 1);
            }
            Outcome::Refused(reason) => {
                tracing::warn!(
                    seq,
                    reason,
                    "broker refuses this event and nothing else is delivered now: kept, retried"
                );
                self.retry.insert(seq);
                self.fail(Outcome::Retry(reason));
            }
            other => {
                self.retry.insert(seq);
                self.fail(other);
            }
        }
        Ok(())
    }

    /// Whether the broker has taken other rows lately ([`PARK_PROOF`]): the proof that a
    /// refused row is refused for itself.
    pub(super) fn delivering(&self) -> bool {
        self.last_delivered
            .is_some_and(|t| t.elapsed() <= PARK_PROOF)
    }

    pub(super) fn fail(&mut self, o: Outcome) {
        self.failures += 1;
        if let Outcome::Unauthorized(msg) = &o {
            tracing::error!(error = %msg, "broker refuses our credentials or ACLs; keeping every event and retrying slowly");
            self.unauthorized = true;
        } else if let Outcome::Retry(msg) = &o {
            tracing::debug!(error = %msg, "delivery failed; will retry");
        }
        let why = match &o {
            Outcome::Retry(m) | Outcome::Unauthorized(m) | Outcome::Refused(m) => Some(m.clone()),
            _ => None,
        };
        self.status.send_modify(|s| {
            s.failed_deliveries += 1;
            if why.is_some() {
                s.last_error = why;
            }
        });
    }

    pub(super) fn resolve(&mut self, seq: u64, outcome: Outcome) -> Result<(), UplinkError> {
        if seq == LINK_DOWN {
            // librdkafka lost every broker connection: offline now, not after the message
            // timeout (in-flight messages still resolve on their own).
            tracing::debug!("all brokers down");
            self.failures += 1;
            return Ok(());
        }
        if seq == LINK_ERROR {
            if let Outcome::Retry(why) = outcome {
                self.status.send_modify(|s| s.last_error = Some(why));
            }
            return Ok(());
        }
        if !self.in_flight.remove(&seq) {
            return Ok(()); // a report from a producer we already replaced
        }
        match outcome {
            Outcome::Delivered => {
                self.to_ack.push(seq);
                self.last_delivered = Some(Instant::now());
                self.failures = 0;
                self.unauthorized = false;
            }
            failed => self.settle_failure(seq, failed)?,
        }
        Ok(())
    }

    /// Hands delivered rows to the ack thread and publishes what it has deleted so far.
    pub(super) fn flush_acks(&mut self) -> Result<(), UplinkError> {
        if !self.to_ack.is_empty() {
            let acks = std::mem::take(&mut self.to_ack);
            self.acker.delete(acks);
        }
        self.publish_acked();
        Ok(())
    }

    pub(super) fn publish_acked(&mut self) {
        let done = self.acker.done.load(Ordering::Relaxed);
        let before = self.status.borrow().delivered;
        if done > before {
            self.depth.0 = self.depth.0.saturating_sub(done - before);
            let depth = self.depth.0;
            self.status.send_modify(|s| {
                s.delivered = done;
                s.last_delivery_ms = Some(chrono::Utc::now().timestamp_millis());
                s.outbox_depth = depth;
            });
        }
    }

    /// Waits until every delete handed to the ack thread has committed.
    pub(super) fn sync_acks(&mut self) -> Result<(), UplinkError> {
        self.flush_acks()?;
        self.acker.sync();
        self.report_ack_error()?;
        self.publish_acked();
        Ok(())
    }

    /// Logs and counts a failed delete of the ack thread as soon as the loop sees it.
    pub(super) fn report_ack_error(&mut self) -> Result<(), UplinkError> {
        let failed = self
            .acker
            .error
            .lock()
            .map_err(|_| UplinkError::Poisoned)?
            .take();
        if let Some(e) = failed {
            tracing::error!(error = %e, "outbox delete failed; those events will be sent again after a restart");
            self.status.send_modify(|s| s.ack_errors += 1);
        }
        Ok(())
    }

    /// Waits for a delivery report (or a short tick), resolves every report that is ready,
    /// and deletes the delivered rows in one transaction.
    pub(super) async fn pump(&mut self) -> Result<(), UplinkError> {
        (self.beat)();
        self.report_ack_error()?;
        let first = if self.in_flight.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            None
        } else {
            tokio::time::timeout(Duration::from_millis(50), self.reports.recv())
                .await
                .ok()
                .flatten()
        };
        if let Some((seq, o)) = first {
            self.resolve(seq, o)?;
        }
        while let Ok((seq, o)) = self.reports.try_recv() {
            self.resolve(seq, o)?;
        }
        self.flush_acks()
    }

    pub(super) fn rebuild_if_fatal(&mut self) -> Result<(), UplinkError> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::error!(?code, reason, "fatal producer error");
            self.rebuild("fatal producer error")?;
        }
        Ok(())
    }

    /// Replaces the producer. Its queued messages are purged; their rows go to the retry set
    /// and are sent again by the new producer.
    pub(super) fn rebuild(&mut self, why: &str) -> Result<(), UplinkError> {
        tracing::warn!(
            why,
            in_flight = self.in_flight.len(),
            "rebuilding the Kafka producer"
        );
        let fresh = producer(&self.cfg, &self.reports_tx)?;
        drop(std::mem::replace(&mut self.producer, fresh));
        while let Ok((seq, o)) = self.reports.try_recv() {
            self.resolve(seq, o)?;
        }
        let orphans: Vec<u64> = self.in_flight.drain().collect();
        self.retry.extend(orphans);
        self.flush_acks()?;
        self.status.send_modify(|s| s.producer_rebuilds += 1);
        Ok(())
    }

    /// Outbox depth, re-counted at most every second.
    pub(super) fn depth(&mut self) -> Result<u64, UplinkError> {
        if self.depth.1.elapsed() > Duration::from_secs(1) {
            let d = self.outbox()?.depth()?;
            self.depth = (d, Instant::now());
        }
        Ok(self.depth.0)
    }

    /// Exact depth (for the exit-when-empty check).
    pub(super) fn depth_now(&mut self) -> Result<u64, UplinkError> {
        let d = self.outbox()?.depth()?;
        self.depth = (d, Instant::now());
        Ok(d)
    }

    pub(super) fn next_drain_state(&mut self) -> Result<State, UplinkError> {
        let s = if self.depth()? >= self.cfg.backlog_threshold {
            State::Backlogged
        } else {
            State::Online
        };
        self.set_state(s);
        Ok(s)
    }

    pub(super) fn window(&self, s: State) -> usize {
        if s == State::Backlogged {
            self.cfg.max_in_flight
        } else {
            self.cfg.max_in_flight.min(1000)
        }
    }

    /// `Online` and `Backlogged`: keep the window full, resolve deliveries.
    pub(super) async fn draining(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        exit_when_empty: bool,
    ) -> Result<State, UplinkError> {
        loop {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            let state = self.next_drain_state()?;
            self.fill(self.window(state))?;
            self.pump().await?;
            if self.failures > 0 {
                return Ok(State::Offline);
            }
            if exit_when_empty && self.in_flight.is_empty() && self.retry.is_empty() {
                self.sync_acks()?;
                if self.depth_now()? == 0 {
                    return Ok(State::ShuttingDown);
                }
            }
        }
    }

    /// `Offline`: let in-flight messages resolve, back off, then probe with a small batch.
    pub(super) async fn offline(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<State, UplinkError> {
        self.set_state(State::Offline);
        self.rebuild_if_fatal()?;
        let max = Duration::from_millis(if self.unauthorized {
            self.cfg.max_backoff_ms * 4
        } else {
            self.cfg.max_backoff_ms
        });
        let deadline = Instant::now() + self.backoff;
        while Instant::now() < deadline || !self.in_flight.is_empty() {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            let before = self.status.borrow().delivered;
            self.pump().await?;
            if self.status.borrow().delivered > before && self.in_flight.is_empty() {
                // Stragglers got through: the link is back.
                self.failures = 0;
                return Ok(State::Online);
            }
        }
        self.backoff = (self.backoff * 2).min(max);
        // Probe.
        self.failures = 0;
        self.fill(10)?;
        if self.in_flight.is_empty() && self.retry.is_empty() {
            // Nothing to send: a metadata request tells whether the brokers are back.
            return Ok(if self.metadata_probe() {
                self.backoff = Duration::from_millis(250);
                State::Online
            } else {
                State::Offline
            });
        }
        while !self.in_flight.is_empty() {
            if *stop.borrow() {
                return Ok(State::ShuttingDown);
            }
            self.pump().await?;
        }
        if self.failures == 0 {
            self.backoff = Duration::from_millis(250);
            Ok(State::Online)
        } else {
            // An idempotent producer whose messages timed out can stay wedged on brokers
            // without epoch bumps: start a fresh one for the next probe.
            self.rebuild("probe failed")?;
            Ok(State::Offline)
        }
    }

    /// Asks the cluster for the topic's metadata (at most 2 s): can we reach a broker?
    pub(super) fn metadata_probe(&self) -> bool {
        let ask = || {
            self.producer
                .client()
                .fetch_metadata(
                    Some(&self.cfg.topic),
                    Timeout::After(Duration::from_secs(2)),
                )
                .is_ok()
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(ask),
            _ => ask(),
        }
    }

    /// `ShuttingDown`: no new sends; wait for in-flight deliveries until the deadline.
    pub(super) async fn shutting_down(&mut self) -> Result<(), UplinkError> {
        self.set_state(State::ShuttingDown);
        let deadline = Instant::now() + Duration::from_millis(self.cfg.shutdown_deadline_ms);
        while !self.in_flight.is_empty() && Instant::now() < deadline {
            self.pump().await?;
        }
        self.flush_acks()?;
        let left = Duration::from_millis(self.cfg.shutdown_deadline_ms / 10);
        let _ = self.producer.flush(Timeout::After(left));
        while let Ok((seq, o)) = self.reports.try_recv() {
            self.resolve(seq, o)?;
        }
        self.sync_acks()?;
        if !self.in_flight.is_empty() {
            tracing::warn!(
                unacknowledged = self.in_flight.len(),
                "shutdown deadline reached; those events stay in the outbox and go next time"
            );
        }
        Ok(())
    }
}
