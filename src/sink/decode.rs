//! From Kafka message to batch item: each message is decoded and validated into an event
//! whose numbers are converted for their columns with checks, or rejected with a reason that
//! PostgreSQL can store; within a batch, a second message with an `event_id` already in the
//! batch is either a plain re-delivery (written once) or a conflict (dead-lettered).

use std::collections::HashMap;

use uuid::Uuid;

use crate::event::{self, Event};

use super::writer::Stored;

/// One decoded or rejected message of a batch.
// Nearly every item is `Good`; boxing it would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(super) enum Item {
    /// A valid event, to be written.
    Good {
        ev: Event,
        /// Its numbers as the columns store them, checked.
        stored: Stored,
        partition: i32,
        offset: i64,
    },
    /// Not an event the sink can store: dead-lettered with the reason.
    Bad {
        partition: i32,
        offset: i64,
        payload: Option<Vec<u8>>,
        error: String,
    },
    /// The same event as an earlier message of this batch, byte for byte after decoding (an
    /// agent's re-send): written by that message; only its offset counts.
    Repeat { partition: i32, offset: i64 },
}

impl Item {
    /// Where the message sits in its topic.
    pub(super) fn position(&self) -> (i32, i64) {
        match self {
            Item::Good {
                partition, offset, ..
            }
            | Item::Bad {
                partition, offset, ..
            }
            | Item::Repeat { partition, offset } => (*partition, *offset),
        }
    }

    /// This message as a dead letter, because PostgreSQL refused it with `error` although it
    /// accepts other rows (see `triage`). A valid event keeps its content, re-encoded.
    pub(super) fn refused(&self, error: &tokio_postgres::Error) -> Item {
        let (partition, offset) = self.position();
        let (payload, what) = match self {
            Item::Good { ev, .. } => (serde_json::to_vec(ev).ok(), "payload re-encoded"),
            Item::Bad { payload, .. } => (payload.clone(), "dead letter refused too"),
            Item::Repeat { .. } => (None, "re-delivery"),
        };
        let detail = super::triage::describe(error);
        Item::Bad {
            partition,
            offset,
            payload,
            error: storable(&format!("refused by PostgreSQL ({what}): {detail}")),
        }
    }
}

/// Decodes one message: `payload` is `None` for a message without a value.
pub(super) fn classify(
    partition: i32,
    offset: i64,
    payload: Option<&[u8]>,
    max_bytes: usize,
) -> Item {
    let Some(payload) = payload else {
        return Item::Bad {
            partition,
            offset,
            payload: None,
            error: "empty message".into(),
        };
    };
    if payload.len() > max_bytes {
        return Item::Bad {
            partition,
            offset,
            payload: None,
            error: format!("oversized: {} bytes", payload.len()),
        };
    }
    let decoded = event::decode(payload)
        .map_err(|e| e.to_string())
        .and_then(|ev| Stored::of(&ev).map(|stored| (ev, stored)));
    match decoded {
        Ok((ev, stored)) => Item::Good {
            ev,
            stored,
            partition,
            offset,
        },
        Err(error) => Item::Bad {
            partition,
            offset,
            payload: Some(payload.to_vec()),
            error: storable(&error),
        },
    }
}

/// The items of one batch, in the order their messages arrived.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) items: Vec<Item>,
    /// Index of the first `Good` item with each `event_id`, to see repeats and conflicts.
    ids: HashMap<Uuid, usize>,
}

impl Batch {
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Decodes and appends one message. A valid event whose `event_id` is earlier in this
    /// batch with other content is not appended but returned: it must start the next batch,
    /// so that it is judged against the stored event (a conflict, or a plain re-send of the
    /// stored one when the earlier message was the conflict).
    pub(super) fn push(
        &mut self,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
        max_bytes: usize,
    ) -> Option<Item> {
        self.append(classify(partition, offset, payload, max_bytes))
    }

    /// Appends a decoded item, or returns it (see [`Batch::push`]).
    pub(super) fn append(&mut self, item: Item) -> Option<Item> {
        let item = match &item {
            Item::Good {
                ev,
                partition,
                offset,
                ..
            } => match self.ids.get(&ev.event_id) {
                None => {
                    self.ids.insert(ev.event_id, self.items.len());
                    item
                }
                Some(&first) => match &self.items[first] {
                    Item::Good { ev: earlier, .. } if earlier == ev => Item::Repeat {
                        partition: *partition,
                        offset: *offset,
                    },
                    _ => return Some(item),
                },
            },
            _ => item,
        };
        self.items.push(item);
        None
    }
}

/// Longest dead-letter reason kept (the rest is cut, marked with `...`).
const MAX_REASON_CHARS: usize = 2000;

/// A dead-letter reason PostgreSQL can store: decoders quote the offending input, which may
/// hold NUL (no `text` column can) and be of any length.
pub(super) fn storable(reason: &str) -> String {
    let mut out: String = reason
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect();
    if reason.chars().nth(MAX_REASON_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_reasons_are_storable() {
        assert_eq!(
            storable("unknown field `a\0b`"),
            "unknown field `a\u{FFFD}b`"
        );
        let long = "x".repeat(MAX_REASON_CHARS + 10);
        let s = storable(&long);
        assert!(s.ends_with("...") && s.chars().count() == MAX_REASON_CHARS + 3);
        assert_eq!(storable("short"), "short");
    }

    #[cfg(feature = "testkit")]
    #[test]
    fn a_batch_writes_a_repeat_once_and_hands_a_different_event_to_the_next_batch() {
        let ev = crate::testkit::Synthetic::new("d").event(1, 2);
        let same = serde_json::to_vec(&ev).unwrap();
        let mut other = ev.clone();
        other.detections[0].confidence = 0.5;
        let other = serde_json::to_vec(&other).unwrap();
        let mut b = Batch::default();
        assert!(b.push(0, 10, Some(&same), 1 << 20).is_none());
        assert!(b.push(1, 3, Some(&same), 1 << 20).is_none());
        let carried = b.push(0, 11, Some(&other), 1 << 20);
        assert!(matches!(carried, Some(Item::Good { offset: 11, .. })));
        assert!(b.push(0, 12, None, 1 << 20).is_none());
        assert!(matches!(b.items[0], Item::Good { offset: 10, .. }));
        assert!(matches!(
            b.items[1],
            Item::Repeat {
                partition: 1,
                offset: 3
            }
        ));
        assert!(matches!(b.items[2], Item::Bad { offset: 12, .. }));
        assert_eq!(b.len(), 3);
        let mut next = Batch::default();
        assert!(next.append(carried.unwrap()).is_none());
        assert_eq!(next.len(), 1);
    }
}
