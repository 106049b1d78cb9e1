//! The state file the running agent refreshes for `edge-agent status` (which adds the
//! outbox's own counters, read without the agent's help: `commands::status`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::health::AgentMetrics;
use super::uplink::{self, UplinkStatus};

/// The small JSON file the running agent refreshes for `edge-agent status`: next to the outbox.
pub fn state_file_path(outbox: &Path) -> PathBuf {
    outbox.with_file_name("agent-state.json")
}

/// What `edge-agent status` reads about a running agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    pub updated_ms: i64,
    pub source_up: bool,
    pub uplink_state: Option<uplink::State>,
    /// Why deliveries last failed (a refused certificate, a failed SASL login, ...).
    #[serde(default)]
    pub uplink_last_error: Option<String>,
    pub frames_processed: u64,
    pub events_enqueued: u64,
}

pub(super) fn write_state(path: &Path, m: &AgentMetrics, st: &UplinkStatus) {
    let state = AgentState {
        pid: std::process::id(),
        updated_ms: chrono::Utc::now().timestamp_millis(),
        source_up: m.camera_up.get() > 0.5,
        uplink_state: st.state,
        uplink_last_error: st.last_error.clone(),
        frames_processed: m.frames_processed.get(),
        events_enqueued: m.events.get(),
    };
    let tmp = path.with_extension("json.tmp");
    let ok = serde_json::to_vec(&state)
        .ok()
        .and_then(|b| std::fs::write(&tmp, b).ok())
        .and_then(|_| std::fs::rename(&tmp, path).ok());
    if ok.is_none() {
        tracing::debug!(path = %path.display(), "could not write the state file");
    }
}
