//! Where each assigned partition starts: at the offset stored in PostgreSQL with the rows,
//! checked against the partition's watermarks first.
//!
//! # Invariants
//!
//! * **A partition starts at PostgreSQL's offset**, never at Kafka's committed one (those are
//!   written after each batch for lag monitoring only).
//! * **A stored offset outside the log is never used silently.** Before an assignment the
//!   partition's watermarks (`low`, `high`) are read from the broker:
//!   - `low <= stored <= high`: start at `stored`.
//!   - `stored < low`: the records in between were deleted (retention) before this sink read
//!     them. Start at `low`; a `sink_health` row `truncated`, a warning, a counter.
//!   - `stored > high`: the topic was deleted and re-created (or truncated); the stored offset
//!     belongs to a log that is gone, and starting there would skip the new log's first
//!     `stored - high` records as "already written". The config key `stored_offset_past_end`
//!     decides: `rewind` (default) resets the stored offset to `low` in PostgreSQL, in one
//!     transaction with a `sink_health` row `rewound`, and starts there; the partition's
//!     `log_epoch` goes up by one, so the new log's dead letters do not collide with the old
//!     log's at the same offsets. `hold` leaves the partition unfetched (a `sink_health` row
//!     `held`, `/healthz` 503 naming it) until an operator resets the offset and restarts.
//!   - the watermarks cannot be read in time: start at `stored` and say so. The consumer runs
//!     with `auto.offset.reset=error`, so a fetch outside the log comes back as an error, and
//!     the loop checks the partition again (`consumer`), instead of librdkafka jumping to the
//!     log's start by itself.
//! * **The health rows and the reset commit before the assignment is made**, so what
//!   PostgreSQL says and what the sink reads agree after any crash.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::Client;

const SELECT_OFFSETS: &str =
    "SELECT kafka_partition, next_offset FROM sink_offsets WHERE kafka_topic = $1";
/// The stored offset of a partition whose log is gone goes back to the new log's start; the
/// partition's log epoch goes up (dead letters are keyed by it).
const REWIND_OFFSET: &str = "
INSERT INTO sink_offsets (kafka_topic, kafka_partition, next_offset, log_epoch)
VALUES ($1, $2, $3, 1)
ON CONFLICT (kafka_topic, kafka_partition)
DO UPDATE SET next_offset = EXCLUDED.next_offset, log_epoch = sink_offsets.log_epoch + 1,
              updated_at = now()";
const INSERT_HEALTH: &str = "
INSERT INTO sink_health (kafka_topic, kafka_partition, kind, stored_offset, low_watermark,
                         high_watermark, start_offset, message)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// How long all watermark queries of one assignment may take together.
pub const WATERMARKS_BUDGET: Duration = Duration::from_secs(4);

/// What to do with a partition whose stored offset is past the end of its log (config key
/// `stored_offset_past_end`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PastEnd {
    /// Reset the stored offset to the log's start and read the new log from there.
    #[default]
    Rewind,
    /// Do not fetch the partition; report it until an operator decides.
    Hold,
}

/// The partition's watermarks, or why they are not known.
pub type Marks = HashMap<i32, Result<(i64, i64), String>>;

/// Reads the watermarks of `partitions` within [`WATERMARKS_BUDGET`] (blocking).
pub fn watermarks<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
    partitions: &[i32],
) -> Marks {
    let deadline = Instant::now() + WATERMARKS_BUDGET;
    partitions
        .iter()
        .map(|&p| {
            let left = deadline.saturating_duration_since(Instant::now());
            let marks = if left.is_zero() {
                Err("no time left to ask".to_string())
            } else {
                consumer
                    .fetch_watermarks(topic, p, left)
                    .map_err(|e| e.to_string())
            };
            (p, marks)
        })
        .collect()
}

/// Where one partition starts, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// At the stored offset, which lies inside the log.
    Inside(i64),
    /// At `low`: the records from `stored` to `low` were deleted unread.
    Truncated { stored: i64, low: i64, high: i64 },
    /// The stored offset is past the log's end.
    PastEnd { stored: i64, low: i64, high: i64 },
    /// At the stored offset, unchecked.
    Unchecked { stored: i64, why: String },
}

/// Judges a stored offset against the partition's watermarks.
pub fn judge(stored: i64, marks: &Result<(i64, i64), String>) -> Verdict {
    match marks {
        Ok((low, high)) if stored > *high => Verdict::PastEnd {
            stored,
            low: *low,
            high: *high,
        },
        Ok((low, high)) if stored < *low => Verdict::Truncated {
            stored,
            low: *low,
            high: *high,
        },
        Ok(_) => Verdict::Inside(stored),
        Err(why) => Verdict::Unchecked {
            stored,
            why: why.clone(),
        },
    }
}

