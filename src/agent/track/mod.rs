//! Multi-object tracking after NMS, in the spirit of ByteTrack (Zhang et al., 2022): identities
//! for the detector's boxes across frames, so that the agent can report objects with a
//! lifecycle, zones entered and lines crossed instead of one row per frame.
//!
//! # Algorithm (one [`Tracker::update`] per processed frame)
//!
//! 1. Every track's constant-velocity Kalman filter (`kalman`, state `(cx, cy, a, h)` and
//!    velocities) predicts its box in this frame.
//! 2. Detections are split by confidence: *high* (`>= high_confidence`) and *low*
//!    (`>= low_confidence`, below high). Low ones are kept: an occluded or blurred object
//!    often scores low, and matching it to its track keeps the identity alive.
//! 3. First association: confirmed tracks (matched last frame or lost for a while) against the
//!    high detections. Cost: IoU of the predicted box and the detection, same class only,
//!    gated at `match_iou`; solved optimally (Hungarian method, the `pathfinding` crate).
//! 4. Second association: confirmed tracks that were matched last frame and are still free,
//!    against the low detections, gated at `low_match_iou` (stricter: low boxes are noisier).
//! 5. Tentative tracks (seen fewer than `min_hits` frames in a row) against the remaining high
//!    detections, gated at `match_iou`. An unmatched tentative track is dropped at once: a
//!    one-frame false positive never becomes a track.
//! 6. Remaining high detections with confidence `>= new_track_confidence` start tentative
//!    tracks. A tentative track matched `min_hits` frames in a row is confirmed: it gets its
//!    `track_id` and a [`TrackEvent::Started`].
//! 7. A confirmed track without a match is *lost*: its filter keeps predicting and it can be
//!    matched again (step 3). Lost for more than `max_missed` frames, it ends with a
//!    [`TrackEvent::Ended`] summary.
//!
//! Matched boxes update the filter; the box reported for a track is the filter's, which is
//! steadier than the raw detection (zones and lines read it).
//!
//! # Identities
//!
//! `track_id`s are unique per tracker (one per camera) and per agent run: they count up from
//! 1 in the order tracks are confirmed. After a restart the count starts again, so a track id
//! is only meaningful together with the run (`agent_started` event) that produced it; the
//! tracks open at a restart are not continued.

mod kalman;
pub mod scene;

use kalman::Kalman;
use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;

/// Tracker tunables (`[tracker]` in the agent's configuration). The defaults work at 5-15 fps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackerConfig {
    /// Detections at or above this confidence take part in the first association.
    pub high_confidence: f32,
    /// Detections below this confidence are ignored.
    pub low_confidence: f32,
    /// A high detection at or above this confidence that matches no track starts one.
    pub new_track_confidence: f32,
    /// Least IoU between a predicted box and a high detection to match them.
    pub match_iou: f32,
    /// Least IoU between a predicted box and a low detection to match them.
    pub low_match_iou: f32,
    /// Frames in a row a new track must be matched before it is confirmed.
    pub min_hits: u32,
    /// Frames a confirmed track may go unmatched before it ends.
    pub max_missed: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            high_confidence: 0.5,
            low_confidence: 0.1,
            new_track_confidence: 0.6,
            match_iou: 0.2,
            low_match_iou: 0.5,
            min_hits: 2,
            max_missed: 30,
        }
    }
}

/// One detection as the tracker takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub class_id: u32,
    pub confidence: f32,
    /// `[x1, y1, x2, y2]` in frame pixels.
    pub bbox: [f32; 4],
}

/// What a track looked like over its life, reported when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub track_id: u64,
    pub class_id: u32,
    /// Frame numbers (as passed to `update`) of the first and last match.
    pub first_frame: u64,
    pub last_frame: u64,
    /// Frames in which a detection was matched to the track.
    pub frames_seen: u64,
    pub best_confidence: f32,
    /// The detection box of the best confidence.
    pub best_bbox: [f32; 4],
}

/// A change in the set of tracks.
#[derive(Debug, Clone, PartialEq)]
pub enum TrackEvent {
    /// A track was confirmed (its first frames are in the summary so far).
    Started(Summary),
    /// A confirmed track was lost for longer than `max_missed` frames (or the tracker was
    /// finished).
    Ended(Summary),
}

/// A confirmed track as it stands after an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tracked {
    pub track_id: u64,
    pub class_id: u32,
    /// The filtered box in this frame.
    pub bbox: [f32; 4],
    /// The detection matched in this frame, as an index into `update`'s input (`None`: the
    /// track is lost this frame and `bbox` is a prediction).
    pub detection: Option<usize>,
}

