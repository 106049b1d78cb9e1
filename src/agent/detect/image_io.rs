//! Image input: reading files safely and letterboxing them into the network's input.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, GenericImageView, RgbImage};

/// Largest image we decode by default (40 megapixels, ~120 MB as RGB). Larger files are refused
/// from their header, before any pixel memory is allocated.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Letterbox padding value (Ultralytics' grey).
pub const PAD_VALUE: u8 = 114;

/// Why an image could not be used. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {path} is empty (0 bytes)")]
    Empty { path: PathBuf },
    #[error("image {path} cannot be decoded (not a JPEG or PNG, or corrupt): {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("image {path} is {width}x{height}, over the limit of {max_pixels} pixels")]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("image {path} has a zero dimension ({width}x{height})")]
    ZeroSized {
        path: PathBuf,
        width: u32,
        height: u32,
    },
}

/// Reads a JPEG or PNG (RGB, RGBA or greyscale), refusing oversized images from the header.
pub fn load_image(path: &Path, max_pixels: u64) -> Result<DynamicImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })?;
    decode_image(&bytes, path, max_pixels)
}

/// Decodes image bytes (see [`load_image`]); `path` is only used in errors.
pub fn decode_image(
    bytes: &[u8],
    path: &Path,
    max_pixels: u64,
) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            path: path.to_owned(),
        });
    }
    let decode_err = |e: &dyn std::fmt::Display| ImageError::Decode {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(&e))?;
    match reader.format() {
        Some(image::ImageFormat::Jpeg) | Some(image::ImageFormat::Png) => {}
        Some(other) => return Err(decode_err(&format!("unsupported format {other:?}"))),
        None => return Err(decode_err(&"unknown format")),
    }
    let (width, height) = reader.into_dimensions().map_err(|e| decode_err(&e))?;
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSized {
            path: path.to_owned(),
            width,
            height,
        });
    }
    if width as u64 * height as u64 > max_pixels {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            width,
            height,
            max_pixels,
        });
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(&e))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    reader.limits(limits);
    reader.decode().map_err(|e| decode_err(&e))
}

/// How an image was fitted into the square network input, to map boxes back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    /// Network input side (pixels).
    pub size: usize,
    /// Scale applied to the original image.
    pub scale: f32,
    /// Left padding (pixels of network input).
    pub pad_x: f32,
    /// Top padding.
    pub pad_y: f32,
    /// Original image size.
    pub orig_w: u32,
    pub orig_h: u32,
}

impl Letterbox {
    /// Ultralytics' geometry: scale to fit, round the new size, split the padding with the odd
    /// pixel on the right/bottom.
    ///
    /// ```
    /// use edge_vision::agent::detect::Letterbox;
    /// // A 1280x720 frame in a 640 input: scale 0.5, 140 grey rows above and below.
    /// let lb = Letterbox::new(1280, 720, 640);
    /// assert_eq!((lb.scale, lb.pad_x, lb.pad_y), (0.5, 0.0, 140.0));
    /// assert_eq!(lb.to_original([0.0, 140.0, 320.0, 500.0]), [0.0, 0.0, 640.0, 720.0]);
    /// ```
    pub fn new(orig_w: u32, orig_h: u32, size: usize) -> Self {
        let scale = (size as f32 / orig_w as f32).min(size as f32 / orig_h as f32);
        let (nw, nh) = Self::unpadded(orig_w, orig_h, scale, size);
        Self {
            size,
            scale,
            pad_x: ((size - nw) / 2) as f32,
            pad_y: ((size - nh) / 2) as f32,
            orig_w,
            orig_h,
        }
    }

    fn unpadded(w: u32, h: u32, scale: f32, size: usize) -> (usize, usize) {
        let nw = ((w as f32 * scale).round() as usize).clamp(1, size);
        let nh = ((h as f32 * scale).round() as usize).clamp(1, size);
        (nw, nh)
    }

    /// Maps a box from network-input pixels back to original pixels, clipped to the image.
    pub fn to_original(&self, b: [f32; 4]) -> [f32; 4] {
        let fx = |v: f32| ((v - self.pad_x) / self.scale).clamp(0.0, self.orig_w as f32);
        let fy = |v: f32| ((v - self.pad_y) / self.scale).clamp(0.0, self.orig_h as f32);
        [fx(b[0]), fy(b[1]), fx(b[2]), fy(b[3])]
    }
}

/// Letterboxes an image into a `size x size` RGB buffer, CHW, values in `0..1`.
pub fn letterbox_chw(img: &DynamicImage, size: usize) -> (Vec<f32>, Letterbox) {
    let (w, h) = img.dimensions();
    let lb = Letterbox::new(w, h, size);
    let (nw, nh) = Letterbox::unpadded(w, h, lb.scale, size);
    let rgb: RgbImage = img.to_rgb8();
    let resized = if (nw as u32, nh as u32) == (w, h) {
        rgb
    } else {
        image::imageops::resize(
            &rgb,
            nw as u32,
            nh as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    let plane = size * size;
    let mut out = vec![PAD_VALUE as f32 / 255.0; 3 * plane];
    let (px, py) = (lb.pad_x as usize, lb.pad_y as usize);
    let raw = resized.as_raw();
    for y in 0..nh {
        let row = &raw[y * nw * 3..(y + 1) * nw * 3];
        let base = (y + py) * size + px;
        for x in 0..nw {
            for c in 0..3 {
                out[c * plane + base + x] = row[x * 3 + c] as f32 / 255.0;
            }
        }
    }
    (out, lb)
}

/// Letterboxes into a `[1, 3, size, size]` tensor on `device`.
pub fn letterbox_tensor(
    img: &DynamicImage,
    size: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Letterbox)> {
    let (data, lb) = letterbox_chw(img, size);
    Ok((Tensor::from_vec(data, (1, 3, size, size), device)?, lb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_geometry_matches_ultralytics() {
        // bus.jpg: 810x1080 -> 480x640, 80 px of padding on each side.
        let lb = Letterbox::new(810, 1080, 640);
        assert!((lb.scale - 640.0 / 1080.0).abs() < 1e-6);
        assert_eq!((lb.pad_x, lb.pad_y), (80.0, 0.0));
        // zidane.jpg: 1280x720 -> 640x360, 140 px top and bottom.
        let lb = Letterbox::new(1280, 720, 640);
        assert_eq!((lb.pad_x, lb.pad_y), (0.0, 140.0));
        let back = lb.to_original([0.0, 140.0, 640.0, 500.0]);
        assert_eq!(back, [0.0, 0.0, 1280.0, 720.0]);
        // Boxes in the padding are clipped to the image.
        assert_eq!(
            lb.to_original([-5.0, 0.0, 700.0, 640.0]),
            [0.0, 0.0, 1280.0, 720.0]
        );
    }

    #[test]
    fn letterbox_pads_with_grey_and_keeps_pixels() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 32, image::Rgb([255, 0, 10])));
        let (data, lb) = letterbox_chw(&img, 64);
        assert_eq!(lb.pad_y, 16.0);
        let plane = 64 * 64;
        assert!((data[0] - 114.0 / 255.0).abs() < 1e-6); // top-left is padding
        let centre = 32 * 64 + 32;
        assert!((data[centre] - 1.0).abs() < 1e-6);
        assert!(data[plane + centre].abs() < 1e-6);
        assert!((data[2 * plane + centre] - 10.0 / 255.0).abs() < 1e-6);
    }
}
