//! Stage 1, capture: reads frames from the configured source (`super::source`) and hands the
//! newest one to inference through a one-frame [`Slot`]. A lost camera is retried with backoff
//! and announced with `camera_lost` / `camera_recovered` health events; it never stops the
//! agent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::config::{AgentConfig, SourceKind};
use super::health::{now_ms, AgentMetrics, Beats};
use super::source::{self, Frame, FrameSource, SourceError};
use crate::event::{Event, Health, Kind};

/// One-frame hand-off between capture and inference.
pub(super) struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

#[derive(Default)]
pub(super) struct SlotState {
    frame: Option<Frame>,
    closed: bool,
}

impl Slot {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(SlotState::default()),
            cv: Condvar::new(),
        }
    }

    /// Puts a frame: replaces the waiting one (returns true: one dropped) or, with `wait`,
    /// waits until it was taken. Returns false without putting when closed.
    pub(super) fn put(&self, frame: Frame, wait: bool, beat: &dyn Fn()) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        if wait {
            while st.frame.is_some() && !st.closed {
                beat();
                st = match self.cv.wait_timeout(st, Duration::from_millis(200)) {
                    Ok((g, _)) => g,
                    Err(_) => return false,
                };
            }
        }
        let dropped = st.frame.replace(frame).is_some();
        self.cv.notify_all();
        dropped
    }

    /// Takes the waiting frame; `Err(())` once closed and empty, `Ok(None)` on timeout.
    pub(super) fn take(&self, timeout: Duration) -> Result<Option<Frame>, ()> {
        let Ok(mut st) = self.state.lock() else {
            return Err(());
        };
        if st.frame.is_none() && !st.closed {
            st = match self.cv.wait_timeout(st, timeout) {
                Ok((g, _)) => g,
                Err(_) => return Err(()),
            };
        }
        match st.frame.take() {
            Some(f) => {
                self.cv.notify_all();
                Ok(Some(f))
            }
            None if st.closed => Err(()),
            None => Ok(None),
        }
    }

    pub(super) fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
        }
        self.cv.notify_all();
    }
}

/// What the configured source is, for logs and the `agent_started` event.
pub fn describe_source(cfg: &AgentConfig) -> String {
    let s = &cfg.source;
    match s.kind {
        SourceKind::Images => format!("images {}", s.images),
        SourceKind::Synthetic => format!("synthetic {}x{}", s.width, s.height),
        SourceKind::Camera => format!("camera {} {}x{}@{}", s.camera, s.width, s.height, s.fps),
    }
}

/// Checks the configured source now (no images match, a bad camera name) and returns a factory
/// that opens it on the capture thread. A camera is not touched until then: one that is missing
/// at start is retried like one unplugged later.
pub fn source_factory(cfg: &AgentConfig) -> Result<source::SourceFactory, SourceError> {
    let s = cfg.source.clone();
    let max_pixels = cfg.detector.max_pixels;
    Ok(match s.kind {
        SourceKind::Images => {
            let files = source::ImageFiles::open(&s.images, s.repeat, s.fps, max_pixels)?;
            Box::new(move || Ok(Box::new(files) as Box<dyn FrameSource>))
        }
        SourceKind::Synthetic => Box::new(move || {
            Ok(Box::new(source::Synthetic::new(s.width, s.height, s.fps)) as Box<dyn FrameSource>)
        }),
        SourceKind::Camera => {
            source::camera_index(&s.camera)?;
            Box::new(move || {
                source::Camera::new(&s.camera, s.width, s.height, s.fps, s.format, max_pixels)
                    .map(|c| Box::new(c) as Box<dyn FrameSource>)
            })
        }
    })
}

/// Capture stage. Returns an error only for a source that cannot work at all.
#[allow(clippy::too_many_arguments)]
pub(super) fn capture_loop(
    source: source::SourceFactory,
    slot: &Slot,
    m: &AgentMetrics,
    beats: &Beats,
    stop: &AtomicBool,
    health: &SyncSender<(Event, String)>,
    device_id: &str,
    max_frames: u64,
    retry_max: Duration,
    live: bool,
    t0: Instant,
) -> Result<(), SourceError> {
    let beat = || beats.capture.store(now_ms(t0), Ordering::Relaxed);
    let mut source = source()?;
    let mut lost: Option<String> = None;
    let mut backoff = Duration::from_millis(250);
    let mut frames = 0u64;
    m.camera_up.set(1.0);
    while !stop.load(Ordering::Relaxed) {
        beat();
        if max_frames > 0 && frames >= max_frames {
            return Ok(());
        }
        match source.next_frame() {
            Ok(frame) => {
                if let Some(why) = lost.take() {
                    tracing::info!(source = %source.describe(), "source recovered");
                    m.camera_up.set(1.0);
                    let ev = Event::health(
                        device_id,
                        Kind::CameraRecovered,
                        Health {
                            message: Some(format!("{} back after: {why}", source.describe())),
                            evicted: None,
                        },
                    );
                    let _ = health.send((ev, String::new()));
                    backoff = Duration::from_millis(250);
                }
                frames += 1;
                m.frames_captured.inc();
                if slot.put(frame, !live, &beat) {
                    m.frames_dropped.inc();
                }
            }
            Err(SourceError::BadFrame { origin, reason }) => {
                m.frames_bad.inc();
                tracing::warn!(%origin, "bad frame skipped: {reason}");
            }
            Err(SourceError::Ended) => return Ok(()),
            Err(SourceError::Config(e)) => return Err(SourceError::Config(e)),
            Err(SourceError::Unavailable(why)) => {
                if lost.is_none() {
                    tracing::warn!(source = %source.describe(), "source lost: {why}");
                    m.camera_up.set(0.0);
                    let ev = Event::health(
                        device_id,
                        Kind::CameraLost,
                        Health {
                            message: Some(why.clone()),
                            evicted: None,
                        },
                    );
                    let _ = health.send((ev, String::new()));
                    lost = Some(why);
                }
                // Sleep in small steps so stop and the heartbeat stay responsive.
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    beat();
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(retry_max);
                if let Err(e) = source.reopen() {
                    tracing::debug!("reopen failed: {e}");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_keeps_the_newest_frame_or_waits() {
        let slot = Slot::new();
        let frame = |i| Frame {
            image: image::DynamicImage::new_rgb8(2, 2),
            captured_at: chrono::Utc::now(),
            index: i,
            origin: String::new(),
            id: uuid::Uuid::now_v7(),
        };
        assert!(!slot.put(frame(0), false, &|| {}));
        assert!(slot.put(frame(1), false, &|| {}), "replacing counts a drop");
        let got = slot.take(Duration::from_millis(10)).unwrap().unwrap();
        assert_eq!(got.index, 1);
        assert!(slot.take(Duration::from_millis(10)).unwrap().is_none());
        slot.close();
        assert!(slot.take(Duration::from_millis(10)).is_err());
    }
}
