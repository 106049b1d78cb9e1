//! JPEG snapshots of frames with detections, in a directory kept under a byte cap.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// A snapshot that could not be written (logged; the event is not affected).
#[derive(Debug, thiserror::Error)]
pub(super) enum SnapshotError {
    #[error("encoding: {0}")]
    Encode(#[from] image::ImageError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A directory of JPEG snapshots kept under a byte cap (oldest deleted first; names are
/// UUIDv7 event ids, so name order is time order).
pub(super) struct SnapshotDir {
    dir: PathBuf,
    max_bytes: u64,
    quality: u8,
    /// (name, bytes), oldest first.
    files: VecDeque<(PathBuf, u64)>,
    total: u64,
}

impl SnapshotDir {
    pub(super) fn open(dir: &Path, max_bytes: u64, quality: u8) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "jpg"))
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
            .collect();
        files.sort();
        let total = files.iter().map(|f| f.1).sum();
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            quality,
            files: files.into(),
            total,
        })
    }

    pub(super) fn write(
        &mut self,
        name: &str,
        img: &image::DynamicImage,
    ) -> Result<(), SnapshotError> {
        let mut bytes = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, self.quality);
        img.to_rgb8().write_with_encoder(enc)?;
        let path = self.dir.join(format!("{name}.jpg"));
        let tmp = self.dir.join(format!(".{name}.jpg.tmp"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        std::fs::write(&tmp, &bytes).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        self.total += bytes.len() as u64;
        self.files.push_back((path, bytes.len() as u64));
        while self.total > self.max_bytes {
            let Some((old, n)) = self.files.pop_front() else {
                break;
            };
            let _ = std::fs::remove_file(&old);
            self.total -= n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_dir_stays_under_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 7])
        }));
        let mut s = SnapshotDir::open(dir.path(), 4000, 90).unwrap();
        for i in 0..20 {
            s.write(&format!("{i:04}"), &img).unwrap();
        }
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 4000, "{on_disk}");
        assert!(dir.path().join("0019.jpg").exists(), "newest kept");
        assert!(!dir.path().join("0000.jpg").exists(), "oldest deleted");
    }
}
