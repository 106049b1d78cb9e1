//! Acknowledged rows are deleted off the drain loop, on a thread of their own; the token
//! bucket of the bandwidth cap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::agent::outbox::Outbox;

pub(super) enum AckJob {
    Delete(Vec<u64>),
    Sync(std::sync::mpsc::Sender<()>),
}

/// The ack thread: deletes delivered rows in batched transactions, off the drain loop.
pub(super) struct Acker {
    pub(super) jobs: std::sync::mpsc::Sender<AckJob>,
    /// Rows deleted so far.
    pub(super) done: Arc<AtomicU64>,
    /// The last delete error, for the drain loop to log.
    pub(super) error: Arc<Mutex<Option<String>>>,
}

impl Acker {
    pub(super) fn start(outbox: Arc<Mutex<Outbox>>) -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<AckJob>();
        let done = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (d, e) = (done.clone(), error.clone());
        std::thread::Builder::new()
            .name("outbox-acker".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let mut seqs = Vec::new();
                    let mut syncs = Vec::new();
                    for job in std::iter::once(job).chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    {
                        match job {
                            AckJob::Delete(s) => seqs.extend(s),
                            AckJob::Sync(reply) => syncs.push(reply),
                        }
                    }
                    if !seqs.is_empty() {
                        let result = match outbox.lock() {
                            Ok(mut ob) => ob.ack(&seqs).map_err(|err| err.to_string()),
                            Err(_) => Err("outbox lock poisoned".to_string()),
                        };
                        match result {
                            Ok(_) => {
                                d.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                            }
                            Err(msg) => {
                                if let Ok(mut slot) = e.lock() {
                                    *slot = Some(msg);
                                }
                            }
                        }
                    }
                    for reply in syncs {
                        let _ = reply.send(());
                    }
                }
            })
            .map(|_| ())
            .unwrap_or_else(|err| tracing::error!(%err, "cannot start the ack thread"));
        Self { jobs, done, error }
    }

    pub(super) fn delete(&self, seqs: Vec<u64>) {
        let _ = self.jobs.send(AckJob::Delete(seqs));
    }

    pub(super) fn sync(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.jobs.send(AckJob::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// A token bucket for the bandwidth cap.
pub(super) struct Bucket {
    pub(super) rate: f64,
    pub(super) tokens: f64,
    pub(super) last: Instant,
}

impl Bucket {
    pub(super) fn take(&mut self, n: u64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate.max(n as f64));
        self.last = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}
