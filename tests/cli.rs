//! The command-line contract other tools depend on, run as real processes.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(args)
        .output()
        .expect("run edge-agent")
}

/// The developer tools (`bench`, `outbox fill`, ...), which the device package does not ship.
fn dev(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-vision-dev"))
        .args(args)
        .output()
        .expect("run edge-vision-dev")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model() -> String {
    common::imported_model().display().to_string()
}

#[test]
fn detect_json_prints_one_object_per_image_in_the_contract_shape() {
    let bus = common::fixture("bus.jpg").display().to_string();
    let zidane = common::fixture("zidane.jpg").display().to_string();
    let o = agent(&["detect", "--model", &model(), "--json", &bus, &zidane]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{}", stdout(&o));
    for (line, (path, w, h, n)) in lines
        .iter()
        .zip([(&bus, 810, 1080, 3), (&zidane, 1280, 720, 2)])
    {
        // Keys in the documented order.
        let keys: Vec<String> =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
                .unwrap()
                .keys()
                .cloned()
                .collect();
        assert_eq!(
            keys,
            ["image", "width", "height", "detections", "inference_ms"]
        );
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["image"], path.as_str());
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(w), Some(h))
        );
        assert!(v["inference_ms"].as_f64().unwrap() > 0.0);
        let dets = v["detections"].as_array().unwrap();
        assert_eq!(dets.len(), n, "{line}");
        for d in dets {
            let keys: Vec<&String> = d.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["label", "class_id", "confidence", "bbox"]);
            assert_eq!(d["label"], "Normal");
            assert_eq!(d["class_id"], 0);
            let c = d["confidence"].as_f64().unwrap();
            assert!((0.25..=1.0).contains(&c));
            let b: Vec<f64> = d["bbox"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert!(
                b[0] < b[2] && b[1] < b[3] && b[2] <= w as f64 && b[3] <= h as f64,
                "{b:?}"
            );
        }
    }
    // The bus's first (most confident) man, as in the example.
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert!((v["detections"][0]["confidence"].as_f64().unwrap() - 0.658).abs() < 0.005);
}

#[test]
fn thresholds_change_what_is_reported() {
    let bus = common::fixture("bus.jpg").display().to_string();
    let o = agent(&[
        "detect",
        "--model",
        &model(),
        "--conf",
        "0.65",
        "--json",
        &bus,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        v["detections"].as_array().unwrap().len(),
        1,
        "only the 0.658 box passes 0.65"
    );
}

#[test]
fn readable_table_without_json() {
    let bus = common::fixture("bus.jpg").display().to_string();
    let o = agent(&["detect", "--model", &model(), &bus]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("810x1080")
            && out.contains("3 detections")
            && out.matches("Normal").count() == 3,
        "{out}"
    );
}

#[test]
fn annotate_writes_each_image_with_boxes() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::fixture("bus.jpg").display().to_string();
    let o = agent(&[
        "detect",
        "--model",
        &model(),
        "--annotate",
        &dir.path().display().to_string(),
        &bus,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = image::open(dir.path().join("bus.annotated.png"))
        .expect("annotated image")
        .to_rgb8();
    let orig = image::open(common::fixture("bus.jpg")).unwrap().to_rgb8();
    assert_eq!(out.dimensions(), orig.dimensions());
    // The box of class 0 is drawn in its colour along the first man's bottom edge.
    let changed = out
        .pixels()
        .zip(orig.pixels())
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 2000, "only {changed} pixels changed");
    assert!(out.pixels().filter(|p| p.0 == [255, 56, 56]).count() > 1000);
}

#[test]
fn a_bad_image_fails_alone_with_exit_code_3() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let bus = common::fixture("bus.jpg").display().to_string();
    let o = agent(&[
        "detect",
        "--model",
        &model(),
        "--json",
        &bad.display().to_string(),
        &bus,
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("broken.jpg") && stderr(&o).contains("cannot be decoded"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        stdout(&o).lines().count(),
        1,
        "the good image is still reported"
    );
}

#[test]
fn usage_and_model_errors_have_distinct_exit_codes() {
    let bus = common::fixture("bus.jpg").display().to_string();
    let o = agent(&["detect", "--model", &model(), "--size", "500", &bus]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("multiple of 32"));
    let o = agent(&["detect", "--model", "/nonexistent/m.safetensors", &bus]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("/nonexistent/m.safetensors"));
    let o = agent(&["detect", "--model", &model()]);
    assert_eq!(o.status.code(), Some(2), "no images is a usage error");
}

#[test]
fn bench_prints_the_contract_json() {
    let bus = common::fixture("bus.jpg").display().to_string();
    let o = dev(&[
        "--threads",
        "1",
        "bench",
        "--model",
        &model(),
        "--image",
        &bus,
        "--size",
        "320",
        "--runs",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        v.keys().collect::<Vec<_>>(),
        ["median_ms", "p90_ms", "runs", "threads"]
    );
    assert_eq!(v["runs"], 3);
    assert_eq!(v["threads"], 1);
    let (median, p90) = (
        v["median_ms"].as_f64().unwrap(),
        v["p90_ms"].as_f64().unwrap(),
    );
    assert!(median > 0.0 && p90 >= median, "{v:?}");
}

/// The device binary ships what an operator runs; benchmarks and synthetic data live in
/// `edge-vision-dev`, which the package does not contain.
#[test]
fn developer_tools_are_not_in_the_device_binary() {
    for args in [
        &["bench", "--help"][..],
        &["outbox", "fill", "--help"],
        &["outbox", "raw-send", "--help"],
    ] {
        let o = agent(args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "edge-agent {args:?}: {}",
            stdout(&o)
        );
        assert!(
            stderr(&o).contains("unrecognized subcommand"),
            "{}",
            stderr(&o)
        );
        let o = dev(args);
        assert!(
            o.status.success(),
            "edge-vision-dev {args:?}: {}",
            stderr(&o)
        );
    }
    let help = stdout(&agent(&["outbox", "--help"]));
    assert!(help.contains("drain") && help.contains("status"), "{help}");
}

/// `config check` prints floats as they were written, not widened from f32.
#[test]
fn config_check_prints_floats_as_written() {
    let o = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["--config", "/dev/null", "config", "check"])
        .env("EDGE_AGENT__DEVICE_ID", "cam-1")
        .env("EDGE_AGENT__DETECTOR__CONFIDENCE", "0.3")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("iou = 0.45\n"), "{text}");
    assert!(text.contains("confidence = 0.3\n"), "{text}");
    assert!(text.contains("fps = 15.0\n"), "{text}");
}

#[test]
fn model_import_and_info_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fall.safetensors");
    let o = agent(&[
        "model",
        "import",
        &common::fixture("fall-best.pt").display().to_string(),
        "-o",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("YOLOv8s") && stdout(&o).contains("Normal, Fall"),
        "{}",
        stdout(&o)
    );
    let o = agent(&["model", "info", &out.display().to_string()]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["size"], "s");
    assert_eq!(v["num_classes"], 2);
    assert_eq!(v["names"], serde_json::json!(["Normal", "Fall"]));
}

/// Serves `body` to every request on a loopback port, for a bounded number of requests.
fn serve(body: Vec<u8>, requests: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}/model.safetensors")
}

