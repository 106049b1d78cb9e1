//! The tracker alone, on synthetic boxes with known identities: noise, missed frames, low
//! confidence during an occlusion, crossing paths, a one-frame false positive, classes. Each
//! test checks identities against the ground truth that made the boxes.

use std::collections::{HashMap, HashSet};

use edge_vision::agent::track::{Detection, TrackEvent, Tracker, TrackerConfig};

/// A small deterministic generator (xorshift), so that the noise is the same on every run.
struct Noise(u64);

impl Noise {
    /// Uniform in `[-a, a]`.
    fn next(&mut self, a: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 % 2001) as f32 / 1000.0 - 1.0) * a
    }
}

/// A 40x100 person box with its bottom centre at `(x, y)`, jittered by up to `j` px.
fn person(x: f32, y: f32, j: f32, n: &mut Noise, confidence: f32) -> Detection {
    Detection {
        class_id: 0,
        confidence,
        bbox: [
            x - 20.0 + n.next(j),
            y - 100.0 + n.next(j),
            x + 20.0 + n.next(j),
            y + n.next(j),
        ],
    }
}

/// Runs `frames` through a tracker; for each frame, the truth id of each detection. Returns
/// the tracker's events and, per truth id, the set of track ids it was given.
fn run(
    cfg: TrackerConfig,
    frames: &[Vec<(u32, Detection)>],
) -> (Vec<TrackEvent>, HashMap<u32, HashSet<u64>>) {
    let mut t = Tracker::new(cfg);
    let mut events = Vec::new();
    let mut ids: HashMap<u32, HashSet<u64>> = HashMap::new();
    for (f, frame) in frames.iter().enumerate() {
        let dets: Vec<Detection> = frame.iter().map(|(_, d)| *d).collect();
        let u = t.update(f as u64, &dets);
        assert_eq!(u.track_ids.len(), dets.len());
        for ((truth, _), id) in frame.iter().zip(&u.track_ids) {
            if let Some(id) = id {
                ids.entry(*truth).or_default().insert(*id);
            }
        }
        events.extend(u.events);
    }
    events.extend(t.finish());
    (events, ids)
}

fn started(events: &[TrackEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, TrackEvent::Started(_)))
        .count()
}

/// Two people walk towards each other on nearly the same row, overlap while they pass, and
/// walk on: each keeps one id through the crossing (no switch), with 3 px of noise.
#[test]
fn crossing_paths_keep_their_identities() {
    let mut n = Noise(7);
    let frames: Vec<Vec<(u32, Detection)>> = (0..80)
        .map(|f| {
            let f = f as f32;
            vec![
                (1, person(100.0 + 8.0 * f, 400.0, 3.0, &mut n, 0.9)),
                (2, person(740.0 - 8.0 * f, 410.0, 3.0, &mut n, 0.85)),
            ]
        })
        .collect();
    let (events, ids) = run(TrackerConfig::default(), &frames);
    assert_eq!(ids[&1].len(), 1, "person 1 got ids {:?}", ids[&1]);
    assert_eq!(ids[&2].len(), 1, "person 2 got ids {:?}", ids[&2]);
    assert_ne!(ids[&1], ids[&2]);
    assert_eq!(started(&events), 2, "{events:?}");
}

/// Missed for 10 frames (under `max_missed`): the same id when it reappears where its
/// velocity says. Missed for 40: the track ends, and a new one starts.
#[test]
fn short_gaps_keep_the_track_long_ones_end_it() {
    let mut n = Noise(11);
    let walk = |f: usize, n: &mut Noise| person(100.0 + 6.0 * f as f32, 500.0, 2.0, n, 0.9);
    let frames: Vec<Vec<(u32, Detection)>> = (0..60)
        .map(|f| {
            if (20..30).contains(&f) {
                vec![]
            } else {
                vec![(1, walk(f, &mut n))]
            }
        })
        .collect();
    let (events, ids) = run(TrackerConfig::default(), &frames);
    assert_eq!(ids[&1].len(), 1, "{:?}", ids[&1]);
    assert_eq!(started(&events), 1);

    let frames: Vec<Vec<(u32, Detection)>> = (0..100)
        .map(|f| {
            if (20..60).contains(&f) {
                vec![]
            } else {
                vec![(1, walk(f, &mut n))]
            }
        })
        .collect();
    let (events, ids) = run(TrackerConfig::default(), &frames);
    assert_eq!(
        ids[&1].len(),
        2,
        "a new track after the long gap: {:?}",
        ids[&1]
    );
    let ended: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TrackEvent::Ended(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 2, "{events:?}");
    assert_eq!(ended[0].first_frame, 0);
    assert_eq!(ended[0].last_frame, 19);
    assert_eq!(ended[0].frames_seen, 20);
}

