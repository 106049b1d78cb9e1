//! The store-and-forward outbox: a bounded, crash-safe SQLite queue of events on the device.
//!
//! # Invariants
//!
//! * **An acknowledged enqueue survives a process crash.** [`Outbox::enqueue`] returns only after
//!   its transaction committed. With [`Durability::Full`] (the default) the WAL is fsynced at
//!   every commit, so a power cut loses nothing acknowledged either (on storage that honours
//!   fsync). With [`Durability::Normal`] a power cut may roll back the last commits since the
//!   previous checkpoint; a process crash still loses nothing. Batching (group commit) makes
//!   the fsync cost per batch, not per event.
//! * **Rows are deleted only after the broker acknowledged them** ([`Outbox::ack`] is called
//!   from the uplink's delivery reports), so every event leaves at least once.
//! * **The files never grow past `max_bytes`.** The database is capped with
//!   `max_page_count`; the WAL is checkpointed and truncated (`journal_size_limit`) within a
//!   reserve carved out of the cap. Before a batch would not fit, events are evicted by value:
//!   first events without detections, then the lowest-confidence detections (oldest first on
//!   ties), then the oldest health events. Evictions are counted by reason, persisted, and
//!   announced with an `outbox_evicted` health event. `SQLITE_FULL` (cap or disk full) evicts
//!   and retries instead of failing. On a disk that fills up before the cap, the file's current
//!   size becomes the cap and `NAME.reserve` (a file of zeros, 64 KiB-1 MiB, made at open) is
//!   deleted to give the checkpoint and the deletes the room they need: tested on a real 2 MiB
//!   tmpfs (`tests/outbox.rs`). The reserve is re-created at the next open.
//! * **A corrupt file never stops the agent.** `quick_check` runs at open; a file that fails it
//!   (or is not a database) is moved aside as `NAME.corrupt-<unix ms>` with its WAL, kept for
//!   inspection, counted, and a fresh outbox is opened.
//! * **Old outboxes open.** The schema is versioned with `PRAGMA user_version`; every older
//!   version is migrated forward in a transaction at open. A newer version is refused.

mod evict;
mod files;
mod park;
mod reader;
mod schema;
mod stats;

pub use files::file_bytes;
pub use reader::OutboxReader;
pub use schema::{DEAD_LETTER_SHARE, SCHEMA_VERSION};
pub use stats::{read_stats, ReadError};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode};

use crate::event::{Event, Evictions, Health, Kind};

use evict::{add, counter_pairs};
use files::{mmap_limit, now_ms, quarantine, wal_reserve};
use schema::*;

/// Fsync policy, see the module docs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// fsync the WAL at every commit: nothing acknowledged is lost, even on power cut.
    Full,
    /// fsync at checkpoints only: a process crash loses nothing, a power cut may lose the last
    /// commits.
    Normal,
}

/// How an outbox is opened.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutboxConfig {
    pub path: PathBuf,
    /// Upper bound for the database plus its WAL, in bytes (at least 256 KiB).
    pub max_bytes: u64,
    /// Events older than this are dropped (counted as `expired`).
    pub max_age: Option<Duration>,
    pub durability: Durability,
    /// Device id used for the outbox's own health events.
    pub device_id: String,
}

impl OutboxConfig {
    pub fn new(path: impl Into<PathBuf>, device_id: &str) -> Self {
        Self {
            path: path.into(),
            max_bytes: 512 * 1024 * 1024,
            max_age: None,
            durability: Durability::Full,
            device_id: device_id.to_string(),
        }
    }
}

/// Why an outbox could not be opened (a corrupt file is not one of them: it is quarantined).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("outbox {path}: cannot move the corrupt file aside: {source}")]
    Quarantine {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("outbox {path} has schema version {found}, newer than this agent's {SCHEMA_VERSION}; refusing to touch it")]
    TooNew { path: PathBuf, found: i64 },
    #[error("outbox max_bytes {0} is below the minimum of 262144")]
    CapTooSmall(u64),
}

