//! `edge-agent`: the device agent's command line. Argument parsing and one call into
//! `edge_vision::agent::commands` per subcommand; exit codes are `edge_vision::exit`'s.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_vision::agent::commands::{self, CommandError, ModelChoice};
use edge_vision::agent::uplink::UplinkConfig;

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
        model: ModelChoice,
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

fn main() -> ExitCode {
    edge_vision::exit::main("edge-agent", "warn", || dispatch(Cli::parse()))
}

fn dispatch(cli: Cli) -> Result<u8, CommandError> {
    if let Some(n) = cli.threads {
        commands::set_threads(n).map_err(CommandError::Usage)?;
    }
    let config = cli.config.as_deref();
    match cli.command {
        Command::Run { progress } => commands::run(config, cli.threads, progress),
        Command::Cameras => commands::cameras(),
        Command::Config {
            command: ConfigCommand::Check,
        } => commands::config_check(config),
        Command::Status { outbox } => commands::status(config, outbox),
        Command::Detect {
            model,
            conf,
            iou,
            json,
            annotate,
            images,
        } => commands::detect(&model, conf, iou, json, annotate.as_deref(), &images),
        Command::Model { command } => match command {
            ModelCommand::Import { checkpoint, output } => {
                commands::model_import(&checkpoint, &output)
            }
            ModelCommand::Fetch {
                name,
                dir,
                manifest,
                trust_unpinned,
            } => commands::model_fetch(&name, &dir, manifest.as_deref(), trust_unpinned),
            ModelCommand::List { manifest } => commands::model_list(manifest.as_deref()),
            ModelCommand::Info { model, names } => commands::model_info(&model, names.as_deref()),
        },
        Command::Outbox { command } => match command {
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
                let mut cfg = UplinkConfig::new(&brokers, &topic);
                cfg.message_timeout_ms = message_timeout_ms;
                cfg.max_bytes_per_sec = max_bytes_per_sec;
                cfg.live_first = !fifo;
                cfg.max_in_flight = max_in_flight;
                commands::outbox_drain(&outbox, max_bytes, cfg, exit_when_empty)
            }
            OutboxCommand::Status { outbox } => commands::outbox_status(&outbox),
        },
    }
}
