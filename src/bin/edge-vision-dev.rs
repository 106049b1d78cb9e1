//! `edge-vision-dev`: developer and benchmark tools (feature `testkit`; not in the device
//! package). Argument parsing and one call into `edge_vision::testkit::bench` per subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_vision::agent::commands::ModelChoice;
use edge_vision::testkit::bench::{self, DevError, Fill};

#[derive(Parser)]
#[command(
    name = "edge-vision-dev",
    version,
    about = "edge-vision developer tools: benchmarks and synthetic data"
)]
struct Cli {
    /// Worker threads for inference (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time the detector: the forward pass on one image, or whole detections over a set.
    Bench {
        #[command(flatten)]
        model: ModelChoice,
        /// Image to run on.
        #[arg(long, required_unless_present = "images")]
        image: Option<PathBuf>,
        /// Instead of --image: decode every image of this directory (or glob) first, then time
        /// whole detections (letterbox, forward, NMS) over them: the bare-inference baseline
        /// for `edge-agent run`'s pipeline fps.
        #[arg(long, conflicts_with = "image")]
        images: Option<String>,
        /// Timed runs (passes over the set with --images).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long)]
        json: bool,
    },
    /// Outbox tools.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// The sink against a raw COPY of the same rows (drops and re-creates two scratch
    /// databases, `edge_sink_bench` and `edge_sink_bench_copy`, on --server).
    SinkBench {
        #[arg(long)]
        brokers: String,
        /// An existing, empty topic.
        #[arg(long)]
        topic: String,
        /// Server to create the two scratch databases on (libpq string without dbname).
        #[arg(long, default_value = "host=127.0.0.1 user=postgres")]
        server: String,
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Enqueue synthetic detection events (tests, benchmarks, demos).
    Fill(Fill),
    /// The uplink's baseline: every payload of an outbox through a bare rdkafka producer (same
    /// client settings, no outbox bookkeeping, nothing deleted), timed.
    RawSend {
        #[arg(long)]
        outbox: PathBuf,
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
    },
}

fn main() -> ExitCode {
    edge_vision::exit::main("edge-vision-dev", "warn", || dispatch(Cli::parse()))
}

fn dispatch(cli: Cli) -> Result<u8, DevError> {
    if let Some(n) = cli.threads {
        edge_vision::agent::commands::set_threads(n).map_err(DevError::Usage)?;
    }
    match cli.command {
        Command::Bench {
            model,
            image,
            images,
            runs,
            warmup,
            json,
        } => match (images, image) {
            (Some(pattern), _) => bench::detector_frames(&model, &pattern, runs),
            (None, Some(image)) => bench::detector(&model, &image, runs, warmup, json),
            (None, None) => Err(DevError::Usage("--image or --images".into())),
        },
        Command::Outbox {
            command: OutboxCommand::Fill(fill),
        } => bench::outbox_fill(&fill),
        Command::Outbox {
            command:
                OutboxCommand::RawSend {
                    outbox,
                    brokers,
                    topic,
                },
        } => bench::outbox_raw_send(&outbox, &brokers, &topic),
        Command::SinkBench {
            brokers,
            topic,
            server,
            events,
            batch_size,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let report = rt.block_on(bench::sink(&brokers, &topic, &server, events, batch_size))?;
            println!("{report}");
            Ok(edge_vision::exit::OK)
        }
    }
}
