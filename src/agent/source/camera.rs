//! V4L2 cameras through `nokhwa`: MJPEG and YUYV frames decoded here, so that webcam MJPEG
//! without Huffman tables and limited-range YUYV are handled the same on every target.

use std::path::Path;

use image::{DynamicImage, RgbImage};

use super::{Frame, FrameSource, SourceError};

/// Pixel formats a camera can be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelFormat {
    /// MJPEG if the camera offers it (less USB bandwidth), else YUYV.
    Auto,
    Mjpeg,
    Yuyv,
}

/// Why one camera frame could not be decoded (the frame is skipped and counted).
#[derive(Debug, thiserror::Error)]
pub enum FrameDecodeError {
    #[error("YUYV needs an even, non-zero width, got {width}x{height}")]
    YuyvGeometry { width: u32, height: u32 },
    #[error("{format} frame {width}x{height} needs {need} bytes, got {got}")]
    Short {
        format: &'static str,
        width: u32,
        height: u32,
        need: usize,
        got: usize,
    },
    #[error("not a JPEG frame (no SOI marker)")]
    NotJpeg,
    #[error(transparent)]
    Image(#[from] crate::agent::detect::image_io::ImageError),
    #[error("unsupported pixel format {0}")]
    Unsupported(String),
}

/// Decodes one YUYV 4:2:2 frame (V4L2 `YUYV`, BT.601 limited range) to RGB.
pub fn decode_yuyv(data: &[u8], width: u32, height: u32) -> Result<RgbImage, FrameDecodeError> {
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 || w % 2 != 0 {
        return Err(FrameDecodeError::YuyvGeometry { width, height });
    }
    let need = w * h * 2;
    let short = |got: usize| FrameDecodeError::Short {
        format: "YUYV",
        width,
        height,
        need,
        got,
    };
    if data.len() < need {
        return Err(short(data.len()));
    }
    let mut out = vec![0u8; w * h * 3];
    for (src, dst) in data[..need].chunks_exact(4).zip(out.chunks_exact_mut(6)) {
        let (y0, u, y1, v) = (src[0], src[1], src[2], src[3]);
        let d = u as i32 - 128;
        let e = v as i32 - 128;
        for (k, y) in [y0, y1].into_iter().enumerate() {
            // Integer BT.601: 298/256 = 1.164, 409 = 1.596, 100 = 0.392, 208 = 0.813, 516 = 2.017.
            let c = 298 * (y as i32 - 16);
            let clamp = |v: i32| ((v + 128) >> 8).clamp(0, 255) as u8;
            dst[k * 3] = clamp(c + 409 * e);
            dst[k * 3 + 1] = clamp(c - 100 * d - 208 * e);
            dst[k * 3 + 2] = clamp(c + 516 * d);
        }
    }
    RgbImage::from_raw(width, height, out).ok_or_else(|| short(data.len()))
}

/// Decodes one MJPEG frame. Many webcams leave out the Huffman tables (they are implied by the
/// MJPEG format); the standard ones (JPEG Annex K) are inserted before the scan when missing.
pub fn decode_mjpeg(data: &[u8], max_pixels: u64) -> Result<DynamicImage, FrameDecodeError> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return Err(FrameDecodeError::NotJpeg);
    }
    let patched;
    let bytes = match missing_dht_insert_at(data) {
        Some(at) => {
            let mut v = Vec::with_capacity(data.len() + 432);
            v.extend_from_slice(&data[..at]);
            v.extend_from_slice(&standard_dht());
            v.extend_from_slice(&data[at..]);
            patched = v;
            &patched[..]
        }
        None => data,
    };
    Ok(crate::agent::detect::image_io::decode_image(
        bytes,
        Path::new("mjpeg frame"),
        max_pixels,
    )?)
}

