//! Stage 2, inference: takes the newest frame from the slot, runs the detector, applies the
//! class filter, frame-rate cap and change detection, writes snapshots, and sends one
//! detection event per frame (its `event_id` and `captured_at` are the frame's) to the writer.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use super::capture::Slot;
use super::config::{DetectorSettings, SnapshotConfig};
use super::detect::{Detection, Detector};
use super::health::{now_ms, AgentMetrics, Beats};
use super::pipeline::RunError;
use super::snapshots::SnapshotDir;
use crate::event::{Event, FrameSize, ModelRef, Object, Origin};

/// Do two frames' detections match (same labels, each box IoU >= 0.5 with a partner)?
pub(super) fn same_detections(a: &[Object], b: &[Object]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut used = vec![false; b.len()];
    a.iter().all(|x| {
        let hit = b.iter().enumerate().position(|(i, y)| {
            !used[i]
                && x.class_id == y.class_id
                && crate::agent::detect::postprocess::iou(&x.bbox, &y.bbox) >= 0.5
        });
        if let Some(i) = hit {
            used[i] = true;
        }
        hit.is_some()
    })
}

/// Inference stage.
#[allow(clippy::too_many_arguments)]
pub(super) fn inference_loop(
    detector: Detector,
    settings: &DetectorSettings,
    snapshots: &SnapshotConfig,
    model: ModelRef,
    device_id: &str,
    slot: &Slot,
    m: &AgentMetrics,
    beats: &Beats,
    events: SyncSender<(Event, String)>,
    t0: Instant,
) {
    let min_gap = (settings.max_fps > 0.0).then(|| Duration::from_secs_f64(1.0 / settings.max_fps));
    let mut last_run: Option<Instant> = None;
    let mut previous: Option<Vec<Object>> = None;
    let mut snaps = snapshots.dir.as_ref().and_then(|d| {
        match SnapshotDir::open(d, snapshots.max_bytes, snapshots.quality) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(dir = %d.display(), "snapshots disabled: {e}");
                None
            }
        }
    });
    loop {
        beats.inference.store(now_ms(t0), Ordering::Relaxed);
        let frame = match slot.take(Duration::from_millis(200)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(()) => return,
        };
        if let (Some(gap), Some(last)) = (min_gap, last_run) {
            if last.elapsed() < gap {
                m.frames_sampled_out.inc();
                continue;
            }
        }
        last_run = Some(Instant::now());
        let result = match detector.detect(&frame.image) {
            Ok(r) => r,
            Err(e) => {
                m.frames_bad.inc();
                tracing::warn!(origin = %frame.origin, "inference failed: {e}");
                continue;
            }
        };
        let done = now_ms(t0);
        let _ =
            m.first_processed_ms
                .compare_exchange(-1, done, Ordering::Relaxed, Ordering::Relaxed);
        m.last_processed_ms.store(done, Ordering::Relaxed);
        m.frames_processed.inc();
        m.inference.observe(result.inference_ms / 1000.0);
        let objects: Vec<Object> = result
            .detections
            .iter()
            .filter(|d| settings.classes.is_empty() || settings.classes.contains(&d.label))
            .map(to_object)
            .collect();
        if settings.emit_on_change {
            if previous
                .as_deref()
                .is_some_and(|p| same_detections(&objects, p))
            {
                m.frames_unchanged.inc();
                continue;
            }
            previous = Some(objects.clone());
        }
        for o in &objects {
            m.detections.add(&o.label, 1);
        }
        let ev = Event::detection(
            Origin {
                event_id: frame.id,
                captured_at: frame.captured_at,
            },
            device_id,
            model.clone(),
            FrameSize {
                width: result.width,
                height: result.height,
            },
            objects,
        );
        if let Some(s) = snaps.as_mut() {
            if !ev.detections.is_empty() {
                match s.write(&ev.event_id.to_string(), &frame.image) {
                    Ok(()) => m.snapshots.inc(),
                    Err(e) => tracing::warn!("snapshot: {e}"),
                }
            }
        }
        if events.send((ev, frame.origin)).is_err() {
            return;
        }
    }
}

pub(super) fn to_object(d: &Detection) -> Object {
    Object {
        label: d.label.clone(),
        class_id: d.class_id as u32,
        confidence: d.confidence,
        bbox: d.bbox,
    }
}

pub(super) fn sha256_file(path: &Path) -> Result<String, RunError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|source| RunError::ModelRead {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(class_id: u32, x: f32) -> Object {
        Object {
            label: format!("c{class_id}"),
            class_id,
            confidence: 0.9,
            bbox: [x, 10.0, x + 100.0, 200.0],
        }
    }

    #[test]
    fn change_detection_compares_labels_and_boxes() {
        assert!(same_detections(&[], &[]));
        assert!(same_detections(&[obj(0, 10.0)], &[obj(0, 15.0)]));
        assert!(!same_detections(&[obj(0, 10.0)], &[obj(1, 10.0)]));
        assert!(!same_detections(&[obj(0, 10.0)], &[obj(0, 300.0)]));
        assert!(!same_detections(&[obj(0, 10.0)], &[]));
        assert!(same_detections(
            &[obj(0, 10.0), obj(0, 500.0)],
            &[obj(0, 505.0), obj(0, 12.0)]
        ));
    }
}
