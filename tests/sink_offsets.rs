//! A stored offset that no longer fits the partition's log (issue 12, item 2): the topic is
//! deleted and re-created under a stopped sink, so PostgreSQL's offsets point past the new
//! log's end. The sink must not skip the new log's records as "already written": by policy it
//! rewinds (a `sink_health` row, the offset reset, everything read) or holds the partition
//! (`/healthz` 503, nothing fetched), and it says so. Also checks the broker's watermarks,
//! which the check depends on (and so does the lag metric).

mod common;

use std::time::Duration;

use common::broker::Broker;
use common::rig::{count, database, event, producer, send_all, spawn_sink, until, wait_for};
use edge_vision::sink::offsets::PastEnd;
use edge_vision::sink::SinkConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// Events `from..to` as messages, one bad message (not an event) at `bad_at` positions.
fn messages(from: u64, to: u64, bad_at: u64) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .map(|i| {
            if i - from == bad_at {
                return ("dev-x".to_string(), b"not an event".to_vec());
            }
            let e = event(i, (i % 3) as usize);
            (e.device_id.clone(), serde_json::to_vec(&e).unwrap())
        })
        .collect()
}

fn config(b: &Broker, topic: &str, db: &str) -> SinkConfig {
    let mut cfg = SinkConfig::new(&b.bootstrap, topic, "g", db);
    cfg.batch_size = 200;
    cfg.batch_ms = 50;
    cfg.metrics_listen = String::new();
    cfg
}

/// The broker reports a partition's end as the offset after its last record, also when the
/// records came in batches of many (tansu 0.6.0 said the last batch's base offset + 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_reports_the_true_end_of_a_partition() {
    let b = Broker::start().await;
    b.create_topic("marks", 1);
    send_all(&producer(&b), "marks", &messages(0, 3_000, u64::MAX)).await;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &b.bootstrap)
        .set("group.id", "marks")
        .create()
        .unwrap();
    let (low, high) = c
        .fetch_watermarks("marks", 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!((low, high), (0, 3_000));
}

/// Stored offsets past the end of a re-created topic: `hold` fetches nothing and says so;
/// `rewind` resets the offset (one `sink_health` row per partition), reads the new log from its
/// start, and keys its dead letters apart from the old log's at the same offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_is_held_or_read_from_its_start_never_skipped() {
    let b = Broker::start().await;
    b.create_topic("again", 1);
    let db = database().await;
    let p = producer(&b);
    // The old log: 300 messages, a bad one at offset 5.
    send_all(&p, "again", &messages(0, 300, 5)).await;
    let (stop, status, task) = spawn_sink(config(&b, "again", &db));
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM events",
            299,
            Duration::from_secs(60)
        )
        .await,
        299
    );
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
    drop(status);

    // The topic goes and comes back with a shorter log: 100 new events, a bad one at 5 again.
    b.delete_topic("again");
    b.create_topic("again", 1);
    send_all(&p, "again", &messages(1_000, 1_100, 5)).await;

    // hold: nothing fetched, the partition named in the status (and so in /healthz).
    let mut cfg = config(&b, "again", &db);
    cfg.stored_offset_past_end = PastEnd::Hold;
    let (stop, status, task) = spawn_sink(cfg);
    until(&status, "partition held", 60, |s| !s.held.is_empty()).await;
    let held = status.borrow().held.clone();
    assert!(
        held[0].contains("partition 0") && held[0].contains("past the end"),
        "{held:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 299);
    assert_eq!(
        count(&db, "SELECT count(*) FROM sink_health WHERE kind = 'held' AND stored_offset = 300 AND high_watermark = 100 AND start_offset IS NULL").await,
        1
    );
    let _ = stop.send(true);
    task.await.unwrap().unwrap();

    // rewind (the default): everything of the new log is read, once.
    let (stop, status, task) = spawn_sink(config(&b, "again", &db));
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM events",
            398,
            Duration::from_secs(60)
        )
        .await,
        398,
        "the new log's 99 events are written: {:?}",
        *status.borrow()
    );
    until(&status, "offset at the new end", 30, |s| {
        s.rewound == 1 && s.held.is_empty()
    })
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM sink_health WHERE kind = 'rewound' AND stored_offset = 300 AND low_watermark = 0 AND high_watermark = 100 AND start_offset = 0").await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT next_offset FROM sink_offsets WHERE kafka_topic = 'again'"
        )
        .await,
        100
    );
    assert_eq!(
        count(
            &db,
            "SELECT log_epoch::bigint FROM sink_offsets WHERE kafka_topic = 'again'"
        )
        .await,
        1
    );
    // Both bad messages sit at offset 5, one per log epoch: neither hides the other.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM dead_letters WHERE kafka_offset = 5"
        )
        .await,
        2
    );
    assert_eq!(
        count(&db, "SELECT count(DISTINCT log_epoch) FROM dead_letters").await,
        2
    );
    assert_eq!(status.borrow().skipped_already_written, 0);
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
}

/// The topic re-created under a running sink: a fetch past the new log's end comes back as
/// out of range (or the group rebalances when the topic goes and comes back); either way the
/// partition is checked again and the new log read from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_recreated_under_a_running_sink_is_read_from_its_start() {
    let b = Broker::start().await;
    b.create_topic("live", 1);
    let db = database().await;
    let p = producer(&b);
    send_all(&p, "live", &messages(0, 300, u64::MAX)).await;
    let mut cfg = config(&b, "live", &db);
    cfg.librdkafka
        .insert("topic.metadata.refresh.interval.ms".into(), "1000".into());
    let (stop, status, task) = spawn_sink(cfg);
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM events",
            300,
            Duration::from_secs(60)
        )
        .await,
        300
    );
    b.delete_topic("live");
    b.create_topic("live", 1);
    send_all(&p, "live", &messages(2_000, 2_100, u64::MAX)).await;
    assert_eq!(
        wait_for(
            &db,
            "SELECT count(*) FROM events",
            400,
            Duration::from_secs(90)
        )
        .await,
        400,
        "the new log's 100 events are written: {:?}",
        *status.borrow()
    );
    assert!(status.borrow().rewound >= 1, "{:?}", *status.borrow());
    assert_eq!(
        count(
            &db,
            "SELECT next_offset FROM sink_offsets WHERE kafka_topic = 'live'"
        )
        .await,
        100
    );
    let _ = stop.send(true);
    task.await.unwrap().unwrap();
}
