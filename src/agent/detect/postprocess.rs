//! From raw head outputs to boxes: sigmoid class scores, DFL box decode, per-class NMS.
//!
//! Scores are thresholded on the logit (sigmoid is monotonic), so only candidate cells pay for
//! the sigmoid and the DFL softmax.

use super::image_io::Letterbox;
use super::model::LevelOutput;

/// A box in original-image pixels with its best class.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    pub label: String,
    pub class_id: usize,
    pub confidence: f32,
    /// `[x1, y1, x2, y2]` in pixels of the original image, clipped to it.
    pub bbox: [f32; 4],
}

/// A candidate before NMS, in network-input pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub class_id: usize,
    pub score: f32,
    pub bbox: [f32; 4],
}

/// Most candidates kept for NMS (Ultralytics' `max_nms`).
const MAX_NMS: usize = 30_000;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Expected value of one side's distance under the softmax of its DFL bins.
fn dfl_side(logits: impl Iterator<Item = f32> + Clone, proj: &[f32]) -> f32 {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let mut num = 0.0;
    let mut den = 0.0;
    for (l, p) in logits.zip(proj) {
        let e = (l - max).exp();
        num += e * p;
        den += e;
    }
    num / den
}

/// Decodes every cell whose best class score reaches `conf`.
pub fn decode(
    levels: &[LevelOutput],
    num_classes: usize,
    reg_max: usize,
    dfl: &[f32],
    conf: f32,
) -> Vec<Candidate> {
    let conf = conf.clamp(1e-6, 1.0 - 1e-6);
    let logit_threshold = (conf / (1.0 - conf)).ln();
    let mut out = Vec::new();
    for lv in levels {
        let cells = lv.h * lv.w;
        for cell in 0..cells {
            let mut best = (0usize, f32::NEG_INFINITY);
            for c in 0..num_classes {
                let v = lv.classes[c * cells + cell];
                if v > best.1 {
                    best = (c, v);
                }
            }
            if best.1 < logit_threshold {
                continue;
            }
            let (ax, ay) = ((cell % lv.w) as f32 + 0.5, (cell / lv.w) as f32 + 0.5);
            let side = |s: usize| {
                let base = s * reg_max;
                dfl_side(
                    (0..reg_max).map(move |b| lv.boxes[(base + b) * cells + cell]),
                    dfl,
                )
            };
            let (l, t, r, b) = (side(0), side(1), side(2), side(3));
            let s = lv.stride as f32;
            out.push(Candidate {
                class_id: best.0,
                score: sigmoid(best.1),
                bbox: [(ax - l) * s, (ay - t) * s, (ax + r) * s, (ay + b) * s],
            });
        }
    }
    out
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Greedy per-class non-maximum suppression; returns at most `max_det` boxes, best first.
pub fn nms(mut cands: Vec<Candidate>, iou_threshold: f32, max_det: usize) -> Vec<Candidate> {
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    cands.truncate(MAX_NMS);
    let mut kept: Vec<Candidate> = Vec::new();
    for c in cands {
        if kept.len() >= max_det {
            break;
        }
        if kept
            .iter()
            .all(|k| k.class_id != c.class_id || iou(&k.bbox, &c.bbox) <= iou_threshold)
        {
            kept.push(c);
        }
    }
    kept
}

/// Maps NMS survivors to labelled detections in original-image pixels.
pub fn finish(kept: Vec<Candidate>, lb: &Letterbox, names: &[String]) -> Vec<Detection> {
    kept.into_iter()
        .map(|c| Detection {
            label: names
                .get(c.class_id)
                .cloned()
                .unwrap_or_else(|| format!("class{}", c.class_id)),
            class_id: c.class_id,
            confidence: c.score,
            bbox: lb.to_original(c.bbox),
        })
        .filter(|d| d.bbox[2] > d.bbox[0] && d.bbox[3] > d.bbox[1])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(class_id: usize, score: f32, x: f32) -> Candidate {
        Candidate {
            class_id,
            score,
            bbox: [x, 0.0, x + 10.0, 10.0],
        }
    }

    #[test]
    fn nms_is_per_class_and_sorted() {
        let kept = nms(
            vec![
                cand(0, 0.5, 0.0),
                cand(0, 0.9, 1.0),
                cand(1, 0.7, 1.0),
                cand(0, 0.6, 50.0),
            ],
            0.45,
            300,
        );
        let scores: Vec<f32> = kept.iter().map(|c| c.score).collect();
        // 0.5 overlaps 0.9 of the same class and goes; class 1 at the same place stays.
        assert_eq!(scores, vec![0.9, 0.7, 0.6]);
        assert_eq!(
            nms(vec![cand(0, 0.5, 0.0), cand(0, 0.4, 100.0)], 0.45, 1).len(),
            1
        );
    }

    #[test]
    fn nms_survives_nan_scores() {
        let kept = nms(vec![cand(0, f32::NAN, 0.0), cand(0, 0.9, 100.0)], 0.45, 300);
        assert_eq!(kept.len(), 2);
    }

    #[test]
    fn iou_of_known_boxes() {
        assert_eq!(iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 10.0, 10.0]), 1.0);
        assert!((iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
    }

    #[test]
    fn decode_one_cell() {
        // One 1x1 level, stride 32, 2 classes, reg_max 2 with projection [0, 1].
        // Class 1 logit 2.0 (p = 0.88); every side's bins are [0, big] -> distance ~1 cell.
        let boxes = vec![0.0, 20.0, 0.0, 20.0, 0.0, 20.0, 0.0, 20.0];
        let lv = LevelOutput {
            boxes,
            classes: vec![-5.0, 2.0],
            h: 1,
            w: 1,
            stride: 32,
        };
        let c = decode(&[lv], 2, 2, &[0.0, 1.0], 0.25);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].class_id, 1);
        assert!((c[0].score - sigmoid(2.0)).abs() < 1e-6);
        for (got, want) in c[0].bbox.iter().zip([-16.0, -16.0, 48.0, 48.0]) {
            assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        }
        let lv = LevelOutput {
            boxes: vec![0.0; 8],
            classes: vec![-5.0, -2.0],
            h: 1,
            w: 1,
            stride: 32,
        };
        assert!(decode(&[lv], 2, 2, &[0.0, 1.0], 0.25).is_empty());
    }
}