/// What one frame changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Update {
    /// For each input detection, the id of the confirmed track it belongs to.
    pub track_ids: Vec<Option<u64>>,
    /// Every confirmed track, matched or lost.
    pub tracks: Vec<Tracked>,
    /// Tracks confirmed and ended in this frame.
    pub events: Vec<TrackEvent>,
}

/// One association round: which tracks take part, which detections, the IoU gate.
type Round<'a> = (fn(Phase) -> bool, &'a [usize], f32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Matched in every frame since it started, fewer than `min_hits` times.
    Tentative,
    /// Confirmed, matched in the last frame.
    Tracked,
    /// Confirmed, unmatched for `missed` frames.
    Lost,
}

#[derive(Debug, Clone)]
struct Track {
    filter: Kalman,
    phase: Phase,
    /// 0 until confirmed.
    id: u64,
    class_id: u32,
    hits: u64,
    missed: u32,
    first_frame: u64,
    last_frame: u64,
    best_confidence: f32,
    best_bbox: [f32; 4],
    /// The detection matched in the current update.
    detection: Option<usize>,
}

impl Track {
    fn summary(&self) -> Summary {
        Summary {
            track_id: self.id,
            class_id: self.class_id,
            first_frame: self.first_frame,
            last_frame: self.last_frame,
            frames_seen: self.hits,
            best_confidence: self.best_confidence,
            best_bbox: self.best_bbox,
        }
    }

    fn hit(&mut self, d: &Detection, frame: u64) {
        self.filter.update(d.bbox);
        self.hits += 1;
        self.missed = 0;
        self.last_frame = frame;
        if d.confidence > self.best_confidence {
            self.best_confidence = d.confidence;
            self.best_bbox = d.bbox;
        }
    }
}

