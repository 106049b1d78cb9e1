//! Connecting to PostgreSQL: libpq connection strings with libpq's TLS options, and the
//! password read from a file.
//!
//! tokio-postgres parses libpq connection strings (`host=... dbname=...` or
//! `postgresql://...?...`) but knows only `sslmode=disable|prefer|require` and none of the
//! certificate options, and by itself it cannot speak TLS at all. We take `sslmode` (libpq's
//! values), `sslrootcert`, `sslcert` and `sslkey` out of the string, hand the rest to
//! tokio-postgres, and build an OpenSSL connector (the same vendored OpenSSL librdkafka uses)
//! that checks what the mode asks for, as libpq does:
//!
//! | `sslmode`         | encrypted               | certificate chain checked       | host name checked |
//! |-------------------|-------------------------|---------------------------------|-------------------|
//! | `disable`         | no                      | -                               | -                 |
//! | `prefer` (default)| if the server offers it | no                              | no                |
//! | `require`         | yes                     | only when `sslrootcert` is given| no                |
//! | `verify-ca`       | yes                     | yes                             | no                |
//! | `verify-full`     | yes                     | yes                             | yes               |
//!
//! Without `sslrootcert`, `verify-ca` and `verify-full` trust the system's certificate store.
//! libpq's `allow` (plain first, TLS on refusal) has no tokio-postgres equivalent and is refused
//! with an error rather than silently changed.

use std::path::{Path, PathBuf};

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres::{Client, Config, NoTls};

/// The connection-string keys we handle instead of tokio-postgres.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// libpq's `sslmode` values that tokio-postgres + OpenSSL can honour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<Self, DatabaseConfigError> {
        Ok(match v {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(DatabaseConfigError::SslMode(other.to_string())),
        })
    }
}

/// Why a database connection string or its files cannot be used. These are configuration
/// mistakes: the sink exits on them instead of retrying.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseConfigError {
    #[error("database_url: {0}")]
    Parse(#[source] tokio_postgres::Error),
    #[error(
        "database_url: sslmode `{0}` is not one of disable, prefer, require, verify-ca, verify-full"
    )]
    SslMode(String),
    #[error("database_url: {key} `{path}`: {reason}")]
    TlsFile {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("database_url: sslcert and sslkey go together (only {0} is set)")]
    HalfClientCert(&'static str),
    #[error("database_password_file: `{path}`: {source}")]
    PasswordFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] openssl::error::ErrorStack),
}

impl DatabaseConfigError {
    /// The configuration key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            Self::PasswordFile { .. } => "database_password_file",
            _ => "database_url",
        }
    }
}

/// `connect_timeout` when the URL sets none.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A PostgreSQL server to connect to, parsed and checked once.
#[derive(Clone)]
pub struct Database {
    /// Everything tokio-postgres understands (host, user, dbname, ...), with the mode it
    /// should negotiate (`prefer` or `require`; `disable` when TLS is off).
    config: Config,
    /// What libpq's `sslmode` asked for, for logs and `describe()`.
    mode: SslMode,
    /// The OpenSSL connector; `None` for `sslmode=disable`.
    tls: Option<MakeTlsConnector>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("hosts", &self.config.get_hosts())
            .field("mode", &self.mode)
            .finish()
    }
}

impl Database {
    /// Parses a libpq connection string; `password_file`, when given, supplies the password
    /// (its first line, so a trailing newline does not count).
    pub fn new(url: &str, password_file: Option<&Path>) -> Result<Self, DatabaseConfigError> {
        let (rest, tls) = take_tls_params(url);
        let get = |k: &str| {
            tls.iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let mode = match get("sslmode") {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::Prefer,
        };
        let mut config: Config = rest.parse().map_err(DatabaseConfigError::Parse)?;
        config.ssl_mode(match mode {
            SslMode::Disable => WireMode::Disable,
            SslMode::Prefer => WireMode::Prefer,
            _ => WireMode::Require,
        });
        if let Some(p) = password_file {
            let text =
                std::fs::read_to_string(p).map_err(|source| DatabaseConfigError::PasswordFile {
                    path: p.display().to_string(),
                    source,
                })?;
            config.password(text.lines().next().unwrap_or(""));
        }
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(connector(
                mode,
                get("sslrootcert").map(PathBuf::from).as_deref(),
                get("sslcert").map(PathBuf::from).as_deref(),
                get("sslkey").map(PathBuf::from).as_deref(),
            )?),
        };
        // A server that stopped answering (a cut link, a frozen host) must become an error the
        // sink can wait out visibly, not a connect that hangs for the kernel's TCP timeout;
        // libpq's own default is to wait forever, so an explicit `connect_timeout` wins.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives_idle(std::time::Duration::from_secs(30));
        Ok(Self { config, mode, tls })
    }

    /// The `sslmode` in force.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// Opens a connection; its I/O runs on a spawned task until the client is dropped.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await?;
                spawn_connection(conn);
                Ok(client)
            }
            None => {
                let (client, conn) = self.config.connect(NoTls).await?;
                spawn_connection(conn);
                Ok(client)
            }
        }
    }
}

fn spawn_connection<F>(conn: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "database connection closed");
        }
    });
}

/// True when `e` is the TLS handshake failing (certificate refused, host name wrong, server
/// without TLS under `require`): retrying cannot help until someone changes a file.
pub fn is_tls_refusal(e: &tokio_postgres::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(ssl) = s.downcast_ref::<openssl::ssl::Error>() {
            return ssl.ssl_error().is_some();
        }
        src = s.source();
    }
    e.to_string().contains("server does not support TLS")
}

