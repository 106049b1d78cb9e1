//! Frame sources: one trait, three kinds (the camera in `camera.rs`).
//!
//! * [`ImageFiles`] — a directory or a glob of JPEG/PNG files, sorted by name, optionally
//!   looped and paced to a frame rate (tests, demos, replaying recordings);
//! * [`Synthetic`] — a moving test pattern, no files needed;
//! * [`Camera`] — a V4L2 camera through `nokhwa`, MJPEG or YUYV, decoded here
//!   ([`decode_mjpeg`], [`decode_yuyv`]) so that webcam MJPEG without Huffman tables and
//!   limited-range YUYV are handled the same on every target.
//!
//! A source returns [`SourceError::Unavailable`] when the device is gone (unplugged, read
//! error); the capture stage then drops it, backs off and calls [`FrameSource::reopen`] until
//! it works again. A frame that cannot be decoded is [`SourceError::BadFrame`]: counted and
//! skipped. [`SourceError::Ended`] only comes from a finite, non-looping file source.

mod camera;

pub use camera::{
    camera_index, decode_mjpeg, decode_yuyv, list_cameras, Camera, FrameDecodeError, PixelFormat,
};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use image::{DynamicImage, RgbImage};

/// One captured frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub image: DynamicImage,
    /// When the frame was captured (the event's `captured_at`).
    pub captured_at: DateTime<Utc>,
    /// Frame number within this source's life (0-based).
    pub index: u64,
    /// Where it came from: a file name, `camera:/dev/video0`, `synthetic`.
    pub origin: String,
    /// The event id this frame's event will carry (UUIDv7, made at capture).
    pub id: uuid::Uuid,
}

impl Frame {
    /// A frame captured now: its id (the event's `event_id`, a UUIDv7) and capture time are
    /// made here, once, and never again downstream.
    pub fn captured(image: DynamicImage, index: u64, origin: String) -> Self {
        Self {
            image,
            captured_at: Utc::now(),
            index,
            origin,
            id: uuid::Uuid::now_v7(),
        }
    }
}

/// Why no frame came.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The device is gone or failing; retry later with [`FrameSource::reopen`].
    #[error("source unavailable: {0}")]
    Unavailable(String),
    /// This one frame is unusable; the next may be fine.
    #[error("bad frame from {origin}: {reason}")]
    BadFrame { origin: String, reason: String },
    /// A finite source has no more frames.
    #[error("source ended")]
    Ended,
    /// The source cannot work with this configuration at all (no files match, bad format).
    #[error("source configuration: {0}")]
    Config(String),
}

/// Something that produces frames. Blocking; lives on the capture thread (not `Send`: camera
/// handles are not), which is why the pipeline takes a [`SourceFactory`].
pub trait FrameSource {
    /// The next frame (paced by the source where it has a frame rate).
    fn next_frame(&mut self) -> Result<Frame, SourceError>;
    /// Tries to get the device back after [`SourceError::Unavailable`].
    fn reopen(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    /// For logs and health events.
    fn describe(&self) -> String;
}

/// Builds a source on the capture thread.
pub type SourceFactory = Box<dyn FnOnce() -> Result<Box<dyn FrameSource>, SourceError> + Send>;

/// Sleeps so that frames come at most `fps` per second (0 = no pacing).
#[derive(Debug)]
struct Pacer {
    period: Option<Duration>,
    next: Option<Instant>,
}

impl Pacer {
    fn new(fps: f64) -> Self {
        Self {
            period: (fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps)),
            next: None,
        }
    }

    fn wait(&mut self) {
        let Some(period) = self.period else { return };
        let now = Instant::now();
        let next = self.next.unwrap_or(now);
        if next > now {
            std::thread::sleep(next - now);
        }
        // Do not try to catch up after a stall: pace from now on.
        self.next = Some(next.max(now) + period);
    }
}

/// Files from a directory (every .jpg/.jpeg/.png) or a glob whose file-name part may hold `*`
/// and `?`.
pub struct ImageFiles {
    files: Vec<PathBuf>,
    pos: usize,
    repeat: bool,
    pacer: Pacer,
    index: u64,
    /// Decoder's pixel limit (refuses decompression bombs).
    max_pixels: u64,
    pattern: String,
}

