//! The sink while PostgreSQL is unreachable: it waits visibly (`/healthz`, `STATUS=`, the
//! metrics), keeps its place in the consumer group past `max.poll.interval.ms`, keeps the
//! watchdog fed, stops at once on SIGTERM, and loses and doubles nothing. PostgreSQL is cut
//! off by a TCP proxy, so other tests' databases are not disturbed.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::{free_port, Broker};
use common::proxy::FaultProxy;
use common::rig::{count, database, event, producer, send_all, spawn_sink, until, wait_for};
use edge_vision::sink::{Phase, SinkConfig};

/// The test database's URL through `proxy`.
fn via(proxy: &FaultProxy, db: &str) -> String {
    format!("{db} port={}", proxy.addr.port())
}

async fn pg_proxy() -> FaultProxy {
    FaultProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:5432".parse().unwrap(),
    )
    .await
}

fn messages(n: u64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let e = event(i, (i % 3) as usize);
            (e.device_id.clone(), serde_json::to_vec(&e).unwrap())
        })
        .collect()
}

/// A cut database, then SIGTERM (the stop signal): the sink returns at once, not after the
/// outage; a new sink then writes everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_database_is_unreachable_ends_the_sink_at_once() {
    let b = Broker::start().await;
    b.create_topic("stopdown", 2);
    let db = database().await;
    let proxy = pg_proxy().await;
    let n = 20_000u64;
    send_all(&producer(&b), "stopdown", &messages(n)).await;
    let mut cfg = SinkConfig::new(&b.bootstrap, "stopdown", "g", &via(&proxy, &db));
    cfg.batch_size = 500;
    cfg.batch_ms = 50;
    cfg.metrics_listen = String::new();
    let (stop, status, task) = spawn_sink(cfg.clone());
    until(&status, "consuming", 60, |s| s.events >= 2000).await;
    proxy.cut();
    until(&status, "waiting for the database", 30, |s| {
        matches!(s.phase, Phase::WaitingForDatabase { .. })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    let _ = stop.send(true);
    let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(
        ended.is_ok(),
        "the sink must stop within a few seconds while waiting for the database"
    );
    ended.unwrap().unwrap().expect("a clean stop");
    eprintln!("stopped {:?} after the signal", asked.elapsed());
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);

    proxy.restore();
    let (stop, _status, task) = spawn_sink(cfg);
    let done = wait_for(
        &db,
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets",
        n as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(done, n as i64);
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, n as i64);
    let objects: i64 = (0..n).map(|i| (i % 3) as i64).sum();
    assert_eq!(count(&db, "SELECT count(*) FROM objects").await, objects);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
}

/// A rebalance while one member's database is unreachable: the waiting member keeps polling,
/// so the group forms again at once and the other member (its database reachable) takes and
/// writes its share meanwhile; the waiting member's callback gives up on the stored offsets
/// after its budget and leaves its partitions pending until its database is back. Exact
/// counts at the end. (A member that stopped polling would hold the rebalance until its
/// `max.poll.interval.ms`, five minutes by default.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_while_one_database_is_unreachable_does_not_hold_the_group() {
    let b = Broker::start().await;
    b.create_topic("split", 4);
    let db = database().await;
    let proxy = pg_proxy().await;
    let n = 20_000u64;
    send_all(&producer(&b), "split", &messages(n)).await;
    let spawn = |url: String| {
        let mut cfg = SinkConfig::new(&b.bootstrap, "split", "g", &url);
        cfg.batch_size = 500;
        cfg.batch_ms = 50;
        cfg.metrics_listen = String::new();
        spawn_sink(cfg)
    };
    let (stop_a, a, task_a) = spawn(via(&proxy, &db));
    until(&a, "consuming", 60, |s| s.events >= 2000).await;
    proxy.cut();
    until(&a, "waiting for the database", 30, |s| {
        matches!(s.phase, Phase::WaitingForDatabase { .. })
    })
    .await;
    let a_events = a.borrow().events;
    let joined = Instant::now();
    let (stop_b, bst, task_b) = spawn(db.clone());
    until(
        &bst,
        "the second member got nothing to write while the first waits",
        45,
        |s| s.events > 0,
    )
    .await;
    eprintln!("second member writing {:?} after joining", joined.elapsed());
    assert_eq!(
        a.borrow().events,
        a_events,
        "nothing written through the cut"
    );
    assert!(matches!(a.borrow().phase, Phase::WaitingForDatabase { .. }));
    proxy.restore();
    let done = wait_for(
        &db,
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets",
        n as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(done, n as i64, "a {:?}, b {:?}", *a.borrow(), *bst.borrow());
    let _ = stop_a.send(true);
    let _ = stop_b.send(true);
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, n as i64);
    let objects: i64 = (0..n).map(|i| (i % 3) as i64).sum();
    assert_eq!(count(&db, "SELECT count(*) FROM objects").await, objects);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
}

