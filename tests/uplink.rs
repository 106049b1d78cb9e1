//! The uplink against a real Kafka-protocol broker (tansu) behind a fault proxy, and
//! librdkafka's MockCluster for request errors. Every test counts arrivals by `event_id`.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::{consume_events, Broker};
use edge_vision::agent::outbox::{Durability, Outbox, OutboxConfig};
use edge_vision::agent::uplink::{self, State, UplinkConfig, UplinkStatus};
use edge_vision::event::{Event, Kind, Object};
use edge_vision::testkit::Synthetic;
use tokio::sync::watch;

/// Event `i` from device `dev-1`; every third one without detections.
fn event(i: u64) -> Event {
    Synthetic::new("dev-1").event(i, usize::from(!i.is_multiple_of(3)))
}

fn outbox(dir: &std::path::Path) -> Arc<Mutex<Outbox>> {
    let mut cfg = OutboxConfig::new(dir.join("outbox.sqlite"), "dev-1");
    cfg.durability = Durability::Normal;
    Arc::new(Mutex::new(Outbox::open(cfg).unwrap().0))
}

fn enqueue(ob: &Arc<Mutex<Outbox>>, n: u64, ids: &mut HashSet<String>) {
    let mut done = 0;
    while done < n {
        let k = 500.min(n - done);
        let mut batch: Vec<Event> = (done..done + k).map(event).collect();
        ids.extend(batch.iter().map(|e| e.event_id.to_string()));
        ob.lock().unwrap().enqueue(&mut batch).unwrap();
        done += k;
    }
}

struct Running {
    stop: watch::Sender<bool>,
    status: watch::Receiver<UplinkStatus>,
    task: tokio::task::JoinHandle<Result<(), uplink::UplinkError>>,
}

fn spawn_uplink(ob: Arc<Mutex<Outbox>>, cfg: UplinkConfig) -> Running {
    let (stop, stop_rx) = watch::channel(false);
    let (status_tx, status) = watch::channel(UplinkStatus::default());
    let task = tokio::spawn(uplink::run(ob, cfg, stop_rx, status_tx, false));
    Running { stop, status, task }
}

impl Running {
    async fn wait_empty(&self, ob: &Arc<Mutex<Outbox>>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let depth = ob.lock().unwrap().stats().unwrap().depth;
            if depth == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "outbox still holds {depth} events; status {:?}",
                *self.status.borrow()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(self) -> UplinkStatus {
        let _ = self.stop.send(true);
        self.task.await.expect("join").expect("uplink ran cleanly");
        let st = self.status.borrow().clone();
        st
    }
}

fn config(b: &Broker, topic: &str) -> UplinkConfig {
    let mut cfg = UplinkConfig::new(&b.bootstrap, topic);
    cfg.message_timeout_ms = 5_000;
    cfg.max_backoff_ms = 2_000;
    cfg
}

fn assert_all_arrived(b: &Broker, topic: &str, ids: &HashSet<String>) -> usize {
    let seen = b.consume_event_ids(topic, 3, ids.len(), Duration::from_secs(60));
    let missing = ids.iter().filter(|id| !seen.contains_key(*id)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} events never arrived",
        ids.len()
    );
    let unexpected = seen.keys().filter(|id| !ids.contains(*id)).count();
    assert_eq!(unexpected, 0, "events arrived that were never enqueued");
    seen.values().filter(|&&n| n > 1).count()
}

/// 1. Start with the broker unreachable, enqueue 10,000 events, make it reachable: all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_offline_then_delivers_everything() {
    let b = Broker::start().await;
    b.create_topic("offline-start", 3);
    b.proxy.cut();
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path());
    let mut ids = HashSet::new();
    enqueue(&ob, 10_000, &mut ids);
    let run = spawn_uplink(ob.clone(), config(&b, "offline-start"));
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        run.status.borrow().state,
        Some(State::Offline),
        "unreachable broker means Offline"
    );
    assert_eq!(
        ob.lock().unwrap().stats().unwrap().depth,
        10_000,
        "nothing deleted without an ack"
    );
    b.proxy.restore();
    run.wait_empty(&ob, Duration::from_secs(90)).await;
    let st = run.stop().await;
    assert!(st.delivered >= 10_000);
    let dups = assert_all_arrived(&b, "offline-start", &ids);
    eprintln!("offline start: 10000 events, {dups} arrived twice");
}

