//! What validation cannot catch: messages PostgreSQL itself refuses, events that reuse a
//! stored `event_id` with other content, and a database that refuses every row. A real
//! PostgreSQL refuses them here (a CHECK constraint and triggers added by the test stand for
//! whatever a column, an extension or a DBA's rule may refuse that the decoder does not know).

mod common;

use std::time::{Duration, Instant};

use common::broker::Broker;
use common::rig::{count, database, event, producer, send_all, spawn_sink, until};
use edge_vision::sink::{self, Phase, SinkConfig};

async fn sql(db: &str, text: &str) {
    sink::connect(db)
        .await
        .unwrap()
        .batch_execute(text)
        .await
        .unwrap();
}

async fn texts(db: &str, query: &str) -> Vec<String> {
    let c = sink::connect(db).await.unwrap();
    c.query(query, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn watermarks(bootstrap: &str, topic: &str, partitions: i32) -> Vec<(i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "watermarks")
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap_or((-1, -1))
        })
        .collect()
}

/// 3,000 good events with refused ones (a CHECK violation, class 23; a trigger's
/// numeric_value_out_of_range, class 22) scattered among them, events that reuse a stored id
/// with other content, one conflict inside a batch, and plain re-sends: the sink stays up,
/// every good event is stored once with exactly its objects, every bad message is
/// dead-lettered with its SQL error or its conflict, and the offsets reach the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_found_by_splitting_and_dead_lettered() {
    let b = Broker::start().await;
    b.create_topic("refused", 3);
    let db = database().await;
    sql(
        &db,
        "ALTER TABLE events ADD CONSTRAINT test_refuse CHECK (device_id NOT LIKE 'refuse-%');
         CREATE FUNCTION test_overflow() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.label = 'overflow' THEN
             RAISE EXCEPTION 'value out of range for this test' USING ERRCODE = '22003';
           END IF; RETURN NEW; END $$;
         CREATE TRIGGER test_overflow BEFORE INSERT ON objects
           FOR EACH ROW EXECUTE FUNCTION test_overflow();",
    )
    .await;
    let n = 3000u64;
    let mut msgs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut good_objects = 0i64;
    let mut originals = Vec::new();
    for i in 0..n {
        let e = event(i, (i % 3) as usize);
        good_objects += (i % 3) as i64;
        msgs.push((e.device_id.clone(), serde_json::to_vec(&e).unwrap()));
        if i % 250 == 7 {
            // Refused by the CHECK constraint (on `events`).
            let mut r = event(n + i, 1);
            r.device_id = format!("refuse-{i}");
            msgs.push((r.device_id.clone(), serde_json::to_vec(&r).unwrap()));
        }
        if i % 500 == 11 {
            // Refused by the trigger (on `objects`: the whole event must not be stored).
            let mut r = event(2 * n + i, 2);
            r.detections[1].label = "overflow".into();
            msgs.push((r.device_id.clone(), serde_json::to_vec(&r).unwrap()));
        }
        if i % 600 == 3 {
            originals.push(e.clone());
        }
        if i == 1500 {
            // The same id twice in a row with different content: the second is a conflict
            // even when both arrive in one batch.
            let mut c = e.clone();
            c.seq += 1_000_000;
            msgs.push((c.device_id.clone(), serde_json::to_vec(&c).unwrap()));
        }
    }
    let refused = 12 + 6;
    // Later: the same ids with other content (stored already by then), and plain re-sends.
    for o in &originals {
        let mut c = o.clone();
        c.detections.push(
            c.detections
                .first()
                .cloned()
                .unwrap_or_else(|| event(0, 1).detections[0].clone()),
        );
        msgs.push((c.device_id.clone(), serde_json::to_vec(&c).unwrap()));
        msgs.push((o.device_id.clone(), serde_json::to_vec(o).unwrap()));
    }
    let conflicts = originals.len() as i64;
    let total = msgs.len() as i64;
    let p = producer(&b);
    // The originals go first, so they are stored before their conflicts arrive.
    let (first, later) = msgs.split_at(msgs.len() - 2 * originals.len());
    send_all(&p, "refused", first).await;

    let mut cfg = SinkConfig::new(&b.bootstrap, "refused", "g", &db);
    cfg.batch_size = 400;
    cfg.batch_ms = 50;
    let (stop, status, task) = spawn_sink(cfg);
    until(&status, "the originals are stored", 120, |s| {
        s.events >= n && s.dead_letters > refused as u64
    })
    .await;
    send_all(&p, "refused", later).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = count(
            &db,
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM sink_offsets",
        )
        .await;
        if done >= total {
            break;
        }
        assert!(
            !task.is_finished(),
            "the sink is alive: {:?}",
            *status.borrow()
        );
        assert!(
            Instant::now() < deadline,
            "stuck at {done}/{total}: {:?}; offsets {:?}; last rows {:?}; watermarks {:?}",
            *status.borrow(),
            texts(&db, "SELECT kafka_partition || ':' || next_offset FROM sink_offsets ORDER BY 1").await,
            texts(&db, "SELECT kafka_partition || ':' || max(kafka_offset) FROM (SELECT kafka_partition, kafka_offset FROM events UNION ALL SELECT kafka_partition, kafka_offset FROM dead_letters) x GROUP BY kafka_partition ORDER BY 1").await,
            watermarks(&b.bootstrap, "refused", 3),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!task.is_finished(), "the sink is alive");
    let st = status.borrow().clone();
    let _ = stop.send(true);
    task.await.unwrap().expect("clean stop");

    assert_eq!(
        count(&db, "SELECT count(*) FROM events").await,
        n as i64,
        "{st:?}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM objects").await,
        good_objects
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM events e WHERE detections <> (SELECT count(*) FROM objects o WHERE o.event_id = e.event_id)").await,
        0,
        "every event has exactly its own objects"
    );
    let refusals = texts(
        &db,
        "SELECT error FROM dead_letters WHERE error LIKE 'refused by PostgreSQL%'",
    )
    .await;
    assert_eq!(refusals.len(), refused, "{refusals:?}");
    assert_eq!(
        refusals
            .iter()
            .filter(|e| e.contains("SQLSTATE 23514"))
            .count(),
        12
    );
    assert_eq!(
        refusals
            .iter()
            .filter(|e| e.contains("SQLSTATE 22003"))
            .count(),
        6
    );
    let conflicted = texts(
        &db,
        "SELECT error FROM dead_letters WHERE error LIKE 'conflict:%'",
    )
    .await;
    assert_eq!(conflicted.len() as i64, conflicts + 1, "{conflicted:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM dead_letters").await,
        refused as i64 + conflicts + 1,
        "nothing else dead-lettered (re-sends are not conflicts)"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM dead_letters WHERE payload IS NULL"
        )
        .await,
        0,
        "each dead letter keeps its message"
    );
    assert_eq!(
        (st.refused, st.conflicts),
        (refused as u64, conflicts as u64 + 1)
    );
}

