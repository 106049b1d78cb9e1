//! The device builds: `cross/build.sh` cross-compiles edge-agent for aarch64 (Jetson, Pi 4/5)
//! and armv7 (32-bit Pi OS); the aarch64 binary runs under qemu-user and finds the same people
//! in bus.jpg as the x86-64 build; the armv7 binary prints its version. Slow the first time
//! (two release builds with fat LTO); later runs reuse `~/.cache/edge-vision/cross-target`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn build(arch: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("cross/build.sh"))
        .arg(arch)
        .output()
        .expect("bash");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cross/build.sh {arch} failed:\n{err}");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.exists(), "{} missing", path.display());
    let size = std::fs::metadata(&path).unwrap().len();
    println!("{arch}: {} ({:.1} MB)", path.display(), size as f64 / 1e6);
    path
}

fn detections(cmd: &mut Command) -> Vec<[f64; 5]> {
    let out = cmd.output().expect("run detect");
    assert!(
        out.status.success(),
        "detect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    v["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let b = &d["bbox"];
            [
                b[0].as_f64().unwrap(),
                b[1].as_f64().unwrap(),
                b[2].as_f64().unwrap(),
                b[3].as_f64().unwrap(),
                d["confidence"].as_f64().unwrap(),
            ]
        })
        .collect()
}

fn iou(a: &[f64; 5], b: &[f64; 5]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f64; 5]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter)
}

#[test]
fn aarch64_build_runs_under_qemu_with_the_same_detections() {
    let bin = build("aarch64");
    let version = Command::new("qemu-aarch64-static")
        .arg(&bin)
        .arg("--version")
        .output()
        .expect("qemu-aarch64-static (Debian qemu-user-static)");
    let text = String::from_utf8_lossy(&version.stdout);
    assert!(
        text.contains(edge_vision::VERSION),
        "{text}{}",
        String::from_utf8_lossy(&version.stderr)
    );
    let model = common::imported_model();
    let bus = common::fixture("bus.jpg");
    let args = |c: &mut Command| {
        c.args(["detect", "--json", "--model"]).arg(model).arg(&bus);
    };
    let mut arm = Command::new("qemu-aarch64-static");
    arm.arg(&bin);
    args(&mut arm);
    let mut x86 = Command::new(env!("CARGO_BIN_EXE_edge-agent"));
    args(&mut x86);
    let (a, x) = (detections(&mut arm), detections(&mut x86));
    println!("aarch64: {a:?}\nx86-64:  {x:?}");
    assert!(!x.is_empty());
    assert_eq!(a.len(), x.len());
    for d in &x {
        let best = a.iter().map(|e| iou(d, e)).fold(0.0, f64::max);
        assert!(best >= 0.9, "{d:?}: best IoU {best} on aarch64");
        let conf = a
            .iter()
            .max_by(|p, q| iou(d, p).total_cmp(&iou(d, q)))
            .map(|e| e[4])
            .unwrap_or(0.0);
        assert!((conf - d[4]).abs() < 0.02, "confidence {conf} vs {}", d[4]);
    }
}

#[test]
fn armv7_build_prints_its_version() {
    let bin = build("armv7");
    let out = Command::new("qemu-arm-static")
        .args(["-L", "/usr/arm-linux-gnueabihf"])
        .arg(&bin)
        .arg("--version")
        .output()
        .expect("qemu-arm-static (Debian qemu-user-static)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(edge_vision::VERSION),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
