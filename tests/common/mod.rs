//! Shared helpers for the integration tests: where the real fixtures are, and a model imported
//! from the real checkpoint once per test binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `$EDGE_VISION_CACHE`, else `~/.cache/edge-vision`: fixtures and tools live outside the clone.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("EDGE_VISION_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/edge-vision")
        })
}

/// The fixture directory filled by `scripts/fetch-fixtures.sh`. Tests need the real weights and
/// photos; a missing fixture is a failure with instructions, never a silent skip.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("EDGE_VISION_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("fixtures"));
    for f in ["fall-best.pt", "bus.jpg", "zidane.jpg"] {
        assert!(
            dir.join(f).exists(),
            "fixture {} is missing: run `bash scripts/fetch-fixtures.sh` (or scripts/test.sh) first",
            dir.join(f).display()
        );
    }
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The fall-detection checkpoint imported to safetensors (once per test process).
pub fn imported_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("edge-vision-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let out = dir.join("fall.safetensors");
        edge_vision::agent::detect::import::import_checkpoint(&fixture("fall-best.pt"), &out)
            .expect("import best.pt");
        out
    })
}

/// One line of `tests/fixtures/ort_reference.jsonl`.
#[derive(Debug, serde::Deserialize)]
pub struct Reference {
    pub image: String,
    pub width: u32,
    pub height: u32,
    pub detections: Vec<edge_vision::agent::detect::Detection>,
}

pub fn ort_reference() -> Vec<Reference> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ort_reference.jsonl"),
    )
    .expect("reference fixture");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("reference line"))
        .collect()
}

pub mod broker;
pub mod certs;
pub mod proxy;
pub mod rig;
pub mod tls_pg;
