//! The CPU fast path: convolution with BatchNorm folded in, bias and SiLU fused, run as a GEMM.
//!
//! Candle's stock CPU `conv2d` materialises a full im2col matrix and then runs a GEMM that leaves
//! one of two cores idle much of the time. On YOLOv8 that made a frame 5.8x slower than ONNX
//! Runtime. This module replaces it for every convolution of the model:
//!
//! * 1x1 stride-1 convolutions (half the layers of a C2f block) are a plain GEMM on the input,
//!   no copy at all.
//! * kxk convolutions are cut into column tiles (output pixels); each tile is unrolled (im2col)
//!   into a per-thread buffer that is reused across layers and frames, then multiplied by the
//!   weights. Tiles run on every core through rayon, so the GEMM of a tile and the bias + SiLU
//!   that follows it work on data still in cache.
//! * Small feature maps (the 20x20 end of the network) have too few tiles to keep every core
//!   busy; there the whole im2col is built once and the GEMM itself is parallelised.
//!
//! Everything is `f32`, NCHW, contiguous. Other devices (CUDA) never reach this code: the model
//! falls back to Candle's own kernels there.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

/// Geometry and weights of one convolution with everything after it fused.
#[derive(Debug, Clone)]
pub(crate) struct FusedConv {
    /// Weights as a row-major `[c_out, c_in * k * k]` matrix (BatchNorm already folded in).
    pub weight: Vec<f32>,
    /// One bias per output channel (the folded BatchNorm shift, or the conv's own bias).
    pub bias: Vec<f32>,
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    /// Apply SiLU after the bias (every `Conv` block of YOLOv8; not the head's last 1x1 convs).
    pub silu: bool,
}

/// A pointer to the output buffer that rayon tasks write to; each task writes a disjoint tile.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks only ever write disjoint (row block, column tile) regions of the buffer.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Read through a method so closures capture the whole (Send + Sync) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Per-thread im2col scratch, grown on demand and kept across layers and frames.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Column-tile width: about 256 KiB of im2col per tile, so a tile stays in L2.
fn tile_cols(k_dim: usize) -> usize {
    let t = (64 * 1024 / k_dim.max(1)).clamp(64, 4096);
    t - t % 16
}

