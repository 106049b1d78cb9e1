//! `edge-agent`'s configuration: one struct per TOML section, defaults embedded, checked by
//! [`AgentConfig::validate`] with errors that name the key and where the value came from.
//! `systemd/edge-agent.toml` documents every key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::detect::DetectorConfig;
use super::outbox::Durability;
use super::source::PixelFormat;
use super::uplink::UplinkConfig;
use crate::settings::ConfigError;

/// Which kind of frame source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Camera,
    Images,
    Synthetic,
}

/// `[source]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Camera: an index or `/dev/videoN`.
    pub camera: String,
    /// Requested camera resolution; synthetic frame size.
    pub width: u32,
    pub height: u32,
    /// Camera frame rate; pacing of image and synthetic sources (0 = as fast as they go).
    pub fps: f64,
    /// Camera pixel format: `auto` (MJPEG if offered), `mjpeg`, `yuyv`.
    pub format: PixelFormat,
    /// Images: a directory or a glob such as `/data/frames/*.jpg`.
    pub images: String,
    /// Images: start again after the last file.
    #[serde(rename = "loop")]
    pub repeat: bool,
    /// Stop after this many frames (0 = never): tests, demos.
    pub max_frames: u64,
    /// Longest pause between attempts to reopen a lost camera.
    pub retry_max_ms: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::Camera,
            camera: "/dev/video0".into(),
            width: 1280,
            height: 720,
            fps: 15.0,
            format: PixelFormat::Auto,
            images: String::new(),
            repeat: false,
            max_frames: 0,
            retry_max_ms: 30_000,
        }
    }
}

/// `[detector]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorSettings {
    /// Safetensors model (`edge-agent model import` / `model fetch`).
    pub model: PathBuf,
    /// Class names file for models that carry none.
    pub names: Option<PathBuf>,
    /// Network input side (multiple of 32).
    pub input_size: usize,
    /// Minimum confidence of a detection.
    pub confidence: f32,
    /// NMS IoU threshold.
    pub iou: f32,
    /// Keep only these labels (empty: all).
    pub classes: Vec<String>,
    /// Most frames per second sent through the network (0 = as many as it can take).
    pub max_fps: f64,
    /// Skip frames whose detections match the previous frame's (same labels, boxes IoU >= 0.5).
    pub emit_on_change: bool,
    /// Inference threads (0 = all cores).
    pub threads: usize,
    /// Largest image accepted, in pixels.
    pub max_pixels: u64,
}

impl Default for DetectorSettings {
    fn default() -> Self {
        let d = DetectorConfig::default();
        Self {
            model: "/var/lib/edge-agent/models/model.safetensors".into(),
            names: None,
            input_size: d.input_size,
            confidence: d.conf,
            iou: d.iou,
            classes: Vec::new(),
            max_fps: 0.0,
            emit_on_change: false,
            threads: 0,
            max_pixels: d.max_pixels,
        }
    }
}

/// `[snapshots]`: JPEGs of frames with detections, in a bounded directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Where to write them (unset: no snapshots).
    pub dir: Option<PathBuf>,
    /// Oldest snapshots are deleted beyond this many bytes.
    pub max_bytes: u64,
    /// JPEG quality, 1-100.
    pub quality: u8,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 256 * 1024 * 1024,
            quality: 80,
        }
    }
}

/// `[outbox]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    pub path: PathBuf,
    /// Cap for the database and its WAL.
    pub max_bytes: u64,
    /// Events older than this are dropped, counted (0 = keep until the cap needs room).
    pub max_age_s: u64,
    /// `full` (fsync every commit) or `normal` (fsync at checkpoints).
    pub durability: Durability,
    /// Events per transaction at most ...
    pub batch_max: usize,
    /// ... and the longest an event waits for its batch.
    pub batch_ms: u64,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            path: "/var/lib/edge-agent/outbox.sqlite".into(),
            max_bytes: 512 * 1024 * 1024,
            max_age_s: 0,
            durability: Durability::Full,
            batch_max: 64,
            batch_ms: 100,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` for `/metrics` and `/healthz` (empty: off).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// `[watchdog]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchdogConfig {
    /// A stage silent this long counts as stalled: `/healthz` answers 503 and systemd's
    /// watchdog pings stop (0: systemd's `WatchdogSec`, or 60 s outside systemd).
    pub stall_ms: u64,
}

