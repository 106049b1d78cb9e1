//! The event schema shared by the agent and the sink (documented in `docs/schema.md`).
//!
//! One JSON object per Kafka message, key = `device_id`. Every event has a stable `event_id`
//! (UUIDv7, made when the frame is captured, so it sorts by time) and a per-device `seq` that
//! increases monotonically across restarts. Consumers dedupe on `event_id`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of this schema; consumers refuse versions they do not know.
pub const SCHEMA_VERSION: u32 = 1;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A frame went through the detector (with or without detections).
    Detection,
    AgentStarted,
    AgentStopping,
    CameraLost,
    CameraRecovered,
    /// The outbox evicted events to stay under its cap; `health.evicted` has the counts.
    OutboxEvicted,
    /// The broker refused an event for itself while it took others: the event was parked in
    /// the outbox's dead-letter table; `health.message` names its `seq`, `event_id` and the
    /// broker's reason.
    EventParked,
}

impl Kind {
    /// The name used in JSON and in the sink's tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Detection => "detection",
            Kind::AgentStarted => "agent_started",
            Kind::AgentStopping => "agent_stopping",
            Kind::CameraLost => "camera_lost",
            Kind::CameraRecovered => "camera_recovered",
            Kind::OutboxEvicted => "outbox_evicted",
            Kind::EventParked => "event_parked",
        }
    }

    pub fn is_health(self) -> bool {
        self != Kind::Detection
    }
}

/// The model that produced a detection event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    pub name: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameSize {
    pub width: u32,
    pub height: u32,
}

/// One detected object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Object {
    pub label: String,
    pub class_id: u32,
    pub confidence: f32,
    /// `[x1, y1, x2, y2]` in frame pixels.
    pub bbox: [f32; 4],
}

/// Eviction counts by reason, carried by `outbox_evicted` events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evictions {
    pub no_detections: u64,
    pub low_confidence: u64,
    pub oldest: u64,
    pub expired: u64,
}

impl Evictions {
    pub fn total(&self) -> u64 {
        self.no_detections + self.low_confidence + self.oldest + self.expired
    }
}

/// Extra facts of health events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<Evictions>,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub schema_version: u32,
    pub event_id: Uuid,
    pub device_id: String,
    /// Monotonic per device; assigned by the outbox when the event is enqueued.
    pub seq: u64,
    pub captured_at: DateTime<Utc>,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<FrameSize>,
    #[serde(default)]
    pub detections: Vec<Object>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// Which frame (or moment) an event describes: its stable id, a UUIDv7 made once when the
/// frame is captured, and the capture time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub event_id: Uuid,
    pub captured_at: DateTime<Utc>,
}

impl Origin {
    /// A new id for something happening now (health events, synthetic frames).
    pub fn now() -> Self {
        Self {
            event_id: Uuid::now_v7(),
            captured_at: Utc::now(),
        }
    }
}

impl Event {
    fn new(origin: Origin, device_id: &str, kind: Kind) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id: origin.event_id,
            device_id: device_id.to_string(),
            seq: 0,
            captured_at: origin.captured_at,
            kind,
            model: None,
            frame: None,
            detections: Vec::new(),
            health: None,
        }
    }

    /// The detection event of the frame `origin` names (`seq` is set by the outbox).
    pub fn detection(
        origin: Origin,
        device_id: &str,
        model: ModelRef,
        frame: FrameSize,
        detections: Vec<Object>,
    ) -> Self {
        Self {
            model: Some(model),
            frame: Some(frame),
            detections,
            ..Self::new(origin, device_id, Kind::Detection)
        }
    }

    /// A health event happening now (`kind` must not be `Detection`).
    pub fn health(device_id: &str, kind: Kind, health: Health) -> Self {
        Self {
            health: Some(health),
            ..Self::new(Origin::now(), device_id, kind)
        }
    }

    /// Highest detection confidence (0 without detections): the outbox evicts low values first.
    pub fn max_confidence(&self) -> f32 {
        self.detections
            .iter()
            .map(|d| d.confidence)
            .fold(0.0, f32::max)
    }
}

/// Why bytes are not an event we accept.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown schema_version {0} (this build knows {SCHEMA_VERSION})")]
    Version(u32),
    #[error("an event is a JSON object, not {0}")]
    NotAnObject(&'static str),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// Longest `device_id`, model name or label, in bytes (they are indexed and shown).
pub const MAX_NAME_BYTES: usize = 256;
/// Longest health message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Most detections in one event.
pub const MAX_DETECTIONS: usize = 10_000;

/// Parses and checks one message payload: JSON shape and version, then [`validate`].
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    // serde's derived decoder also takes an event as a positional array; the schema is an
    // object.
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => {}
        Some(b'[') => return Err(DecodeError::NotAnObject("an array")),
        Some(_) => return Err(DecodeError::NotAnObject("a scalar")),
    }
    let ev: Event = serde_json::from_slice(bytes)?;
    if ev.schema_version != SCHEMA_VERSION {
        return Err(DecodeError::Version(ev.schema_version));
    }
    validate(&ev)?;
    Ok(ev)
}