impl ImageFiles {
    pub fn open(
        pattern: &str,
        repeat: bool,
        fps: f64,
        max_pixels: u64,
    ) -> Result<Self, SourceError> {
        let files = list_images(pattern)?;
        if files.is_empty() {
            return Err(SourceError::Config(format!("no images match {pattern}")));
        }
        Ok(Self {
            files,
            pos: 0,
            repeat,
            pacer: Pacer::new(fps),
            index: 0,
            max_pixels,
            pattern: pattern.to_string(),
        })
    }

    /// The files in the order they will be read.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// Lists the images a pattern names, sorted.
pub fn list_images(pattern: &str) -> Result<Vec<PathBuf>, SourceError> {
    let path = Path::new(pattern);
    let (dir, name_pattern) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| SourceError::Config(format!("{pattern} names no files")))?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (dir.to_path_buf(), Some(name))
    };
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| SourceError::Config(format!("cannot list {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        // Not only regular files: a FIFO or device node is read like a file (and may block).
        .filter(|p| !p.is_dir())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match &name_pattern {
                Some(pat) => wildcard(pat, &name),
                None => {
                    let lower = name.to_ascii_lowercase();
                    lower.ends_with(".jpg") || lower.ends_with(".jpeg") || lower.ends_with(".png")
                }
            }
        })
        .collect();
    files.sort();
    Ok(files)
}

/// `*` and `?` matching over bytes.
fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            pi += 1;
            mark = ni;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl FrameSource for ImageFiles {
    fn next_frame(&mut self) -> Result<Frame, SourceError> {
        if self.pos >= self.files.len() {
            if !self.repeat {
                return Err(SourceError::Ended);
            }
            self.pos = 0;
        }
        let path = self.files[self.pos].clone();
        self.pos += 1;
        self.pacer.wait();
        let index = self.index;
        self.index += 1;
        let origin = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let image =
            crate::agent::detect::image_io::load_image(&path, self.max_pixels).map_err(|e| {
                SourceError::BadFrame {
                    origin: origin.clone(),
                    reason: e.to_string(),
                }
            })?;
        Ok(Frame::captured(image, index, origin))
    }

    fn describe(&self) -> String {
        format!("images {} ({} files)", self.pattern, self.files.len())
    }
}

/// A moving gradient with a bright square: cheap, deterministic, no files.
pub struct Synthetic {
    width: u32,
    height: u32,
    pacer: Pacer,
    index: u64,
}

impl Synthetic {
    pub fn new(width: u32, height: u32, fps: f64) -> Self {
        Self {
            width: width.max(16),
            height: height.max(16),
            pacer: Pacer::new(fps),
            index: 0,
        }
    }
}

impl FrameSource for Synthetic {
    fn next_frame(&mut self) -> Result<Frame, SourceError> {
        self.pacer.wait();
        let t = self.index;
        self.index += 1;
        let (w, h) = (self.width, self.height);
        let side = (w.min(h) / 4).max(4);
        let sx = (t as u32 * 7) % (w - side);
        let sy = (t as u32 * 3) % (h - side);
        let img = RgbImage::from_fn(w, h, |x, y| {
            if x >= sx && x < sx + side && y >= sy && y < sy + side {
                image::Rgb([240, 240, 240])
            } else {
                image::Rgb([
                    ((x + t as u32) % 256) as u8,
                    ((y * 255) / h) as u8,
                    (t % 256) as u8,
                ])
            }
        });
        Ok(Frame::captured(
            DynamicImage::ImageRgb8(img),
            t,
            "synthetic".into(),
        ))
    }

    fn describe(&self) -> String {
        format!("synthetic {}x{}", self.width, self.height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("*.jpg", "bus.jpg"));
        assert!(wildcard("frame-??.png", "frame-07.png"));
        assert!(!wildcard("frame-??.png", "frame-7.png"));
        assert!(!wildcard("*.jpg", "bus.jpeg"));
        assert!(wildcard("*", "x"));
    }

    #[test]
    fn synthetic_frames_move() {
        let mut s = Synthetic::new(64, 48, 0.0);
        let a = s.next_frame().unwrap();
        let b = s.next_frame().unwrap();
        assert_eq!((a.index, b.index), (0, 1));
        assert_ne!(a.image.to_rgb8().into_raw(), b.image.to_rgb8().into_raw());
    }
}
