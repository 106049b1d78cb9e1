//! The sink's schema: the refinery migrations in `migrations/`, embedded in the binary.

use tokio_postgres::Client;

use crate::sink::database::Database;

use super::SinkError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies the migrations in `migrations/` (refinery, history in `refinery_schema_history`).
pub async fn migrate(client: &mut Client) -> Result<usize, SinkError> {
    let report = embedded::migrations::runner().run_async(client).await?;
    Ok(report.applied_migrations().len())
}

/// True when every embedded migration is already in the history table. Checked with one
/// `SELECT`, so a least-privilege role (no `CREATE`: docs/sink.md) can start once the owner
/// has run `edge-sink migrate`; refinery itself always issues DDL first.
pub async fn schema_is_current(client: &Client) -> Result<bool, SinkError> {
    let rows = match client.query(SELECT_APPLIED_VERSIONS, &[]).await {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Ok(false)
        }
        Err(e) => return Err(e.into()),
    };
    let applied: std::collections::HashSet<i64> =
        rows.iter().map(|r| i64::from(r.get::<_, i32>(0))).collect();
    Ok(embedded::migrations::runner()
        .get_migrations()
        .iter()
        .all(|m| applied.contains(&i64::from(m.version()))))
}

/// Connects with a libpq connection string, TLS as its `sslmode` says (no password file).
pub async fn connect(url: &str) -> Result<Client, SinkError> {
    Ok(Database::new(url, None)?.connect().await?)
}

/// The migrations applied so far.
const SELECT_APPLIED_VERSIONS: &str = "SELECT version FROM refinery_schema_history";
