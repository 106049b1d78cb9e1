//! The Kafka side of the sink: partitions assigned at the offsets stored in PostgreSQL,
//! batches collected by size or time, decoded (`decode`) and committed
//! (`triage`), and the wait while the database is unavailable.
//!
//! # Phases
//!
//! The loop is in one of two phases, one fn each:
//!
//! * **Consuming** (`Sink::consume`): collect a batch, commit it, tell Kafka (lag only).
//! * **Waiting for the database** (`Sink::wait_for_database`), after a batch could not be
//!   committed (an outage, or a database that refuses every row). Fetching stops
//!   (`unassign`: nothing piles up in memory), but the loop goes on polling the consumer, so
//!   this member never exceeds `max.poll.interval.ms` and rebalances go through; it retries
//!   the rest of the batch with backoff (0.5 s doubling to 10 s), then assigns its partitions
//!   again at PostgreSQL's offsets and consumes on.
//!
//! The rebalance callback runs inside librdkafka's poll, so it may not wait for the database
//! indefinitely either: it gives PostgreSQL [`ASSIGN_BUDGET`] to answer with the stored
//! offsets, and otherwise assigns nothing and leaves the partitions to the loop (pending).
//! Either way a stored offset is checked against the partition's watermarks before it is
//! used (`offsets`); a fetch that still finds its offset outside the log
//! (`auto.offset.reset=error`) sends the partitions back to pending, to be checked again.
//! SIGTERM ends every phase at once: what is not committed has moved no offset. Each turn of
//! the loop beats in the status, which `/healthz` and the watchdog read (`health`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::sink::database::{self, Database};

use super::config::{consumer_config, SinkConfig};
use super::decode::{Batch, Item};
use super::offsets::{self, PastEnd, Plan};
use super::schema::{migrate, schema_is_current};
use super::triage::{self, describe, is_transient, Outcome, Stall};
use super::{Phase, SinkError, SinkStatus};

/// How long the rebalance callback waits for PostgreSQL's offsets before it assigns nothing
/// and leaves the partitions to the loop. It runs inside librdkafka's poll, so this stays
/// well inside `max.poll.interval.ms`, the session timeout's usual values and the watchdog.
pub const ASSIGN_BUDGET: Duration = Duration::from_secs(8);

/// Longest pause between two retries while the database is unavailable.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The partitions this member owns, as the rebalance callback saw them; shared with the loop.
#[derive(Debug, Default)]
struct Assignment {
    /// Owned by this member in the group, whether fetched now or not.
    owned: Vec<i32>,
    /// Start offsets of partitions just assigned, for the loop to learn (then drained).
    fresh: Vec<(i32, i64)>,
    /// The owned partitions are not being fetched: the callback could not read their offsets
    /// in time, or the loop stopped fetching while it waits for the database. The loop
    /// assigns them at PostgreSQL's offsets as soon as it can.
    pending: bool,
    /// Owned partitions not fetched by policy (`stored_offset_past_end = "hold"`), with why.
    held: Vec<(i32, String)>,
    /// Assignments made (callback or loop), for the status.
    made: u64,
    /// Stored offsets reset to a new log's start, and starts past deleted records.
    rewound: u64,
    truncated: u64,
}

impl Assignment {
    /// Forgets the partitions (revoked by a rebalance); the counters are totals and stay.
    fn revoke(&mut self) {
        *self = Assignment {
            made: self.made,
            rewound: self.rewound,
            truncated: self.truncated,
            ..Assignment::default()
        };
    }

    /// Takes in an assignment made from `plan`.
    fn made_from(&mut self, plan: Plan) {
        self.fresh.extend(plan.fresh);
        self.held = plan.held;
        self.rewound += plan.rewound;
        self.truncated += plan.truncated;
        self.pending = false;
        self.made += 1;
    }
}

/// Starts every newly assigned partition exactly at PostgreSQL's stored offset: the
/// assignment is made by us, with those offsets, inside librdkafka's rebalance callback (a
/// seek after the fact can fail while the fetcher starts, and the fetch would then begin at
/// Kafka's committed offset).
struct Ctx {
    assignment: Arc<Mutex<Assignment>>,
    /// Where the offsets live (the callback opens its own connection).
    database: Database,
    /// The one topic the sink consumes.
    topic: String,
    /// What to do with a stored offset past the end of its log.
    past_end: PastEnd,
    /// Total consumer lag from the last statistics report (-1: none yet).
    lag: Arc<std::sync::atomic::AtomicI64>,
    /// The latest client-wide error (a TLS handshake or SASL login that failed, brokers
    /// down), for the status.
    broker_error: Arc<Mutex<Option<String>>>,
}