/// While partly hidden the detector scores a person low (0.3): the second association keeps
/// the track, so no new id and no end.
#[test]
fn low_confidence_detections_carry_a_track_through_an_occlusion() {
    let mut n = Noise(3);
    let frames: Vec<Vec<(u32, Detection)>> = (0..50)
        .map(|f| {
            let c = if (15..30).contains(&f) { 0.3 } else { 0.9 };
            vec![(1, person(200.0 + 5.0 * f as f32, 300.0, 2.0, &mut n, c))]
        })
        .collect();
    let (events, ids) = run(TrackerConfig::default(), &frames);
    assert_eq!(ids[&1].len(), 1);
    assert_eq!(started(&events), 1);
    let TrackEvent::Ended(s) = events.last().unwrap() else {
        panic!("{events:?}")
    };
    assert_eq!(s.frames_seen, 50, "the low frames count as seen");
    assert_eq!(s.best_confidence, 0.9);
}

/// A detection in one frame only never becomes a track; `min_hits` frames make one.
#[test]
fn a_one_frame_false_positive_is_never_a_track() {
    let mut n = Noise(5);
    let mut frames: Vec<Vec<(u32, Detection)>> = (0..10).map(|_| vec![]).collect();
    frames[4] = vec![(1, person(300.0, 300.0, 0.0, &mut n, 0.95))];
    let (events, ids) = run(TrackerConfig::default(), &frames);
    assert!(events.is_empty(), "{events:?}");
    assert!(ids.is_empty());
}

/// A person and a car on the same spot are two tracks: association never crosses classes.
#[test]
fn classes_are_tracked_apart() {
    let mut n = Noise(9);
    let frames: Vec<Vec<(u32, Detection)>> = (0..20)
        .map(|_| {
            let p = person(400.0, 400.0, 1.0, &mut n, 0.9);
            let car = Detection { class_id: 1, ..p };
            vec![(1, p), (2, car)]
        })
        .collect();
    let (events, ids) = run(TrackerConfig::default(), &frames);
    assert_eq!(started(&events), 2);
    assert_eq!(ids[&1].len(), 1);
    assert_eq!(ids[&2].len(), 1);
    assert_ne!(ids[&1], ids[&2]);
}

/// Fifty people on a grid, walking with noise and each missing 10% of frames at random: no
/// identity switches (every truth keeps one id, no id is shared).
#[test]
fn fifty_objects_with_random_misses_keep_their_ids() {
    let mut n = Noise(42);
    let frames: Vec<Vec<(u32, Detection)>> = (0..100)
        .map(|f| {
            (0..50u32)
                .filter_map(|i| {
                    let keep = n.next(1.0) > -0.8; // ~90 %
                    let (gx, gy) = ((i % 10) as f32, (i / 10) as f32);
                    let d = person(
                        60.0 + 120.0 * gx + 2.0 * f as f32,
                        150.0 + 130.0 * gy,
                        2.0,
                        &mut n,
                        0.8,
                    );
                    keep.then_some((i, d))
                })
                .collect()
        })
        .collect();
    let (_, ids) = run(TrackerConfig::default(), &frames);
    let mut seen = HashSet::new();
    for (truth, set) in &ids {
        assert_eq!(set.len(), 1, "truth {truth}: {set:?}");
        assert!(seen.insert(*set.iter().next().unwrap()), "id shared");
    }
    assert_eq!(ids.len(), 50);
}
