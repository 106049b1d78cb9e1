//! The outbox's files on disk: sizes, the reserve carved out of the cap, quarantine of a corrupt
//! database.

use std::path::{Path, PathBuf};

use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension};

use super::Outbox;

/// The reserve file of the outbox at `path`.
pub(super) fn reserve_of(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf().into_os_string();
    p.push(".reserve");
    PathBuf::from(p)
}

/// SQLite ran out of disk: a full disk, or an I/O error creating or growing a file (the
/// WAL's shared-memory file on a disk with no byte left is `SQLITE_IOERR_SHMSIZE`).
pub(super) fn no_room(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DiskFull | ErrorCode::SystemIoFailure)
    )
}

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
        reserve_of(&self.cfg.path)
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

/// What [`Outbox::self_check`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SelfCheck {
    /// The write path works.
    Sound,
    /// The write path works after `next_seq` was set above every stored seq (it was missing
    /// or behind: every enqueue would have failed).
    Repaired { next_seq: i64 },
    /// The write path fails with damage `quick_check` did not see (a broken index, a column
    /// renamed in the schema text): the file must be moved aside.
    Damaged(String),
}

/// The highest seq in the outbox, queued or dead-lettered.
const MAX_SEQ: &str = "SELECT max(m) FROM (SELECT max(seq) AS m FROM events UNION ALL SELECT max(seq) FROM dead_letters)";
const SET_NEXT_SEQ_ROW: &str = "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?1)";

impl Outbox {
    /// Damage `quick_check` cannot see, found by the fuzzer (fuzz/corpus/outbox/open-finding-*):
    /// a `next_seq` counter that is missing or behind the stored rows (repaired), and a schema
    /// or index that fails the write path (reported as damage). The write path is probed the
    /// way `enqueue`, `dead_letter` and eviction use it, in a transaction that is rolled back.
    /// Errors that say nothing about the file (busy, permissions, a full disk) are returned.
    pub(super) fn self_check(&mut self) -> rusqlite::Result<SelfCheck> {
        let damage = |e: &rusqlite::Error| {
            matches!(
                e.sqlite_error_code(),
                Some(
                    ErrorCode::DatabaseCorrupt
                        | ErrorCode::NotADatabase
                        | ErrorCode::ConstraintViolation
                        | ErrorCode::Unknown
                )
            ) || matches!(
                e,
                rusqlite::Error::QueryReturnedNoRows | rusqlite::Error::InvalidColumnType(..)
            )
        };
        let full = |e: &rusqlite::Error| e.sqlite_error_code() == Some(ErrorCode::DiskFull);
        let mut result = SelfCheck::Sound;
        // The small tables (meta; dead letters, at most 5% of the cap) get the full check,
        // their indexes against their rows, which quick_check skips; the events table's
        // would cost minutes on a full outbox.
        for table in ["meta", "dead_letters"] {
            let verdict =
                self.conn
                    .query_row(&format!("PRAGMA integrity_check({table})"), [], |r| {
                        r.get::<_, String>(0)
                    });
            match verdict {
                Ok(v) if v == "ok" => {}
                Ok(v) => return Ok(SelfCheck::Damaged(format!("{table}: {v}"))),
                Err(e) if damage(&e) => return Ok(SelfCheck::Damaged(e.to_string())),
                Err(e) => return Err(e),
            }
        }
        let counters = (|| {
            let next: Option<i64> = self
                .conn
                .query_row(super::schema::NEXT_SEQ, [], |r| r.get(0))
                .optional()?;
            let max: Option<i64> = self.conn.query_row(MAX_SEQ, [], |r| r.get(0))?;
            Ok::<_, rusqlite::Error>((next, max.unwrap_or(0)))
        })();
        match counters {
            Ok((next, max)) if next.is_none_or(|n| n <= max) => {
                let next_seq = max.saturating_add(1);
                match self
                    .conn
                    .execute(SET_NEXT_SEQ_ROW, rusqlite::params![next_seq])
                {
                    Ok(_) => result = SelfCheck::Repaired { next_seq },
                    Err(e) if damage(&e) => return Ok(SelfCheck::Damaged(e.to_string())),
                    // Repaired by the next open with room; enqueue fails meanwhile.
                    Err(e) if full(&e) => {
                        tracing::warn!(error = %e, "outbox seq counter cannot be repaired now: the disk is full");
                        return Ok(result);
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(_) => {}
            Err(e) if damage(&e) => return Ok(SelfCheck::Damaged(e.to_string())),
            Err(e) => return Err(e),
        }
        match self.probe_writes() {
            Ok(()) => Ok(result),
            Err(e) if damage(&e) => Ok(SelfCheck::Damaged(e.to_string())),
            // A full disk says nothing about the file, and must not keep the agent from
            // starting: enqueue evicts and falls back on the reserve file.
            Err(e) if full(&e) => {
                tracing::warn!(error = %e, "outbox write probe skipped: the disk is full");
                Ok(result)
            }
            Err(e) => Err(e),
        }
    }

    /// One row through the statements that write: enqueue (seq counter, insert, counters),
    /// dead-lettering with its trim, eviction's reads and the delete; rolled back.
    fn probe_writes(&mut self) -> rusqlite::Result<()> {
        use super::schema::*;
        let tx = self.conn.transaction()?;
        let next: i64 = tx.query_row(NEXT_SEQ, [], |r| r.get(0))?;
        tx.execute(
            INSERT_EVENT,
            rusqlite::params![
                next,
                "probe",
                "probe",
                b"{}".as_slice(),
                now_ms(),
                0,
                0.0,
                2
            ],
        )?;
        tx.execute(SET_NEXT_SEQ, rusqlite::params![next + 1])?;
        tx.execute(
            "UPDATE meta SET value = value + 0 WHERE key != 'next_seq'",
            [],
        )?;
        tx.execute(DEAD_LETTER, rusqlite::params![next, "probe", now_ms()])?;
        tx.execute(TRIM_DEAD_LETTERS, rusqlite::params![i64::MAX])?;
        tx.execute(DELETE_EVENT, rusqlite::params![next])?;
        for sql in [EVICTION_ORDER, SELECT_OLDEST, SELECT_TO_SEND, STATS] {
            tx.prepare(sql)?;
        }
        tx.rollback()
    }
}
