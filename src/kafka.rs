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

/// A librdkafka property that the `librdkafka` pass-through may not change, because the
/// correctness of the uplink or the sink depends on our value.
#[derive(Debug, Clone, Copy)]
pub struct Protected {
    /// Property names (a key and its librdkafka aliases).
    pub keys: &'static [&'static str],
    /// Values that keep the guarantee (compared without case and surrounding space); empty:
    /// the key may not be set at all.
    pub allowed: &'static [&'static str],
    /// What would break.
    pub why: &'static str,
}

/// What the uplink's producer depends on.
pub const PRODUCER_PROTECTED: &[Protected] = &[
    Protected {
        keys: &["acks", "request.required.acks"],
        allowed: &["all", "-1"],
        why: "rows leave the outbox on the broker's acknowledgement; only acks=all makes that \
              acknowledgement durable",
    },
    Protected {
        keys: &["enable.idempotence"],
        allowed: &["true"],
        why: "retries after a lost acknowledgement must not duplicate or reorder events",
    },
    Protected {
        keys: &["transactional.id"],
        allowed: &[],
        why: "the uplink does not run Kafka transactions; a transactional producer refuses its \
              sends",
    },
];

/// What the sink's consumer depends on.
pub const CONSUMER_PROTECTED: &[Protected] = &[
    Protected {
        keys: &["enable.auto.commit"],
        allowed: &["false"],
        why: "offsets live in PostgreSQL with the rows; Kafka's are written after each batch, \
              for lag monitoring only",
    },
    Protected {
        keys: &["enable.auto.offset.store"],
        allowed: &["false"],
        why: "an offset may only move once its batch is committed in PostgreSQL",
    },
    Protected {
        keys: &["partition.assignment.strategy"],
        allowed: &[
            "range",
            "roundrobin",
            "range,roundrobin",
            "roundrobin,range",
        ],
        why: "the sink assigns each partition at PostgreSQL's offset in the eager rebalance \
              callback; cooperative-sticky's incremental assignment bypasses it",
    },
    Protected {
        keys: &["auto.offset.reset"],
        allowed: &["error"],
        why: "a fetch outside the log must come back to the sink, which checks the stored offset \
              against the watermarks (src/sink/offsets.rs); a reset by librdkafka would skip the \
              new log's records below the stored offset as already written",
    },
    Protected {
        keys: &["group.protocol"],
        allowed: &["classic"],
        why: "the sink assigns each partition at PostgreSQL's offset in the rebalance callback, \
              which the new consumer group protocol does not call",
    },
];

/// A pass-through property that would switch off what correctness depends on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key} = {value:?} is not allowed ({allowed}): {why}")]
pub struct ProtectedError {
    pub key: String,
    pub value: String,
    /// The values that are allowed, for the message.
    pub allowed: String,
    pub why: &'static str,
}

/// Checks the pass-through properties against `protected`; the first offender is returned.
pub fn check_passthrough<'a>(
    props: impl IntoIterator<Item = (&'a String, &'a String)>,
    protected: &[Protected],
) -> Result<(), ProtectedError> {
    for (key, value) in props {
        let k = key.trim().to_ascii_lowercase();
        let Some(p) = protected.iter().find(|p| p.keys.contains(&k.as_str())) else {
            continue;
        };
        let v = value.trim().to_ascii_lowercase().replace(' ', "");
        if !p.allowed.contains(&v.as_str()) {
            return Err(ProtectedError {
                key: key.clone(),
                value: value.clone(),
                allowed: if p.allowed.is_empty() {
                    "it may not be set".into()
                } else {
                    format!("only {}", p.allowed.join(" or "))
                },
                why: p.why,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_pass_through_cannot_switch_off_what_correctness_needs() {
        let ok = props(&[
            ("acks", "ALL"),
            ("linger.ms", "5"),
            ("enable.idempotence", "true"),
        ]);
        assert!(check_passthrough(&ok, PRODUCER_PROTECTED).is_ok());
        for (k, v) in [
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("enable.idempotence", "false"),
            ("transactional.id", "x"),
        ] {
            let e = check_passthrough(&props(&[(k, v)]), PRODUCER_PROTECTED).unwrap_err();
            assert_eq!(e.key, k, "{e}");
        }
        let ok = props(&[("partition.assignment.strategy", "range, roundrobin")]);
        assert!(check_passthrough(&ok, CONSUMER_PROTECTED).is_ok());
        for (k, v) in [
            ("enable.auto.commit", "true"),
            ("enable.auto.offset.store", "true"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("group.protocol", "consumer"),
        ] {
            let e = check_passthrough(&props(&[(k, v)]), CONSUMER_PROTECTED).unwrap_err();
            assert!(e.to_string().starts_with(k), "{e}");
        }
    }
}
