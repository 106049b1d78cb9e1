//! `edge-sink`: Kafka -> PostgreSQL. Argument parsing and one call into
//! `edge_vision::sink::commands` per subcommand; exit codes are `edge_vision::exit`'s.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_vision::sink::{self, commands, SinkError};

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
    config: Option<PathBuf>,
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

fn main() -> ExitCode {
    edge_vision::exit::main("edge-sink", "info", || dispatch(Cli::parse()))
}

fn dispatch(cli: Cli) -> Result<u8, SinkError> {
    let mut cfg = sink::config::load(cli.config.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check,
        } => commands::config_check(&cfg),
        Command::Migrate { database_url } => {
            cfg.database_url = database_url.unwrap_or(cfg.database_url);
            rt.block_on(commands::migrate(&cfg))
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
            cfg.brokers = brokers.unwrap_or(cfg.brokers);
            cfg.topic = topic.unwrap_or(cfg.topic);
            cfg.group_id = group.unwrap_or(cfg.group_id);
            cfg.database_url = database_url.unwrap_or(cfg.database_url);
            cfg.batch_size = batch_size.unwrap_or(cfg.batch_size).max(1);
            cfg.batch_ms = batch_ms.unwrap_or(cfg.batch_ms);
            cfg.metrics_listen = metrics_listen.unwrap_or(cfg.metrics_listen);
            rt.block_on(commands::run(cfg))
        }
    }
}
