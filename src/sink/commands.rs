//! Each subcommand of `edge-sink` as one library call; the binary only parses arguments.

use super::database::Database;
use super::{schema, SinkConfig, SinkError, SinkStatus};
use crate::exit;
use crate::settings;

/// `edge-sink config check`: prints the effective configuration, secrets masked.
pub fn config_check(cfg: &SinkConfig) -> Result<u8, SinkError> {
    println!("{}", settings::printable(cfg)?);
    eprintln!("edge-sink: configuration is valid");
    Ok(exit::OK)
}

/// `edge-sink migrate`: applies the embedded migrations. A current schema issues no DDL at
/// all, so the unit's `ExecStartPre` works for a role without `CREATE` (docs/sink.md).
pub async fn migrate(cfg: &SinkConfig) -> Result<u8, SinkError> {
    let db = Database::new(&cfg.database_url, cfg.database_password_file.as_deref())?;
    let mut client = db.connect().await?;
    if schema::schema_is_current(&client).await? {
        println!("schema is current");
        return Ok(exit::OK);
    }
    let n = match schema::migrate(&mut client).await {
        Err(SinkError::Migrate(e)) => Err(SinkError::SchemaBehind(e)),
        r => r,
    }?;
    println!("applied {n} migration(s)");
    Ok(exit::OK)
}

/// `edge-sink run`: consumes into PostgreSQL until SIGTERM/SIGINT, with `/metrics` when
/// configured; prints the final status as JSON.
pub async fn run(cfg: SinkConfig) -> Result<u8, SinkError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (status_tx, status_rx) = tokio::sync::watch::channel(SinkStatus::default());
    if !cfg.metrics_listen.is_empty() {
        super::health::serve(&cfg.metrics_listen, status_rx.clone(), stop_rx.clone()).await?;
    }
    tokio::spawn(async move {
        crate::notify::terminated().await;
        let _ = stop_tx.send(true);
    });
    super::run(cfg, stop_rx, status_tx).await?;
    println!("{}", serde_json::to_string(&*status_rx.borrow())?);
    Ok(exit::OK)
}
