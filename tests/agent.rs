//! `edge-agent run` and its parts, with real weights, real photos, a real SQLite outbox, a real
//! Kafka-protocol broker (tansu) behind a fault proxy, the real `edge-sink` and a real
//! PostgreSQL.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::broker::{free_port, Broker};
use common::rig::database;
use edge_vision::agent::detect::{Detector, DetectorConfig};
use edge_vision::agent::source::{self, Frame, FrameSource, SourceError};
use edge_vision::agent::{self, AgentConfig, Control, SourceKind};
use edge_vision::settings;
use edge_vision::sink;

const AGENT: &str = env!("CARGO_BIN_EXE_edge-agent");
const SINK: &str = env!("CARGO_BIN_EXE_edge-sink");

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// `n` real frames: the two fixture photos, plain, mirrored and rescaled, as JPEG files.
fn frames_dir(dir: &Path, n: usize) -> PathBuf {
    let out = dir.join("frames");
    std::fs::create_dir_all(&out).unwrap();
    let photos = [
        image::open(common::fixture("bus.jpg")).unwrap(),
        image::open(common::fixture("zidane.jpg")).unwrap(),
    ];
    for i in 0..n {
        let base = &photos[i % 2];
        let img = match (i / 2) % 3 {
            0 => base.clone(),
            1 => base.fliph(),
            _ => base.resize(
                base.width() * 3 / 4,
                base.height() * 3 / 4,
                image::imageops::FilterType::Triangle,
            ),
        };
        img.to_rgb8()
            .save(out.join(format!("frame-{i:03}.jpg")))
            .unwrap();
    }
    out
}

/// An agent configuration file: the example file's defaults with `body` appended as overrides.
fn agent_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn base_config(
    dir: &Path,
    images: &Path,
    brokers: &str,
    topic: &str,
    extra_source: &str,
) -> String {
    format!(
        r#"device_id = "cam-{id}"
[source]
kind = "images"
images = "{images}"
{extra_source}
[detector]
model = "{model}"
input_size = 320
[outbox]
path = "{outbox}"
batch_ms = 20
[uplink]
brokers = "{brokers}"
topic = "{topic}"
message_timeout_ms = 5000
max_backoff_ms = 2000
shutdown_deadline_ms = 15000
[metrics]
listen = ""
"#,
        id = uuid::Uuid::now_v7().simple(),
        images = images.display(),
        model = common::imported_model().display(),
        outbox = dir.join("outbox.sqlite").display(),
    )
}

/// The `--progress` lines of a running agent, collected on a thread.
struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    fn spawn(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(AGENT)
            .args(["--config", config.to_str().unwrap(), "run", "--progress"])
            .envs(env.iter().copied())
            .env("RUST_LOG", "edge_vision=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    l.lock().unwrap().push(v);
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            lines,
            stderr,
        }
    }

    fn committed(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    fn wait_for_lines(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.lines.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "agent committed only {} events; stderr:\n{}",
                self.lines.lock().unwrap().len(),
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn wait(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200)); // let the readers finish
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "agent did not exit in {timeout:?}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn the_example_configs_parse_and_restate_the_defaults() {
    let agent =
        settings::load::<AgentConfig>(settings::AGENT, Some(&repo("systemd/edge-agent.toml")), &[])
            .unwrap();
    assert_eq!(agent.config, AgentConfig::default());
    let sink = settings::load::<sink::SinkConfig>(
        settings::SINK,
        Some(&repo("systemd/edge-sink.toml")),
        &[],
    )
    .unwrap();
    assert_eq!(sink.config, sink::SinkConfig::default());
}

