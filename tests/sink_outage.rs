//! PostgreSQL going away under the sink: stopped for several seconds, then restarted, while
//! the sink consumes. The sink pauses (no offset moves without rows), retries, resumes; nothing
//! is dead-lettered for a connectivity error; the counts are exact.
//!
//! Its own test binary: it stops the machine's PostgreSQL, which no other test may see (test
//! binaries run one after another).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::rig::{count, database, event, producer, send_all};
use edge_vision::sink::{self, SinkConfig, SinkStatus};

fn pg_ctl(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster (/etc/postgresql)")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a cluster version");
    let ok = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .status()
        .expect("pg_ctlcluster")
        .success();
    assert!(ok, "pg_ctlcluster {action}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_mid_stream_exact_counts() {
    let b = Broker::start().await;
    b.create_topic("pgdown", 3);
    let db = database().await;
    let p = producer(&b);
    let n = 60_000u64;
    let msgs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let e = event(i, (i % 3) as usize);
            (e.device_id.clone(), serde_json::to_vec(&e).unwrap())
        })
        .collect();
    let objects: i64 = (0..n).map(|i| (i % 3) as i64).sum();
    send_all(&p, "pgdown", &msgs).await;

    let mut cfg = SinkConfig::new(&b.bootstrap, "pgdown", "g", &db);
    cfg.batch_size = 500; // many small transactions, so the outage lands mid-stream
    cfg.batch_ms = 50;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (tx, status) = tokio::sync::watch::channel(SinkStatus::default());
    let task = tokio::spawn(sink::run(cfg, stop_rx, tx));

    // Let it get going, then take the database away for 8 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status.borrow().events < 5_000 {
        assert!(
            Instant::now() < deadline,
            "sink did not start: {:?}",
            *status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg_ctl("stop");
    let at_stop = status.borrow().events;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = status.borrow().clone();
    pg_ctl("start");
    for _ in 0..60 {
        if Command::new("pg_isready")
            .args(["-h", "127.0.0.1", "-q"])
            .status()
            .is_ok_and(|s| s.success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        during.events <= at_stop + 500,
        "no rows can be written while the database is down: {at_stop} -> {during:?}"
    );
    assert!(during.db_retries > 0, "the outage was noticed: {during:?}");
    assert!(!task.is_finished(), "the sink survived the outage");

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = count(
            &db,
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets",
        )
        .await;
        if done >= n as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stuck at {done}: {:?}",
            *status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = stop.send(true);
    task.await.unwrap().expect("no error");
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, n as i64);
    assert_eq!(
        count(&db, "SELECT count(DISTINCT event_id) FROM events").await,
        n as i64
    );
    assert_eq!(count(&db, "SELECT count(*) FROM objects").await, objects);
    assert_eq!(
        count(&db, "SELECT count(*) FROM dead_letters").await,
        0,
        "connectivity errors are never dead-lettered"
    );
}
