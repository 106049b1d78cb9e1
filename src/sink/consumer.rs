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
use super::schema::{migrate, schema_is_current};
use super::triage::{self, describe, is_transient, Outcome, Stall};
use super::{Phase, SinkError, SinkStatus};

const SELECT_OFFSETS: &str =
    "SELECT kafka_partition, next_offset FROM sink_offsets WHERE kafka_topic = $1";

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
    /// Assignments made (callback or loop), for the status.
    made: u64,
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
    /// Total consumer lag from the last statistics report (-1: none yet).
    lag: Arc<std::sync::atomic::AtomicI64>,
}

impl ClientContext for Ctx {
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

/// The stored offsets of `topic`'s partitions.
async fn stored_offsets(
    client: &Client,
    topic: &str,
) -> Result<HashMap<i32, i64>, tokio_postgres::Error> {
    let rows = client.query(SELECT_OFFSETS, &[&topic]).await?;
    rows.iter()
        .map(|r| Ok((r.try_get::<_, i32>(0)?, r.try_get::<_, i64>(1)?)))
        .collect()
}

/// The assignment of `owned` at the stored offsets (0 for a partition never written).
fn start_at(
    topic: &str,
    owned: &[i32],
    stored: &HashMap<i32, i64>,
) -> (TopicPartitionList, Vec<(i32, i64)>) {
    let mut tpl = TopicPartitionList::new();
    let mut fresh = Vec::new();
    for &p in owned {
        let o = stored.get(&p).copied().unwrap_or(0);
        let _ = tpl.add_partition_offset(topic, p, Offset::Offset(o));
        fresh.push((p, o));
    }
    (tpl, fresh)
}

impl Ctx {
    /// The stored offsets, read within `budget` (retrying while the database fails).
    fn offsets_within(&self, budget: Duration) -> Result<HashMap<i32, i64>, String> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let db = self.database.clone();
        let topic = self.topic.clone();
        tokio::task::block_in_place(|| {
            handle.block_on(async move {
                let mut last = String::from("no answer");
                let attempts = async {
                    loop {
                        match db.connect().await {
                            Ok(c) => match stored_offsets(&c, &topic).await {
                                Ok(s) => return s,
                                Err(e) => last = describe(&e),
                            },
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
                *a = Assignment {
                    made: a.made,
                    ..Assignment::default()
                };
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
        match self.offsets_within(ASSIGN_BUDGET) {
            Ok(stored) => {
                let (with_offsets, fresh) = start_at(&self.topic, &owned, &stored);
                tracing::info!(
                    ?fresh,
                    "partitions assigned at the offsets stored in PostgreSQL"
                );
                if let Err(e) = base.assign(&with_offsets) {
                    tracing::error!(error = %e, "assign failed");
                }
                a.fresh.extend(fresh);
                a.pending = false;
                a.made += 1;
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
    let consumer: StreamConsumer<Ctx> = consumer_config(&cfg)?.create_with_context(Ctx {
        assignment: assignment.clone(),
        database: db.clone(),
        topic: cfg.topic.clone(),
        lag: lag.clone(),
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
        let stored = match stored_offsets(&self.client, &self.cfg.topic).await {
            Ok(s) => s,
            Err(e) if is_transient(&e) => return Err(Stall::Unavailable(e)),
            Err(e) => return Err(Stall::Refusing(e)),
        };
        let (tpl, fresh) = start_at(&self.cfg.topic, &owned, &stored);
        if let Ok(mut a) = self.assignment.lock() {
            // The callback runs only inside our own polls, so nothing changed meanwhile.
            if a.pending && a.owned == owned {
                if let Err(e) = self.consumer.assign(&tpl) {
                    tracing::error!(error = %e, "assign failed");
                    return Ok(());
                }
                tracing::info!(
                    ?fresh,
                    "partitions assigned again at the offsets stored in PostgreSQL"
                );
                a.pending = false;
                a.made += 1;
                a.fresh.extend(fresh);
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
                        Err(e) => {
                            // Broker down, transport errors: librdkafka reconnects by itself.
                            // Keep the batch so far and keep polling; offsets only move with
                            // rows in PostgreSQL, so nothing is lost or doubled.
                            self.st.broker_errors += 1;
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
        if let Ok(mut a) = self.assignment.lock() {
            if !a.pending {
                if let Err(e) = self.consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
                a.pending = true;
            }
        }
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