impl ClientContext for Ctx {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!("librdkafka: {error}: {reason}");
        if let Ok(mut e) = self.broker_error.lock() {
            *e = Some(format!("{error}: {reason}"));
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.lag.store(lag, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Ctx {
    /// The assignment of `owned` (`offsets::prepare`), made within `budget` (retrying while
    /// the database fails).
    fn plan_within(
        &self,
        owned: &[i32],
        marks: &offsets::Marks,
        budget: Duration,
    ) -> Result<Plan, String> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let db = self.database.clone();
        let topic = self.topic.clone();
        let policy = self.past_end;
        tokio::task::block_in_place(|| {
            handle.block_on(async move {
                let mut last = String::from("no answer");
                let attempts = async {
                    loop {
                        match db.connect().await {
                            Ok(mut c) => {
                                match offsets::prepare(&mut c, &topic, owned, marks, policy).await {
                                    Ok(plan) => return plan,
                                    Err(e) => last = describe(&e),
                                }
                            }
                            Err(e) => last = describe(&e),
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                };
                match tokio::time::timeout(budget, attempts).await {
                    Ok(s) => Ok(s),
                    Err(_) => Err(last),
                }
            })
        })
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr;
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            tracing::info!("partitions revoked");
            let _ = base.unassign();
            if let Ok(mut a) = self.assignment.lock() {
                a.revoke();
            }
            return;
        }
        let owned: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let Ok(mut a) = self.assignment.lock() else {
            return;
        };
        a.owned = owned.clone();
        let marks = tokio::task::block_in_place(|| offsets::watermarks(base, &self.topic, &owned));
        match self.plan_within(&owned, &marks, ASSIGN_BUDGET) {
            Ok(plan) => {
                tracing::info!(
                    fresh = ?plan.fresh,
                    held = ?plan.held,
                    "partitions assigned at the offsets stored in PostgreSQL"
                );
                if let Err(e) = base.assign(&plan.tpl) {
                    tracing::error!(error = %e, "assign failed");
                }
                a.made_from(plan);
            }
            Err(e) => {
                tracing::warn!(
                    ?owned,
                    error = %e,
                    "cannot read the stored offsets in time; the partitions are fetched once the database answers"
                );
                let _ = base.assign(&TopicPartitionList::new());
                a.pending = true;
            }
        }
    }
}

/// How a phase ended.
enum Next {
    /// Go on consuming.
    Consume,
    /// Stop asked (SIGTERM): return.
    Stop,
}

/// The sink's loop and what it owns.
struct Sink {
    cfg: SinkConfig,
    db: Database,
    /// The connection batches are written on (replaced after errors).
    client: Client,
    consumer: StreamConsumer<Ctx>,
    assignment: Arc<Mutex<Assignment>>,
    lag: Arc<std::sync::atomic::AtomicI64>,
    /// Shared with the consumer's context (`Ctx::broker_error`).
    broker_error: Arc<Mutex<Option<String>>>,
    /// Next offset to write per partition, from PostgreSQL; messages below it are written.
    next: HashMap<i32, i64>,
    /// A message that must open the next batch (its id is in this one with other content).
    carry: Option<Item>,
    st: SinkStatus,
    status: watch::Sender<SinkStatus>,
    stop: watch::Receiver<bool>,
}

/// Runs the sink until `stop` turns true.
pub async fn run(
    cfg: SinkConfig,
    mut stop: watch::Receiver<bool>,
    status: watch::Sender<SinkStatus>,
) -> Result<(), SinkError> {
    let db = Database::new(&cfg.database_url, cfg.database_password_file.as_deref())?;
    tracing::info!(sslmode = ?db.ssl_mode(), "database settings");
    let mut st = SinkStatus::default();
    let since = Instant::now();
    let mut client = loop {
        match db.connect().await {
            Ok(c) => break c,
            // A refused certificate will not fix itself: say so and stop.
            Err(e) if database::is_tls_refusal(&e) => return Err(SinkError::DbTls(e)),
            Err(e) => {
                tracing::warn!(error = %e, "database unreachable at start; retrying");
                st.waiting(
                    since,
                    format!("database unreachable at start: {}", describe(&e)),
                );
                status.send_replace(st.clone());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
    };
    if !schema_is_current(&client).await? {
        match migrate(&mut client).await {
            Ok(n) => tracing::info!(applied = n, "migrations applied"),
            Err(SinkError::Migrate(e)) => return Err(SinkError::SchemaBehind(e)),
            Err(e) => return Err(e),
        }
    }
    let assignment = Arc::new(Mutex::new(Assignment::default()));
    let lag = Arc::new(std::sync::atomic::AtomicI64::new(-1));
    let broker_error = Arc::new(Mutex::new(None));
    let consumer: StreamConsumer<Ctx> = consumer_config(&cfg)?.create_with_context(Ctx {
        assignment: assignment.clone(),
        database: db.clone(),
        topic: cfg.topic.clone(),
        past_end: cfg.stored_offset_past_end,
        lag: lag.clone(),
        broker_error: broker_error.clone(),
    })?;
    consumer.subscribe(&[&cfg.topic])?;
    st.consuming();
    status.send_replace(st.clone());
    let mut sink = Sink {
        cfg,
        db,
        client,
        consumer,
        assignment,
        lag,
        broker_error,
        next: HashMap::new(),
        carry: None,
        st,
        status,
        stop,
    };
    while let Next::Consume = sink.consume().await {}
    Ok(())
}

impl Sink {
    /// Marks the loop alive (and publishes the status).
    fn beat(&mut self) {
        self.st.last_beat = Some(Instant::now());
        if let Ok(mut e) = self.broker_error.lock() {
            if let Some(e) = e.take() {
                self.st.last_broker_error = Some(e);
            }
        }
        self.status.send_replace(self.st.clone());
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Takes what the rebalance callback learnt.
    fn learn_assignments(&mut self) {
        learn(&self.assignment, &mut self.next, &mut self.st);
    }

    /// Assigns the owned partitions at PostgreSQL's offsets when they are pending.
    async fn resume(&mut self) -> Result<(), Stall> {
        let owned = match self.assignment.lock() {
            Ok(a) if a.pending => a.owned.clone(),
            _ => return Ok(()),
        };
        let topic = self.cfg.topic.clone();
        let marks =
            tokio::task::block_in_place(|| offsets::watermarks(&self.consumer, &topic, &owned));
        let policy = self.cfg.stored_offset_past_end;
        let plan = match offsets::prepare(&mut self.client, &topic, &owned, &marks, policy).await {
            Ok(plan) => plan,
            Err(e) if is_transient(&e) => return Err(Stall::Unavailable(e)),
            Err(e) => return Err(Stall::Refusing(e)),
        };
        if let Ok(mut a) = self.assignment.lock() {
            // The callback runs only inside our own polls, so nothing changed meanwhile.
            if a.pending && a.owned == owned {
                if let Err(e) = self.consumer.assign(&plan.tpl) {
                    tracing::error!(error = %e, "assign failed");
                    return Ok(());
                }
                tracing::info!(
                    fresh = ?plan.fresh,
                    held = ?plan.held,
                    "partitions assigned again at the offsets stored in PostgreSQL"
                );
                a.made_from(plan);
            }
        }
        self.learn_assignments();
        Ok(())
    }

    /// One batch: collect, commit, account. Hands over to [`Sink::wait_for_database`] when the
    /// batch cannot be committed now.
    async fn consume(&mut self) -> Next {
        self.beat();
        if self.stopping() {
            return Next::Stop;
        }
        if let Err(stall) = self.resume().await {
            return self.wait_for_database(Vec::new(), stall).await;
        }
        let Some(batch) = self.collect().await else {
            return Next::Stop;
        };
        if batch.is_empty() {
            return Next::Consume;
        }
        let started = Instant::now();
        let items = batch.items;
        let Some(out) = self.commit(&items).await else {
            return Next::Stop;
        };
        let rest = self.account(&items, out, started);
        match rest {
            None => Next::Consume,
            Some((from, stall)) => {
                let rest = items.into_iter().skip(from).collect();
                self.wait_for_database(rest, stall).await
            }
        }
    }

    /// Collects one batch (size or time); `None` when stop was asked.
    async fn collect(&mut self) -> Option<Batch> {
        let mut batch = Batch::default();
        // Next offset expected per partition within this batch.
        let mut batch_next: HashMap<i32, i64> = HashMap::new();
        if let Some(item) = self.carry.take() {
            let (p, o) = item.position();
            batch_next.insert(p, o + 1);
            let _ = batch.append(item);
        }
        // A carried message opens the batch, and its time starts now.
        let mut deadline = (!batch.is_empty())
            .then(|| tokio::time::Instant::now() + Duration::from_millis(self.cfg.batch_ms));
        while batch.len() < self.cfg.batch_size {
            let wait = match deadline {
                Some(d) => d,
                None => tokio::time::Instant::now() + Duration::from_millis(200),
            };
            tokio::select! {
                m = self.consumer.recv() => {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) if is_outside_the_log(&e) => {
                            // `auto.offset.reset=error`: a fetch found its offset outside the
                            // log (the topic was re-created or truncated under us). Stop
                            // fetching; `consume` checks the partitions again.
                            tracing::warn!(error = %e, "fetch offset outside the log: checking the partitions' offsets again");
                            self.withdraw();
                            break;
                        }
                        Err(e) => {
                            // Broker down, transport errors: librdkafka reconnects by itself.
                            // Keep the batch so far and keep polling; offsets only move with
                            // rows in PostgreSQL, so nothing is lost or doubled.
                            self.st.broker_errors += 1;
                            self.st.last_broker_error = Some(e.to_string());
                            tracing::warn!(error = %e, "consumer error; retrying");
                            self.beat();
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    };
                    learn(&self.assignment, &mut self.next, &mut self.st);
                    let pending = is_pending(&self.assignment);
                    if pending {
                        // Fetched before the assignment was withdrawn: fetched again later.
                        continue;
                    }
                    if let Some(&n) = self.next.get(&m.partition()) {
                        if m.offset() < n {
                            self.st.skipped_already_written += 1;
                            continue;
                        }
                        // Offsets are contiguous in a plain topic written without
                        // transactions; a jump means records this sink will never see
                        // (compaction, retention, or a broker serving the wrong batch). Say so
                        // loudly; the rows that did arrive are still written exactly once.
                        let expected = n.max(*batch_next.get(&m.partition()).unwrap_or(&n));
                        if m.offset() > expected {
                            self.st.offset_gaps += 1;
                            tracing::warn!(partition = m.partition(), expected, got = m.offset(), "offset gap: records missing from the topic");
                        }
                    }
                    batch_next.insert(m.partition(), m.offset() + 1);
                    self.st.messages += 1;
                    if let Some(item) = batch.push(m.partition(), m.offset(), m.payload(), self.cfg.max_message_bytes) {
                        self.carry = Some(item);
                        break;
                    }
                    if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + Duration::from_millis(self.cfg.batch_ms));
                    }
                }
                _ = tokio::time::sleep_until(wait) => {
                    self.learn_assignments();
                    self.beat();
                    // Partitions the rebalance callback left pending are assigned by
                    // `consume`, which needs this batch closed (even empty) to get there.
                    let pending = is_pending(&self.assignment);
                    if deadline.is_some() || pending { break; }
                }
                _ = self.stop.changed() => return None,
            }
        }
        Some(batch)
    }

    /// Commits `items` (splitting around refused messages); `None` when stop was asked
    /// meanwhile (nothing after the last commit moved an offset).
    async fn commit(&mut self, items: &[Item]) -> Option<Outcome> {
        let mut stop = self.stop.clone();
        tokio::select! {
            out = triage::commit(&mut self.client, &self.db, &self.cfg.topic, items) => Some(out),
            _ = stop.changed() => None,
        }
    }

    /// Books what a commit wrote; returns where the uncommitted rest starts, and why.
    fn account(
        &mut self,
        items: &[Item],
        out: Outcome,
        started: Instant,
    ) -> Option<(usize, Stall)> {
        if out.committed > 0 {
            // Offsets are now durable in PostgreSQL; tell Kafka too (lag monitoring only).
            for it in &items[..out.committed] {
                let (p, o) = it.position();
                let n = self.next.entry(p).or_insert(0);
                *n = (*n).max(o + 1);
            }
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &self.next {
                let _ = tpl.add_partition_offset(&self.cfg.topic, *p, Offset::Offset(*o));
            }
            let _ = self.consumer.commit(&tpl, CommitMode::Async);
            self.st.batches += 1;
        }
        let w = out.written;
        self.st.events += w.events;
        self.st.objects += w.objects;
        self.st.dead_letters += w.dead;
        self.st.conflicts += w.conflicts;
        self.st.refused += out.refused;
        self.st.dedupe_batches += u64::from(w.deduped);
        self.st.last_batch_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let l = self.lag.load(std::sync::atomic::Ordering::Relaxed);
        self.st.lag = (l >= 0).then_some(l);
        self.beat();
        tracing::debug!(
            events = w.events,
            objects = w.objects,
            dead = w.dead,
            ms = self.st.last_batch_ms,
            "batch written"
        );
        out.stall.map(|s| (out.committed, s))
    }

    /// Waits out a database that cannot take `rest` now: stops fetching, keeps polling (the
    /// group keeps this member, rebalances go through), retries with backoff, then assigns
    /// the partitions again at PostgreSQL's offsets.
    async fn wait_for_database(&mut self, mut rest: Vec<Item>, stall: Stall) -> Next {
        let since = Instant::now();
        tracing::warn!(error = %stall, held = rest.len(), "waiting for the database; fetching paused, batch kept");
        self.withdraw();
        let mut stall = stall;
        let mut backoff = Duration::from_millis(500);
        loop {
            self.st.db_retries += 1;
            match &stall {
                Stall::Unavailable(_) => self.st.waiting(since, stall.to_string()),
                Stall::Refusing(_) => self.st.refusing(since, stall.to_string()),
            }
            self.beat();
            // Poll for `backoff`: librdkafka's callbacks and the group's liveness need it.
            let until = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    m = self.consumer.recv() => {
                        // Fetched before the assignment was withdrawn: fetched again later.
                        if m.is_err() {
                            self.st.broker_errors += 1;
                        }
                        self.beat();
                    }
                    _ = tokio::time::sleep_until(until) => break,
                    _ = self.stop.changed() => return Next::Stop,
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let mut stop = self.stop.clone();
            let connected = tokio::select! {
                c = self.db.connect() => c,
                _ = stop.changed() => return Next::Stop,
            };
            match connected {
                Ok(c) => self.client = c,
                Err(e) => {
                    stall = Stall::Unavailable(e);
                    continue;
                }
            }
            if !rest.is_empty() {
                let started = Instant::now();
                let Some(out) = self.commit(&rest).await else {
                    return Next::Stop;
                };
                match self.account(&rest, out, started) {
                    None => rest.clear(),
                    Some((from, s)) => {
                        rest.drain(..from);
                        stall = s;
                        continue;
                    }
                }
            }
            match self.resume().await {
                Ok(()) => break,
                Err(s) => stall = s,
            }
        }
        tracing::info!(
            seconds = since.elapsed().as_secs(),
            "database back; consuming again"
        );
        self.st.consuming();
        self.beat();
        Next::Consume
    }
}

impl Sink {
    /// Stops fetching: the owned partitions become pending, to be assigned again (at
    /// PostgreSQL's offsets, checked against the log) by `resume`.
    fn withdraw(&mut self) {
        if let Ok(mut a) = self.assignment.lock() {
            if !a.pending {
                if let Err(e) = self.consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
                a.pending = true;
            }
        }
    }
}

/// Whether a consumer error says a fetch offset lies outside the partition's log.
fn is_outside_the_log(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    matches!(
        e,
        KafkaError::MessageConsumption(
            RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange
        )
    )
}

/// Whether the owned partitions are waiting to be assigned (not fetched now).
fn is_pending(assignment: &Mutex<Assignment>) -> bool {
    assignment.lock().map(|a| a.pending).unwrap_or(false)
}

/// Takes what the rebalance callback learnt: start offsets, and the count of assignments.
fn learn(assignment: &Mutex<Assignment>, next: &mut HashMap<i32, i64>, st: &mut SinkStatus) {
    if let Ok(mut a) = assignment.lock() {
        for (p, o) in a.fresh.drain(..) {
            next.insert(p, o);
        }
        st.assignments = a.made;
        st.rewound = a.rewound;
        st.truncated = a.truncated;
        st.held = a
            .held
            .iter()
            .map(|(p, why)| format!("partition {p}: {why}"))
            .collect();
    }
}

impl SinkStatus {
    fn waiting(&mut self, since: Instant, reason: String) {
        self.phase = Phase::WaitingForDatabase {
            seconds: since.elapsed().as_secs(),
            reason,
        };
    }

    fn refusing(&mut self, since: Instant, reason: String) {
        self.phase = Phase::DatabaseRefusing {
            seconds: since.elapsed().as_secs(),
            reason,
        };
    }

    fn consuming(&mut self) {
        self.phase = Phase::Consuming;
    }
}

#[cfg(test)]
mod tests {
    use super::Assignment;

    #[test]
    fn a_revocation_forgets_the_partitions_and_keeps_the_totals() {
        let mut a = Assignment {
            owned: vec![1, 2],
            fresh: vec![(1, 5)],
            pending: true,
            held: vec![(2, "past the end".into())],
            made: 3,
            rewound: 2,
            truncated: 1,
        };
        a.revoke();
        assert_eq!((a.made, a.rewound, a.truncated), (3, 2, 1));
        assert!(a.owned.is_empty() && a.fresh.is_empty() && a.held.is_empty() && !a.pending);
    }
}