fn connector(
    mode: SslMode,
    root: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<MakeTlsConnector, DatabaseConfigError> {
    let file_err =
        |key: &'static str, p: &Path, e: openssl::error::ErrorStack| DatabaseConfigError::TlsFile {
            key,
            path: p.display().to_string(),
            reason: if p.exists() {
                e.to_string()
            } else {
                "no such file".into()
            },
        };
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    // libpq: `require` with a root certificate behaves as `verify-ca`.
    let check_chain = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull)
        || (mode == SslMode::Require && root.is_some());
    if check_chain {
        match root {
            Some(r) => b
                .set_ca_file(r)
                .map_err(|e| file_err("sslrootcert", r, e))?,
            None => b.set_default_verify_paths()?,
        }
        b.set_verify(SslVerifyMode::PEER);
    } else {
        b.set_verify(SslVerifyMode::NONE);
    }
    match (cert, key) {
        (Some(c), Some(k)) => {
            b.set_certificate_chain_file(c)
                .map_err(|e| file_err("sslcert", c, e))?;
            b.set_private_key_file(k, SslFiletype::PEM)
                .map_err(|e| file_err("sslkey", k, e))?;
        }
        (Some(_), None) => return Err(DatabaseConfigError::HalfClientCert("sslcert")),
        (None, Some(_)) => return Err(DatabaseConfigError::HalfClientCert("sslkey")),
        (None, None) => {}
    }
    let mut m = MakeTlsConnector::new(b.build());
    let check_host = mode == SslMode::VerifyFull;
    m.set_callback(move |cc, _host| {
        cc.set_verify_hostname(check_host);
        Ok(())
    });
    Ok(m)
}

/// Splits libpq's TLS keys off a connection string (either form), returning the rest for
/// tokio-postgres and the keys with their (unquoted, unescaped) values in order.
fn take_tls_params(url: &str) -> (String, Vec<(String, String)>) {
    let mut taken = Vec::new();
    let trimmed = url.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = trimmed.split_once('?') else {
            return (trimmed.to_string(), taken);
        };
        let mut kept = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            if TLS_KEYS.contains(&k) {
                taken.push((k.to_string(), percent_decode(v)));
            } else {
                kept.push(part);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, taken);
    }
    // key = value pairs; values may be 'single quoted' and use backslash escapes.
    let mut kept = String::new();
    let b = trimmed.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &trimmed[start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'=' {
            i += 1;
        }
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
            i += 1; // closing quote
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let end = i.min(b.len());
        if TLS_KEYS.contains(&key) {
            taken.push((
                key.to_string(),
                String::from_utf8_lossy(&value).into_owned(),
            ));
        } else {
            if !kept.is_empty() {
                kept.push(' ');
            }
            kept.push_str(&trimmed[start..end]);
        }
    }
    (kept, taken)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_keys_leave_both_forms_and_the_rest_stays() {
        let (rest, t) = take_tls_params(
            "host=db.example user=edge_sink sslmode=verify-full sslrootcert='/etc/my ca.pem' dbname=ev",
        );
        assert_eq!(rest, "host=db.example user=edge_sink dbname=ev");
        assert_eq!(
            t,
            vec![
                ("sslmode".to_string(), "verify-full".to_string()),
                ("sslrootcert".to_string(), "/etc/my ca.pem".to_string())
            ]
        );
        let (rest, t) = take_tls_params(
            "postgresql://edge_sink@db:5433/ev?sslmode=require&application_name=s&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgresql://edge_sink@db:5433/ev?application_name=s");
        assert_eq!(t[1], ("sslrootcert".to_string(), "/etc/ca.pem".to_string()));
        let (rest, t) = take_tls_params("postgresql://db/ev?sslmode=disable");
        assert_eq!(rest, "postgresql://db/ev");
        assert_eq!(t.len(), 1);
        // Escapes and spaces around '=' as libpq allows.
        let (rest, t) = take_tls_params("host = h password='it\\'s' sslkey = /k\\ x");
        assert_eq!(rest, "host = h password='it\\'s'");
        assert_eq!(t, vec![("sslkey".to_string(), "/k x".to_string())]);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let e = Database::new("host=h sslmode=allow", None).unwrap_err();
        assert!(e.to_string().contains("sslmode `allow`"), "{e}");
        let e = Database::new(
            "host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("sslrootcert `/nonexistent/ca.pem`: no such file"),
            "{e}"
        );
        let e = Database::new("host=h sslcert=/c.pem", None).unwrap_err();
        assert!(e.to_string().contains("sslcert and sslkey"), "{e}");
        let e = Database::new("host=h nosuchkey=1", None).unwrap_err();
        assert!(e.to_string().starts_with("database_url:"), "{e}");
        let e = Database::new("host=h", Some(Path::new("/nonexistent/pw"))).unwrap_err();
        assert!(
            e.to_string()
                .contains("database_password_file: `/nonexistent/pw`"),
            "{e}"
        );
        let d = Database::new("host=h", None).unwrap();
        assert_eq!(d.ssl_mode(), SslMode::Prefer);
        let d = Database::new("postgresql://h/db?sslmode=disable", None).unwrap();
        assert_eq!(d.ssl_mode(), SslMode::Disable);
    }
}