/// 2. Cut the network for 30 s three times while draining (events keep coming): none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thirty_second_outages_lose_nothing() {
    let b = Broker::start().await;
    b.create_topic("outages", 3);
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path());
    let mut ids = HashSet::new();
    enqueue(&ob, 5_000, &mut ids);
    let run = spawn_uplink(ob.clone(), config(&b, "outages"));
    let mut states = HashSet::new();
    for round in 0..3 {
        // Events keep arriving (as from a camera) while the link is up and while it is down.
        for _ in 0..10 {
            enqueue(&ob, 200, &mut ids);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        b.proxy.cut();
        let cut_at = Instant::now();
        while cut_at.elapsed() < Duration::from_secs(30) {
            enqueue(&ob, 100, &mut ids);
            if let Some(s) = run.status.borrow().state {
                states.insert(s);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        b.proxy.restore();
        let before = run.status.borrow().delivered;
        let restored = Instant::now();
        while run.status.borrow().delivered == before {
            assert!(
                restored.elapsed() < Duration::from_secs(30),
                "no delivery within 30 s of the link coming back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "outage {} over; deliveries resumed after {:.1} s; depth {}",
            round + 1,
            restored.elapsed().as_secs_f64(),
            ob.lock().unwrap().stats().unwrap().depth
        );
    }
    run.wait_empty(&ob, Duration::from_secs(120)).await;
    let st = run.stop().await;
    assert!(states.contains(&State::Offline), "saw states {states:?}");
    let dups = assert_all_arrived(&b, "outages", &ids);
    eprintln!(
        "outages: {} events, {} failed deliveries retried, {dups} arrived twice",
        ids.len(),
        st.failed_deliveries
    );
}

/// 3. SIGKILL the draining agent at random moments, 20 times, restarting it: every event
/// arrives at least once; duplicates are reported (the sink removes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_drain_loses_nothing() {
    let b = Broker::start().await;
    b.create_topic("sigkill", 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.sqlite");
    let mut ids = HashSet::new();
    {
        let ob = outbox(dir.path());
        enqueue(&ob, 30_000, &mut ids);
    }
    let bin = env!("CARGO_BIN_EXE_edge-agent");
    let drain = |exit: bool| {
        let mut c = std::process::Command::new(bin);
        c.args([
            "outbox",
            "drain",
            "--outbox",
            &path.display().to_string(),
            "--brokers",
            &b.bootstrap,
            "--topic",
            "sigkill",
        ])
        .args(["--max-in-flight", "500", "--max-bytes-per-sec", "2000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        if exit {
            c.arg("--exit-when-empty");
        }
        c
    };
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..20 {
        let mut child = drain(false).spawn().unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(150 + seed % 600)).await;
        unsafe { kill(child.id() as i32, 9) };
        let _ = child.wait();
    }
    let status = drain(true).status().unwrap();
    assert!(status.success());
    let ob = outbox(dir.path());
    assert_eq!(ob.lock().unwrap().stats().unwrap().depth, 0);
    let dups = assert_all_arrived(&b, "sigkill", &ids);
    eprintln!(
        "sigkill: 20 kills during a 30000-event drain, every event arrived, {dups} arrived twice"
    );
}

/// 6. The first release's outbox file opens and drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_release_outbox_drains() {
    let b = Broker::start().await;
    b.create_topic("legacy", 3);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/outbox_v1.sqlite"
        ),
        dir.path().join("outbox.sqlite"),
    )
    .unwrap();
    let ob = outbox(dir.path());
    let ids: HashSet<String> = ob
        .lock()
        .unwrap()
        .next_batch(100, &HashSet::new(), None)
        .unwrap()
        .into_iter()
        .map(|p| p.event_id)
        .collect();
    assert_eq!(ids.len(), 25);
    let run = spawn_uplink(ob.clone(), config(&b, "legacy"));
    run.wait_empty(&ob, Duration::from_secs(30)).await;
    run.stop().await;
    assert_all_arrived(&b, "legacy", &ids);
}

/// Too-large events are dead-lettered, counted, and never block the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_events_are_dead_lettered_and_the_rest_flows() {
    let b = Broker::start().await;
    b.create_topic("big", 3);
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path());
    let mut ids = HashSet::new();
    enqueue(&ob, 100, &mut ids);
    let mut huge = event(1);
    huge.detections = (0..20_000)
        .map(|i| Object {
            label: format!("thing-{i}"),
            class_id: 1,
            confidence: 0.9,
            bbox: [0.0, 0.0, 1.0, 1.0],
        })
        .collect();
    let huge_id = huge.event_id;
    ob.lock().unwrap().enqueue(&mut [huge]).unwrap();
    enqueue(&ob, 100, &mut ids);
    let mut cfg = config(&b, "big");
    cfg.message_max_bytes = 100_000;
    let run = spawn_uplink(ob.clone(), cfg);
    run.wait_empty(&ob, Duration::from_secs(30)).await;
    let st = run.stop().await;
    assert_eq!(st.dead_lettered, 1);
    assert_eq!(ob.lock().unwrap().stats().unwrap().dead_letters, 1);
    // Everything else arrived once, and so did one `event_parked` announcement naming it.
    let events = consume_events(&b.bootstrap, "big", 3, ids.len() + 1);
    let (announced, rest): (Vec<Event>, Vec<Event>) = events
        .into_iter()
        .partition(|e| e.kind == Kind::EventParked);
    assert_eq!(announced.len(), 1, "{announced:?}");
    let m = announced[0]
        .health
        .as_ref()
        .unwrap()
        .message
        .clone()
        .unwrap();
    assert!(m.contains(&format!("(event {huge_id}) parked")), "{m}");
    let got: HashSet<String> = rest.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(rest.len(), ids.len(), "each event once");
    assert_eq!(got, ids);
}

