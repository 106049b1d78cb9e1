//! Criterion benches of the detector's forward pass (what `edge-vision-dev bench` times), on the real
//! imported YOLOv8s fall model at 320 and 640, and on a random YOLOv8n at 640.
//!
//!     bash scripts/fetch-fixtures.sh && cargo bench --bench detector
//!
//! The ONNX Runtime comparison of the same model in the same run is `scripts/bench-vs-ort.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use edge_vision::agent::detect::{self, weights::ModelFile, Detector, DetectorConfig, ModelSize};

fn fixtures() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let dir = std::env::var_os("EDGE_VISION_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache/edge-vision/fixtures"));
    assert!(
        dir.join("fall-best.pt").exists(),
        "run `bash scripts/fetch-fixtures.sh` first"
    );
    dir
}

fn forward(c: &mut Criterion) {
    let fx = fixtures();
    let tmp = std::env::temp_dir().join(format!(
        "edge-vision-bench-{}.safetensors",
        std::process::id()
    ));
    detect::import::import_checkpoint(&fx.join("fall-best.pt"), &tmp).expect("import");
    let img = image::open(fx.join("bus.jpg")).expect("bus.jpg");
    let mut group = c.benchmark_group("forward");
    group.sample_size(10);
    for size in [320, 640] {
        let det = Detector::load(
            &tmp,
            None,
            &Device::Cpu,
            DetectorConfig {
                input_size: size,
                ..Default::default()
            },
        )
        .expect("load");
        let (input, _) = det.prepare(&img).expect("prepare");
        group.bench_function(format!("yolov8s-fall/{size}"), |b| {
            b.iter(|| det.forward(&input).expect("forward"))
        });
    }
    let n = Detector::from_file(
        ModelFile {
            tensors: detect::random_yolo_v8(ModelSize::N, 80, 1).expect("random"),
            metadata: HashMap::new(),
        },
        Path::new("random-yolov8n"),
        None,
        &Device::Cpu,
        DetectorConfig::default(),
    )
    .expect("yolov8n");
    let (input, _) = n.prepare(&img).expect("prepare");
    group.bench_function("yolov8n-random/640", |b| {
        b.iter(|| n.forward(&input).expect("forward"))
    });
    group.finish();
    let _ = std::fs::remove_file(tmp);
}

criterion_group!(benches, forward);
criterion_main!(benches);
