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
    tokio::spawn(notify_systemd(status_rx.clone()));
    super::run(cfg, stop_rx, status_tx).await?;
    crate::notify::Notifier::from_env().notify("STOPPING=1");
    println!("{}", serde_json::to_string(&*status_rx.borrow())?);
    Ok(exit::OK)
}

/// systemd's view (`Type=notify`): `READY=1` once the consumer is subscribed, `WATCHDOG=1`
/// while the loop runs (withheld when it stalls: systemd restarts the sink), `STATUS=` the
/// phase whenever it changes (e.g. `waiting for the database ...`).
async fn notify_systemd(status: tokio::sync::watch::Receiver<SinkStatus>) {
    let n = crate::notify::Notifier::from_env();
    if !n.enabled() {
        return;
    }
    let period = crate::notify::watchdog_interval()
        .map(|w| (w / 3).min(std::time::Duration::from_secs(1)))
        .unwrap_or(std::time::Duration::from_secs(1));
    let (mut ready, mut said) = (false, None);
    loop {
        let (started, alive, text, phase) = {
            let s = status.borrow();
            (
                s.phase != super::Phase::Starting,
                super::health::watchdog_ok(&s),
                super::health::report(&s).unwrap_or_else(|e| e),
                std::mem::discriminant(&s.phase),
            )
        };
        if started && !ready {
            n.notify("READY=1");
            ready = true;
        }
        if alive {
            n.notify("WATCHDOG=1");
        }
        // Seconds change every turn while waiting: say each phase (and stall) once.
        let key = Some((phase, alive));
        if key != said {
            n.notify(&format!("STATUS={text}"));
            said = key;
        }
        tokio::time::sleep(period).await;
    }
}
