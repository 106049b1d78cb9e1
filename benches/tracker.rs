//! Criterion bench of the tracker: one `Tracker::update` with 50 people walking on a grid
//! (the goal: under 1 ms per frame on the 2-core machine), and the same frame with the
//! zones and lines of a busy scene evaluated for every track.
//!
//!     cargo bench --bench tracker

use criterion::{criterion_group, criterion_main, Criterion};
use edge_vision::agent::track::scene::{LineConfig, Scene, ZoneConfig};
use edge_vision::agent::track::{Detection, Tracker, TrackerConfig};

/// Frame `f` of 50 people on a 10x5 grid, each walking right at 2 px per frame (made inside
/// the timed loop: 50 boxes, well under a microsecond).
fn frame(f: u64) -> Vec<Detection> {
    (0..50u32)
        .map(|i| {
            let (gx, gy) = ((i % 10) as f32, (i / 10) as f32);
            let x = 60.0 + 120.0 * gx + 2.0 * f as f32;
            let y = 150.0 + 130.0 * gy;
            Detection {
                class_id: 0,
                confidence: 0.8,
                bbox: [x - 20.0, y - 100.0, x + 20.0, y],
            }
        })
        .collect()
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracker");
    g.bench_function("update, 50 objects", |b| {
        let mut t = Tracker::new(TrackerConfig::default());
        let mut f = 0u64;
        b.iter(|| {
            let u = t.update(f, &frame(f));
            f += 1;
            u
        })
    });
    let labels = vec!["person".to_string()];
    let zones: Vec<ZoneConfig> = (0..4)
        .map(|i| ZoneConfig {
            name: format!("zone-{i}"),
            polygon: vec![
                [300.0 * i as f32, 0.0],
                [300.0 * i as f32 + 250.0, 0.0],
                [300.0 * i as f32 + 250.0, 720.0],
                [300.0 * i as f32, 720.0],
            ],
            classes: vec![],
        })
        .collect();
    let lines: Vec<LineConfig> = (0..4)
        .map(|i| LineConfig {
            name: format!("line-{i}"),
            from: [0.0, 100.0 + 150.0 * i as f32],
            to: [1280.0, 120.0 + 150.0 * i as f32],
            classes: vec![],
            hysteresis_px: 6.0,
        })
        .collect();
    g.bench_function("update + 4 zones + 4 lines, 50 objects", |b| {
        let mut t = Tracker::new(TrackerConfig::default());
        let mut s = Scene::new(&zones, &lines, None, &labels).expect("valid scene");
        let mut f = 0u64;
        b.iter(|| {
            let u = t.update(f, &frame(f));
            let mut n = 0;
            for tr in u.tracks.iter().filter(|tr| tr.detection.is_some()) {
                n += s.observe(tr.track_id, tr.class_id, tr.bbox).len();
            }
            f += 1;
            n
        })
    });
    g.finish();
}

criterion_group!(benches, update);
criterion_main!(benches);
