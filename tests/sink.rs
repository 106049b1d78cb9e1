//! `edge-sink` against a real PostgreSQL (127.0.0.1:5432) and a real Kafka-protocol broker
//! (tansu). Each test has its own topic and its own database.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::rig::{count, database, event, producer, send, send_all, spawn_sink, wait_for};
use edge_vision::sink::{self, SinkConfig};

/// 100,000 events in (plus 1,000 delivered twice): exactly 100,000 event rows and the right
/// number of object rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_events_exactly_once() {
    let b = Broker::start().await;
    b.create_topic("s100k", 3);
    let db = database().await;
    let p = producer(&b);
    let mut msgs = Vec::new();
    let mut objects = 0i64;
    for i in 0..100_000u64 {
        let n = (i % 4) as usize;
        objects += n as i64;
        let e = event(i, n);
        msgs.push((e.device_id.clone(), serde_json::to_vec(&e).unwrap()));
    }
    let dups: Vec<(String, Vec<u8>)> = msgs.iter().step_by(100).cloned().collect();
    let t = Instant::now();
    send_all(&p, "s100k", &msgs).await;
    send_all(&p, "s100k", &dups).await;
    eprintln!("produced 101000 in {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let (stop, status, task) = spawn_sink(SinkConfig::new(&b.bootstrap, "s100k", "g", &db));
    let total = 101_000i64;
    let deadline = Instant::now() + Duration::from_secs(180);
    while count(
        &db,
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets",
    )
    .await
        < total
    {
        assert!(
            Instant::now() < deadline,
            "sink did not consume everything: {:?}",
            *status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("sink consumed 101000 in {:.1} s", t.elapsed().as_secs_f64());
    let st = status.borrow().clone();
    assert!(
        st.dedupe_batches > 0 && st.dedupe_batches < st.batches,
        "duplicates took the staging path, the rest the direct COPY: {st:?}"
    );
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 100_000);
    assert_eq!(
        count(&db, "SELECT count(DISTINCT event_id) FROM events").await,
        100_000
    );
    assert_eq!(count(&db, "SELECT count(*) FROM objects").await, objects);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
}

/// Poison mixed with good messages: every good one inserted, every bad one dead-lettered with
/// a reason, the partition keeps moving and the process stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_and_the_rest_flows() {
    let b = Broker::start().await;
    b.create_topic("poison", 3);
    let db = database().await;
    let p = producer(&b);
    let mut msgs = Vec::new();
    let mut good = 0i64;
    let mut bad = 0i64;
    let mut seed = 0x2545F4914F6CDD1Du64;
    for i in 0..20_000u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let e = event(i, 1);
        let mut v = serde_json::to_value(&e).unwrap();
        let payload: Vec<u8> = match i % 2 {
            0 => {
                good += 1;
                serde_json::to_vec(&e).unwrap()
            }
            _ => {
                bad += 1;
                match (seed >> 8) % 16 {
                    // Values that decode as JSON but no column can store as sent, which
                    // crashed (NUL, year -5000, 100 kB key) or were silently altered (wrapped
                    // integers, infinity) before.
                    6 => {
                        v["device_id"] = "dev\u{0}x".into();
                        serde_json::to_vec(&v).unwrap()
                    }
                    7 => {
                        v["detections"][0]["label"] = "per\u{0}son".into();
                        serde_json::to_vec(&v).unwrap()
                    }
                    8 => {
                        v["model"]["name"] = "m\u{0}".into();
                        serde_json::to_vec(&v).unwrap()
                    }
                    9 => {
                        v["seq"] = serde_json::json!(u64::MAX - 7);
                        serde_json::to_vec(&v).unwrap()
                    }
                    10 => {
                        v["detections"][0]["class_id"] = serde_json::json!(1u64 << 31);
                        serde_json::to_vec(&v).unwrap()
                    }
                    11 => {
                        v["frame"]["width"] = serde_json::json!(3_000_000_000u64);
                        serde_json::to_vec(&v).unwrap()
                    }
                    12 => {
                        v["detections"][0]["confidence"] = serde_json::json!(1e308f64);
                        serde_json::to_vec(&v).unwrap()
                    }
                    13 => {
                        v["captured_at"] = "-5000-01-01T00:00:00Z".into();
                        serde_json::to_vec(&v).unwrap()
                    }
                    14 => {
                        // an unknown field whose name holds NUL: the decoder quotes it
                        let mut raw = serde_json::to_string(&v).unwrap();
                        raw.insert_str(1, "\"bad\\u0000field\":1,");
                        raw.into_bytes()
                    }
                    15 => {
                        if seed.is_multiple_of(2) {
                            v["device_id"] = "d".repeat(100_000).into();
                            serde_json::to_vec(&v).unwrap()
                        } else {
                            // the same event as a positional array
                            let a: Vec<serde_json::Value> =
                                v.as_object().unwrap().values().cloned().collect();
                            serde_json::to_vec(&a).unwrap()
                        }
                    }
                    0 => b"not json at all".to_vec(),
                    1 => {
                        v["schema_version"] = 99.into();
                        serde_json::to_vec(&v).unwrap()
                    }
                    2 => {
                        v.as_object_mut().unwrap().remove("device_id");
                        serde_json::to_vec(&v).unwrap()
                    }
                    3 => {
                        v["seq"] = "twelve".into();
                        serde_json::to_vec(&v).unwrap()
                    }
                    4 => {
                        let mut raw = serde_json::to_vec(&e).unwrap();
                        raw.truncate(raw.len() / 2);
                        raw
                    }
                    _ => (0..(seed % 300)).map(|k| (k * 31 + seed) as u8).collect(),
                }
            }
        };
        msgs.push((e.device_id.clone(), payload));
    }
    send_all(&p, "poison", &msgs).await;
    send(&p, "poison", "dev-0", &vec![b'x'; 300_000]).await; // over the sink's 200 kB limit
    bad += 1;
    let mut cfg = SinkConfig::new(&b.bootstrap, "poison", "g", &db);
    cfg.max_message_bytes = 200_000;
    let (stop, status, task) = spawn_sink(cfg);
    let total = good + bad;
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(
        &db,
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets",
    )
    .await
        < total
    {
        assert!(Instant::now() < deadline, "stuck: {:?}", *status.borrow());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = stop.send(true);
    task.await.unwrap().expect("the sink never crashed");
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, good);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, bad);
    assert_eq!(
        count(&db, "SELECT count(*) FROM dead_letters WHERE error = ''").await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM dead_letters WHERE error LIKE 'oversized%'"
        )
        .await,
        1
    );
    assert!(
        count(
            &db,
            "SELECT count(*) FROM dead_letters WHERE error LIKE '%schema_version 99%'"
        )
        .await
            > 0
    );
    // Each hostile kind was dead-lettered with a reason that says what was wrong.
    for reason in [
        "device_id: contains NUL",
        "label: contains NUL",
        "model.name: contains NUL",
        "does not fit a bigint column",
        "class_id 2147483648 does not fit an integer column",
        "frame.width 3000000000 does not fit an integer column",
        "confidence: inf is not in [0, 1]",
        "year -5000",
        "unknown field",
        "device_id: 100000 bytes",
    ] {
        let n = count(
            &db,
            &format!("SELECT count(*) FROM dead_letters WHERE strpos(error, '{reason}') > 0"),
        )
        .await;
        assert!(n > 0, "no dead letter says {reason:?}");
    }
    // No stored object row belongs to a rejected message: every event's object rows match
    // its detections count.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM events e WHERE e.detections <> (SELECT count(*) FROM objects o WHERE o.event_id = e.event_id)"
        )
        .await,
        0
    );
}