/// Request errors injected by librdkafka's MockCluster: the uplink retries until the broker
/// takes everything; nothing is lost or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_retried_until_delivered() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("mocked", 3, 1).expect("topic");
    let errs = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 12];
    mock.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &errs);
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path());
    let mut ids = HashSet::new();
    enqueue(&ob, 2_000, &mut ids);
    let mut cfg = UplinkConfig::new(&mock.bootstrap_servers(), "mocked");
    cfg.message_timeout_ms = 3_000;
    cfg.librdkafka.insert("retries".into(), "1".into());
    let run = spawn_uplink(ob.clone(), cfg);
    run.wait_empty(&ob, Duration::from_secs(60)).await;
    let st = run.stop().await;
    assert!(st.delivered >= 2_000, "{st:?}");
    assert_eq!(st.dead_lettered, 0);
}

/// A permanent refusal (INVALID_RECORD, off the retriable allowlist) while the broker takes
/// other rows parks the refused rows in the outbox's dead-letter table instead of retrying
/// them forever at the head of every retry; the same refusal before anything was delivered
/// says nothing about the rows (it could be the topic or the broker), so those rows are kept
/// and delivered once the broker takes them. Nothing is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_broker_refuses_are_parked_only_while_others_are_delivered() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;
    let refusal = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD; 3];

    // Refused before any delivery: kept, then delivered.
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("early", 1, 1).expect("topic");
    mock.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &refusal);
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path());
    let mut ids = HashSet::new();
    enqueue(&ob, 300, &mut ids);
    let mut cfg = UplinkConfig::new(&mock.bootstrap_servers(), "early");
    cfg.message_timeout_ms = 3_000;
    cfg.max_backoff_ms = 500;
    let run = spawn_uplink(ob.clone(), cfg.clone());
    run.wait_empty(&ob, Duration::from_secs(60)).await;
    let st = run.stop().await;
    assert_eq!(
        st.dead_lettered, 0,
        "nothing parked before any delivery: {st:?}"
    );
    assert!(st.delivered >= 300, "{st:?}");
    assert!(st.failed_deliveries > 0, "the refusals happened: {st:?}");

    // Refused while others are delivered: parked, counted, kept in the dead-letter table.
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("late", 1, 1).expect("topic");
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path());
    let mut ids = HashSet::new();
    enqueue(&ob, 300, &mut ids);
    cfg.brokers = mock.bootstrap_servers();
    cfg.topic = "late".into();
    let run = spawn_uplink(ob.clone(), cfg);
    run.wait_empty(&ob, Duration::from_secs(60)).await;
    mock.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &refusal);
    enqueue(&ob, 300, &mut ids);
    run.wait_empty(&ob, Duration::from_secs(60)).await;
    let st = run.stop().await;
    let stats = ob.lock().unwrap().stats().unwrap();
    assert!(st.dead_lettered > 0, "refused rows parked: {st:?}");
    assert_eq!(
        stats.dead_letters, st.dead_lettered,
        "each parked row is in the table"
    );
    assert!(
        st.delivered + st.dead_lettered >= 600,
        "every row delivered or parked: {st:?}"
    );

    // Each parked detection is announced upstream by an `event_parked` health event naming it
    // (unless that announcement was refused and parked in turn: parking a health event
    // announces nothing, so nothing loops).
    let parked_kinds = |kind: Kind| -> Vec<Event> {
        let db = rusqlite::Connection::open(dir.path().join("outbox.sqlite")).unwrap();
        let mut stmt = db.prepare("SELECT payload FROM dead_letters").unwrap();
        let rows: Vec<Vec<u8>> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        rows.iter()
            .map(|p| edge_vision::event::decode(p).unwrap())
            .filter(|e| e.kind == kind)
            .collect()
    };
    let parked_detections = parked_kinds(Kind::Detection);
    let parked_announcements: Vec<String> = parked_kinds(Kind::EventParked)
        .into_iter()
        .map(|e| e.health.unwrap().message.unwrap())
        .collect();
    assert!(!parked_detections.is_empty());
    // Everything delivered is on the topic: the unparked detections and the announcements.
    let expect = usize::try_from(st.delivered).unwrap();
    let mut announced: Vec<String> = consume_events(&mock.bootstrap_servers(), "late", 1, expect)
        .into_iter()
        .filter(|e| e.kind == Kind::EventParked)
        .map(|e| e.health.unwrap().message.unwrap())
        .collect();
    announced.extend(parked_announcements);
    assert_eq!(
        announced.len(),
        parked_detections.len(),
        "one announcement per parked detection: {announced:?}"
    );
    for ev in &parked_detections {
        let named = format!("(event {}) parked: refused by the broker", ev.event_id);
        let n = announced.iter().filter(|m| m.contains(&named)).count();
        assert_eq!(n, 1, "announcements naming {named}: {announced:?}");
    }
}