/// The assignment to make.
#[derive(Debug, Default)]
pub struct Plan {
    /// The partitions to fetch, at their start offsets.
    pub tpl: TopicPartitionList,
    /// `(partition, start offset)` of the fetched ones.
    pub fresh: Vec<(i32, i64)>,
    /// Partitions not fetched, with the reason.
    pub held: Vec<(i32, String)>,
    /// Partitions whose stored offset was reset to the start of a new log.
    pub rewound: u64,
    /// Partitions that start past records deleted unread.
    pub truncated: u64,
}

/// Reads the stored offsets of `owned`, judges them against `marks`, writes the resets and
/// the `sink_health` rows in one transaction, and returns the assignment to make.
pub async fn prepare(
    client: &mut Client,
    topic: &str,
    owned: &[i32],
    marks: &Marks,
    policy: PastEnd,
) -> Result<Plan, tokio_postgres::Error> {
    let stored = stored(client, topic).await?;
    let mut plan = Plan::default();
    let tx = client.transaction().await?;
    for &p in owned {
        let s = stored.get(&p).copied().unwrap_or(0);
        let verdict = judge(s, marks.get(&p).unwrap_or(&Err("not asked".into())));
        let start = match verdict {
            Verdict::Inside(o) => Some(o),
            Verdict::Unchecked { stored, why } => {
                tracing::warn!(partition = p, stored, why = %why, "watermarks unknown: starting at the stored offset unchecked (a fetch outside the log comes back as an error and is checked then)");
                Some(stored)
            }
            Verdict::Truncated { stored, low, high } => {
                let message = format!("records {stored}..{low} were deleted before this sink read them (retention?); starting at {low}");
                tracing::warn!(partition = p, "{message}");
                health(
                    &tx,
                    topic,
                    p,
                    "truncated",
                    (stored, low, high),
                    Some(low),
                    &message,
                )
                .await?;
                plan.truncated += 1;
                Some(low)
            }
            Verdict::PastEnd { stored, low, high } => match policy {
                PastEnd::Rewind => {
                    let message = format!("stored offset {stored} is past the end {high} of the log (topic deleted and re-created?): stored offset reset to {low}, the new log is read from its start");
                    tracing::warn!(partition = p, "{message}");
                    tx.execute(REWIND_OFFSET, &[&topic, &p, &low]).await?;
                    health(
                        &tx,
                        topic,
                        p,
                        "rewound",
                        (stored, low, high),
                        Some(low),
                        &message,
                    )
                    .await?;
                    plan.rewound += 1;
                    Some(low)
                }
                PastEnd::Hold => {
                    let message = format!("stored offset {stored} is past the end {high} of the log (topic deleted and re-created?): not fetched (stored_offset_past_end = \"hold\"); set it to \"rewind\", or reset the offset in sink_offsets, and restart");
                    tracing::error!(partition = p, "{message}");
                    health(&tx, topic, p, "held", (stored, low, high), None, &message).await?;
                    plan.held.push((p, message));
                    None
                }
            },
        };
        if let Some(o) = start {
            let _ = plan.tpl.add_partition_offset(topic, p, Offset::Offset(o));
            plan.fresh.push((p, o));
        }
    }
    tx.commit().await?;
    Ok(plan)
}

/// The stored offsets of `topic`'s partitions.
async fn stored(client: &Client, topic: &str) -> Result<HashMap<i32, i64>, tokio_postgres::Error> {
    let rows = client.query(SELECT_OFFSETS, &[&topic]).await?;
    rows.iter()
        .map(|r| Ok((r.try_get::<_, i32>(0)?, r.try_get::<_, i64>(1)?)))
        .collect()
}

/// One `sink_health` row.
async fn health(
    tx: &tokio_postgres::Transaction<'_>,
    topic: &str,
    partition: i32,
    kind: &str,
    (stored, low, high): (i64, i64, i64),
    start: Option<i64>,
    message: &str,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        INSERT_HEALTH,
        &[
            &topic, &partition, &kind, &stored, &low, &high, &start, &message,
        ],
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_offsets_are_judged_against_the_log() {
        assert_eq!(judge(5, &Ok((0, 10))), Verdict::Inside(5));
        assert_eq!(judge(10, &Ok((0, 10))), Verdict::Inside(10), "at the end");
        assert_eq!(judge(0, &Ok((0, 0))), Verdict::Inside(0), "empty log");
        assert_eq!(
            judge(11, &Ok((0, 10))),
            Verdict::PastEnd {
                stored: 11,
                low: 0,
                high: 10
            }
        );
        assert_eq!(
            judge(3, &Ok((4, 10))),
            Verdict::Truncated {
                stored: 3,
                low: 4,
                high: 10
            }
        );
        assert!(matches!(
            judge(3, &Err("timed out".into())),
            Verdict::Unchecked { stored: 3, .. }
        ));
    }
}