impl FusedConv {
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad - self.k) / self.stride + 1,
            (w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }

    /// Runs the convolution for one image `[c_in, h, w]` into `out` (`[c_out, oh, ow]`).
    pub(crate) fn run(&self, x: &[f32], h: usize, w: usize, out: &mut [f32]) {
        let (oh, ow) = self.out_hw(h, w);
        let n = oh * ow;
        let kd = self.c_in * self.k * self.k;
        debug_assert_eq!(out.len(), self.c_out * n);
        let threads = rayon::current_num_threads().max(1);
        let direct = self.k == 1 && self.stride == 1 && self.pad == 0;
        let tile = tile_cols(kd);
        let n_tiles = n.div_ceil(tile);
        let out_ptr = OutPtr(out.as_mut_ptr());

        if n_tiles < 2 * threads {
            // Small map: one im2col (if needed), a GEMM parallel over its own blocks.
            let owned;
            let rhs: &[f32] = if direct {
                x
            } else {
                let mut buf = vec![0f32; kd * n];
                buf.par_chunks_mut(n)
                    .enumerate()
                    .for_each(|(r, row)| self.im2col_row(x, h, w, ow, r, 0, row));
                owned = buf;
                &owned
            };
            // SAFETY: all pointers cover the full matrices described by the dims and strides.
            unsafe {
                gemm::gemm(
                    self.c_out,
                    n,
                    kd,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    self.weight.as_ptr(),
                    1,
                    kd as isize,
                    rhs.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
            epilogue_rows(out, &self.bias, n, self.silu);
            return;
        }

        (0..n_tiles).into_par_iter().for_each(|t| {
            let c0 = t * tile;
            let cols = tile.min(n - c0);
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let (rhs_ptr, rhs_rs) = if direct {
                    // SAFETY: c0 < n, so the offset stays inside the input row 0.
                    (unsafe { x.as_ptr().add(c0) }, n as isize)
                } else {
                    if scratch.len() < kd * cols {
                        scratch.resize(kd * tile, 0.0);
                    }
                    for r in 0..kd {
                        let row = &mut scratch[r * cols..(r + 1) * cols];
                        self.im2col_row(x, h, w, ow, r, c0, row);
                    }
                    (scratch.as_ptr(), cols as isize)
                };
                // SAFETY: dst is the [c_out, cols] tile at column c0 of the [c_out, n] output,
                // written by this task only; lhs and rhs cover [c_out, kd] and [kd, cols].
                unsafe {
                    let dst = out_ptr.get().add(c0);
                    gemm::gemm(
                        self.c_out,
                        cols,
                        kd,
                        dst,
                        1,
                        n as isize,
                        false,
                        self.weight.as_ptr(),
                        1,
                        kd as isize,
                        rhs_ptr,
                        1,
                        rhs_rs,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    for co in 0..self.c_out {
                        let row = std::slice::from_raw_parts_mut(dst.add(co * n), cols);
                        epilogue(row, self.bias[co], self.silu);
                    }
                }
            });
        });
    }

    /// Fills one row of the im2col matrix (one `(ci, ky, kx)` tap) for output columns
    /// `c0 .. c0 + row.len()`.
    #[allow(clippy::too_many_arguments)]
    fn im2col_row(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        ow: usize,
        r: usize,
        c0: usize,
        row: &mut [f32],
    ) {
        let kk = self.k * self.k;
        let ci = r / kk;
        let ky = (r % kk) / self.k;
        let kx = r % self.k;
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        let (s, pad) = (self.stride, self.pad);
        // Output columns ox whose input column ox*s + kx - pad lies inside the image.
        let ox_lo = pad.saturating_sub(kx).div_ceil(s).min(ow);
        let ox_hi = if w + pad > kx {
            ((w - 1 + pad - kx) / s + 1).min(ow)
        } else {
            0
        };
        let mut j = 0;
        let mut pos = c0;
        while j < row.len() {
            let oy = pos / ow;
            let ox0 = pos % ow;
            let run = (ow - ox0).min(row.len() - j);
            let dst = &mut row[j..j + run];
            let iy = oy * s + ky;
            if iy < pad || iy - pad >= h {
                dst.fill(0.0);
            } else {
                let src = &plane[(iy - pad) * w..(iy - pad + 1) * w];
                let a = ox_lo.clamp(ox0, ox0 + run);
                let b = ox_hi.clamp(a, ox0 + run);
                dst[..a - ox0].fill(0.0);
                dst[b - ox0..].fill(0.0);
                if a < b {
                    let first = a * s + kx - pad;
                    let mid = &mut dst[a - ox0..b - ox0];
                    if s == 1 {
                        mid.copy_from_slice(&src[first..first + (b - a)]);
                    } else {
                        for (t, d) in mid.iter_mut().enumerate() {
                            *d = src[first + t * s];
                        }
                    }
                }
            }
            j += run;
            pos += run;
        }
    }
}

fn epilogue_rows(out: &mut [f32], bias: &[f32], n: usize, silu: bool) {
    out.par_chunks_mut(n)
        .zip(bias.par_iter())
        .for_each(|(row, &b)| epilogue(row, b, silu));
}

/// `row = silu(row + bias)` (or just `row + bias`), dispatched at run time to AVX-512 or AVX2
/// where the CPU has them; the portable version auto-vectorises (NEON on ARM).
fn epilogue(row: &mut [f32], bias: f32, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            unsafe { x86::epilogue_avx512(row, bias, silu) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            unsafe { x86::epilogue_avx2(row, bias, silu) };
            return;
        }
    }
    epilogue_generic(row, bias, silu)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn epilogue_avx2(row: &mut [f32], bias: f32, silu: bool) {
        super::epilogue_generic(row, bias, silu)
    }

    /// SiLU of 16 lanes: `x / (1 + exp(-x))`, exp as `2^f * 2^i` with `scalef` doing the
    /// `2^i` (no integer conversion).
    #[target_feature(enable = "avx512f")]
    unsafe fn silu16(x: __m512) -> __m512 {
        let t = _mm512_mul_ps(
            _mm512_max_ps(
                _mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_set1_ps(88.0)),
                _mm512_set1_ps(-87.0),
            ),
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        );
        let fi = _mm512_roundscale_ps::<0x08>(t); // nearest, no exceptions
        let f = _mm512_sub_ps(t, fi);
        let mut p = _mm512_set1_ps(1.525_273_4e-5);
        for c in [
            1.540_353e-4,
            1.333_355_8e-3,
            9.618_129e-3,
            5.550_411e-2,
            2.402_265e-1,
            std::f32::consts::LN_2,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        let e = _mm512_scalef_ps(p, fi);
        _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn epilogue_avx512(row: &mut [f32], bias: f32, silu: bool) {
        let b = _mm512_set1_ps(bias);
        let n = row.len();
        let p = row.as_mut_ptr();
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if n - i >= 16 {
                0xffff
            } else {
                ((1u32 << (n - i)) - 1) as u16
            };
            // SAFETY: the mask keeps loads and stores inside row[i..n].
            let x = _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(m, p.add(i)) }, b);
            let y = if silu { silu16(x) } else { x };
            unsafe { _mm512_mask_storeu_ps(p.add(i), m, y) };
            i += 16;
        }
    }
}