/// `GET path` on the sink's metrics address: (status code, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

fn metric(port: u16, name: &str) -> f64 {
    get(port, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// `edge-sink run` as systemd runs it (`NOTIFY_SOCKET`, `WATCHDOG_USEC`), PostgreSQL cut for
/// 20 s, three times `max.poll.interval.ms`: READY=1 once consuming; during the outage the
/// watchdog is still fed, `STATUS=` and `/healthz` say it waits for the database, the gauge
/// is 1; afterwards everything is written exactly once, nothing dead-lettered, the member
/// was never thrown out of its group (no extra assignment), and SIGTERM ends it with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_is_waited_out_visibly_with_the_watchdog_fed() {
    let b = Broker::start().await;
    b.create_topic("longdown", 2);
    let db = database().await;
    let proxy = pg_proxy().await;
    let n = 20_000u64;
    send_all(&producer(&b), "longdown", &messages(n)).await;

    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notes: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let n2 = notes.clone();
    let stop_reading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sr = stop_reading.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !sr.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(k) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..k]).into_owned();
                n2.lock().unwrap().push((Instant::now(), text));
            }
        }
    });
    let port = free_port();
    let config = dir.path().join("sink.toml");
    std::fs::write(
        &config,
        format!(
            "brokers = \"{}\"\ntopic = \"longdown\"\ngroup_id = \"g\"\ndatabase_url = \"{}\"\nbatch_size = 500\nbatch_ms = 50\nmetrics_listen = \"127.0.0.1:{port}\"\n\n[librdkafka]\n\"max.poll.interval.ms\" = \"7000\"\n\"session.timeout.ms\" = \"6000\"\n",
            b.bootstrap,
            via(&proxy, &db)
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge-sink"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "3000000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let saw = |what: &str| notes.lock().unwrap().iter().any(|(_, t)| t.contains(what));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(saw("READY=1") && metric(port, "edge_sink_events_total") >= 2000.0) {
        assert!(Instant::now() < deadline, "never ready and consuming");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(port, "/healthz"), (200, "ok\n".into()));
    let assignments = metric(port, "edge_sink_assignments_total");

    proxy.cut();
    let cut_at = Instant::now();
    let mut waiting_seen = false;
    while cut_at.elapsed() < Duration::from_secs(21) {
        let (code, body) = get(port, "/healthz");
        assert_eq!(code, 200, "waiting is healthy: {body}");
        if body.starts_with("waiting for the database") {
            waiting_seen = true;
            assert_eq!(metric(port, "edge_sink_waiting_for_database"), 1.0);
        }
        assert!(child.try_wait().unwrap().is_none(), "the sink is running");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(waiting_seen, "/healthz said it waits for the database");
    assert!(
        saw("STATUS=waiting for the database"),
        "{:?}",
        notes.lock().unwrap()
    );
    {
        // Pings all through the outage: no gap as long as the watchdog period (3 s).
        let notes = notes.lock().unwrap();
        let pings: Vec<Instant> = notes
            .iter()
            .filter(|(t, s)| s == "WATCHDOG=1" && *t >= cut_at)
            .map(|(t, _)| *t)
            .collect();
        assert!(pings.len() >= 10, "{} pings", pings.len());
        let gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(
            gap < Duration::from_secs(3),
            "longest gap between pings {gap:?}"
        );
    }
    proxy.restore();
    let done = wait_for(
        &db,
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets",
        n as i64,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(done, n as i64);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, "/healthz") != (200, "ok\n".into()) {
        assert!(Instant::now() < deadline, "{:?}", get(port, "/healthz"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(port, "edge_sink_waiting_for_database"), 0.0);
    // One assignment more: the sink's own, at PostgreSQL's offsets, after the outage; a
    // member thrown out for exceeding max.poll.interval.ms would have rebalanced as well.
    assert_eq!(
        metric(port, "edge_sink_assignments_total"),
        assignments + 1.0
    );

    let term = Instant::now();
    unsafe { kill(child.id() as i32, 15) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            term.elapsed() < Duration::from_secs(10),
            "SIGTERM ends the sink"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_reading.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    assert!(saw("STOPPING=1"));
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, n as i64);
    let objects: i64 = (0..n).map(|i| (i % 3) as i64).sum();
    assert_eq!(count(&db, "SELECT count(*) FROM objects").await, objects);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
