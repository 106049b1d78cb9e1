//! Each subcommand of `edge-agent` as one library call; the binary only parses arguments.
//! Every function returns the exit code it succeeded with, or a [`CommandError`] that knows
//! its own (see [`crate::exit`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::detect::fetch::{self, FetchError, ManifestEntry};
use super::detect::{self, Detector, DetectorConfig, ImageResult, LoadError};
use super::outbox::{read_stats, Durability, OpenError, Outbox, OutboxConfig, ReadError};
use super::source::{self, SourceError};
use super::uplink::{self, UplinkConfig, UplinkError, UplinkStatus};
use super::{AgentConfig, AgentState, CommitHook, Committed, Control, RunError};
use crate::exit::{self, ExitStatus};
use crate::settings::{self, ConfigError, PrintError};

/// Why a command failed; each variant maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Model(#[from] LoadError),
    #[error("{0}")]
    Input(String),
    #[error("outbox: {0}")]
    Outbox(#[from] OpenError),
    #[error("outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    OutboxRead(#[from] ReadError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("uplink: {0}")]
    Uplink(#[from] UplinkError),
    #[error(transparent)]
    Cameras(SourceError),
    #[error(transparent)]
    Print(#[from] PrintError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("output: {0}")]
    Json(#[from] serde_json::Error),
    #[error("imported file does not load back: {0}")]
    ImportCheck(LoadError),
    #[error("writing {path}: {source}")]
    Output {
        path: PathBuf,
        source: image::ImageError,
    },
}

impl ExitStatus for CommandError {
    fn exit_code(&self) -> u8 {
        match self {
            CommandError::Config(_) | CommandError::Usage(_) => exit::USAGE,
            CommandError::Model(LoadError::Config(_)) => exit::USAGE,
            CommandError::Model(_)
            | CommandError::Input(_)
            | CommandError::Outbox(_)
            | CommandError::OutboxRead(_) => exit::INPUT,
            CommandError::Fetch(FetchError::Download { .. }) => exit::NETWORK,
            CommandError::Fetch(FetchError::Manifest { .. } | FetchError::Unknown { .. }) => {
                exit::USAGE
            }
            CommandError::Fetch(_) => exit::INPUT,
            CommandError::Run(e) => e.exit_code(),
            _ => exit::INTERNAL,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CommandError {
    let what = what.into();
    move |source| CommandError::Io { what, source }
}

/// Loads and validates the agent's configuration: embedded defaults, then `file` (or
/// `/etc/edge-agent/agent.toml` when it exists), then `EDGE_AGENT__*` variables.
fn load_config(file: Option<&Path>) -> Result<AgentConfig, ConfigError> {
    let loaded = settings::load::<AgentConfig>(settings::AGENT, file, &settings::process_env())?;
    loaded.config.validate(&loaded.origin())?;
    Ok(loaded.config)
}

/// Which model to load and at what input size (`--model`, `--names`, `--size`).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelChoice {
    /// Model file (safetensors: imported checkpoint or lmz/candle-yolo-v8 naming).
    #[arg(long)]
    pub model: PathBuf,
    /// Class names file (one per line), for models that carry none.
    #[arg(long)]
    pub names: Option<PathBuf>,
    /// Network input side: 640 (default), 320, 416, 480, 512, ... (multiple of 32).
    #[arg(long, default_value_t = 640)]
    pub size: usize,
}

impl ModelChoice {
    /// Loads the detector on the CPU with these thresholds.
    pub fn load(&self, conf: f32, iou: f32) -> Result<Detector, CommandError> {
        let config = DetectorConfig {
            input_size: self.size,
            conf,
            iou,
            ..DetectorConfig::default()
        };
        Ok(Detector::load(
            &self.model,
            self.names.as_deref(),
            &candle_core::Device::Cpu,
            config,
        )?)
    }
}

/// `edge-agent run`: the agent until SIGTERM/SIGINT or the end of a finite source; the run's
/// totals are printed as JSON on stderr.
pub fn run(
    config: Option<&Path>,
    threads: Option<usize>,
    progress: bool,
) -> Result<u8, CommandError> {
    let cfg = load_config(config)?;
    let device_id = cfg.resolve_device_id(Path::new("/etc/machine-id"))?;
    if threads.is_none() && cfg.detector.threads > 0 {
        set_threads(cfg.detector.threads)
            .map_err(|e| CommandError::Usage(format!("detector.threads: {e}")))?;
    }
    let source = super::source_factory(&cfg).map_err(|e| match e {
        SourceError::Config(_) => CommandError::Usage(e.to_string()),
        other => CommandError::Run(RunError::Source(other)),
    })?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Signals on their own small thread: the pipeline's runtime is inside `run`.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(crate::notify::terminated());
            let _ = stop_tx.send(true);
        })
        .map_err(io("starting the signal thread"))?;
    let on_commit: Option<CommitHook> = progress.then(|| {
        Box::new(|lines: &[Committed]| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for l in lines {
                if let Ok(s) = serde_json::to_string(l) {
                    let _ = writeln!(out, "{s}");
                }
            }
            let _ = out.flush();
        }) as CommitHook
    });
    let watchdog = crate::notify::watchdog_interval();
    let stall_after = Some(cfg.watchdog.stall_ms)
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .or(watchdog)
        .unwrap_or(Duration::from_secs(60));
    let control = Control {
        stop: stop_rx,
        on_commit,
        notifier: crate::notify::Notifier::from_env(),
        heartbeat: watchdog
            .map(|w| w / 2)
            .unwrap_or(Duration::from_secs(1))
            .min(stall_after / 2)
            .max(Duration::from_millis(50)),
        stall_after,
    };
    let report = super::run(cfg, device_id, source, control)?;
    eprintln!("{}", serde_json::to_string(&report)?);
    Ok(exit::OK)
}

/// Sizes rayon's global pool (inference threads); once per process.
pub fn set_threads(n: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| format!("cannot set {n} threads: {e}"))
}

/// `edge-agent cameras`: one line per camera the system offers.
pub fn cameras() -> Result<u8, CommandError> {
    let cams = source::list_cameras().map_err(CommandError::Cameras)?;
    if cams.is_empty() {
        eprintln!("edge-agent: no cameras found");
    }
    for c in cams {
        println!("{c}");
    }
    Ok(exit::OK)
}

/// `edge-agent config check`: validates and prints the effective configuration, secrets
/// masked.
pub fn config_check(config: Option<&Path>) -> Result<u8, CommandError> {
    let cfg = load_config(config)?;
    println!("{}", settings::printable(&cfg)?);
    eprintln!("edge-agent: configuration is valid");
    Ok(exit::OK)
}

/// Opens an outbox file for a command (a corrupt one is moved aside and said so).
pub(crate) fn open_outbox(
    path: &Path,
    max_bytes: u64,
    durability: Durability,
    device: &str,
) -> Result<Outbox, CommandError> {
    let mut cfg = OutboxConfig::new(path, device);
    cfg.max_bytes = max_bytes;
    cfg.durability = durability;
    let (outbox, report) = Outbox::open(cfg)?;
    if let Some(q) = report.quarantined {
        eprintln!(
            "edge-agent: outbox {} was corrupt; moved to {}",
            path.display(),
            q.display()
        );
    }
    Ok(outbox)
}

fn age_s(now_ms: i64, t: Option<i64>) -> Option<f64> {
    t.map(|t| (now_ms - t) as f64 / 1000.0)
}

/// `edge-agent status`: outbox depth, oldest pending event, last delivery, and what the
/// running agent last wrote to its state file. `outbox` defaults to the configuration's.
pub fn status(config: Option<&Path>, outbox: Option<PathBuf>) -> Result<u8, CommandError> {
    let path = match outbox {
        Some(p) => p,
        None => load_config(config)?.outbox.path,
    };
    let st = read_stats(&path)?;
    let now = chrono::Utc::now().timestamp_millis();
    let state: Option<AgentState> = std::fs::read(super::state_file_path(&path))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let running = state.as_ref().is_some_and(|s| {
        now - s.updated_ms < 15_000 && Path::new(&format!("/proc/{}", s.pid)).exists()
    });
    let out = serde_json::json!({
        "outbox": path.display().to_string(),
        "depth": st.depth,
        "file_bytes": st.file_bytes,
        "oldest_pending_age_s": age_s(now, st.oldest_created_ms),
        "last_delivery_age_s": age_s(now, st.last_ack_ms),
        "evictions": st.evictions,
        "dead_letters": st.dead_letters,
        "agent_running": running,
        "source_up": state.as_ref().map(|s| s.source_up),
        "uplink_state": state.as_ref().and_then(|s| s.uplink_state),
        "uplink_last_error": state.as_ref().and_then(|s| s.uplink_last_error.clone()),
        "state_age_s": age_s(now, state.as_ref().map(|s| s.updated_ms)),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(exit::OK)
}

/// `edge-agent outbox status`: the outbox file's depth, size and counters.
pub fn outbox_status(path: &Path) -> Result<u8, CommandError> {
    let st = read_stats(path)?;
    let mut v = serde_json::to_value(&st)?;
    v["oldest_pending_age_s"] = serde_json::json!(age_s(
        chrono::Utc::now().timestamp_millis(),
        st.oldest_created_ms
    ));
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(exit::OK)
}

/// `edge-agent outbox drain`: sends an outbox file to Kafka with the agent's uplink until
/// SIGTERM/SIGINT or, with `exit_when_empty`, until it is empty; prints the totals as JSON.
pub fn outbox_drain(
    path: &Path,
    max_bytes: u64,
    cfg: UplinkConfig,
    exit_when_empty: bool,
) -> Result<u8, CommandError> {
    let ob = open_outbox(path, max_bytes, Durability::Full, "drain")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the runtime"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (status_tx, status_rx) = tokio::sync::watch::channel(UplinkStatus::default());
    let start = std::time::Instant::now();
    rt.block_on(async move {
        tokio::spawn(async move {
            crate::notify::terminated().await;
            let _ = stop_tx.send(true);
        });
        uplink::run(
            Arc::new(Mutex::new(ob)),
            cfg,
            stop_rx,
            status_tx,
            exit_when_empty,
        )
        .await
    })?;
    let st = status_rx.borrow().clone();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "delivered": st.delivered,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "msgs_per_sec": (st.delivered as f64 / secs).round(),
            "failed_deliveries": st.failed_deliveries,
            "dead_lettered": st.dead_lettered,
            "producer_rebuilds": st.producer_rebuilds,
            "outbox_depth": st.outbox_depth,
            "last_error": st.last_error,
        })
    );
    Ok(exit::OK)
}

