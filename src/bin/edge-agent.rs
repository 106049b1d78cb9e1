//! `edge-agent`: the device agent's command line. Thin: the work is in the library.
//!
//! Exit codes: 0 success; 1 internal error; 2 bad usage or configuration; 3 bad input (a model
//! or image that cannot be used; `detect` still processes the other images); 4 network (fetch).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_vision::detect::{self, Detector, DetectorConfig};

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Edge vision agent: YOLOv8 detection in Candle"
)]
struct Cli {
    /// Worker threads for inference (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
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
        #[arg(long)]
        image: PathBuf,
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
    match run(cli.command) {
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

fn run(command: Command) -> Result<u8, Fail> {
    match command {
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
            runs,
            warmup,
            json,
        } => {
            let det = load(&model, 0.25, 0.45)?;
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
    }
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
