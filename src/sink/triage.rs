//! What the sink does when PostgreSQL refuses a batch: wait, or find the message at fault.
//!
//! # Invariants
//!
//! * **An unavailable database is waited out, never blamed on a message.** The errors on the
//!   allowlist in [`is_transient`] (connection lost, server starting or shutting down, read-only,
//!   out of disk, memory or connections, lock and statement timeouts, serialization failures,
//!   system I/O errors) stop the batch where it is: nothing is dead-lettered and no offset moves
//!   for them.
//! * **Any other error is presumed to be about the data, and proven message by message.** The
//!   batch is split in halves, in arrival order, and each half is written on its own, down to
//!   the single message PostgreSQL refuses. Because halves commit in order, what is committed
//!   is always a prefix of the batch, and every partition's offset only moves forward.
//! * **A message is dead-lettered only when the database accepts other rows.** Before a
//!   refused message is dead-lettered (with the SQL error), a probe row is written and rolled
//!   back. When the probe is refused too, the database refuses everything (a revoked grant, a
//!   broken trigger, a full table): that is no message's fault, and the sink waits and retries
//!   as for an outage ([`Stall::Refusing`], shown in `/healthz` and the metrics).
//! * **A refused statement costs the connection.** A COPY that failed part-way can leave the
//!   client's protocol state out of step with the server, so the connection is replaced
//!   after every non-transient error.

use tokio_postgres::Client;

use super::database::Database;
use super::decode::Item;
use super::writer::{write_batch, Written};

/// Why writing stopped before the end of a batch.
#[derive(Debug)]
pub(super) enum Stall {
    /// The database is unavailable (an allowlisted error): retry later.
    Unavailable(tokio_postgres::Error),
    /// The database refuses even a probe row: retry later, an operator must look.
    Refusing(tokio_postgres::Error),
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stall::Unavailable(e) => write!(f, "database unavailable: {}", describe(e)),
            Stall::Refusing(e) => write!(
                f,
                "database refuses every row (not the messages' fault; fix the database): {}",
                describe(e)
            ),
        }
    }
}

/// An error with its SQLSTATE when the server sent one.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("SQLSTATE {}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// How far a batch got.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Items committed, always a prefix of the batch.
    pub committed: usize,
    /// What those commits wrote.
    pub written: Written,
    /// Messages dead-lettered because PostgreSQL refused them.
    pub refused: u64,
    /// Set when the rest of the batch could not be written now.
    pub stall: Option<Stall>,
}

/// A row of each table the sink writes, in a transaction that is rolled back: whether the
/// database accepts rows at all.
const PROBE: &str = "
INSERT INTO events (event_id, device_id, seq, captured_at, kind, detections, kafka_topic, kafka_partition, kafka_offset)
  VALUES ('00000000-0000-0000-0000-000000000000', 'edge-sink probe', 0, now(), 'detection', 1, 'edge-sink probe', 0, 0)
  ON CONFLICT DO NOTHING;
INSERT INTO objects (event_id, idx, device_id, captured_at, label, class_id, confidence, x1, y1, x2, y2)
  VALUES ('00000000-0000-0000-0000-000000000000', 0, 'edge-sink probe', now(), 'probe', 0, 0.5, 0, 0, 1, 1)
  ON CONFLICT DO NOTHING;
INSERT INTO dead_letters (kafka_topic, kafka_partition, kafka_offset, payload, error)
  VALUES ('edge-sink probe', 0, 0, NULL, 'probe') ON CONFLICT DO NOTHING;";

async fn probe(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(PROBE).await?;
    tx.rollback().await
}

/// Writes `items` in order, splitting around messages PostgreSQL refuses (module docs).
pub(super) async fn commit(
    client: &mut Client,
    db: &Database,
    topic: &str,
    items: &[Item],
) -> Outcome {
    let mut out = Outcome::default();
    // Ranges still to write; the next one is on top, so they are written in order.
    let mut todo = vec![(0, items.len())];
    while let Some((a, b)) = todo.pop() {
        if a == b {
            continue;
        }
        let e = match write_batch(client, topic, &items[a..b]).await {
            Ok(w) => {
                out.written += w;
                out.committed = b;
                continue;
            }
            Err(e) => e,
        };
        if is_transient(&e) {
            out.stall = Some(Stall::Unavailable(e));
            return out;
        }
        tracing::warn!(error = %describe(&e), messages = b - a, "batch refused; looking for the message at fault");
        match db.connect().await {
            Ok(c) => *client = c,
            Err(c) => {
                out.stall = Some(Stall::Unavailable(c));
                return out;
            }
        }
        if b - a > 1 {
            let mid = a + (b - a) / 2;
            todo.push((mid, b));
            todo.push((a, mid));
            continue;
        }
        if let Err(p) = probe(client).await {
            out.stall = Some(if is_transient(&p) {
                Stall::Unavailable(p)
            } else {
                Stall::Refusing(e)
            });
            return out;
        }
        let dead = items[a].refused(&e);
        let (partition, offset) = dead.position();
        tracing::warn!(partition, offset, error = %describe(&e), "message refused by PostgreSQL; dead-lettered");
        match write_batch(client, topic, std::slice::from_ref(&dead)).await {
            Ok(w) => {
                out.written += w;
                out.refused += 1;
                out.committed = b;
            }
            Err(d) => {
                if let Ok(c) = db.connect().await {
                    *client = c;
                }
                out.stall = Some(if is_transient(&d) {
                    Stall::Unavailable(d)
                } else {
                    Stall::Refusing(d)
                });
                return out;
            }
        }
    }
    out
}

/// The allowlist: errors after which the same write can succeed later, without any change to
/// the data (connection lost, server restarting, resources exhausted, read-only, timeouts).
pub(super) fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let Some(code) = e.code() else {
        return true; // I/O or protocol: the connection is gone
    };
    let s = code.code();
    // 08 connection exception, 53 insufficient resources (disk full, out of memory, too many
    // connections), 57 operator intervention (admin shutdown, crash shutdown, cannot connect
    // now, query/statement cancelled), 58 system error (I/O error), 40 transaction rollback
    // (serialization failure, deadlock, completion unknown).
    matches!(&s[..2], "08" | "53" | "57" | "58")
        // read-only transaction (a hot standby, or default_transaction_read_only), lock not
        // available, object in use, idle-session timeout
        || matches!(s, "40001" | "40P01" | "40003" | "25006" | "55P03" | "55006")
}
