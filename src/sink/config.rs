//! `edge-sink`'s configuration (`systemd/edge-sink.toml` documents every key) and the
//! consumer's librdkafka settings made from it.

use rdkafka::config::ClientConfig;

use crate::sink::database::Database;

use super::{SinkError, MAX_MESSAGE_BYTES};
use crate::settings::{self, ConfigError};

/// Sink settings (`systemd/edge-sink.toml` documents every key).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// Bootstrap brokers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topic the agents write to.
    pub topic: String,
    /// Consumer group: run more instances with the same group to scale out.
    pub group_id: String,
    /// libpq connection string (`host=... user=... dbname=... sslmode=verify-full
    /// sslrootcert=...`); TLS options as libpq's (src/sink/database.rs).
    pub database_url: String,
    /// The database password, read from this file (its first line) at start-up; keeps the
    /// secret out of the config file (systemd credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_password_file: Option<std::path::PathBuf>,
    /// A batch closes at this many messages ...
    pub batch_size: usize,
    /// ... or this long after its first message.
    pub batch_ms: u64,
    /// Messages larger than this are dead-lettered ("oversized").
    pub max_message_bytes: usize,
    /// `/metrics` and `/healthz` address (empty: off).
    pub metrics_listen: String,
    /// A stored offset past the end of its partition's log (the topic was deleted and
    /// re-created): `rewind` to the new log's start, or `hold` the partition for an operator.
    pub stored_offset_past_end: super::offsets::PastEnd,
    /// TLS/SASL to Kafka; passwords come from files.
    #[serde(default)]
    pub security: crate::kafka::Security,
    /// Any other librdkafka consumer property.
    #[serde(default)]
    pub librdkafka: std::collections::BTreeMap<String, String>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self::new(
            "127.0.0.1:9092",
            "edge-vision.events",
            "edge-sink",
            "host=127.0.0.1 user=edge_sink dbname=edge_vision",
        )
    }
}

impl SinkConfig {
    pub fn new(brokers: &str, topic: &str, group_id: &str, database_url: &str) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            group_id: group_id.into(),
            database_url: database_url.into(),
            database_password_file: None,
            batch_size: 5000,
            batch_ms: 500,
            max_message_bytes: MAX_MESSAGE_BYTES,
            metrics_listen: "127.0.0.1:9465".into(),
            stored_offset_past_end: Default::default(),
            security: Default::default(),
            librdkafka: Default::default(),
        }
    }
}

/// The consumer's librdkafka configuration: our settings, TLS/SASL (secrets read from their
/// files now), then the pass-through properties.
pub fn consumer_config(cfg: &SinkConfig) -> Result<ClientConfig, SinkError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("queued.max.messages.kbytes", "65536")
        .set("statistics.interval.ms", "5000");
    cfg.security.apply(&mut cc)?;
    crate::kafka::check_passthrough(&cfg.librdkafka, crate::kafka::CONSUMER_PROTECTED)?;
    for (k, v) in &cfg.librdkafka {
        cc.set(k, v);
    }
    Ok(cc)
}

/// Loads the layered configuration (embedded defaults, `file` or `/etc/edge-sink/sink.toml`,
/// `EDGE_SINK__*` variables) and checks it; errors name the key and the file or variable.
pub fn load(file: Option<&std::path::Path>) -> Result<SinkConfig, ConfigError> {
    let loaded = settings::load::<SinkConfig>(settings::SINK, file, &settings::process_env())?;
    let origin = loaded.origin();
    let cfg = loaded.config;
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        key: key.into(),
        origin: origin.clone(),
        message,
    };
    for (key, empty) in [
        ("brokers", cfg.brokers.is_empty()),
        ("topic", cfg.topic.is_empty()),
        ("group_id", cfg.group_id.is_empty()),
        ("database_url", cfg.database_url.is_empty()),
        ("batch_size", cfg.batch_size == 0),
    ] {
        if empty {
            return Err(invalid(key, "must not be empty or zero".into()));
        }
    }
    crate::kafka::check_passthrough(&cfg.librdkafka, crate::kafka::CONSUMER_PROTECTED)
        .map_err(|e| invalid(&format!("librdkafka.{}", e.key), e.to_string()))?;
    // The connection string's TLS options and the password file, checked now so a mistake is
    // a configuration error (exit 2) rather than a failure at the first connection.
    if let Err(e) = Database::new(&cfg.database_url, cfg.database_password_file.as_deref()) {
        let key = e.key();
        let text = e.to_string();
        let message = text.strip_prefix(&format!("{key}: ")).unwrap_or(&text);
        return Err(invalid(key, message.to_string()));
    }
    Ok(cfg)
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn kafka_secrets_come_from_files_and_overrides_win() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("kafka-password");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let mut cfg = SinkConfig::new("k:9093", "t", "g", "host=db");
        cfg.security = crate::kafka::Security {
            protocol: Some("sasl_ssl".into()),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("edge-sink".into()),
            sasl_password_file: Some(pw),
            ..Default::default()
        };
        cfg.librdkafka
            .insert("session.timeout.ms".into(), "30000".into());
        let c = consumer_config(&cfg).unwrap();
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("session.timeout.ms"), Some("30000"));
        cfg.security.sasl_password_file = Some(dir.path().join("missing"));
        let err = consumer_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
