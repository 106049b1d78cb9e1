//! Developer tooling, behind the `testkit` feature (on by default for the workspace, off in the
//! device package): the one synthetic-event generator that tests, benches and tools share, and
//! the benchmark commands of `edge-vision-dev` ([`mod@bench`]).

pub mod bench;

use crate::event::{Event, FrameSize, ModelRef, Object, Origin};

/// Deterministic synthetic detection events.
///
/// Event `i` comes from device `DEVICE-(i % devices)` (or `DEVICE` alone when `devices` is 1),
/// carries the objects [`Synthetic::event`] is asked for (confidences spread evenly over
/// 0.25-0.94), and has a fresh `event_id` and `captured_at` like a real frame. `seq` is 0 (the
/// outbox assigns it) unless [`Synthetic::with_seq`] asked for each device's own count.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// Device id, or the prefix of the device ids when `devices > 1`.
    pub device: String,
    /// How many devices the events are spread over.
    pub devices: u64,
    /// Set `seq` as a consumer sees it (1, 2, 3, ... per device) instead of leaving it to the
    /// outbox.
    pub seq: bool,
}

/// How many objects event `i` carries.
#[derive(Debug, Clone, Copy)]
pub enum Objects {
    /// A deterministic `share` (0-1) of the events carry 1-3 objects, the rest none.
    Share(f64),
    /// 0 to `max`, spread pseudo-randomly over the events.
    UpTo(usize),
}

impl Objects {
    /// The count for event `i`.
    pub fn count(self, i: u64) -> usize {
        let spread = i.wrapping_mul(7919);
        match self {
            Objects::Share(share) => {
                if ((spread % 1000) as f64) / 1000.0 < share {
                    1 + (i % 3) as usize
                } else {
                    0
                }
            }
            Objects::UpTo(max) => {
                let n = u64::try_from(max).unwrap_or(u64::MAX - 1) + 1;
                usize::try_from(spread % n).unwrap_or(max)
            }
        }
    }
}

impl Synthetic {
    /// Events from one device.
    pub fn new(device: &str) -> Self {
        Self {
            device: device.into(),
            devices: 1,
            seq: false,
        }
    }

    /// Spread the events over `n` devices (`DEVICE-0` .. `DEVICE-(n-1)`).
    pub fn devices(mut self, n: u64) -> Self {
        self.devices = n.max(1);
        self
    }

    /// Number events per device: event `i` gets `seq = i / devices + 1`.
    pub fn with_seq(mut self) -> Self {
        self.seq = true;
        self
    }

    /// The device id of event `i`.
    pub fn device_of(&self, i: u64) -> String {
        if self.devices <= 1 {
            self.device.clone()
        } else {
            format!("{}-{}", self.device, i % self.devices)
        }
    }

    /// Event `i` with `objects` objects.
    pub fn event(&self, i: u64, objects: usize) -> Event {
        let detections = (0..objects as u64)
            .map(|k| Object {
                label: "person".into(),
                class_id: 0,
                confidence: confidence(i, k),
                bbox: [
                    10.0 * k as f32,
                    20.0,
                    110.0 + k as f32,
                    300.0 + (i % 97) as f32,
                ],
            })
            .collect();
        let mut e = Event::detection(
            Origin::now(),
            &self.device_of(i),
            ModelRef {
                name: "synthetic".into(),
                sha256: "0".repeat(64),
            },
            FrameSize {
                width: 1280,
                height: 720,
            },
            detections,
        );
        if self.seq {
            e.seq = i / self.devices + 1;
        }
        e
    }

    /// Event `i` with as many objects as `objects` says.
    pub fn event_with(&self, i: u64, objects: Objects) -> Event {
        self.event(i, objects.count(i))
    }

    /// Events `range`, each with as many objects as `objects` says.
    pub fn events(&self, range: std::ops::Range<u64>, objects: Objects) -> Vec<Event> {
        range.map(|i| self.event_with(i, objects)).collect()
    }
}

/// Confidence of object `k` of event `i`: a permutation of 0.25-0.94 over every 70 events, so
/// any window of events has the same, even spread (eviction by value is measured on it).
fn confidence(i: u64, k: u64) -> f32 {
    0.25 + (i.wrapping_mul(31).wrapping_add(k.wrapping_mul(17)) % 70) as f32 / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_deterministic_and_spread() {
        let g = Synthetic::new("dev").devices(7).with_seq();
        let a = g.event(10, 3);
        let b = g.event(10, 3);
        assert_eq!(a.detections, b.detections);
        assert_ne!(a.event_id, b.event_id, "every event is a new frame");
        assert_eq!(a.device_id, "dev-3");
        assert_eq!(a.seq, 2, "the second event of dev-3");
        assert_eq!(Synthetic::new("one").event(5, 0).device_id, "one");
        let mean: f32 = (0..70).map(|i| confidence(i, 0)).sum::<f32>() / 70.0;
        assert!((mean - 0.595).abs() < 1e-3, "{mean}");
        let with = (0..1000)
            .filter(|&i| Objects::Share(0.5).count(i) > 0)
            .count();
        assert!((450..=550).contains(&with), "{with}");
        assert!((0..100).all(|i| Objects::UpTo(3).count(i) <= 3));
        assert!((0..100).any(|i| Objects::UpTo(3).count(i) == 3));
    }
}