#[inline(always)]
fn epilogue_generic(row: &mut [f32], bias: f32, silu: bool) {
    if silu {
        for v in row.iter_mut() {
            let x = *v + bias;
            *v = x / (1.0 + fast_exp(-x));
        }
    } else {
        for v in row.iter_mut() {
            *v += bias;
        }
    }
}

/// `exp(x)` to a few ulp over the range SiLU needs, written so that it vectorises:
/// `2^(x log2 e)` split into an integer power (built in the exponent bits) and a polynomial
/// for the fraction.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E;
    let fi = (t + 0.5).floor();
    let f = t - fi;
    // 2^f = e^(f ln 2) for f in [-0.5, 0.5): Taylor to degree 7, error < 1e-8 relative.
    let p = 1.525_273_4e-5_f32;
    let p = p * f + 1.540_353e-4;
    let p = p * f + 1.333_355_8e-3;
    let p = p * f + 9.618_129e-3;
    let p = p * f + 5.550_411e-2;
    let p = p * f + 2.402_265e-1;
    let p = p * f + std::f32::consts::LN_2;
    let p = p * f + 1.0;
    let bits = ((fi as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// Batch, channels, height, width.
type Nchw = (usize, usize, usize, usize);

/// The f32 NCHW slice a custom op works on, or an error naming the op.
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<(&'a [f32], Nchw)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} expects f32 input")
    };
    let dims = layout.shape().dims4()?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} expects a contiguous input")
    };
    Ok((&data[start..end], dims))
}

impl CustomOp1 for FusedConv {
    fn name(&self) -> &'static str {
        "fused-conv-bn-silu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, (b, c, h, w)) = contiguous_f32(storage, layout, "fused conv")?;
        if c != self.c_in {
            candle_core::bail!("fused conv expects {} input channels, got {c}", self.c_in)
        }
        if h + 2 * self.pad < self.k || w + 2 * self.pad < self.k {
            candle_core::bail!("fused conv: input {h}x{w} smaller than kernel {}", self.k)
        }
        let (oh, ow) = self.out_hw(h, w);
        let per_in = c * h * w;
        let per_out = self.c_out * oh * ow;
        let mut out = vec![0f32; b * per_out];
        for i in 0..b {
            self.run(
                &x[i * per_in..(i + 1) * per_in],
                h,
                w,
                &mut out[i * per_out..(i + 1) * per_out],
            );
        }
        Ok((CpuStorage::F32(out), Shape::from((b, self.c_out, oh, ow))))
    }
}

/// Max-pooling with "same" padding by -inf (PyTorch's `MaxPool2d(k, 1, k // 2)`), separable:
/// a row pass and a column pass, `2k` comparisons per pixel instead of `k^2`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxPoolSame {
    pub k: usize,
}