/// Why an enqueue failed. Nothing was written when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("outbox: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox: cannot serialise event: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("outbox is full and nothing is left to evict (batch of {0} bytes is larger than the cap allows)")]
    Full(u64),
}

/// What opening found.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Where a corrupt file was moved, if one was.
    pub quarantined: Option<PathBuf>,
    /// Schema version found on disk (0 for a new file).
    pub migrated_from: i64,
}

/// One row ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub seq: u64,
    pub event_id: String,
    /// Kafka key.
    pub device_id: String,
    /// Kafka value (the event's JSON).
    pub payload: Vec<u8>,
}

/// Counters and gauges for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct OutboxStats {
    pub depth: u64,
    pub payload_bytes: u64,
    /// Database plus WAL on disk.
    pub file_bytes: u64,
    pub oldest_created_ms: Option<i64>,
    pub evictions: Evictions,
    pub dead_letters: u64,
    pub quarantined: u64,
    pub next_seq: u64,
    /// When the broker last acknowledged an event (ms since the epoch).
    pub last_ack_ms: Option<i64>,
}

/// The outbox. Not `Sync`: share it behind a mutex; every call is short.
pub struct Outbox {
    /// The one connection (WAL mode).
    conn: Connection,
    /// As opened.
    cfg: OutboxConfig,
    /// `max_page_count` we set (database pages available under the cap).
    max_pages: u64,
    /// Page size in bytes.
    page_size: u64,
    /// Rows queued, kept exact by every write of this connection (a COUNT(*) scans the whole
    /// table once there is no index to count).
    depth: u64,
}

impl Outbox {
    /// Opens (creating, migrating or quarantining as needed). On a disk with no room left
    /// (SQLite cannot even create the WAL's shared-memory file), the reserve file next to the
    /// outbox is deleted and the open tried once more: that room is what the reserve is for.
    pub fn open(cfg: OutboxConfig) -> Result<(Self, OpenReport), OpenError> {
        match Self::open_once(cfg.clone()) {
            Err(OpenError::Sqlite { path, source }) if files::no_room(&source) => {
                let reserve = files::reserve_of(&path);
                if std::fs::remove_file(&reserve).is_err() {
                    return Err(OpenError::Sqlite { path, source });
                }
                tracing::warn!(outbox = %path.display(), error = %source, "no room on the disk to open the outbox: reserve file released");
                Self::open_once(cfg)
            }
            other => other,
        }
    }