/// `edge-agent detect`: detections per image (a line, or JSON), optionally annotated copies.
/// An image that cannot be used is reported and the others still processed (exit 3).
pub fn detect(
    model: &ModelChoice,
    conf: f32,
    iou: f32,
    json: bool,
    annotate: Option<&Path>,
    images: &[PathBuf],
) -> Result<u8, CommandError> {
    let det = model.load(conf, iou)?;
    if let Some(dir) = annotate {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let mut failed = 0;
    for path in images {
        match det.detect_file(path) {
            Ok((img, result)) => {
                print_result(path, &result, json);
                if let Some(dir) = annotate {
                    let out = annotated_path(dir, path);
                    detect::annotate::annotate(&img, &result.detections)
                        .save(&out)
                        .map_err(|source| CommandError::Output {
                            path: out.clone(),
                            source,
                        })?;
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("edge-agent: {e}");
            }
        }
    }
    Ok(if failed > 0 { exit::INPUT } else { exit::OK })
}

fn annotated_path(dir: &Path, image: &Path) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    dir.join(format!("{stem}.annotated.png"))
}

fn print_result(path: &Path, r: &ImageResult, json: bool) {
    if json {
        let dets: Vec<_> = r
            .detections
            .iter()
            .map(|d| {
                serde_json::json!({
                    "label": d.label,
                    "class_id": d.class_id,
                    "confidence": (f64::from(d.confidence) * 1000.0).round() / 1000.0,
                    "bbox": d.bbox.map(|v| (f64::from(v) * 10.0).round() / 10.0),
                })
            })
            .collect();
        let line = serde_json::json!({
            "image": path.display().to_string(),
            "width": r.width,
            "height": r.height,
            "detections": dets,
            "inference_ms": (r.inference_ms * 10.0).round() / 10.0,
        });
        println!("{line}");
        return;
    }
    println!(
        "{} ({}x{}, {:.1} ms): {} detections",
        path.display(),
        r.width,
        r.height,
        r.inference_ms,
        r.detections.len()
    );
    if !r.detections.is_empty() {
        println!(
            "  {:<16} {:>5} {:>6}  {:>28}",
            "label", "class", "conf", "box x1,y1,x2,y2"
        );
    }
    for d in &r.detections {
        let b = d.bbox;
        println!(
            "  {:<16} {:>5} {:>6.3}  {:>6.1},{:>6.1},{:>6.1},{:>6.1}",
            d.label, d.class_id, d.confidence, b[0], b[1], b[2], b[3]
        );
    }
}

/// `edge-agent model import`: an Ultralytics checkpoint to safetensors, proven to load back.
pub fn model_import(checkpoint: &Path, output: &Path) -> Result<u8, CommandError> {
    let summary = detect::import::import_checkpoint(checkpoint, output)
        .map_err(|e| CommandError::Input(e.to_string()))?;
    let det = Detector::load(
        output,
        None,
        &candle_core::Device::Cpu,
        DetectorConfig::default(),
    )
    .map_err(CommandError::ImportCheck)?;
    println!(
        "imported {} tensors from {} -> {} (YOLOv8{}, {} classes: {}; bn eps {}; ultralytics {})",
        summary.tensors,
        checkpoint.display(),
        output.display(),
        det.size(),
        summary.names.len(),
        summary.names.join(", "),
        summary.bn_eps,
        summary.ultralytics_version.as_deref().unwrap_or("unknown"),
    );
    Ok(exit::OK)
}

/// The embedded manifest, or the one at `path`.
fn read_manifest(path: Option<&Path>) -> Result<Vec<ManifestEntry>, CommandError> {
    match path {
        None => Ok(fetch::parse_manifest(
            fetch::EMBEDDED_MANIFEST,
            "embedded manifest",
        )?),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| CommandError::Usage(format!("manifest {}: {e}", p.display())))?;
            Ok(fetch::parse_manifest(&text, &p.display().to_string())?)
        }
    }
}

