//! Kafka client settings shared by the agent's uplink and the sink: TLS and SASL passed through
//! to librdkafka, with every secret read from a file (a systemd credential, say), never from the
//! main configuration.

use std::path::PathBuf;

use rdkafka::config::ClientConfig;

/// TLS and SASL settings passed through to librdkafka. Secrets are read from files.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Security {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    /// File holding the SASL password (e.g. a systemd credential).
    pub sasl_password_file: Option<PathBuf>,
    pub ssl_ca_location: Option<PathBuf>,
    pub ssl_certificate_location: Option<PathBuf>,
    pub ssl_key_location: Option<PathBuf>,
    /// File holding the private key's password.
    pub ssl_key_password_file: Option<PathBuf>,
}

/// A secret file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read secret {path}: {source}")]
pub struct SecretError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The file's contents without the trailing newline.
pub fn read_secret(path: &PathBuf) -> Result<String, SecretError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| SecretError {
            path: path.clone(),
            source,
        })
}

impl Security {
    /// Sets the librdkafka properties, reading the secret files now.
    pub fn apply(&self, c: &mut ClientConfig) -> Result<(), SecretError> {
        if let Some(p) = &self.protocol {
            c.set("security.protocol", p);
        }
        if let Some(m) = &self.sasl_mechanism {
            c.set("sasl.mechanism", m);
        }
        if let Some(u) = &self.sasl_username {
            c.set("sasl.username", u);
        }
        if let Some(f) = &self.sasl_password_file {
            c.set("sasl.password", read_secret(f)?);
        }
        for (key, path) in [
            ("ssl.ca.location", &self.ssl_ca_location),
            ("ssl.certificate.location", &self.ssl_certificate_location),
            ("ssl.key.location", &self.ssl_key_location),
        ] {
            if let Some(p) = path {
                c.set(key, p.display().to_string());
            }
        }
        if let Some(f) = &self.ssl_key_password_file {
            c.set("ssl.key.password", read_secret(f)?);
        }
        Ok(())
    }
}