/// The dead-letter table stays inside its share of the cap: the oldest dead letters go, and
/// are counted.
#[test]
fn the_dead_letter_table_is_bounded_inside_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = OutboxConfig::new(dir.path().join("outbox.sqlite"), "dev-1");
    cfg.max_bytes = 2 * 1024 * 1024;
    let mut ob = Outbox::open(cfg.clone()).unwrap().0;
    let mut events: Vec<Event> = (0..400).map(event).collect();
    let seqs = ob.enqueue(&mut events).unwrap();
    let one = serde_json::to_vec(&events[0]).unwrap().len() as u64;
    for s in &seqs {
        ob.dead_letter(*s, "refused by the broker: test").unwrap();
    }
    let budget = cfg.max_bytes / edge_vision::agent::outbox::DEAD_LETTER_SHARE;
    let kept = ob.stats().unwrap().dead_letters;
    assert!(kept > 0 && kept < 400, "kept {kept}");
    assert!(
        kept * one <= budget + one * 2,
        "kept {kept} of ~{one} B, budget {budget}"
    );
    assert_eq!(ob.dead_letters_dropped().unwrap(), 400 - kept);
    // What stays queued is one `event_parked` announcement per parked event.
    let queued = ob.next_batch(1_000, &HashSet::new(), None).unwrap();
    assert_eq!(queued.len(), 400);
    for (p, ev) in queued.iter().zip(&events) {
        let a = edge_vision::event::decode(&p.payload).unwrap();
        assert_eq!(a.kind, Kind::EventParked);
        let m = a.health.unwrap().message.unwrap();
        assert!(
            m.contains(&format!(
                "(event {}) parked: refused by the broker: test",
                ev.event_id
            )),
            "{m}"
        );
    }
    // Parking an announcement announces nothing.
    for p in &queued {
        ob.dead_letter(p.seq, "refused by the broker: test")
            .unwrap();
    }
    assert_eq!(ob.stats().unwrap().depth, 0);
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Live-first drain under a bandwidth cap: a fresh event overtakes a backlog that is still
/// draining, and the cap holds the send rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_events_overtake_a_capped_backlog() {
    let b = Broker::start().await;
    b.create_topic("live", 3);
    let dir = tempfile::tempdir().unwrap();
    let ob = outbox(dir.path());
    let mut ids = HashSet::new();
    enqueue(&ob, 20_000, &mut ids);
    let backlog_bytes = ob.lock().unwrap().stats().unwrap().payload_bytes;
    let cap = 1_000_000u64;
    let mut cfg = config(&b, "live");
    cfg.max_bytes_per_sec = Some(cap);
    cfg.live_window_ms = 1_000;
    let started = Instant::now();
    let run = spawn_uplink(ob.clone(), cfg);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut fresh: Vec<Event> = (0..10).map(event).collect();
    let fresh_seqs = ob.lock().unwrap().enqueue(&mut fresh).unwrap();
    ids.extend(fresh.iter().map(|e| e.event_id.to_string()));
    // Wait until every fresh event has been delivered (its row deleted).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = ob
            .lock()
            .unwrap()
            .classes()
            .unwrap()
            .iter()
            .filter(|r| fresh_seqs.contains(&r.0))
            .count();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "fresh events still queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backlog_left = ob.lock().unwrap().stats().unwrap().depth;
    assert!(
        backlog_left > 5_000,
        "the fresh events went out while the backlog still held {backlog_left} events"
    );
    run.wait_empty(&ob, Duration::from_secs(60)).await;
    let secs = started.elapsed().as_secs_f64();
    run.stop().await;
    // The token bucket starts with one second of credit.
    let floor = backlog_bytes as f64 / cap as f64 - 1.0;
    assert!(
        secs >= floor * 0.9,
        "{backlog_bytes} bytes at {cap} B/s took only {secs:.1} s"
    );
    assert_all_arrived(&b, "live", &ids);
    eprintln!("live-first: fresh events delivered with {backlog_left} backlog events still queued; {backlog_bytes} B drained in {secs:.1} s under a {cap} B/s cap");
}