/// `edge-agent model fetch`: downloads a manifest model with a checksum; prints its path.
pub fn model_fetch(
    name: &str,
    dir: &Path,
    manifest: Option<&Path>,
    trust_unpinned: bool,
) -> Result<u8, CommandError> {
    let entries = read_manifest(manifest)?;
    let entry = fetch::find(&entries, name)?;
    eprintln!(
        "fetching {} ({}), licence: {}",
        entry.name, entry.description, entry.licence
    );
    let path = fetch::fetch(entry, dir, trust_unpinned, true)?;
    println!("{}", path.display());
    Ok(exit::OK)
}

/// `edge-agent model list`: the models the manifest offers.
pub fn model_list(manifest: Option<&Path>) -> Result<u8, CommandError> {
    for e in read_manifest(manifest)? {
        let pin = if e.sha256.is_empty() {
            "unpinned"
        } else {
            "sha256 pinned"
        };
        println!("{:<16} {} [{}; {}]", e.name, e.description, e.licence, pin);
    }
    Ok(exit::OK)
}

/// `edge-agent model info`: what a model file holds, as JSON.
pub fn model_info(model: &Path, names: Option<&Path>) -> Result<u8, CommandError> {
    let det = Detector::load(
        model,
        names,
        &candle_core::Device::Cpu,
        DetectorConfig::default(),
    )
    .map_err(|e| CommandError::Input(e.to_string()))?;
    println!("{}", serde_json::to_string_pretty(det.info())?);
    Ok(exit::OK)
}