/// The agent's whole configuration (`systemd/edge-agent.toml` documents every key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This device's identity: Kafka key and `device_id` of every event. Empty: the contents
    /// of `/etc/machine-id`.
    pub device_id: String,
    pub source: SourceConfig,
    pub detector: DetectorSettings,
    pub snapshots: SnapshotConfig,
    pub outbox: OutboxSettings,
    pub uplink: UplinkConfig,
    pub metrics: MetricsConfig,
    pub watchdog: WatchdogConfig,
}

impl AgentConfig {
    /// Checks values serde cannot (ranges, combinations). `origin` names where the
    /// configuration came from, for the error.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            origin: origin.into(),
            message,
        };
        let d = &self.detector;
        if d.input_size == 0 || !d.input_size.is_multiple_of(32) {
            return Err(bad(
                "detector.input_size",
                format!("{} is not a positive multiple of 32", d.input_size),
            ));
        }
        if !(0.0..=1.0).contains(&d.confidence) {
            return Err(bad(
                "detector.confidence",
                format!("{} is not in [0, 1]", d.confidence),
            ));
        }
        if !(0.0..=1.0).contains(&d.iou) {
            return Err(bad("detector.iou", format!("{} is not in [0, 1]", d.iou)));
        }
        if d.max_fps < 0.0 || !d.max_fps.is_finite() {
            return Err(bad("detector.max_fps", "must be >= 0".into()));
        }
        if self.source.fps < 0.0 || !self.source.fps.is_finite() {
            return Err(bad("source.fps", "must be >= 0".into()));
        }
        if self.source.kind == SourceKind::Images && self.source.images.is_empty() {
            return Err(bad(
                "source.images",
                "source.kind = \"images\" needs a directory or glob".into(),
            ));
        }
        if self.outbox.max_bytes < 256 * 1024 {
            return Err(bad(
                "outbox.max_bytes",
                format!("{} is below the minimum of 262144", self.outbox.max_bytes),
            ));
        }
        if self.outbox.batch_max == 0 {
            return Err(bad("outbox.batch_max", "must be at least 1".into()));
        }
        if !(1..=100).contains(&self.snapshots.quality) {
            return Err(bad("snapshots.quality", "must be 1-100".into()));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(bad(
                "metrics.listen",
                format!("{:?} is not host:port", self.metrics.listen),
            ));
        }
        if self.uplink.brokers.is_empty() {
            return Err(bad("uplink.brokers", "must not be empty".into()));
        }
        if self.uplink.topic.is_empty() {
            return Err(bad("uplink.topic", "must not be empty".into()));
        }
        crate::kafka::check_passthrough(&self.uplink.librdkafka, crate::kafka::PRODUCER_PROTECTED)
            .map_err(|e| bad(&format!("uplink.librdkafka.{}", e.key), e.to_string()))?;
        Ok(())
    }

    /// `device_id`, else `/etc/machine-id`.
    pub fn resolve_device_id(&self, machine_id_file: &Path) -> Result<String, ConfigError> {
        if !self.device_id.is_empty() {
            return Ok(self.device_id.clone());
        }
        crate::settings::machine_id(machine_id_file).ok_or_else(|| ConfigError::Invalid {
            key: "device_id".into(),
            origin: "configuration".into(),
            message: format!(
                "empty, and {} is missing or empty: set device_id",
                machine_id_file.display()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_key() {
        let mut c = AgentConfig::default();
        c.detector.input_size = 100;
        let e = c.validate("file x.toml").unwrap_err().to_string();
        assert!(
            e.contains("detector.input_size") && e.contains("x.toml"),
            "{e}"
        );
        let mut c = AgentConfig::default();
        c.source.kind = SourceKind::Images;
        let e = c.validate("env").unwrap_err().to_string();
        assert!(e.contains("source.images"), "{e}");
        assert!(AgentConfig::default().validate("defaults").is_ok());
    }
}
