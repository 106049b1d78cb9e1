//! `edge-sink`: Kafka -> PostgreSQL. Thin: the work is in `edge_vision::sink`.
//!
//! Exit codes: 0 success (or stopped by SIGTERM/SIGINT); 1 runtime error; 2 bad usage.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_vision::settings;
use edge_vision::sink::{self, SinkConfig, SinkStatus};

#[derive(Parser)]
#[command(
    name = "edge-sink",
    version,
    about = "Kafka -> PostgreSQL sink for edge-vision events"
)]
struct Cli {
    /// Configuration file (default: /etc/edge-sink/sink.toml when it exists). Environment
    /// variables EDGE_SINK__KEY override it; flags override both.
    #[arg(long, global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the migrations in migrations/ and exit.
    Migrate {
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Consume the topic into PostgreSQL until SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        brokers: Option<String>,
        #[arg(long)]
        topic: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        database_url: Option<String>,
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long)]
        batch_ms: Option<u64>,
        /// `/metrics` address ("" turns it off).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective values (secrets masked).
    Check,
}

/// Loads the layered configuration; errors name the key and the file or variable.
fn load_config(file: Option<&std::path::Path>) -> Result<SinkConfig, settings::ConfigError> {
    let loaded = settings::load::<SinkConfig>(settings::SINK, file, &settings::process_env())?;
    let cfg = loaded.config;
    for (key, empty) in [
        ("brokers", cfg.brokers.is_empty()),
        ("topic", cfg.topic.is_empty()),
        ("group_id", cfg.group_id.is_empty()),
        ("database_url", cfg.database_url.is_empty()),
        ("batch_size", cfg.batch_size == 0),
    ] {
        if empty {
            return Err(settings::ConfigError::Invalid {
                key: key.into(),
                origin: loaded
                    .file
                    .as_ref()
                    .map(|f| format!("file {}", f.display()))
                    .unwrap_or_else(|| "environment".into()),
                message: "must not be empty or zero".into(),
            });
        }
    }
    Ok(cfg)
}

/// A metric read off the status: name, help, getter.
type Field = (&'static str, &'static str, fn(&SinkStatus) -> f64);

/// Serves the sink's metrics from its status channel.
async fn serve_metrics(
    addr: &str,
    status: tokio::sync::watch::Receiver<SinkStatus>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use edge_vision::metrics::Registry;
    let listener = edge_vision::metrics::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let registry = std::sync::Arc::new(Registry::default());
    let fields: [Field; 8] = [
        ("edge_sink_events_total", "Event rows written.", |s| {
            s.events as f64
        }),
        ("edge_sink_objects_total", "Object rows written.", |s| {
            s.objects as f64
        }),
        (
            "edge_sink_dead_letters_total",
            "Messages dead-lettered.",
            |s| s.dead_letters as f64,
        ),
        ("edge_sink_batches_total", "Batches committed.", |s| {
            s.batches as f64
        }),
        (
            "edge_sink_db_retries_total",
            "Batch writes retried after a database error.",
            |s| s.db_retries as f64,
        ),
        (
            "edge_sink_broker_errors_total",
            "Consumer errors waited out (broker unreachable, transport).",
            |s| s.broker_errors as f64,
        ),
        (
            "edge_sink_gap_rereads_total",
            "Re-reads after the broker skipped offsets.",
            |s| s.gap_rereads as f64,
        ),
        (
            "edge_sink_lag_messages",
            "Messages behind the high watermarks (librdkafka statistics).",
            |s| s.lag.map(|l| l as f64).unwrap_or(f64::NAN),
        ),
    ];
    for (name, help, f) in fields {
        let rx = status.clone();
        registry.gauge_fn(
            name,
            help,
            Box::new(move || vec![(String::new(), f(&rx.borrow()))]),
        );
    }
    let hist = registry.histogram(
        "edge_sink_batch_seconds",
        "Time to write one batch (COPY, insert, offsets, commit).",
        &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0],
    );
    let mut rx = status.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        while rx.changed().await.is_ok() {
            let (b, ms) = {
                let s = rx.borrow_and_update();
                (s.batches, s.last_batch_ms)
            };
            if b > seen {
                seen = b;
                hist.observe(ms as f64 / 1000.0);
            }
        }
    });
    let health: edge_vision::metrics::HealthFn = std::sync::Arc::new(|| Ok(()));
    tokio::spawn(edge_vision::metrics::serve(
        listener, registry, health, stop,
    ));
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-sink: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-sink: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async move {
        match cli.command {
            Command::Config {
                command: ConfigCommand::Check,
            } => {
                println!(
                    "{}",
                    settings::printable(&cfg).map_err(|e| anyhow::anyhow!(e))?
                );
                eprintln!("edge-sink: configuration is valid");
                Ok(())
            }
            Command::Migrate { database_url } => {
                let url = database_url.unwrap_or(cfg.database_url);
                let mut client = sink::connect(&url).await?;
                let n = sink::migrate(&mut client).await?;
                println!("applied {n} migration(s)");
                Ok(())
            }
            Command::Run {
                brokers,
                topic,
                group,
                database_url,
                batch_size,
                batch_ms,
                metrics_listen,
            } => {
                let mut cfg = cfg;
                cfg.brokers = brokers.unwrap_or(cfg.brokers);
                cfg.topic = topic.unwrap_or(cfg.topic);
                cfg.group_id = group.unwrap_or(cfg.group_id);
                cfg.database_url = database_url.unwrap_or(cfg.database_url);
                cfg.batch_size = batch_size.unwrap_or(cfg.batch_size).max(1);
                cfg.batch_ms = batch_ms.unwrap_or(cfg.batch_ms);
                cfg.metrics_listen = metrics_listen.unwrap_or(cfg.metrics_listen);
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let (status_tx, status_rx) = tokio::sync::watch::channel(SinkStatus::default());
                if !cfg.metrics_listen.is_empty() {
                    serve_metrics(&cfg.metrics_listen, status_rx.clone(), stop_rx.clone()).await?;
                }
                tokio::spawn(async move {
                    let Ok(mut term) =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    let _ = stop_tx.send(true);
                });
                sink::run(cfg, stop_rx, status_tx).await?;
                println!("{}", serde_json::to_string(&*status_rx.borrow())?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-sink: {e:#}");
            ExitCode::from(1)
        }
    }
}