fn config_check(dir: &Path, body: Option<&str>, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(AGENT);
    if let Some(body) = body {
        cmd.args(["--config", agent_config(dir, body).to_str().unwrap()]);
    } else {
        cmd.args(["--config", "/nonexistent/edge-agent/agent.toml"]);
    }
    let out = cmd
        .args(["config", "check"])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `edge-sink --config FILE config check`: exit code and stderr.
fn sink_config_check(file: &Path) -> (Option<i32>, String) {
    let out = Command::new(SINK)
        .arg("--config")
        .arg(file)
        .args(["config", "check"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_name_the_key_and_the_file_or_variable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml").display().to_string();

    let (code, _, err) = config_check(
        dir.path(),
        Some("[uplink]\nbrokers = \"k:9092\"\nlnger_ms = 5\n"),
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&file) && err.contains("lnger_ms") && err.contains("line 3"),
        "{err}"
    );

    let (code, _, err) = config_check(dir.path(), Some("[detector]\ninput_size = \"big\"\n"), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&file) && err.contains("detector.input_size") && err.contains("line 2"),
        "{err}"
    );

    let (code, _, err) = config_check(dir.path(), Some("[detector]\ninput_size = 100\n"), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&file) && err.contains("detector.input_size"),
        "{err}"
    );

    let (code, _, err) = config_check(dir.path(), None, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/edge-agent/agent.toml"), "{err}");

    let (code, _, err) = config_check(
        dir.path(),
        Some("device_id = \"x\"\n"),
        &[("EDGE_AGENT__DETECTOR__CONFIDENCE", "high")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("EDGE_AGENT__DETECTOR__CONFIDENCE"), "{err}");

    // The librdkafka pass-through cannot switch off what deleting on acknowledgement needs.
    for (prop, value) in [("acks", "1"), ("enable.idempotence", "false")] {
        let (code, _, err) = config_check(
            dir.path(),
            Some(&format!("[uplink.librdkafka]\n\"{prop}\" = \"{value}\"\n")),
            &[],
        );
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&file) && err.contains(&format!("uplink.librdkafka.{prop}")),
            "{err}"
        );
    }

    // The sink names its key and file the same way.
    let sink_file = dir.path().join("sink.toml");
    std::fs::write(&sink_file, "brokers = \"k:9092\"\nbatch_sise = 10\n").unwrap();
    let (code, err) = sink_config_check(&sink_file);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("sink.toml") && err.contains("batch_sise") && err.contains("line 2"),
        "{err}"
    );

    // ... nor the sink's what keeping offsets in PostgreSQL needs.
    for (prop, value) in [
        ("enable.auto.commit", "true"),
        ("enable.auto.offset.store", "true"),
        ("partition.assignment.strategy", "cooperative-sticky"),
    ] {
        std::fs::write(
            &sink_file,
            format!("[librdkafka]\n\"{prop}\" = \"{value}\"\n"),
        )
        .unwrap();
        let (code, err) = sink_config_check(&sink_file);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("sink.toml") && err.contains(&format!("librdkafka.{prop}")),
            "{err}"
        );
    }

    // The sink's TLS settings are checked at load: a mode libpq does not have, a CA file
    // that is not there, a password file that is not there.
    for (body, want) in [
        (
            "database_url = \"host=db sslmode=verify_full\"\n",
            "sslmode `verify_full`",
        ),
        (
            "database_url = \"host=db sslmode=verify-full sslrootcert=/nonexistent/ca.pem\"\n",
            "sslrootcert `/nonexistent/ca.pem`: no such file",
        ),
        (
            "database_password_file = \"/nonexistent/pw\"\n",
            "`/nonexistent/pw`",
        ),
    ] {
        std::fs::write(&sink_file, body).unwrap();
        let (code, err) = sink_config_check(&sink_file);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("sink.toml") && err.contains(want), "{err}");
    }

    // A good file with an environment override; secrets masked in the printout.
    let (code, out, err) = config_check(
        dir.path(),
        Some("device_id = \"pi-7\"\n[uplink.librdkafka]\n\"sasl.password\" = \"hunter2\"\n\"client.id\" = \"pi-7\"\n"),
        &[("EDGE_AGENT__UPLINK__BROKERS", "kafka-1:9093")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kafka-1:9093"), "{out}");
    assert!(out.contains("pi-7"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Camera decoding with real encoded frames

/// Drops every DHT segment before the scan, as many webcams' MJPEG does.
fn strip_dht(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        let marker = jpeg[i + 1];
        if marker == 0xDA {
            out.extend_from_slice(&jpeg[i..]);
            return out;
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if marker != 0xC4 {
            out.extend_from_slice(&jpeg[i..i + 2 + len]);
        }
        i += 2 + len;
    }
    panic!("no SOS");
}

/// RGB -> YUYV 4:2:2, BT.601 limited range (what a V4L2 webcam sends), written independently
/// of the decoder under test (floating point, chroma averaged over each pixel pair).
fn to_yuyv(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::with_capacity((img.width() * img.height() * 2) as usize);
    for y in 0..img.height() {
        for x in (0..img.width()).step_by(2) {
            let px = |x| {
                let p = img.get_pixel(x, y).0;
                (p[0] as f64, p[1] as f64, p[2] as f64)
            };
            let (r0, g0, b0) = px(x);
            let (r1, g1, b1) = px(x + 1);
            let luma = |r: f64, g: f64, b: f64| 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
            let (r, g, b) = ((r0 + r1) / 2.0, (g0 + g1) / 2.0, (b0 + b1) / 2.0);
            let u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
            let v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
            for c in [luma(r0, g0, b0), u, luma(r1, g1, b1), v] {
                out.push(c.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

fn detector(size: usize) -> Detector {
    Detector::load(
        common::imported_model(),
        None,
        &candle_core::Device::Cpu,
        DetectorConfig {
            input_size: size,
            ..DetectorConfig::default()
        },
    )
    .unwrap()
}

fn assert_same_people(
    a: &[edge_vision::agent::detect::Detection],
    b: &[edge_vision::agent::detect::Detection],
) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for d in a {
        let best = b
            .iter()
            .map(|e| edge_vision::agent::detect::postprocess::iou(&d.bbox, &e.bbox))
            .fold(0.0, f32::max);
        assert!(best >= 0.9, "{d:?} has no partner with IoU >= 0.9 in {b:?}");
    }
}

#[test]
fn mjpeg_without_huffman_tables_and_yuyv_frames_decode_to_the_same_detections() {
    let photo = image::open(common::fixture("bus.jpg")).unwrap().to_rgb8();
    let det = detector(640);
    let reference = det
        .detect(&image::DynamicImage::ImageRgb8(photo.clone()))
        .unwrap();
    assert!(!reference.detections.is_empty());

    // MJPEG: a real JPEG encoding of the photo, with and without its Huffman tables.
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&photo)
        .unwrap();
    let full = source::decode_mjpeg(&jpeg, 1 << 26).unwrap().to_rgb8();
    let stripped = strip_dht(&jpeg);
    assert!(stripped.len() < jpeg.len() - 400, "the tables were removed");
    let patched = source::decode_mjpeg(&stripped, 1 << 26).unwrap().to_rgb8();
    assert_eq!(
        full.as_raw(),
        patched.as_raw(),
        "standard tables restore the frame exactly"
    );
    let r = det
        .detect(&image::DynamicImage::ImageRgb8(patched))
        .unwrap();
    assert_same_people(&reference.detections, &r.detections);
    assert!(source::decode_mjpeg(b"\xFF\xD8garbage", 1 << 26).is_err());
    assert!(source::decode_mjpeg(b"not a jpeg", 1 << 26).is_err());

    // YUYV.
    let yuyv = to_yuyv(&photo);
    let back = source::decode_yuyv(&yuyv, photo.width(), photo.height()).unwrap();
    let diff: u64 = photo
        .as_raw()
        .iter()
        .zip(back.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).unsigned_abs() as u64)
        .sum();
    let mean = diff as f64 / photo.as_raw().len() as f64;
    assert!(mean < 4.0, "mean abs error {mean}");
    let r = det.detect(&image::DynamicImage::ImageRgb8(back)).unwrap();
    assert_same_people(&reference.detections, &r.detections);
    assert!(source::decode_yuyv(&yuyv[..100], photo.width(), photo.height()).is_err());
}

// ---------------------------------------------------------------------------------------------
// The pipeline in-process: a source that fails and recovers

/// A served frame's id and capture time.
type FrameStamp = (uuid::Uuid, chrono::DateTime<chrono::Utc>);

/// Synthetic frames, then `fail` times Unavailable, then frames again.
struct Flaky {
    inner: source::Synthetic,
    served: u32,
    fail_after: u32,
    failures_left: u32,
    reopens: Arc<Mutex<u32>>,
    /// (id, capture time) of every frame served.
    frames: Arc<Mutex<Vec<FrameStamp>>>,
}

impl FrameSource for Flaky {
    fn next_frame(&mut self) -> Result<Frame, SourceError> {
        if self.served == self.fail_after && self.failures_left > 0 {
            self.failures_left -= 1;
            return Err(SourceError::Unavailable("unplugged (test)".into()));
        }
        self.served += 1;
        let f = self.inner.next_frame()?;
        self.frames.lock().unwrap().push((f.id, f.captured_at));
        Ok(f)
    }
    fn reopen(&mut self) -> Result<(), SourceError> {
        *self.reopens.lock().unwrap() += 1;
        Ok(())
    }
    fn describe(&self) -> String {
        "flaky test source".into()
    }
}

fn outbox_events(path: &Path) -> Vec<edge_vision::event::Event> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare("SELECT payload FROM events ORDER BY seq")
        .unwrap();
    let rows = st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|p| edge_vision::event::decode(&p.unwrap()).unwrap())
        .collect();
    rows
}

#[test]
fn a_source_that_fails_then_recovers_writes_both_health_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::default();
    cfg.source.kind = SourceKind::Synthetic;
    cfg.source.max_frames = 8;
    cfg.source.retry_max_ms = 200;
    cfg.detector.model = common::imported_model().to_path_buf();
    cfg.detector.input_size = 320;
    cfg.outbox.path = dir.path().join("outbox.sqlite");
    cfg.outbox.batch_ms = 10;
    cfg.uplink.brokers = format!("127.0.0.1:{}", free_port()); // nobody listens: offline
    cfg.uplink.shutdown_deadline_ms = 500;
    cfg.metrics.listen = String::new();
    let reopens = Arc::new(Mutex::new(0));
    let frames = Arc::new(Mutex::new(Vec::new()));
    let src = Flaky {
        inner: source::Synthetic::new(320, 240, 20.0),
        served: 0,
        fail_after: 3,
        failures_left: 3,
        reopens: reopens.clone(),
        frames: frames.clone(),
    };
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let report = agent::run(
        cfg.clone(),
        "flaky-1".into(),
        Box::new(move || Ok(Box::new(src) as Box<dyn FrameSource>)),
        Control {
            stop,
            on_commit: None,
            notifier: edge_vision::notify::Notifier::new(None),
            heartbeat: Duration::from_millis(100),
            stall_after: Duration::from_secs(30),
        },
    )
    .unwrap();
    assert_eq!(*reopens.lock().unwrap(), 3, "one reopen per failure");
    let events = outbox_events(&cfg.outbox.path);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"agent_started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"agent_stopping"), "{kinds:?}");
    let lost = kinds
        .iter()
        .position(|k| *k == "camera_lost")
        .expect("camera_lost");
    let back = kinds
        .iter()
        .position(|k| *k == "camera_recovered")
        .expect("camera_recovered");
    assert!(lost < back, "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "camera_lost").count(),
        1,
        "{kinds:?}"
    );
    let detections = kinds.iter().filter(|k| **k == "detection").count() as u64;
    assert_eq!(
        detections, report.frames_processed,
        "one event per processed frame"
    );
    assert_eq!(report.frames_captured, 8);
    assert_eq!(
        report.frames_processed + report.frames_dropped,
        report.frames_captured,
        "{report:?}"
    );
    // Each detection event carries its frame's id and capture time, made once at capture.
    let served = frames.lock().unwrap().clone();
    for e in events.iter().filter(|e| e.kind.as_str() == "detection") {
        assert!(
            served.contains(&(e.event_id, e.captured_at)),
            "event {} is not a served frame's id",
            e.event_id
        );
    }
    // seq is contiguous: nothing was lost between stages.
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

// ---------------------------------------------------------------------------------------------
// The binary, end to end

async fn query_i64(db: &str, sql: &str) -> Vec<i64> {
    let c = sink::connect(db).await.unwrap();
    let row = c.query_one(sql, &[]).await.unwrap();
    (0..row.len()).map(|i| row.get::<_, i64>(i)).collect()
}

fn next_seq(outbox: &Path) -> i64 {
    let c = rusqlite::Connection::open(outbox).unwrap();
    c.query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
        r.get(0)
    })
    .unwrap()
}

/// Image directory -> `edge-agent run` -> broker -> `edge-sink` -> PostgreSQL, with the network
/// cut twice for 20 s and the agent SIGKILLed once: every committed event lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_to_postgres_through_two_cuts_and_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path(), 60);
    let b = Broker::start().await;
    b.create_topic("e2e", 3);
    let db = database().await;
    let sink_metrics = format!("127.0.0.1:{}", free_port());
    let mut sink = Command::new(SINK)
        .args([
            "run",
            "--brokers",
            &b.bootstrap,
            "--topic",
            "e2e",
            "--group",
            "e2e",
            "--database-url",
            &db,
            "--batch-ms",
            "200",
            "--metrics-listen",
            &sink_metrics,
        ])
        .env("RUST_LOG", "edge_vision=debug,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("sink.log")).unwrap())
        .spawn()
        .unwrap();
    let config = agent_config(
        dir.path(),
        &base_config(dir.path(), &frames, &b.bootstrap, "e2e", "fps = 1.5"),
    );
    let device: String = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .split('"')
        .nth(1)
        .unwrap()
        .to_string();

    // Run 1: cut for 20 s after a few events, then SIGKILL mid-stream.
    let mut first = Agent::spawn(&config, &[]);
    first.wait_for_lines(6, Duration::from_secs(60));
    b.proxy.cut();
    tokio::time::sleep(Duration::from_secs(20)).await;
    b.proxy.restore();
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.signal("-KILL");
    assert_eq!(
        first.wait(Duration::from_secs(10)),
        -1,
        "killed by a signal"
    );
    let run1 = first.committed();

    // Run 2: the whole directory again, with another 20 s cut; it ends with the source.
    let mut second = Agent::spawn(&config, &[]);
    second.wait_for_lines(6, Duration::from_secs(60));
    b.proxy.cut();
    tokio::time::sleep(Duration::from_secs(20)).await;
    b.proxy.restore();
    let code = second.wait(Duration::from_secs(120));
    assert_eq!(code, 0, "stderr:\n{}", second.stderr.lock().unwrap());
    let run2 = second.committed();

    // Everything the outbox ever numbered must arrive once: seq 1..next_seq-1, contiguous.
    let outbox = dir.path().join("outbox.sqlite");
    let total = next_seq(&outbox) - 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    let q = format!(
        "SELECT count(*), count(DISTINCT seq), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM events WHERE device_id = '{device}'"
    );
    let mut got = query_i64(&db, &q).await;
    while got[0] < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        got = query_i64(&db, &q).await;
    }
    let (code, metrics) = http_get(&sink_metrics, "/metrics");
    let _ = sink.kill();
    let _ = sink.wait();
    assert_eq!(code, 200);
    let written: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edge_sink_events_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no edge_sink_events_total in\n{metrics}"));
    assert!(written >= total as f64, "{metrics}");
    assert!(
        metrics.contains("edge_sink_batch_seconds_count"),
        "{metrics}"
    );
    let sink_log = std::fs::read_to_string(dir.path().join("sink.log")).unwrap_or_default();
    let tail: Vec<&str> = sink_log.lines().rev().take(40).collect();
    assert_eq!(
        got,
        vec![total, total, 1, total],
        "rows, distinct seqs, min, max\nagent run 2 stderr:\n{}\nsink log (last lines, newest first):\n{}",
        second.stderr.lock().unwrap(),
        tail.join("\n")
    );

    // Detection rows: each reported event with its reported number of objects.
    let reported: HashMap<i64, i64> = run1
        .iter()
        .chain(&run2)
        .filter(|l| l["kind"] == "detection")
        .map(|l| {
            (
                l["seq"].as_i64().unwrap(),
                l["detections"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        run2.iter().filter(|l| l["kind"] == "detection").count(),
        60,
        "the second run processed every frame"
    );
    let c = sink::connect(&db).await.unwrap();
    let rows = c
        .query(
            "SELECT e.seq, count(o.idx) FROM events e LEFT JOIN objects o USING (event_id)
             WHERE e.device_id = $1 AND e.kind = 'detection' GROUP BY e.seq",
            &[&device],
        )
        .await
        .unwrap();
    let in_db: HashMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for (seq, n) in &reported {
        assert_eq!(
            in_db.get(seq),
            Some(n),
            "event seq {seq}: objects in PostgreSQL vs reported"
        );
    }
    // Events committed by run 1 in its last instant (after its last progress line) are in the
    // database but were never reported; at most one batch of them.
    let unreported = in_db.len() - reported.len();
    assert!(unreported <= 64, "{unreported} unreported detection events");
    let last_seen_run1 = run1
        .iter()
        .map(|l| l["seq"].as_i64().unwrap())
        .max()
        .unwrap();
    for seq in in_db.keys().filter(|s| !reported.contains_key(s)) {
        assert!(
            *seq > last_seen_run1,
            "unreported seq {seq} is not in run 1's last batch"
        );
    }
    let objects = query_i64(
        &db,
        &format!("SELECT count(*) FROM objects WHERE device_id = '{device}'"),
    )
    .await[0];
    assert_eq!(objects, in_db.values().sum::<i64>());
    assert!(objects >= 60, "real detections: {objects}");
}

/// SIGTERM while frames flow: exit 0, and every event committed before the signal reaches the
/// broker before the agent exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path(), 6);
    let b = Broker::start().await;
    b.create_topic("term", 1);
    let config = agent_config(
        dir.path(),
        &base_config(
            dir.path(),
            &frames,
            &b.bootstrap,
            "term",
            "fps = 20.0\nloop = true",
        ),
    );
    let mut a = Agent::spawn(&config, &[]);
    a.wait_for_lines(25, Duration::from_secs(90));
    a.signal("-TERM");
    assert_eq!(
        a.wait(Duration::from_secs(60)),
        0,
        "{}",
        a.stderr.lock().unwrap()
    );
    let committed = a.committed();
    let ids: HashSet<String> = committed
        .iter()
        .map(|l| l["event_id"].as_str().unwrap().to_string())
        .collect();
    assert!(committed.iter().any(|l| l["kind"] == "agent_stopping"));
    let seen = b.consume_event_ids("term", 1, ids.len(), Duration::from_secs(30));
    let missing: Vec<_> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} never arrived",
        missing.len(),
        ids.len()
    );
    let report: serde_json::Value = a
        .stderr
        .lock()
        .unwrap()
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("exit report");
    assert_eq!(report["outbox_depth"], 0, "{report}");
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// Started as systemd's `Type=notify` would: READY=1, then WATCHDOG=1 while frames flow; a
/// capture stage blocked on a FIFO stops the pings (and `/healthz` answers 503) until frames
/// flow again.
#[test]
fn watchdog_pings_follow_the_pipeline_heartbeat() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path(), 4);
    let fifo = frames.join("frame-100.jpg");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let body = base_config(
        dir.path(),
        &frames,
        "127.0.0.1:1",
        "t",
        "fps = 2.0\nloop = true",
    )
    .replace("listen = \"\"", &format!("listen = \"{metrics}\""));
    let config = agent_config(dir.path(), &body);
    let mut a = Agent::spawn(
        &config,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    // Collect notifications with their arrival times.
    let t0 = Instant::now();
    let mut got: Vec<(Duration, String)> = Vec::new();
    let recv_for = |d: Duration, got: &mut Vec<(Duration, String)>| {
        let until = Instant::now() + d;
        let mut buf = [0u8; 256];
        while Instant::now() < until {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push((
                    t0.elapsed(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
    };
    // Ready and pinging while the four real frames flow (2 fps: about 2 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !got.iter().any(|(_, m)| m == "WATCHDOG=1") {
        assert!(
            Instant::now() < deadline,
            "no WATCHDOG=1: {got:?}\n{}",
            a.stderr.lock().unwrap()
        );
        recv_for(Duration::from_millis(200), &mut got);
    }
    let ready = got
        .iter()
        .position(|(_, m)| m == "READY=1")
        .expect("READY=1 first");
    let first_ping = got.iter().position(|(_, m)| m == "WATCHDOG=1").unwrap();
    assert!(ready < first_ping, "{got:?}");
    let (code, text) = http_get(&metrics, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "edge_agent_frames_captured_total",
        "edge_agent_inference_seconds_bucket",
        "edge_agent_outbox_depth",
        "edge_agent_uplink_state{state=\"offline\"}",
        "edge_agent_source_up 1",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // Capture now blocks opening the FIFO: after the 1 s stall limit the pings stop.
    recv_for(Duration::from_secs(6), &mut got);
    let since = t0.elapsed() - Duration::from_millis(1500);
    let late: Vec<_> = got
        .iter()
        .filter(|(t, m)| *t > since && m == "WATCHDOG=1")
        .collect();
    assert!(late.is_empty(), "pings while stalled: {got:?}");
    let (code, body) = http_get(&metrics, "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("capture"), "{body}");
    // Unblock with a real frame: pings resume.
    let bus = std::fs::read(common::fixture("bus.jpg")).unwrap();
    let writer = std::thread::spawn(move || std::fs::write(&fifo, bus));
    let before = got.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got[before..].iter().any(|(_, m)| m == "WATCHDOG=1") {
        assert!(Instant::now() < deadline, "pings did not resume: {got:?}");
        recv_for(Duration::from_millis(200), &mut got);
    }
    writer.join().unwrap().unwrap();
    a.signal("-TERM");
    assert_eq!(a.wait(Duration::from_secs(30)), 0);
    recv_for(Duration::from_millis(300), &mut got);
    assert!(got.iter().any(|(_, m)| m == "STOPPING=1"), "{got:?}");
}

/// A camera that is not there: the agent keeps running, records `camera_lost`, and `status`
/// shows it without the agent's help.
/// An uplink that fails mid-run (here: its credential file vanished, so rebuilding the
/// producer after a failed probe fails) is restarted with backoff; meanwhile `/healthz` says
/// so (503) and the metrics count it; once it can start again everything is healthy.
#[test]
fn a_failed_uplink_is_restarted_and_health_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let frames = frames_dir(dir.path(), 4);
    let secret = dir.path().join("kafka-password");
    std::fs::write(&secret, "hunter2\n").unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let body = base_config(
        dir.path(),
        &frames,
        &format!("127.0.0.1:{}", free_port()), // nobody listens: probes fail
        "t",
        "fps = 5.0\nloop = true",
    )
    .replace("listen = \"\"", &format!("listen = \"{metrics}\""))
    .replace("message_timeout_ms = 5000", "message_timeout_ms = 1000")
    .replace("max_backoff_ms = 2000", "max_backoff_ms = 300")
    .replace(
        "[metrics]",
        &format!(
            "[uplink.security]\nsasl_password_file = \"{}\"\n[metrics]",
            secret.display()
        ),
    );
    let config = agent_config(dir.path(), &body);
    let mut a = Agent::spawn(&config, &[]);
    a.wait_for_lines(3, Duration::from_secs(60));
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let wait_until = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "{what}; stderr:\n{}",
                a.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_until("healthy at start", &|| {
        http_get(&metrics, "/healthz").0 == 200
    });
    std::fs::remove_file(&secret).unwrap();
    wait_until("the uplink's failure never showed in /healthz", &|| {
        let (code, body) = http_get(&metrics, "/healthz");
        code == 503 && body.contains("uplink down") && body.contains("kafka-password")
    });
    let (_, text) = http_get(&metrics, "/metrics");
    assert_eq!(metric(&text, "edge_agent_uplink_up"), 0.0, "{text}");
    // It keeps trying (with backoff) while the secret is missing ...
    wait_until("no restart attempts counted", &|| {
        metric(
            &http_get(&metrics, "/metrics").1,
            "edge_agent_uplink_restarts_total",
        ) >= 2.0
    });
    // ... and comes back once it can.
    std::fs::write(&secret, "hunter2\n").unwrap();
    wait_until(
        "the restarted uplink never made /healthz healthy again",
        &|| http_get(&metrics, "/healthz").0 == 200,
    );
    let (_, text) = http_get(&metrics, "/metrics");
    assert_eq!(metric(&text, "edge_agent_uplink_up"), 1.0, "{text}");
    assert!(
        text.contains("edge_agent_uplink_state{state=\"offline\"} 1")
            || text.contains("edge_agent_uplink_state{state=\"online\"} 1"),
        "{text}"
    );
    a.signal("-TERM");
    assert_eq!(
        a.wait(Duration::from_secs(60)),
        0,
        "{}",
        a.stderr.lock().unwrap()
    );
}

#[test]
fn a_missing_camera_is_retried_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.sqlite");
    let config = agent_config(
        dir.path(),
        &format!(
            r#"device_id = "no-cam"
[source]
kind = "camera"
camera = "/dev/video97"
retry_max_ms = 500
[detector]
model = "{}"
input_size = 320
[outbox]
path = "{}"
[uplink]
brokers = "127.0.0.1:1"
[metrics]
listen = ""
"#,
            common::imported_model().display(),
            outbox.display()
        ),
    );
    let mut a = Agent::spawn(&config, &[]);
    a.wait_for_lines(2, Duration::from_secs(60)); // agent_started, camera_lost
    std::thread::sleep(Duration::from_secs(2)); // several retries, and a state file
    assert!(a.child.try_wait().unwrap().is_none(), "still running");
    let lines = a.committed();
    assert_eq!(lines[0]["kind"], "agent_started");
    assert_eq!(lines[1]["kind"], "camera_lost");
    assert_eq!(
        lines.iter().filter(|l| l["kind"] == "camera_lost").count(),
        1
    );
    let out = Command::new(AGENT)
        .args(["--config", config.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["agent_running"], true, "{st}");
    assert_eq!(st["source_up"], false, "{st}");
    assert_eq!(st["uplink_state"], "offline", "{st}");
    assert!(st["depth"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["oldest_pending_age_s"].as_f64().unwrap() > 0.0, "{st}");
    a.signal("-TERM");
    assert_eq!(
        a.wait(Duration::from_secs(30)),
        0,
        "{}",
        a.stderr.lock().unwrap()
    );
}

/// A frame source that cannot work at all (no file matches) is a configuration error (exit 2)
/// naming what was asked for, before anything starts.
#[test]
fn an_image_source_matching_nothing_is_a_clear_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(
        dir.path(),
        &base_config(
            dir.path(),
            &dir.path().join("nothing-here/*.jpg"),
            "127.0.0.1:1",
            "t",
            "",
        ),
    );
    let out = Command::new(AGENT)
        .args(["--config", config.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nothing-here"), "{err}");
    assert!(
        !dir.path().join("outbox.sqlite").exists(),
        "nothing started"
    );
}
