//! The sink rig: a fresh PostgreSQL database per test, a producer, counting queries.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use edge_vision::event::Event;
use edge_vision::sink::{self, SinkConfig, SinkStatus};
use edge_vision::testkit::Synthetic;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::watch;

use super::broker::Broker;

/// The test server: PostgreSQL on loopback with trust auth (scripts/postgres.sh).
pub const PG: &str = "host=127.0.0.1 user=postgres";

/// A fresh database for one test.
pub async fn database() -> String {
    let name = format!("sink_test_{}", uuid::Uuid::now_v7().simple());
    let admin = sink::connect(&format!("{PG} dbname=postgres"))
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (trust auth)");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = format!("{PG} dbname={name}");
    let mut c = sink::connect(&url).await.unwrap();
    sink::migrate(&mut c).await.unwrap();
    url
}

pub fn producer(b: &Broker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &b.bootstrap)
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

pub async fn send(p: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    p.send(
        FutureRecord::to(topic).key(key).payload(payload),
        Duration::from_secs(30),
    )
    .await
    .expect("delivered");
}

pub async fn send_all(p: &FutureProducer, topic: &str, msgs: &[(String, Vec<u8>)]) {
    // `send_result` enqueues at once (an un-polled `send` future would not), so a chunk
    // goes out in batches; then wait for its delivery reports.
    for chunk in msgs.chunks(5000) {
        let mut futs = Vec::with_capacity(chunk.len());
        for (k, v) in chunk {
            let mut rec = FutureRecord::to(topic).key(k).payload(v);
            loop {
                match p.send_result(rec) {
                    Ok(f) => break futs.push(f),
                    Err((_, back)) => {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        for f in futs {
            f.await.expect("not cancelled").expect("delivered");
        }
    }
}

pub async fn count(db: &str, sql: &str) -> i64 {
    let c = sink::connect(db).await.unwrap();
    c.query_one(sql, &[]).await.unwrap().get(0)
}

pub async fn wait_for(db: &str, sql: &str, want: i64, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = count(db, sql).await;
        if n >= want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A detection event `i` with `objects` objects, from one of seven devices (`seq` per device).
pub fn event(i: u64, objects: usize) -> Event {
    Synthetic::new("dev")
        .devices(7)
        .with_seq()
        .event(i, objects)
}

/// A running in-process sink: its stop switch, its status, its task.
pub fn spawn_sink(
    cfg: SinkConfig,
) -> (
    watch::Sender<bool>,
    watch::Receiver<SinkStatus>,
    tokio::task::JoinHandle<Result<(), sink::SinkError>>,
) {
    let (stop, stop_rx) = watch::channel(false);
    let (tx, rx) = watch::channel(SinkStatus::default());
    (stop, rx, tokio::spawn(sink::run(cfg, stop_rx, tx)))
}

/// Waits until `done` holds for the sink's status, or fails naming `what` with the status.
pub async fn until(
    status: &watch::Receiver<SinkStatus>,
    what: &str,
    secs: u64,
    done: impl Fn(&SinkStatus) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done(&status.borrow()) {
        assert!(Instant::now() < deadline, "{what}: {:?}", *status.borrow());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