/// The event's own invariants, beyond its JSON shape: texts without NUL and within their
/// lengths, finite confidences in [0, 1] and finite box coordinates, at most
/// [`MAX_DETECTIONS`] detections, a capture time in the years 1-9999.
pub fn validate(ev: &Event) -> Result<(), DecodeError> {
    fn bad(field: impl Into<String>, reason: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
    fn text(field: &str, v: &str, max: usize, empty_ok: bool) -> Result<(), DecodeError> {
        if v.contains('\0') {
            return Err(bad(field, "contains NUL"));
        }
        if v.len() > max {
            return Err(bad(field, format!("{} bytes, at most {max}", v.len())));
        }
        if v.is_empty() && !empty_ok {
            return Err(bad(field, "empty"));
        }
        Ok(())
    }
    text("device_id", &ev.device_id, MAX_NAME_BYTES, false)?;
    let year = chrono::Datelike::year(&ev.captured_at);
    if !(1..=9999).contains(&year) {
        return Err(bad("captured_at", format!("year {year} is not in 1-9999")));
    }
    if let Some(m) = &ev.model {
        text("model.name", &m.name, MAX_NAME_BYTES, true)?;
        text("model.sha256", &m.sha256, MAX_NAME_BYTES, true)?;
    }
    if ev.detections.len() > MAX_DETECTIONS {
        return Err(bad(
            "detections",
            format!(
                "{} detections, at most {MAX_DETECTIONS}",
                ev.detections.len()
            ),
        ));
    }
    for (i, d) in ev.detections.iter().enumerate() {
        text(
            &format!("detections[{i}].label"),
            &d.label,
            MAX_NAME_BYTES,
            true,
        )?;
        if !(d.confidence.is_finite() && (0.0..=1.0).contains(&d.confidence)) {
            return Err(bad(
                format!("detections[{i}].confidence"),
                format!("{} is not in [0, 1]", d.confidence),
            ));
        }
        if let Some(v) = d.bbox.iter().find(|v| !v.is_finite()) {
            return Err(bad(
                format!("detections[{i}].bbox"),
                format!("{v} is not finite"),
            ));
        }
    }
    if let Some(h) = &ev.health {
        if let Some(msg) = &h.message {
            text("health.message", msg, MAX_MESSAGE_BYTES, true)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event::detection(
            Origin::now(),
            "cam-1",
            ModelRef {
                name: "fall".into(),
                sha256: "ab".repeat(32),
            },
            FrameSize {
                width: 640,
                height: 480,
            },
            vec![Object {
                label: "Normal".into(),
                class_id: 0,
                confidence: 0.7,
                bbox: [1.0, 2.0, 3.0, 4.0],
            }],
        )
    }

    #[test]
    fn round_trips_and_names_fields_as_documented() {
        let ev = sample();
        let json = serde_json::to_value(&ev).unwrap();
        for key in [
            "schema_version",
            "event_id",
            "device_id",
            "seq",
            "captured_at",
            "kind",
            "model",
            "frame",
            "detections",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["kind"], "detection");
        for k in [
            Kind::Detection,
            Kind::AgentStarted,
            Kind::AgentStopping,
            Kind::CameraLost,
            Kind::CameraRecovered,
            Kind::OutboxEvicted,
            Kind::EventParked,
        ] {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                k.as_str(),
                "as_str agrees with serde"
            );
        }
        assert_eq!(
            decode(serde_json::to_string(&ev).unwrap().as_bytes()).unwrap(),
            ev
        );
    }

    #[test]
    fn refuses_unknown_versions_and_fields() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["schema_version"] = 2.into();
        assert!(matches!(
            decode(v.to_string().as_bytes()),
            Err(DecodeError::Version(2))
        ));
        let mut v = serde_json::to_value(sample()).unwrap();
        v["surprise"] = 1.into();
        assert!(matches!(
            decode(v.to_string().as_bytes()),
            Err(DecodeError::Json(_))
        ));
        assert!(decode(b"{not json").is_err());
    }

    #[test]
    fn event_ids_sort_by_creation() {
        let a = sample();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = sample();
        assert!(a.event_id < b.event_id);
    }

    #[test]
    fn values_no_column_can_store_are_refused_with_the_field_named() {
        let ok = serde_json::to_value(sample()).unwrap();
        let refused = |edit: &dyn Fn(&mut serde_json::Value), want: &str| {
            let mut v = ok.clone();
            edit(&mut v);
            let e = decode(&serde_json::to_vec(&v).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        };
        refused(
            &|v| v["device_id"] = "a\u{0}b".into(),
            "device_id: contains NUL",
        );
        refused(&|v| v["device_id"] = "".into(), "device_id: empty");
        refused(
            &|v| v["device_id"] = "x".repeat(300).into(),
            "device_id: 300 bytes",
        );
        refused(&|v| v["model"]["name"] = "\u{0}".into(), "model.name");
        refused(
            &|v| v["detections"][0]["label"] = "\u{0}".into(),
            "detections[0].label",
        );
        refused(
            &|v| v["detections"][0]["confidence"] = serde_json::json!(1e308f64),
            "detections[0].confidence: inf",
        );
        refused(
            &|v| v["detections"][0]["confidence"] = serde_json::json!(1.5),
            "not in [0, 1]",
        );
        refused(
            &|v| v["detections"][0]["bbox"][2] = serde_json::json!(1e39f64),
            "detections[0].bbox",
        );
        refused(
            &|v| v["captured_at"] = "-5000-01-01T00:00:00Z".into(),
            "year -5000",
        );
        refused(
            &|v| v["health"] = serde_json::json!({"message": "a\u{0}"}),
            "health.message",
        );
        let array: Vec<serde_json::Value> = ok.as_object().unwrap().values().cloned().collect();
        let e = decode(&serde_json::to_vec(&array).unwrap()).unwrap_err();
        assert!(e.to_string().contains("not an array"), "{e}");
        assert!(decode(b"  42").is_err());
        assert!(decode(&serde_json::to_vec(&ok).unwrap()).is_ok());
    }
}
