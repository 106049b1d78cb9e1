//! `edge-sink`: Kafka -> PostgreSQL. Thin: the work is in `edge_vision::sink`.
//!
//! Exit codes: 0 success (or stopped by SIGTERM/SIGINT); 1 runtime error; 2 bad usage.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_vision::sink::{self, SinkConfig, SinkStatus};

#[derive(Parser)]
#[command(
    name = "edge-sink",
    version,
    about = "Kafka -> PostgreSQL sink for edge-vision events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the migrations in migrations/ and exit.
    Migrate {
        #[arg(long)]
        database_url: String,
    },
    /// Consume the topic into PostgreSQL until SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value = "edge-sink")]
        group: String,
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
        #[arg(long, default_value_t = 500)]
        batch_ms: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
            Command::Migrate { database_url } => {
                let mut client = sink::connect(&database_url).await?;
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
            } => {
                let mut cfg = SinkConfig::new(&brokers, &topic, &group, &database_url);
                cfg.batch_size = batch_size;
                cfg.batch_ms = batch_ms;
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let (status_tx, status_rx) = tokio::sync::watch::channel(SinkStatus::default());
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
