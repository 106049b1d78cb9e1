//! The outbox's files on disk: sizes, the reserve carved out of the cap, quarantine of a corrupt
//! database.

use std::path::{Path, PathBuf};

use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

use super::Outbox;

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// How much of the file to memory-map: all of it on 64-bit, at most 256 MiB of a 32-bit
/// (armv7) address space.
pub(super) fn mmap_limit(max_bytes: u64) -> u64 {
    let ceiling: u64 = if cfg!(target_pointer_width = "64") {
        4 << 30
    } else {
        256 << 20
    };
    max_bytes.min(ceiling)
}

/// Size of the reserve file (see [`Outbox::ensure_reserve`]).
pub(super) fn reserve_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 64).clamp(64 * 1024, 1024 * 1024)
}

/// Bytes set aside from the cap for the WAL.
pub(super) fn wal_reserve(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(64 * 1024, 4 * 1024 * 1024)
}

impl Outbox {
    /// `quick_check` in a separate, read-only connection.
    ///
    /// `Ok(false)` only for real corruption: `quick_check` finds damage, or SQLite says the
    /// file is corrupt or not a database. Anything else (busy, permissions, a directory in
    /// the way) is an error for the caller: moving a healthy outbox aside would strand its
    /// undelivered events.
    pub(super) fn healthy(path: &Path) -> rusqlite::Result<bool> {
        let corrupt = |e: &rusqlite::Error| {
            matches!(
                e.sqlite_error_code(),
                Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
            )
        };
        let conn =
            match Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE) {
                Ok(c) => c,
                Err(e) if corrupt(&e) => return Ok(false),
                Err(e) => return Err(e),
            };
        conn.busy_timeout(Duration::from_secs(5))?;
        match conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)) {
            Ok(s) => Ok(s == "ok"),
            Err(e) if corrupt(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The reserve file next to the outbox: a few hundred KiB of zeros, deleted when the disk
    /// is really full so that checkpoints and evictions can still be written, then re-created.
    pub(super) fn reserve_path(&self) -> PathBuf {
        let mut p = self.cfg.path.clone().into_os_string();
        p.push(".reserve");
        PathBuf::from(p)
    }

    /// Creates the reserve file if it is missing and the disk has room (best effort).
    pub(super) fn ensure_reserve(&self) {
        let path = self.reserve_path();
        if path.exists() {
            return;
        }
        let size = reserve_bytes(self.cfg.max_bytes) as usize;
        let tmp = path.with_extension("reserve.tmp");
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            use std::io::Write;
            f.write_all(&vec![0u8; size])?;
            f.sync_all()
        });
        match written.and_then(|()| std::fs::rename(&tmp, &path)) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!(path = %path.display(), "no room for the reserve file: {e}");
            }
        }
    }
}

/// Size of the database and its WAL on disk.
pub fn file_bytes(path: &Path) -> u64 {
    let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    size(path.to_owned()) + size(PathBuf::from(wal))
}

/// Moves a corrupt database (and its WAL/SHM) aside; returns the new path.
pub(super) fn quarantine(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = now_ms();
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".corrupt-{stamp}"));
    let target = PathBuf::from(target);
    std::fs::rename(path, &target)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            let mut t = target.as_os_str().to_owned();
            t.push(suffix);
            std::fs::rename(&side, PathBuf::from(t))?;
        }
    }
    Ok(target)
}