/// A database that refuses every row (here a trigger on `events`, as a revoked grant or a
/// broken rule would) is not the messages' fault: nothing is dead-lettered, no offset moves,
/// the sink says so and waits; once the rule is gone, every event is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_refusing_every_row_is_waited_for_not_blamed_on_messages() {
    let b = Broker::start().await;
    b.create_topic("closed", 2);
    let db = database().await;
    sql(
        &db,
        "CREATE FUNCTION test_closed() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'closed for maintenance'; END $$;
         CREATE TRIGGER test_closed BEFORE INSERT ON events
           FOR EACH ROW EXECUTE FUNCTION test_closed();",
    )
    .await;
    let msgs: Vec<(String, Vec<u8>)> = (0..500)
        .map(|i| {
            let e = event(i, 1);
            (e.device_id.clone(), serde_json::to_vec(&e).unwrap())
        })
        .collect();
    send_all(&producer(&b), "closed", &msgs).await;
    let mut cfg = SinkConfig::new(&b.bootstrap, "closed", "g", &db);
    cfg.batch_size = 100;
    let (stop, status, task) = spawn_sink(cfg);
    until(&status, "the refusal is reported", 60, |s| {
        matches!(&s.phase, Phase::DatabaseRefusing { reason, .. } if reason.contains("closed for maintenance"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!task.is_finished());
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM sink_offsets").await, 0);
    sql(&db, "DROP TRIGGER test_closed ON events").await;
    until(&status, "all written once the rule is gone", 90, |s| {
        s.events == 500 && s.phase == Phase::Consuming
    })
    .await;
    let _ = stop.send(true);
    task.await.unwrap().expect("clean stop");
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 500);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(
        count(&db, "SELECT sum(next_offset)::bigint FROM sink_offsets").await,
        500
    );
}