impl CustomOp1 for MaxPoolSame {
    fn name(&self) -> &'static str {
        "maxpool-same"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, (b, c, h, w)) = contiguous_f32(storage, layout, "maxpool")?;
        let r = self.k / 2;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, p)| {
                let mut tmp = vec![f32::NEG_INFINITY; h * w];
                for y in 0..h {
                    for xx in 0..w {
                        let lo = xx.saturating_sub(r);
                        let hi = (xx + r).min(w - 1);
                        tmp[y * w + xx] = p[y * w + lo..=y * w + hi]
                            .iter()
                            .copied()
                            .fold(f32::NEG_INFINITY, f32::max);
                    }
                }
                for y in 0..h {
                    let lo = y.saturating_sub(r);
                    let hi = (y + r).min(h - 1);
                    for xx in 0..w {
                        let mut m = f32::NEG_INFINITY;
                        for yy in lo..=hi {
                            m = m.max(tmp[yy * w + xx]);
                        }
                        o[y * w + xx] = m;
                    }
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 7-loop convolution, the definition the fast path must agree with.
    fn reference(cv: &FusedConv, x: &[f32], h: usize, w: usize) -> Vec<f32> {
        let (oh, ow) = cv.out_hw(h, w);
        let mut out = vec![0f32; cv.c_out * oh * ow];
        for co in 0..cv.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = cv.bias[co] as f64;
                    for ci in 0..cv.c_in {
                        for ky in 0..cv.k {
                            for kx in 0..cv.k {
                                let iy = (oy * cv.stride + ky) as isize - cv.pad as isize;
                                let ix = (ox * cv.stride + kx) as isize - cv.pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    let wv = cv.weight
                                        [co * cv.c_in * cv.k * cv.k + (ci * cv.k + ky) * cv.k + kx];
                                    acc += wv as f64
                                        * x[(ci * h + iy as usize) * w + ix as usize] as f64;
                                }
                            }
                        }
                    }
                    let v = acc as f32;
                    out[(co * oh + oy) * ow + ox] =
                        if cv.silu { v / (1.0 + (-v).exp()) } else { v };
                }
            }
        }
        out
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn check(c_in: usize, c_out: usize, k: usize, stride: usize, h: usize, w: usize, silu: bool) {
        let pad = k / 2;
        let cv = FusedConv {
            weight: pseudo_random(c_out * c_in * k * k, 1),
            bias: pseudo_random(c_out, 2),
            c_in,
            c_out,
            k,
            stride,
            pad,
            silu,
        };
        let x = pseudo_random(c_in * h * w, 3);
        let (oh, ow) = cv.out_hw(h, w);
        let mut out = vec![0f32; c_out * oh * ow];
        cv.run(&x, h, w, &mut out);
        let want = reference(&cv, &x, h, w);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "k={k} s={stride} {h}x{w} at {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn fused_conv_matches_direct_convolution() {
        // Tiled path (many columns) and small-map path, 1x1 / 3x3, stride 1 / 2, odd sizes.
        check(3, 8, 3, 2, 37, 29, true);
        check(16, 12, 3, 1, 40, 41, true);
        check(16, 12, 1, 1, 64, 64, false);
        check(8, 5, 3, 1, 5, 7, true);
        check(8, 5, 1, 1, 3, 3, true);
        check(4, 4, 3, 2, 2, 2, false);
    }

    #[test]
    fn every_epilogue_matches_exact_silu() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let want: Vec<f32> = xs
            .iter()
            .map(|&x| (x + 0.5) / (1.0 + (-(x + 0.5)).exp()))
            .collect();
        let mut a = xs.clone();
        epilogue(&mut a, 0.5, true); // best available on this CPU
        let mut b = xs.clone();
        epilogue_generic(&mut b, 0.5, true);
        for ((x, y), w) in a.iter().zip(&b).zip(&want) {
            assert!(
                (x - w).abs() <= 1e-5 * (1.0 + w.abs()) && (y - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{x} {y} {w}"
            );
        }
        // Odd lengths exercise the masked tail.
        let mut c = vec![1.0f32; 21];
        epilogue(&mut c, 1.0, false);
        assert!(c.iter().all(|&v| v == 2.0));
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -30.0f32;
        while x < 30.0 {
            let (a, b) = (fast_exp(x), x.exp());
            assert!((a - b).abs() <= 2e-6 * b, "exp({x}): {a} vs {b}");
            x += 0.0137;
        }
    }

    #[test]
    fn maxpool_pads_with_negative_infinity() {
        let op = MaxPoolSame { k: 5 };
        let data: Vec<f32> = (0..16).map(|i| -(i as f32) - 1.0).collect();
        let t =
            candle_core::Tensor::from_vec(data, (1, 1, 4, 4), &candle_core::Device::Cpu).unwrap();
        let out = t
            .apply_op1_no_bwd(&op)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Top-left: window covers rows 0..=2, cols 0..=2 -> max is -1; zero padding would give 0.
        assert_eq!(out[0], -1.0);
        assert_eq!(out[15], -6.0);
    }
}