fn manifest(dir: &Path, url: &str, sha: &str) -> String {
    let p = dir.join("manifest.toml");
    std::fs::write(
        &p,
        format!(
            "[[model]]\nname = \"tiny\"\ndescription = \"test\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\nlicence = \"Apache-2.0\"\nclasses = \"metadata\"\nfile = \"tiny.safetensors\"\n"
        ),
    )
    .unwrap();
    p.display().to_string()
}

#[test]
fn model_fetch_checks_the_sha256() {
    use sha2::Digest;
    let body = std::fs::read(common::imported_model()).unwrap();
    let sha: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("models");
    let dest_s = dest.display().to_string();

    // Right checksum: saved, and it loads.
    let m = manifest(dir.path(), &serve(body.clone(), 1), &sha);
    let o = agent(&["model", "fetch", "tiny", "--manifest", &m, "--dir", &dest_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = dest.join("tiny.safetensors");
    assert_eq!(std::fs::read(&saved).unwrap(), body);
    assert!(agent(&["model", "info", &saved.display().to_string()])
        .status
        .success());
    std::fs::remove_file(&saved).unwrap();

    // Wrong checksum: refused, nothing left behind.
    let m = manifest(dir.path(), &serve(body.clone(), 1), &"0".repeat(64));
    let o = agent(&["model", "fetch", "tiny", "--manifest", &m, "--dir", &dest_s]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("checksum mismatch") && stderr(&o).contains(&sha),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_dir(&dest).unwrap().count(),
        0,
        "no partial file left"
    );

    // Unpinned: refused unless trusted, and the checksum to pin is printed.
    let m = manifest(dir.path(), &serve(body.clone(), 2), "");
    let o = agent(&["model", "fetch", "tiny", "--manifest", &m, "--dir", &dest_s]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("no pinned sha256") && stderr(&o).contains(&sha),
        "{}",
        stderr(&o)
    );
    let o = agent(&[
        "model",
        "fetch",
        "tiny",
        "--manifest",
        &m,
        "--dir",
        &dest_s,
        "--trust-unpinned",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Unreachable server: network exit code.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = manifest(dir.path(), &format!("http://127.0.0.1:{port}/x"), &sha);
    let o = agent(&["model", "fetch", "tiny", "--manifest", &m, "--dir", &dest_s]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));

    // Unknown name: usage error listing what exists.
    let o = agent(&["model", "fetch", "nope", "--manifest", &m]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("tiny"));
}

#[test]
fn both_binaries_print_their_version() {
    let o = agent(&["--version"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).trim(),
        format!("edge-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let o = Command::new(env!("CARGO_BIN_EXE_edge-sink"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).trim(),
        format!("edge-sink {}", env!("CARGO_PKG_VERSION"))
    );
}