    fn open_once(cfg: OutboxConfig) -> Result<(Self, OpenReport), OpenError> {
        if cfg.max_bytes < 256 * 1024 {
            return Err(OpenError::CapTooSmall(cfg.max_bytes));
        }
        let path = cfg.path.clone();
        let cfg_again = cfg.clone();
        let sq = |source| OpenError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut report = OpenReport::default();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::Quarantine {
                path: path.clone(),
                source,
            })?;
        }
        if path.exists() && !Self::healthy(&path).map_err(sq)? {
            let moved = quarantine(&path).map_err(|source| OpenError::Quarantine {
                path: path.clone(),
                source,
            })?;
            tracing::error!(outbox = %path.display(), moved_to = %moved.display(), "outbox failed its integrity check; moved aside, starting a fresh one");
            report.quarantined = Some(moved);
        }
        let conn = Connection::open(&path).map_err(sq)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sq)?;
        conn.pragma_update(None, "page_size", 4096).map_err(sq)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sq)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "outbox could not switch to WAL mode");
        }
        let sync = match cfg.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync).map_err(sq)?;
        // Reads of a big backlog come from memory-mapped pages and an 8 MiB cache instead of
        // one pread per page.
        conn.pragma_update(None, "cache_size", -8192).map_err(sq)?;
        let _: i64 = conn
            .query_row(
                &format!("PRAGMA mmap_size = {}", mmap_limit(cfg.max_bytes)),
                [],
                |r| r.get(0),
            )
            .map_err(sq)?;
        let page_size: u64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
            .map_err(sq)? as u64;
        let reserve = wal_reserve(cfg.max_bytes);
        let max_pages = (cfg.max_bytes - reserve) / page_size;
        conn.query_row(&format!("PRAGMA max_page_count = {max_pages}"), [], |_| {
            Ok(())
        })
        .map_err(sq)?;
        conn.pragma_update(None, "journal_size_limit", reserve as i64)
            .map_err(sq)?;
        conn.pragma_update(
            None,
            "wal_autocheckpoint",
            (reserve / page_size / 2).max(16) as i64,
        )
        .map_err(sq)?;

        let mut outbox = Self {
            conn,
            cfg,
            max_pages,
            page_size,
            depth: 0,
        };
        report.migrated_from = outbox.migrate().map_err(|e| match e {
            MigrateError::Sqlite(source) => OpenError::Sqlite {
                path: path.clone(),
                source,
            },
            MigrateError::TooNew(found) => OpenError::TooNew {
                path: path.clone(),
                found,
            },
        })?;
        match outbox.self_check().map_err(sq)? {
            files::SelfCheck::Sound => {}
            files::SelfCheck::Repaired { next_seq } => {
                tracing::warn!(outbox = %path.display(), next_seq, "outbox seq counter was missing or behind its rows; repaired");
            }
            files::SelfCheck::Damaged(why) => {
                // Damage quick_check missed: set the file aside like any corrupt one.
                drop(outbox);
                let moved = quarantine(&path).map_err(|source| OpenError::Quarantine {
                    path: path.clone(),
                    source,
                })?;
                tracing::error!(outbox = %path.display(), moved_to = %moved.display(), error = %why, "outbox cannot be written (damage its integrity check missed); moved aside, starting a fresh one");
                let (fresh, mut again) = Self::open(cfg_again)?;
                fresh
                    .conn
                    .execute(BUMP_COUNTER, params!["quarantined", 1])
                    .map_err(sq)?;
                again.quarantined = Some(moved);
                again.migrated_from = report.migrated_from;
                return Ok((fresh, again));
            }
        }
        outbox.depth = outbox.stats_counts().map_err(sq)?.0;
        outbox.ensure_reserve();
        if report.quarantined.is_some() {
            outbox
                .conn
                .execute(BUMP_COUNTER, params!["quarantined", 1])
                .map_err(sq)?;
        }
        Ok((outbox, report))
    }
    pub fn path(&self) -> &Path {
        &self.cfg.path
    }
    /// Pages in the database file (used and free).
    fn page_count(&self) -> rusqlite::Result<u64> {
        let count: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        Ok(count.max(0) as u64)
    }

    /// Pages in use (database pages minus free pages).
    fn used_pages(&self) -> rusqlite::Result<u64> {
        let count: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok((count - free).max(0) as u64)
    }

    /// Enqueues a batch in one transaction (group commit); assigns and returns each event's
    /// `seq`. Evicts by value first when the batch would not fit under the cap.
    pub fn enqueue(&mut self, events: &mut [Event]) -> Result<Vec<u64>, EnqueueError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut payload_estimate = 0u64;
        for e in events.iter() {
            payload_estimate += serde_json::to_vec(e)?.len() as u64 + 64;
        }
        let mut attempts = 0;
        // Evictions made for this batch, recorded (counters + health event) with it.
        let mut evicted = Evictions::default();
        loop {
            attempts += 1;
            let result = match self.make_room(payload_estimate) {
                Ok(ev) => {
                    add(&mut evicted, ev);
                    self.try_enqueue(events, evicted)
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(seqs) => return Ok(seqs),
                Err(EnqueueError::Sqlite(e)) if is_full(&e) && attempts < 20 => {
                    // Cap or disk full: evict a tenth of the queue and try again.
                    let depth = self.depth;
                    if depth == 0 {
                        return Err(EnqueueError::Full(payload_estimate));
                    }
                    tracing::warn!(error = %e, "outbox full; evicting and retrying");
                    // A really full disk (below our cap): the file cannot grow any more, so
                    // what it holds now becomes the cap, and the WAL is checkpointed and
                    // truncated so that the deletes below have room to be written at all.
                    let pages = self.page_count()?;
                    if pages < self.max_pages * 9 / 10 {
                        tracing::error!(
                            pages,
                            cap_pages = self.max_pages,
                            "the disk is full before the outbox's cap; capping at the current size"
                        );
                        self.max_pages = pages.max(16);
                    }
                    // The reserve file gives back the room that checkpointing and deleting
                    // need on a disk with no free block left.
                    // (It is re-created at the next open, not now: on a disk that stays full
                    // it would take back the room the WAL needs for the next batch.)
                    let _ = std::fs::remove_file(self.reserve_path());
                    let _ = self.checkpoint();
                    let n = (depth / 10).max(1);
                    match self.evict(n) {
                        Ok(ev) => add(&mut evicted, ev),
                        Err(e) if is_full(&e) => {
                            tracing::warn!("evicting on a full disk failed too; retrying")
                        }
                        Err(e) => return Err(e.into()),
                    }
                    let _ = self.checkpoint();
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_enqueue(
        &mut self,
        events: &mut [Event],
        evicted: Evictions,
    ) -> Result<Vec<u64>, EnqueueError> {
        let device = self.cfg.device_id.clone();
        let tx = self.conn.transaction()?;
        let mut next: i64 = tx.query_row(NEXT_SEQ, [], |r| r.get(0))?;
        let now = now_ms();
        let mut seqs = Vec::with_capacity(events.len() + 1);
        let mut health = if evicted.total() > 0 {
            Some(Event::health(
                &device,
                Kind::OutboxEvicted,
                Health {
                    message: None,
                    evicted: Some(evicted),
                },
            ))
        } else {
            None
        };
        {
            let mut insert = tx.prepare_cached(INSERT_EVENT)?;
            for ev in health.iter_mut().chain(events.iter_mut()) {
                insert_row(&mut insert, next, ev, now)?;
                seqs.push(next as u64);
                next += 1;
            }
            tx.execute(SET_NEXT_SEQ, params![next])?;
            for (key, n) in counter_pairs(&evicted) {
                tx.execute(BUMP_COUNTER, params![key, n as i64])?;
            }
        }
        tx.commit()?;
        self.depth += seqs.len() as u64;
        if health.is_some() {
            seqs.remove(0);
        }
        Ok(seqs)
    }

    /// Up to `limit` rows to send, skipping `in_flight`. With `live_since_ms`, rows created at
    /// or after it come first (live-first drain), then the oldest backlog.
    pub fn next_batch(
        &self,
        limit: usize,
        in_flight: &HashSet<u64>,
        live_since_ms: Option<i64>,
    ) -> rusqlite::Result<Vec<Pending>> {
        let mut out = Vec::with_capacity(limit.min(65_536));
        let mut seen = HashSet::new();
        let scan = i64::try_from(limit.saturating_add(in_flight.len())).unwrap_or(i64::MAX);
        let map = |r: &rusqlite::Row| {
            Ok(Pending {
                seq: r.get::<_, i64>(0)? as u64,
                event_id: r.get(1)?,
                device_id: r.get(2)?,
                payload: r.get(3)?,
            })
        };
        if let Some(since) = live_since_ms {
            let mut stmt = self.conn.prepare_cached(SELECT_NEWEST_SINCE)?;
            for row in stmt.query_map(params![since, scan], map)? {
                let p = row?;
                if out.len() >= limit {
                    break;
                }
                if !in_flight.contains(&p.seq) && seen.insert(p.seq) {
                    out.push(p);
                }
            }
        }
        let mut after = 0i64;
        while out.len() < limit {
            let mut stmt = self.conn.prepare_cached(SELECT_OLDEST)?;
            let rows: Vec<Pending> = stmt
                .query_map(params![after, scan], map)?
                .collect::<rusqlite::Result<_>>()?;
            if rows.is_empty() {
                break;
            }
            for p in rows {
                after = p.seq as i64;
                if out.len() < limit && !in_flight.contains(&p.seq) && seen.insert(p.seq) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    /// Opens a read-only connection to the same file (see [`OutboxReader`]).
    pub fn reader(&self) -> rusqlite::Result<OutboxReader> {
        let conn = Connection::open_with_flags(
            &self.cfg.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "cache_size", -8192)?;
        let _: i64 = conn.query_row(
            &format!("PRAGMA mmap_size = {}", mmap_limit(self.cfg.max_bytes)),
            [],
            |r| r.get(0),
        )?;
        Ok(OutboxReader { conn })
    }

    /// Number of queued events.
    pub fn depth(&self) -> rusqlite::Result<u64> {
        Ok(self.depth)
    }

    /// Deletes delivered rows (one transaction). This commit is not fsynced even under
    /// [`Durability::Full`]: losing an acknowledgement to a power cut only re-sends those
    /// events (the sink dedupes on `event_id`); it can never lose one.
    pub fn ack(&mut self, seqs: &[u64]) -> rusqlite::Result<usize> {
        let relax = self.cfg.durability == Durability::Full;
        if relax {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        let n = self.delete_seqs(seqs);
        if relax {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        n
    }

    fn delete_seqs(&mut self, seqs: &[u64]) -> rusqlite::Result<usize> {
        // Deliveries come back mostly in order: delete contiguous runs with one statement.
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let tx = self.conn.transaction()?;
        let mut n = 0;
        {
            let mut del = tx.prepare_cached(DELETE_RANGE)?;
            let mut i = 0;
            while i < sorted.len() {
                let mut j = i;
                while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
                    j += 1;
                }
                n += del.execute(params![sorted[i] as i64, sorted[j] as i64])?;
                i = j + 1;
            }
            if n > 0 {
                tx.prepare_cached(SET_LAST_ACK)?
                    .execute(params![now_ms()])?;
            }
        }
        tx.commit()?;
        self.depth = self.depth.saturating_sub(n as u64);
        Ok(n)
    }

    fn stats_counts(&self) -> rusqlite::Result<(u64, u64, Option<i64>)> {
        stats::counts(&self.conn)
    }

    /// The persistent eviction counters alone: four key lookups, no table scan (metrics read
    /// this on every scrape while the writer and the acker share the connection).
    pub fn evictions(&self) -> rusqlite::Result<Evictions> {
        stats::evictions(&self.conn)
    }

    /// Depth, bytes, counters.
    pub fn stats(&self) -> rusqlite::Result<OutboxStats> {
        stats::of(&self.conn, &self.cfg.path)
    }

    /// All rows' seq and class, oldest first (tests and `status`).
    pub fn classes(&self) -> rusqlite::Result<Vec<(u64, i64, f64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, class, max_conf FROM events ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })?;
        rows.collect()
    }

    /// Checkpoints and truncates the WAL (at shutdown, and in tests measuring the file).
    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }
}

fn is_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull)
}

/// Events are stored by class: the eviction order and the parking rule read it.
const CLASS_EMPTY: i64 = 0;
const CLASS_DETECTIONS: i64 = 1;
const CLASS_HEALTH: i64 = 2;

/// Inserts `ev` as row `seq` (and gives it that `seq`).
fn insert_row(
    insert: &mut rusqlite::CachedStatement<'_>,
    seq: i64,
    ev: &mut Event,
    now: i64,
) -> rusqlite::Result<()> {
    let unstorable =
        |e: Box<dyn std::error::Error + Send + Sync>| rusqlite::Error::ToSqlConversionFailure(e);
    ev.seq = u64::try_from(seq).map_err(|e| unstorable(Box::new(e)))?;
    let payload = serde_json::to_vec(&*ev).map_err(|e| unstorable(Box::new(e)))?;
    let class = if ev.kind.is_health() {
        CLASS_HEALTH
    } else if ev.detections.is_empty() {
        CLASS_EMPTY
    } else {
        CLASS_DETECTIONS
    };
    let bytes = i64::try_from(payload.len()).map_err(|e| unstorable(Box::new(e)))?;
    insert.execute(params![
        seq,
        ev.event_id.to_string(),
        ev.device_id,
        payload,
        now,
        class,
        f64::from(ev.max_confidence()),
        bytes
    ])?;
    Ok(())
}
