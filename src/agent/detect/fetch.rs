//! `edge-agent model fetch NAME`: downloads a model listed in `models/manifest.toml`, with a
//! progress bar, into a temporary file that is checked against the manifest's sha256 before it
//! is renamed into place. A file that fails the check is deleted; nothing half-written is ever
//! left under the final name.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;

/// The manifest shipped with the agent (also installed next to the binary by the package).
pub const EMBEDDED_MANIFEST: &str = include_str!("../../../models/manifest.toml");

/// One downloadable model.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Name used on the command line.
    pub name: String,
    pub description: String,
    /// Download address, pinned to a revision.
    pub url: String,
    /// Expected sha256 (hex); empty means not pinned yet.
    pub sha256: String,
    pub licence: String,
    /// Class names: a file name next to the manifest, or `metadata`.
    pub classes: String,
    /// File name to save as.
    pub file: String,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    model: Vec<ManifestEntry>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("manifest {source_name}: {reason}")]
    Manifest { source_name: String, reason: String },
    #[error("no model named `{name}` in the manifest (known: {known})")]
    Unknown { name: String, known: String },
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error(
        "checksum mismatch for {url}: expected {expected}, got {actual}; the download was deleted"
    )]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("model `{name}` has no pinned sha256 in the manifest; the download's sha256 is {actual}. Re-run with --trust-unpinned to keep it, and pin it in models/manifest.toml")]
    Unpinned { name: String, actual: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Parses a manifest; `source_name` is used in errors.
pub fn parse_manifest(text: &str, source_name: &str) -> Result<Vec<ManifestEntry>, FetchError> {
    let m: Manifest = toml::from_str(text).map_err(|e| FetchError::Manifest {
        source_name: source_name.into(),
        reason: e.to_string(),
    })?;
    Ok(m.model)
}

/// Finds an entry by name.
pub fn find<'a>(entries: &'a [ManifestEntry], name: &str) -> Result<&'a ManifestEntry, FetchError> {
    entries
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| FetchError::Unknown {
            name: name.into(),
            known: entries
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Downloads `entry` into `dir`, returning the final path. `progress` shows a bar on stderr.
pub fn fetch(
    entry: &ManifestEntry,
    dir: &Path,
    trust_unpinned: bool,
    progress: bool,
) -> Result<PathBuf, FetchError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| FetchError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dest = dir.join(&entry.file);
    let tmp = dir.join(format!(".{}.part", entry.file));
    let dl = |reason: String| FetchError::Download {
        url: entry.url.clone(),
        reason,
    };
    let resp = ureq::get(&entry.url)
        .call()
        .map_err(|e| dl(e.to_string()))?;
    let total = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(entry.name.clone());
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut reader = resp.into_body().into_reader();
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let result = (|| {
        loop {
            let n = reader.read(&mut buf).map_err(|e| dl(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(io(&tmp))?;
            bar.inc(n as u64);
        }
        file.sync_all().map_err(io(&tmp))?;
        let actual = crate::agent::detect::import::hex(&hasher.finalize());
        if entry.sha256.is_empty() {
            if !trust_unpinned {
                return Err(FetchError::Unpinned {
                    name: entry.name.clone(),
                    actual,
                });
            }
        } else if !entry.sha256.eq_ignore_ascii_case(&actual) {
            return Err(FetchError::Checksum {
                url: entry.url.clone(),
                expected: entry.sha256.clone(),
                actual,
            });
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        Ok(dest.clone())
    })();
    bar.finish_and_clear();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_manifest_parses_and_names_class_files_that_exist() {
        let entries = parse_manifest(EMBEDDED_MANIFEST, "models/manifest.toml").expect("manifest");
        assert!(!entries.is_empty());
        for e in &entries {
            assert!(e.url.starts_with("https://"), "{}", e.url);
            assert!(e.sha256.is_empty() || e.sha256.len() == 64);
            if e.classes != "metadata" {
                let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("models")
                    .join(&e.classes);
                assert!(
                    p.exists(),
                    "{} names {}, which is missing",
                    e.name,
                    p.display()
                );
            }
        }
        assert!(find(&entries, "yolov8n-coco").is_ok());
        assert!(matches!(
            find(&entries, "nope"),
            Err(FetchError::Unknown { .. })
        ));
    }

    #[test]
    fn unknown_manifest_keys_are_rejected() {
        let bad = "[[model]]\nname='a'\ndescription=''\nurl=''\nsha256=''\nlicence=''\nclasses=''\nfile=''\nextra=1\n";
        let err = parse_manifest(bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("x.toml") && err.contains("extra"), "{err}");
    }
}