/// The tracks of one camera.
#[derive(Debug, Clone)]
pub struct Tracker {
    cfg: TrackerConfig,
    tracks: Vec<Track>,
    /// The last id handed out.
    last_id: u64,
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes.
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Pairs `(track, detection)` of maximum total IoU among those of the same class with IoU
/// `>= gate`.
fn associate(
    tracks: &[(usize, [f32; 4], u32)],
    dets: &[(usize, &Detection)],
    gate: f32,
) -> Vec<(usize, usize)> {
    if tracks.is_empty() || dets.is_empty() {
        return Vec::new();
    }
    // IoU in millionths; 0 for pairs that may not match. The Hungarian method wants no more
    // rows than columns: the smaller side is the rows.
    let weight = |t: &(usize, [f32; 4], u32), d: &(usize, &Detection)| -> i64 {
        if t.2 != d.1.class_id {
            return 0;
        }
        let v = iou(t.1, d.1.bbox);
        if v >= gate {
            (f64::from(v) * 1e6).round() as i64
        } else {
            0
        }
    };
    let tracks_are_rows = tracks.len() <= dets.len();
    let (rows, cols) = if tracks_are_rows {
        (tracks.len(), dets.len())
    } else {
        (dets.len(), tracks.len())
    };
    let m = Matrix::from_fn(rows, cols, |(r, c)| {
        if tracks_are_rows {
            weight(&tracks[r], &dets[c])
        } else {
            weight(&tracks[c], &dets[r])
        }
    });
    let (_, assignment) = kuhn_munkres(&m);
    assignment
        .into_iter()
        .enumerate()
        .filter(|&(r, c)| m[(r, c)] > 0)
        .map(|(r, c)| {
            if tracks_are_rows {
                (tracks[r].0, dets[c].0)
            } else {
                (tracks[c].0, dets[r].0)
            }
        })
        .collect()
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Self {
        Self {
            cfg,
            tracks: Vec::new(),
            last_id: 0,
        }
    }

    /// Tracks `detections` of frame number `frame` (increasing by one per processed frame).
    pub fn update(&mut self, frame: u64, detections: &[Detection]) -> Update {
        let cfg = self.cfg.clone();
        for t in &mut self.tracks {
            t.filter.predict();
        }
        // For each detection, the index of the track it matched.
        let mut track_of: Vec<Option<usize>> = vec![None; detections.len()];
        let mut matched = vec![false; self.tracks.len()];
        let (high, low): (Vec<usize>, Vec<usize>) = (0..detections.len())
            .filter(|&j| detections[j].confidence >= cfg.low_confidence)
            .partition(|&j| detections[j].confidence >= cfg.high_confidence);
        let rounds: [Round<'_>; 3] = [
            // 3. Confirmed tracks against high detections.
            (|p| p != Phase::Tentative, &high, cfg.match_iou),
            // 4. Tracks matched last frame, still free, against low detections.
            (|p| p == Phase::Tracked, &low, cfg.low_match_iou),
            // 5. Tentative tracks against the remaining high detections.
            (|p| p == Phase::Tentative, &high, cfg.match_iou),
        ];
        for (pick, pool, gate) in rounds {
            let ts: Vec<(usize, [f32; 4], u32)> = self
                .tracks
                .iter()
                .enumerate()
                .filter(|(i, t)| !matched[*i] && pick(t.phase))
                .map(|(i, t)| (i, t.filter.bbox(), t.class_id))
                .collect();
            let ds: Vec<(usize, &Detection)> = pool
                .iter()
                .filter(|&&j| track_of[j].is_none())
                .map(|&j| (j, &detections[j]))
                .collect();
            for (i, j) in associate(&ts, &ds, gate) {
                matched[i] = true;
                track_of[j] = Some(i);
            }
        }

        let mut events = Vec::new();
        for t in &mut self.tracks {
            t.detection = None;
        }
        for (j, slot) in track_of.iter().enumerate() {
            if let Some(i) = *slot {
                self.tracks[i].hit(&detections[j], frame);
                self.tracks[i].detection = Some(j);
            }
        }
        for t in &mut self.tracks {
            match (t.phase, t.detection.is_some()) {
                (Phase::Tentative, true) if t.hits >= u64::from(cfg.min_hits.max(1)) => {
                    self.last_id += 1;
                    t.id = self.last_id;
                    t.phase = Phase::Tracked;
                    events.push(TrackEvent::Started(t.summary()));
                }
                (Phase::Tentative, _) => {}
                (_, true) => t.phase = Phase::Tracked,
                (_, false) => {
                    t.phase = Phase::Lost;
                    t.missed += 1;
                }
            }
        }
        // Unmatched tentative tracks go at once; lost ones after `max_missed` frames.
        let max_missed = cfg.max_missed;
        self.tracks.retain(|t| {
            let gone = match t.phase {
                Phase::Tentative => t.detection.is_none(),
                Phase::Lost => t.missed > max_missed,
                Phase::Tracked => false,
            };
            if gone && t.phase == Phase::Lost {
                events.push(TrackEvent::Ended(t.summary()));
            }
            !gone
        });
        // 6. New tentative tracks (confirmed at once when `min_hits` is 1).
        let fresh = cfg.high_confidence.max(cfg.new_track_confidence);
        for (j, d) in detections.iter().enumerate() {
            if track_of[j].is_some() || d.confidence < fresh {
                continue;
            }
            let mut t = Track {
                filter: Kalman::new(d.bbox),
                phase: Phase::Tentative,
                id: 0,
                class_id: d.class_id,
                hits: 1,
                missed: 0,
                first_frame: frame,
                last_frame: frame,
                best_confidence: d.confidence,
                best_bbox: d.bbox,
                detection: Some(j),
            };
            if cfg.min_hits <= 1 {
                self.last_id += 1;
                t.id = self.last_id;
                t.phase = Phase::Tracked;
                events.push(TrackEvent::Started(t.summary()));
            }
            self.tracks.push(t);
        }
        let mut track_ids = vec![None; detections.len()];
        let mut tracks = Vec::new();
        for t in self.tracks.iter().filter(|t| t.phase != Phase::Tentative) {
            if let Some(j) = t.detection {
                track_ids[j] = Some(t.id);
            }
            tracks.push(Tracked {
                track_id: t.id,
                class_id: t.class_id,
                bbox: t.filter.bbox(),
                detection: t.detection,
            });
        }
        Update {
            track_ids,
            tracks,
            events,
        }
    }

    /// Ends every confirmed track (at shutdown, or when the source ends).
    pub fn finish(&mut self) -> Vec<TrackEvent> {
        std::mem::take(&mut self.tracks)
            .into_iter()
            .filter(|t| t.phase != Phase::Tentative)
            .map(|t| TrackEvent::Ended(t.summary()))
            .collect()
    }

    /// Confirmed tracks now (tracked or lost).
    pub fn active(&self) -> usize {
        self.tracks
            .iter()
            .filter(|t| t.phase != Phase::Tentative)
            .count()
    }
}
