//! `detect --annotate DIR`: draws boxes and labels onto a copy of the image.
//!
//! The label font is a built-in 5x7 bitmap (no font file to ship or find on a device); labels
//! are drawn upper-case.

use image::{DynamicImage, Rgb, RgbImage};

use super::Detection;

/// 5x7 glyphs, one `u8` per row, low 5 bits, MSB left.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [30, 17, 17, 17, 17, 17, 30],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' | '_' => [0, 0, 0, 31, 0, 0, 0],
        _ => [0; 7],
    }
}

/// A distinct colour per class.
fn colour(class_id: usize) -> Rgb<u8> {
    const PALETTE: [[u8; 3]; 8] = [
        [255, 56, 56],
        [56, 56, 255],
        [72, 249, 10],
        [255, 157, 151],
        [0, 194, 255],
        [255, 178, 29],
        [207, 210, 49],
        [146, 204, 23],
    ];
    Rgb(PALETTE[class_id % PALETTE.len()])
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: i64, fg: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        let g = glyph(ch);
        let ox = x + i as i64 * 6 * scale;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (1 << (4 - col)) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(img, ox + col * scale + dx, y + row as i64 * scale + dy, fg);
                        }
                    }
                }
            }
        }
    }
}

/// Returns an RGB copy of `img` with every detection's box and `LABEL 0.87` drawn.
pub fn annotate(img: &DynamicImage, detections: &[Detection]) -> RgbImage {
    let mut out = img.to_rgb8();
    let thick = ((out.width().max(out.height()) / 400) as i64).max(2);
    let scale = thick;
    for d in detections {
        let c = colour(d.class_id);
        let [x1, y1, x2, y2] = d.bbox.map(|v| v.round() as i64);
        for t in 0..thick {
            for x in x1..=x2 {
                put(&mut out, x, y1 + t, c);
                put(&mut out, x, y2 - t, c);
            }
            for y in y1..=y2 {
                put(&mut out, x1 + t, y, c);
                put(&mut out, x2 - t, y, c);
            }
        }
        let text = format!("{} {:.2}", d.label, d.confidence);
        let th = 9 * scale;
        let tw = text.chars().count() as i64 * 6 * scale + 2 * scale;
        let ty = if y1 - th >= 0 { y1 - th } else { y1 };
        for y in ty..ty + th {
            for x in x1..x1 + tw {
                put(&mut out, x, y, c);
            }
        }
        draw_text(
            &mut out,
            x1 + scale,
            ty + scale,
            &text,
            scale,
            Rgb([255, 255, 255]),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_box_edges_in_class_colour() {
        let img = DynamicImage::ImageRgb8(RgbImage::new(100, 100));
        let d = Detection {
            label: "Normal".into(),
            class_id: 0,
            confidence: 0.9,
            bbox: [20.0, 40.0, 80.0, 90.0],
        };
        let out = annotate(&img, &[d]);
        assert_eq!(*out.get_pixel(50, 90), colour(0)); // bottom edge
        assert_eq!(*out.get_pixel(20, 60), colour(0)); // left edge
        assert_eq!(*out.get_pixel(50, 70), Rgb([0, 0, 0])); // inside stays
    }
}