/// SIGKILL the sink process mid-batch, 10 times, restarting it: exact counts, no duplicates.
///
/// Each restart resumes from PostgreSQL's offsets, usually in the middle of a producer record
/// batch; the broker must serve that batch from the requested offset (tansu 0.6 did not: the
/// rig builds it with scripts/tansu/tansu-storage.patch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_ten_times_exact_counts() {
    let b = Broker::start().await;
    b.create_topic("skill", 3);
    let db = database().await;
    let p = producer(&b);
    let mut msgs = Vec::new();
    let mut objects = 0i64;
    let mut ids = HashSet::new();
    for i in 0..100_000u64 {
        let n = (i % 3) as usize;
        objects += n as i64;
        let e = event(i, n);
        ids.insert(e.event_id);
        msgs.push((e.device_id.clone(), serde_json::to_vec(&e).unwrap()));
    }
    send_all(&p, "skill", &msgs).await;
    let bin = env!("CARGO_BIN_EXE_edge-sink");
    // One command line for every instance; `extra` adds batch settings.
    let sink = |extra: &[&str], stderr: std::process::Stdio| {
        std::process::Command::new(bin)
            .args([
                "run",
                "--brokers",
                &b.bootstrap,
                "--topic",
                "skill",
                "--group",
                "g",
                "--database-url",
                &db,
                "--metrics-listen",
                "",
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    };
    let run = || {
        sink(
            &["--batch-size", "500", "--batch-ms", "100"],
            std::process::Stdio::null(),
        )
    };
    let mut seed = 0x9E3779B97F4A7C15u64;
    let mut killed_mid = 0;
    for _ in 0..10 {
        let start = count(&db, "SELECT count(*) FROM events").await;
        let mut child = run();
        // Kill once this instance has written a random number of rows (1-4000), polled
        // closely: a kill on progress rather than after a random delay keeps landing
        // mid-stream however fast the machine writes (100,000 events over 10 kills).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let target = start + 1 + i64::try_from(seed % 4000).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while count(&db, "SELECT count(*) FROM events").await < target && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        unsafe { kill(child.id() as i32, 9) };
        let _ = child.wait();
        if count(&db, "SELECT count(*) FROM events").await < 100_000 {
            killed_mid += 1;
        }
    }
    let log = std::env::temp_dir().join(format!("sink-final-{}.log", std::process::id()));
    let mut child = sink(&[], std::fs::File::create(&log).unwrap().into());
    let n = wait_for(
        &db,
        "SELECT count(*) FROM events",
        100_000,
        Duration::from_secs(120),
    )
    .await;
    if n != 100_000 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        eprintln!(
            "final sink log (last lines, newest first):\n{}",
            tail.join("\n")
        );
        let c = sink::connect(&db).await.unwrap();
        for r in c
            .query(
                "SELECT kafka_partition, next_offset FROM sink_offsets ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
        {
            eprintln!("offset p{} = {}", r.get::<_, i32>(0), r.get::<_, i64>(1));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    unsafe { kill(child.id() as i32, 15) };
    let _ = child.wait();
    assert_eq!(n, 100_000);
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 100_000);
    assert_eq!(count(&db, "SELECT count(*) FROM objects").await, objects);
    assert_eq!(
        count(
            &db,
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets"
        )
        .await,
        100_000
    );
    assert!(
        killed_mid >= 8,
        "only {killed_mid} kills landed before the end"
    );
    eprintln!("sink sigkill: {killed_mid} of 10 kills landed mid-stream; 100000 events, {objects} objects, exact");
}

/// Two sink instances in one consumer group split the partitions; one is SIGKILLed while
/// both are writing and events keep arriving; the survivor takes the dead one's partitions
/// after the rebalance, from PostgreSQL's offsets: exact counts, no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_one_killed_exact_counts() {
    two_instances(Trouble::Kill).await;
}

/// The same, but the instance is frozen (SIGSTOP) past its session timeout, probably inside a
/// transaction, and thawed after the survivor took its partitions: a zombie that commits its
/// stale batch late and then rejoins. Rows dedupe on their keys and `sink_offsets` only moves
/// forward, so the counts are still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_group_one_frozen_then_thawed_exact_counts() {
    two_instances(Trouble::Freeze).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Trouble {
    Kill,
    Freeze,
}

async fn two_instances(trouble: Trouble) {
    let b = Broker::start().await;
    b.create_topic("pair", 4);
    let db = database().await;
    let p = producer(&b);
    let total = 60_000u64;
    let objects: i64 = (0..total).map(|i| (i % 3) as i64).sum();
    // A steady stream (1,000 events every 150 ms, ~9 s) so both instances have work when
    // the kill lands and the survivor sees new events after it.
    let feeder = {
        let p = p.clone();
        tokio::spawn(async move {
            for chunk in 0..total / 1000 {
                let msgs: Vec<(String, Vec<u8>)> = (chunk * 1000..(chunk + 1) * 1000)
                    .map(|i| {
                        let e = event(i, (i % 3) as usize);
                        (e.device_id.clone(), serde_json::to_vec(&e).unwrap())
                    })
                    .collect();
                send_all(&p, "pair", &msgs).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    let bin = env!("CARGO_BIN_EXE_edge-sink");
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let port = common::broker::free_port();
        let child = std::process::Command::new(bin)
            .args([
                "run",
                "--brokers",
                &b.bootstrap,
                "--topic",
                "pair",
                "--group",
                "pair-group",
                "--database-url",
                &db,
                "--batch-size",
                "300",
                "--batch-ms",
                "100",
                "--metrics-listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("RUST_LOG", "edge_vision=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap();
        (child, port)
    };
    let (mut a, a_port) = start("a");
    let (mut survivor, b_port) = start("b");
    // Both instances must be writing before the kill (the group split the partitions).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (a_events, b_events) = loop {
        let (x, y) = (
            scrape(a_port, "edge_sink_events_total"),
            scrape(b_port, "edge_sink_events_total"),
        );
        if x > 0.0 && y > 0.0 {
            break (x, y);
        }
        assert!(
            Instant::now() < deadline,
            "both instances should get partitions: a={x} b={y}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    if trouble == Trouble::Freeze {
        unsafe { kill(a.id() as i32, 19) }; // SIGSTOP
        let frozen_at = scrape(b_port, "edge_sink_events_total");
        let rows = count(&db, "SELECT count(*) FROM events").await;
        assert!(rows < total as i64, "the freeze landed mid-stream");
        // Past the 6 s session timeout: the group drops A and B gets every partition.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let b_during = scrape(b_port, "edge_sink_events_total") - frozen_at;
        unsafe { kill(a.id() as i32, 18) }; // SIGCONT
        eprintln!("zombie: B wrote {b_during} events while A was frozen for 10 s");
    } else {
        unsafe { kill(a.id() as i32, 9) };
        let _ = a.wait();
    }
    // Survivor's counter first, then the table: every row counted after this was written by
    // the survivor after its counter was read.
    let b_at_kill = scrape(b_port, "edge_sink_events_total");
    let at_kill = count(&db, "SELECT count(*) FROM events").await;
    feeder.await.unwrap();
    let n = wait_for(
        &db,
        "SELECT count(*) FROM events",
        total as i64,
        Duration::from_secs(120),
    )
    .await;
    let b_final = scrape(b_port, "edge_sink_events_total");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for child in [&mut survivor, &mut a] {
        unsafe { kill(child.id() as i32, 15) };
        let _ = child.wait();
    }
    if n != total as i64 {
        let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("survivor log, newest first:\n{}", tail.join("\n"));
    }
    assert_eq!(n, total as i64);
    assert_eq!(count(&db, "SELECT count(*) FROM objects").await, objects);
    assert_eq!(
        count(
            &db,
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets WHERE kafka_topic = 'pair'"
        )
        .await,
        total as i64
    );
    if trouble == Trouble::Kill {
        assert!(at_kill < total as i64, "the kill landed mid-stream");
    }
    // After a kill the survivor wrote what the dead instance left behind, not just its share
    // (a thawed zombie rejoins and takes part again, so no such bound holds for it).
    if trouble == Trouble::Kill {
        assert!(
            b_final - b_at_kill >= (total as i64 - at_kill) as f64,
            "survivor wrote {} after the kill, {} were missing",
            b_final - b_at_kill,
            total as i64 - at_kill
        );
    }
    eprintln!(
        "two instances ({}): both writing (a {a_events}, b {b_events} rows when first seen); \
         trouble at {at_kill} rows; {total} exactly",
        if trouble == Trouble::Kill {
            "a killed"
        } else {
            "a frozen, thawed"
        }
    );
}

/// One counter from an `edge-sink` `/metrics` endpoint (0 when unreachable).
fn scrape(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