/// Where to insert a DHT segment: the SOS marker's offset, if no DHT comes before it.
fn missing_dht_insert_at(data: &[u8]) -> Option<usize> {
    let mut i = 2;
    while i + 4 <= data.len() {
        if data[i] != 0xFF {
            return None;
        }
        let marker = data[i + 1];
        match marker {
            0xC4 => return None,
            0xDA => return Some(i),
            0xD8 | 0x01 | 0xD0..=0xD7 => i += 2,
            0xFF => i += 1,
            _ => {
                let len = u16::from_be_bytes([data[i + 2], data[i + 3]]) as usize;
                i += 2 + len;
            }
        }
    }
    None
}

/// The four standard Huffman tables of JPEG Annex K.3, as one DHT segment.
fn standard_dht() -> Vec<u8> {
    const DC_LUMA_BITS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    const DC_CHROMA_BITS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    const DC_VALS: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    const AC_LUMA_BITS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
    const AC_LUMA_VALS: [u8; 162] = [
        0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
        0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52,
        0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25,
        0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45,
        0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64,
        0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83,
        0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
        0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6,
        0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3,
        0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8,
        0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    const AC_CHROMA_BITS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
    const AC_CHROMA_VALS: [u8; 162] = [
        0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61,
        0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33,
        0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18,
        0x19, 0x1a, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44,
        0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63,
        0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a,
        0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97,
        0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4,
        0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca,
        0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7,
        0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    let tables: [(u8, &[u8; 16], &[u8]); 4] = [
        (0x00, &DC_LUMA_BITS, &DC_VALS),
        (0x10, &AC_LUMA_BITS, &AC_LUMA_VALS),
        (0x01, &DC_CHROMA_BITS, &DC_VALS),
        (0x11, &AC_CHROMA_BITS, &AC_CHROMA_VALS),
    ];
    let body: usize = tables.iter().map(|(_, _, v)| 17 + v.len()).sum();
    let mut seg = vec![0xFF, 0xC4];
    seg.extend_from_slice(&((body + 2) as u16).to_be_bytes());
    for (class_id, bits, vals) in tables {
        seg.push(class_id);
        seg.extend_from_slice(bits);
        seg.extend_from_slice(vals);
    }
    seg
}

/// A V4L2 camera through nokhwa.
pub struct Camera {
    /// `/dev/videoN` or an index.
    device: String,
    width: u32,
    height: u32,
    fps: u32,
    format: PixelFormat,
    max_pixels: u64,
    /// Open stream; `None` while the device is gone.
    cam: Option<nokhwa::Camera>,
    index: u64,
}

impl Camera {
    /// Does not touch the device yet: the first [`FrameSource::next_frame`] opens it, so a
    /// camera that is unplugged at start-up is retried like one unplugged later.
    pub fn new(
        device: &str,
        width: u32,
        height: u32,
        fps: f64,
        format: PixelFormat,
        max_pixels: u64,
    ) -> Result<Self, SourceError> {
        camera_index(device)?;
        Ok(Self {
            device: device.to_string(),
            width,
            height,
            fps: fps.round().max(1.0) as u32,
            format,
            max_pixels,
            cam: None,
            index: 0,
        })
    }

    fn open(&mut self) -> Result<(), SourceError> {
        use nokhwa::utils::{
            CameraFormat, FrameFormat, RequestedFormat, RequestedFormatType, Resolution,
        };
        let index = camera_index(&self.device)?;
        let fourcc = match self.format {
            PixelFormat::Yuyv => FrameFormat::YUYV,
            PixelFormat::Mjpeg | PixelFormat::Auto => FrameFormat::MJPEG,
        };
        let want = CameraFormat::new(Resolution::new(self.width, self.height), fourcc, self.fps);
        let requested = RequestedFormat::new::<nokhwa::pixel_format::RgbFormat>(
            RequestedFormatType::Closest(want),
        );
        let mut cam = nokhwa::Camera::new(index, requested)
            .map_err(|e| SourceError::Unavailable(format!("{}: {e}", self.device)))?;
        cam.open_stream()
            .map_err(|e| SourceError::Unavailable(format!("{}: {e}", self.device)))?;
        tracing::info!(camera = %self.device, format = %cam.camera_format(), "camera open");
        self.cam = Some(cam);
        Ok(())
    }
}

/// `/dev/video3` -> index 3; `3` -> 3; anything else is a configuration error.
pub fn camera_index(device: &str) -> Result<nokhwa::utils::CameraIndex, SourceError> {
    let digits = device.strip_prefix("/dev/video").unwrap_or(device);
    digits
        .parse::<u32>()
        .map(nokhwa::utils::CameraIndex::Index)
        .map_err(|_| {
            SourceError::Config(format!(
                "camera must be an index or /dev/videoN, not {device:?}"
            ))
        })
}

impl FrameSource for Camera {
    fn next_frame(&mut self) -> Result<Frame, SourceError> {
        if self.cam.is_none() {
            self.open()?;
        }
        let Some(cam) = self.cam.as_mut() else {
            return Err(SourceError::Unavailable(self.device.clone()));
        };
        let buf = match cam.frame() {
            Ok(b) => b,
            Err(e) => {
                self.cam = None;
                return Err(SourceError::Unavailable(format!("{}: {e}", self.device)));
            }
        };
        let res = buf.resolution();
        let origin = format!("camera:{}", self.device);
        let image = match buf.source_frame_format() {
            nokhwa::utils::FrameFormat::MJPEG => decode_mjpeg(buf.buffer(), self.max_pixels),
            nokhwa::utils::FrameFormat::YUYV => {
                decode_yuyv(buf.buffer(), res.width(), res.height()).map(DynamicImage::ImageRgb8)
            }
            nokhwa::utils::FrameFormat::RAWRGB => {
                let got = buf.buffer().len();
                RgbImage::from_raw(res.width(), res.height(), buf.buffer().to_vec())
                    .map(DynamicImage::ImageRgb8)
                    .ok_or(FrameDecodeError::Short {
                        format: "RGB",
                        width: res.width(),
                        height: res.height(),
                        need: 3 * res.width() as usize * res.height() as usize,
                        got,
                    })
            }
            other => Err(FrameDecodeError::Unsupported(other.to_string())),
        }
        .map_err(|e| SourceError::BadFrame {
            origin: origin.clone(),
            reason: e.to_string(),
        })?;
        let index = self.index;
        self.index += 1;
        Ok(Frame::captured(image, index, origin))
    }

    fn reopen(&mut self) -> Result<(), SourceError> {
        self.cam = None;
        self.open()
    }

    fn describe(&self) -> String {
        format!(
            "camera {} {}x{}@{} {:?}",
            self.device, self.width, self.height, self.fps, self.format
        )
    }
}

/// One line per camera the system offers (`edge-agent cameras`).
pub fn list_cameras() -> Result<Vec<String>, SourceError> {
    let cams = nokhwa::query(nokhwa::utils::ApiBackend::Auto)
        .map_err(|e| SourceError::Unavailable(format!("listing cameras: {e}")))?;
    Ok(cams
        .iter()
        .map(|c| format!("{}\t{}\t{}", c.index(), c.human_name(), c.description()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camera_names() {
        assert!(camera_index("/dev/video2").is_ok());
        assert!(camera_index("0").is_ok());
        assert!(matches!(
            camera_index("/dev/sda"),
            Err(SourceError::Config(_))
        ));
    }

    #[test]
    fn yuyv_rejects_short_buffers_and_odd_widths() {
        assert!(decode_yuyv(&[0; 10], 4, 4).is_err());
        assert!(decode_yuyv(&[0; 64], 3, 4).is_err());
        let grey = decode_yuyv(&[126, 128, 126, 128], 2, 1).unwrap();
        assert_eq!(grey.get_pixel(0, 0).0, [128, 128, 128]);
    }
}
