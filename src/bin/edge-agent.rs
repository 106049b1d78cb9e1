//! `edge-agent`: the device agent's command line. Thin: the work is in the library.
//!
//! Exit codes: 0 success; 1 internal error; 2 bad usage or configuration; 3 bad input (a model
//! or image that cannot be used; `detect` still processes the other images); 4 network (fetch).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::{Arc, Mutex};

use edge_vision::detect::{self, Detector, DetectorConfig};
use edge_vision::event::{Event, FrameSize, ModelRef, Object};
use edge_vision::outbox::{Durability, Outbox, OutboxConfig};
use edge_vision::settings;
use edge_vision::uplink::{self, UplinkConfig, UplinkStatus};

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Edge vision agent: YOLOv8 detection in Candle"
)]
struct Cli {
    /// Worker threads for inference (default: all cores; `run` also reads detector.threads).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Configuration file (default: /etc/edge-agent/agent.toml when it exists). Environment
    /// variables EDGE_AGENT__SECTION__KEY override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model file (safetensors: imported checkpoint or lmz/candle-yolo-v8 naming).
    #[arg(long)]
    model: PathBuf,
    /// Class names file (one per line), for models that carry none.
    #[arg(long)]
    names: Option<PathBuf>,
    /// Network input side: 640 (default), 320, 416, 480, 512, ... (multiple of 32).
    #[arg(long, default_value_t = 640)]
    size: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: frames -> detector -> outbox -> Kafka, until SIGTERM (or the end of a
    /// finite image source).
    Run {
        /// Print one JSON line per committed event (seq, kind, detections, origin).
        #[arg(long)]
        progress: bool,
    },
    /// List the cameras the system offers.
    Cameras,
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The local picture without the agent's help: outbox depth, oldest pending event, last
    /// delivery, camera and uplink state as the running agent last wrote them.
    Status {
        /// Outbox to read (default: outbox.path of the configuration).
        #[arg(long)]
        outbox: Option<PathBuf>,
    },
    /// Detect objects in images.
    Detect {
        #[command(flatten)]
        model: ModelArgs,
        /// Minimum confidence.
        #[arg(long, default_value_t = 0.25)]
        conf: f32,
        /// NMS IoU threshold.
        #[arg(long, default_value_t = 0.45)]
        iou: f32,
        /// One JSON object per image per line.
        #[arg(long)]
        json: bool,
        /// Write each image with boxes drawn into this directory.
        #[arg(long)]
        annotate: Option<PathBuf>,
        /// Images (JPEG or PNG).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Time the forward pass after warm-up.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Image to run on.
        #[arg(long, required_unless_present = "images")]
        image: Option<PathBuf>,
        /// Instead of --image: decode every image of this directory (or glob) first, then time
        /// whole detections (letterbox, forward, NMS) over them: the bare-inference baseline
        /// for `run`'s pipeline fps.
        #[arg(long, conflicts_with = "image")]
        images: Option<String>,
        /// Timed runs.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long)]
        json: bool,
    },
    /// Model files: import, fetch, inspect.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// The store-and-forward outbox and its Kafka uplink.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective values (secrets masked).
    Check,
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Enqueue synthetic detection events (tests, benchmarks, demos).
    Fill {
        #[arg(long)]
        outbox: PathBuf,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        #[arg(long, default_value = "synthetic-device")]
        device_id: String,
        /// Events per transaction (group commit).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Share of events that carry detections.
        #[arg(long, default_value_t = 0.5)]
        detection_ratio: f64,
        /// Outbox cap in bytes.
        #[arg(long, default_value_t = 512 * 1024 * 1024)]
        max_bytes: u64,
        /// fsync per commit (`full`) or per checkpoint (`normal`).
        #[arg(long, default_value = "full")]
        durability: String,
        /// Print `acked SEQ` after every committed batch (crash tests read it).
        #[arg(long)]
        progress: bool,
        #[arg(long)]
        json: bool,
    },
    /// Drain the outbox to Kafka until stopped (SIGTERM/SIGINT) or, with --exit-when-empty,
    /// until it is empty.
    Drain {
        #[arg(long)]
        outbox: PathBuf,
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        exit_when_empty: bool,
        #[arg(long, default_value_t = 30_000)]
        message_timeout_ms: u32,
        /// Bandwidth cap, payload bytes per second.
        #[arg(long)]
        max_bytes_per_sec: Option<u64>,
        /// Oldest first instead of live-first.
        #[arg(long)]
        fifo: bool,
        #[arg(long, default_value_t = 5000)]
        max_in_flight: usize,
        #[arg(long, default_value_t = 512 * 1024 * 1024)]
        max_bytes: u64,
    },
    /// Benchmark baseline: send every payload of an outbox with a bare rdkafka producer (same
    /// client settings, no outbox bookkeeping, nothing deleted) and time it.
    RawSend {
        #[arg(long)]
        outbox: PathBuf,
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
    },
    /// Print the outbox's depth, size and counters (reads the file; the agent need not run).
    Status {
        #[arg(long)]
        outbox: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Convert an Ultralytics training checkpoint (.pt) to safetensors, natively.
    Import {
        checkpoint: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Download a model listed in the manifest.
    Fetch {
        name: String,
        /// Directory to save into.
        #[arg(long, default_value = "models")]
        dir: PathBuf,
        /// Manifest to read instead of the embedded one.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Keep a download whose manifest entry has no sha256 yet.
        #[arg(long)]
        trust_unpinned: bool,
    },
    /// List the models the manifest offers.
    List {
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Print what a model file holds.
    Info {
        model: PathBuf,
        #[arg(long)]
        names: Option<PathBuf>,
    },
}

/// An error with the exit code it should produce.
struct Fail(u8, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(1, e.into())
    }
}

fn input<E: Into<anyhow::Error>>(e: E) -> Fail {
    Fail(3, e.into())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("edge-agent: cannot set {n} threads: {e}");
            return ExitCode::from(2);
        }
    }
    let config = cli.config.clone();
    match run(cli.command, config.as_deref(), cli.threads) {
        Ok(code) => ExitCode::from(code),
        Err(Fail(code, e)) => {
            eprintln!("edge-agent: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn load(m: &ModelArgs, conf: f32, iou: f32) -> Result<Detector, Fail> {
    let config = DetectorConfig {
        input_size: m.size,
        conf,
        iou,
        ..DetectorConfig::default()
    };
    let device = candle_core::Device::Cpu;
    Detector::load(&m.model, m.names.as_deref(), &device, config).map_err(|e| match e {
        detect::LoadError::Config(e) => Fail(2, e.into()),
        other => input(other),
    })
}

/// Loads and validates the agent's configuration; errors exit with 2.
fn load_config(file: Option<&Path>) -> Result<edge_vision::agent::AgentConfig, Fail> {
    let loaded = settings::load::<edge_vision::agent::AgentConfig>(
        settings::AGENT,
        file,
        &settings::process_env(),
    )
    .map_err(|e| Fail(2, e.into()))?;
    let origin = match &loaded.file {
        Some(f) if loaded.env_vars.is_empty() => format!("file {}", f.display()),
        Some(f) => format!(
            "file {} or environment {}",
            f.display(),
            loaded.env_vars.join(", ")
        ),
        None if loaded.env_vars.is_empty() => "embedded defaults".into(),
        None => format!("environment {}", loaded.env_vars.join(", ")),
    };
    loaded
        .config
        .validate(&origin)
        .map_err(|e| Fail(2, e.into()))?;
    Ok(loaded.config)
}

fn run(command: Command, config: Option<&Path>, threads: Option<usize>) -> Result<u8, Fail> {
    match command {
        Command::Run { progress } => run_agent(config, threads, progress),
        Command::Cameras => {
            let cams = edge_vision::source::list_cameras()
                .map_err(|e| Fail(1, anyhow::anyhow!("listing cameras: {e}")))?;
            if cams.is_empty() {
                eprintln!("edge-agent: no cameras found");
            }
            for c in cams {
                println!("{c}");
            }
            Ok(0)
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let cfg = load_config(config)?;
            let text = settings::printable(&cfg)
                .map_err(|e| Fail(1, anyhow::anyhow!("printing the configuration: {e}")))?;
            println!("{text}");
            eprintln!("edge-agent: configuration is valid");
            Ok(0)
        }
        Command::Status { outbox } => {
            let path = match outbox {
                Some(p) => p,
                None => load_config(config)?.outbox.path,
            };
            status(&path)
        }
        Command::Detect {
            model,
            conf,
            iou,
            json,
            annotate,
            images,
        } => {
            let det = load(&model, conf, iou)?;
            if let Some(dir) = &annotate {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut failed = 0;
            for path in &images {
                match det.detect_file(path) {
                    Ok((img, result)) => {
                        print_result(path, &result, json)?;
                        if let Some(dir) = &annotate {
                            let out = annotated_path(dir, path);
                            detect::annotate::annotate(&img, &result.detections)
                                .save(&out)
                                .with_context(|| format!("writing {}", out.display()))?;
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("edge-agent: {e}");
                    }
                }
            }
            Ok(if failed > 0 { 3 } else { 0 })
        }
        Command::Bench {
            model,
            image,
            images,
            runs,
            warmup,
            json,
        } => {
            let det = load(&model, 0.25, 0.45)?;
            if let Some(pattern) = images {
                return bench_frames(&det, &pattern, runs);
            }
            let image = image.ok_or_else(|| Fail(2, anyhow::anyhow!("--image or --images")))?;
            let img =
                detect::image_io::load_image(&image, det.config().max_pixels).map_err(input)?;
            let (tensor, _) = det.prepare(&img)?;
            for _ in 0..warmup {
                det.forward(&tensor)?;
            }
            let mut times = Vec::with_capacity(runs);
            for _ in 0..runs.max(1) {
                let t = Instant::now();
                det.forward(&tensor)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
            let out = serde_json::json!({
                "median_ms": round2(pick(0.5)),
                "p90_ms": round2(pick(0.9)),
                "runs": times.len(),
                "threads": rayon::current_num_threads(),
            });
            if json {
                println!("{out}");
            } else {
                println!(
                    "{} ({} classes, size {}, input {}): median {:.1} ms, p90 {:.1} ms over {} runs, {} threads",
                    model.model.display(),
                    det.names().len(),
                    det.size(),
                    model.size,
                    pick(0.5),
                    pick(0.9),
                    times.len(),
                    rayon::current_num_threads()
                );
            }
            Ok(0)
        }
        Command::Model { command } => model_command(command),
        Command::Outbox { command } => outbox_command(command),
    }
}

fn open_outbox(
    path: &Path,
    max_bytes: u64,
    durability: Durability,
    device: &str,
) -> Result<Outbox, Fail> {
    let mut cfg = OutboxConfig::new(path, device);
    cfg.max_bytes = max_bytes;
    cfg.durability = durability;
    let (outbox, report) = Outbox::open(cfg).map_err(|e| Fail(3, e.into()))?;
    if let Some(q) = report.quarantined {
        eprintln!(
            "edge-agent: outbox {} was corrupt; moved to {}",
            path.display(),
            q.display()
        );
    }
    Ok(outbox)
}

/// Bytes this process has written (`/proc/self/io`): to storage, and through write calls.
fn io_written() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    (field("write_bytes:"), field("wchar:"))
}

fn outbox_command(command: OutboxCommand) -> Result<u8, Fail> {
    match command {
        OutboxCommand::Fill {
            outbox,
            count,
            device_id,
            batch,
            detection_ratio,
            max_bytes,
            durability,
            progress,
            json,
        } => {
            let durability = match durability.as_str() {
                "full" => Durability::Full,
                "normal" => Durability::Normal,
                other => {
                    return Err(Fail(
                        2,
                        anyhow::anyhow!("--durability must be full or normal, not {other}"),
                    ))
                }
            };
            let mut ob = open_outbox(&outbox, max_bytes, durability, &device_id)?;
            let (disk0, wchar0) = io_written();
            let start = Instant::now();
            let mut done = 0u64;
            while done < count {
                let n = (batch as u64).min(count - done);
                let mut events: Vec<Event> = (done..done + n)
                    .map(|i| synthetic_event(&device_id, i, detection_ratio))
                    .collect();
                let seqs = ob.enqueue(&mut events)?;
                done += n;
                if progress {
                    if let Some(last) = seqs.last() {
                        use std::io::Write;
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "acked {last}")?;
                        out.flush()?;
                    }
                }
            }
            let secs = start.elapsed().as_secs_f64();
            let (disk1, wchar1) = io_written();
            let stats = ob.stats()?;
            let out = serde_json::json!({
                "enqueued": count,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "events_per_sec": (count as f64 / secs).round(),
                "disk_bytes_per_event": ((disk1 - disk0) as f64 / count as f64).round(),
                "written_bytes_per_event": ((wchar1 - wchar0) as f64 / count as f64).round(),
                "depth": stats.depth,
                "file_bytes": stats.file_bytes,
                "evictions": stats.evictions,
            });
            if json {
                println!("{out}");
            } else {
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            Ok(0)
        }
        OutboxCommand::Drain {
            outbox,
            brokers,
            topic,
            exit_when_empty,
            message_timeout_ms,
            max_bytes_per_sec,
            fifo,
            max_in_flight,
            max_bytes,
        } => {
            let ob = open_outbox(&outbox, max_bytes, Durability::Full, "drain")?;
            let mut cfg = UplinkConfig::new(&brokers, &topic);
            cfg.message_timeout_ms = message_timeout_ms;
            cfg.max_bytes_per_sec = max_bytes_per_sec;
            cfg.live_first = !fifo;
            cfg.max_in_flight = max_in_flight;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let (status_tx, status_rx) = tokio::sync::watch::channel(UplinkStatus::default());
            let start = Instant::now();
            rt.block_on(async move {
                tokio::spawn(async move {
                    edge_vision::notify::terminated().await;
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
                })
            );
            Ok(0)
        }
        OutboxCommand::RawSend {
            outbox,
            brokers,
            topic,
        } => {
            use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
            let ob = open_outbox(&outbox, u64::MAX / 4, Durability::Full, "raw-send")?;
            let rows = ob.next_batch(u32::MAX as usize, &std::collections::HashSet::new(), None)?;
            let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
                uplink::client_config(&UplinkConfig::new(&brokers, &topic))?.create()?;
            let start = Instant::now();
            for r in &rows {
                let mut rec = BaseRecord::to(&topic)
                    .key(r.device_id.as_bytes())
                    .payload(&r.payload);
                loop {
                    match producer.send(rec) {
                        Ok(()) => break,
                        Err((e, back))
                            if e.rdkafka_error_code()
                                == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                        {
                            rec = back;
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        Err((e, _)) => return Err(Fail(1, e.into())),
                    }
                }
            }
            producer.flush(rdkafka::util::Timeout::After(
                std::time::Duration::from_secs(300),
            ))?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({"sent": rows.len(), "seconds": (secs * 1000.0).round() / 1000.0, "msgs_per_sec": (rows.len() as f64 / secs).round()})
            );
            Ok(0)
        }
        OutboxCommand::Status { outbox } => {
            if !outbox.exists() {
                return Err(Fail(
                    3,
                    anyhow::anyhow!("no outbox at {}", outbox.display()),
                ));
            }
            let ob = open_outbox(&outbox, u64::MAX / 4, Durability::Full, "status")?;
            let st = ob.stats()?;
            let age = st
                .oldest_created_ms
                .map(|t| (chrono::Utc::now().timestamp_millis() - t) as f64 / 1000.0);
            let mut v = serde_json::to_value(&st)?;
            v["oldest_pending_age_s"] = serde_json::json!(age);
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
    }
}

/// Deterministic synthetic event `i`: a share of them carry 1-3 detections with varying
/// confidence.
fn synthetic_event(device: &str, i: u64, detection_ratio: f64) -> Event {
    let with = ((i * 7919) % 1000) as f64 / 1000.0 < detection_ratio;
    let detections = if with {
        (0..1 + i % 3)
            .map(|k| Object {
                label: "person".into(),
                class_id: 0,
                confidence: 0.25 + ((i * 31 + k * 17) % 75) as f32 / 100.0,
                bbox: [10.0 * k as f32, 20.0, 110.0 + k as f32, 300.0],
            })
            .collect()
    } else {
        Vec::new()
    };
    Event::detection(
        device,
        ModelRef {
            name: "synthetic".into(),
            sha256: "0".repeat(64),
        },
        FrameSize {
            width: 1280,
            height: 720,
        },
        detections,
    )
}

fn model_command(command: ModelCommand) -> Result<u8, Fail> {
    match command {
        ModelCommand::Import { checkpoint, output } => {
            let summary = detect::import::import_checkpoint(&checkpoint, &output).map_err(input)?;
            // Prove the output loads as a detector before calling it done.
            let det = Detector::load(
                &output,
                None,
                &candle_core::Device::Cpu,
                DetectorConfig::default(),
            )
            .map_err(|e| Fail(1, anyhow::anyhow!("imported file does not load back: {e}")))?;
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
            Ok(0)
        }
        ModelCommand::Fetch {
            name,
            dir,
            manifest,
            trust_unpinned,
        } => {
            let entries = read_manifest(manifest.as_deref())?;
            let entry = edge_vision::fetch::find(&entries, &name).map_err(|e| Fail(2, e.into()))?;
            eprintln!(
                "fetching {} ({}), licence: {}",
                entry.name, entry.description, entry.licence
            );
            let path = edge_vision::fetch::fetch(entry, &dir, trust_unpinned, true).map_err(
                |e| match e {
                    edge_vision::fetch::FetchError::Download { .. } => Fail(4, e.into()),
                    other => Fail(3, other.into()),
                },
            )?;
            println!("{}", path.display());
            Ok(0)
        }
        ModelCommand::List { manifest } => {
            for e in read_manifest(manifest.as_deref())? {
                let pin = if e.sha256.is_empty() {
                    "unpinned"
                } else {
                    "sha256 pinned"
                };
                println!("{:<16} {} [{}; {}]", e.name, e.description, e.licence, pin);
            }
            Ok(0)
        }
        ModelCommand::Info { model, names } => {
            let det = Detector::load(
                &model,
                names.as_deref(),
                &candle_core::Device::Cpu,
                DetectorConfig::default(),
            )
            .map_err(input)?;
            println!("{}", serde_json::to_string_pretty(det.info())?);
            Ok(0)
        }
    }
}

fn read_manifest(path: Option<&Path>) -> Result<Vec<edge_vision::fetch::ManifestEntry>, Fail> {
    match path {
        None => edge_vision::fetch::parse_manifest(
            edge_vision::fetch::EMBEDDED_MANIFEST,
            "embedded manifest",
        )
        .map_err(|e| Fail(1, e.into())),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Fail(2, anyhow::anyhow!("manifest {}: {e}", p.display())))?;
            edge_vision::fetch::parse_manifest(&text, &p.display().to_string())
                .map_err(|e| Fail(2, e.into()))
        }
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn annotated_path(dir: &Path, image: &Path) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    dir.join(format!("{stem}.annotated.png"))
}

fn print_result(path: &Path, r: &detect::ImageResult, json: bool) -> Result<(), Fail> {
    if json {
        let dets: Vec<_> = r
            .detections
            .iter()
            .map(|d| {
                serde_json::json!({
                    "label": d.label,
                    "class_id": d.class_id,
                    "confidence": (d.confidence as f64 * 1000.0).round() / 1000.0,
                    "bbox": d.bbox.map(|v| (v as f64 * 10.0).round() / 10.0),
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
    } else {
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
    Ok(())
}

/// `edge-agent run`.
fn run_agent(config: Option<&Path>, threads: Option<usize>, progress: bool) -> Result<u8, Fail> {
    let cfg = load_config(config)?;
    let device_id = cfg
        .resolve_device_id(Path::new("/etc/machine-id"))
        .map_err(|e| Fail(2, e.into()))?;
    if threads.is_none() && cfg.detector.threads > 0 {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.detector.threads)
            .build_global()
        {
            return Err(Fail(2, anyhow::anyhow!("detector.threads: {e}")));
        }
    }
    let source = edge_vision::agent::source_factory(&cfg).map_err(|e| match e {
        edge_vision::source::SourceError::Config(_) => Fail(2, e.into()),
        other => Fail(1, other.into()),
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
            rt.block_on(edge_vision::notify::terminated());
            let _ = stop_tx.send(true);
        })?;
    let watchdog = edge_vision::notify::watchdog_interval();
    let on_commit: Option<edge_vision::agent::CommitHook> = if progress {
        Some(Box::new(|lines: &[edge_vision::agent::Committed]| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for l in lines {
                if let Ok(s) = serde_json::to_string(l) {
                    let _ = writeln!(out, "{s}");
                }
            }
            let _ = out.flush();
        }))
    } else {
        None
    };
    let stall_after = Some(cfg.watchdog.stall_ms)
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
        .or(watchdog)
        .unwrap_or(std::time::Duration::from_secs(60));
    let control = edge_vision::agent::Control {
        stop: stop_rx,
        on_commit,
        notifier: edge_vision::notify::Notifier::from_env(),
        heartbeat: watchdog
            .map(|w| w / 2)
            .unwrap_or(std::time::Duration::from_secs(1))
            .min(stall_after / 2)
            .max(std::time::Duration::from_millis(50)),
        stall_after,
    };
    let report = edge_vision::agent::run(cfg, device_id, source, control)
        .map_err(|e| Fail(e.exit_code(), e.into()))?;
    eprintln!("{}", serde_json::to_string(&report)?);
    Ok(0)
}

/// `edge-agent status`.
fn status(path: &Path) -> Result<u8, Fail> {
    if !path.exists() {
        return Err(Fail(3, anyhow::anyhow!("no outbox at {}", path.display())));
    }
    let ob = open_outbox(path, u64::MAX / 4, Durability::Full, "status")?;
    let st = ob.stats()?;
    let now = chrono::Utc::now().timestamp_millis();
    let age = |t: Option<i64>| t.map(|t| (now - t) as f64 / 1000.0);
    let state: Option<edge_vision::agent::AgentState> =
        std::fs::read(edge_vision::agent::state_file_path(path))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let running = state.as_ref().is_some_and(|s| {
        now - s.updated_ms < 15_000 && Path::new(&format!("/proc/{}", s.pid)).exists()
    });
    let out = serde_json::json!({
        "outbox": path.display().to_string(),
        "depth": st.depth,
        "file_bytes": st.file_bytes,
        "oldest_pending_age_s": age(st.oldest_created_ms),
        "last_delivery_age_s": age(st.last_ack_ms),
        "evictions": st.evictions,
        "dead_letters": st.dead_letters,
        "agent_running": running,
        "source_up": state.as_ref().map(|s| s.source_up),
        "uplink_state": state.as_ref().and_then(|s| s.uplink_state),
        "state_age_s": state.as_ref().map(|s| (now - s.updated_ms) as f64 / 1000.0),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

/// `bench --images`: whole detections over decoded frames, `passes` times over the set.
fn bench_frames(det: &Detector, pattern: &str, passes: usize) -> Result<u8, Fail> {
    let files = edge_vision::source::list_images(pattern).map_err(|e| Fail(2, e.into()))?;
    let frames: Vec<_> = files
        .iter()
        .map(|f| detect::image_io::load_image(f, det.config().max_pixels).map_err(input))
        .collect::<Result<_, _>>()?;
    if frames.is_empty() {
        return Err(Fail(2, anyhow::anyhow!("no images match {pattern}")));
    }
    det.detect(&frames[0]).map_err(input)?; // warm-up
    let start = Instant::now();
    let mut n = 0u64;
    for _ in 0..passes.max(1) {
        for f in &frames {
            det.detect(f).map_err(input)?;
            n += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "frames": n,
            "seconds": round2(secs),
            "fps": round2(n as f64 / secs),
            "threads": rayon::current_num_threads(),
        })
    );
    Ok(0)
}
