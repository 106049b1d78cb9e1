//! The constant-velocity Kalman filter of one track, in box space `(cx, cy, a, h)`: centre,
//! aspect ratio (width / height) and height, with their velocities per frame. The noise
//! model is SORT's and ByteTrack's: standard deviations proportional to the box height, so
//! the filter behaves the same for near and far objects.
//!
//! Fixed-size arrays by hand rather than a linear-algebra crate: the filter needs an 8x8
//! predict, a 4x4 solve and nothing else, and runs for every track on every frame.

// Matrix arithmetic reads best with its indices.
#![allow(clippy::needless_range_loop)]

/// State: `[cx, cy, a, h, vcx, vcy, va, vh]`.
type State = [f64; 8];
type Cov = [[f64; 8]; 8];

/// Position noise per unit of height.
const STD_POSITION: f64 = 1.0 / 20.0;
/// Velocity noise per unit of height.
const STD_VELOCITY: f64 = 1.0 / 160.0;

/// One track's filter.
#[derive(Debug, Clone)]
pub struct Kalman {
    mean: State,
    cov: Cov,
}

/// `[x1, y1, x2, y2]` to `[cx, cy, a, h]`.
pub fn to_xyah(b: [f32; 4]) -> [f64; 4] {
    let (x1, y1, x2, y2) = (
        f64::from(b[0]),
        f64::from(b[1]),
        f64::from(b[2]),
        f64::from(b[3]),
    );
    let h = (y2 - y1).max(1e-3);
    [(x1 + x2) / 2.0, (y1 + y2) / 2.0, (x2 - x1).max(1e-3) / h, h]
}

/// `[cx, cy, a, h]` to `[x1, y1, x2, y2]`.
pub fn to_xyxy(m: &[f64]) -> [f32; 4] {
    let h = m[3].max(1e-3);
    let w = m[2].max(1e-3) * h;
    [
        (m[0] - w / 2.0) as f32,
        (m[1] - h / 2.0) as f32,
        (m[0] + w / 2.0) as f32,
        (m[1] + h / 2.0) as f32,
    ]
}

fn diag(std: [f64; 8]) -> Cov {
    let mut c = [[0.0; 8]; 8];
    for i in 0..8 {
        c[i][i] = std[i] * std[i];
    }
    c
}

impl Kalman {
    /// A filter at the measured box, velocities zero and uncertain.
    pub fn new(b: [f32; 4]) -> Self {
        let z = to_xyah(b);
        let h = z[3];
        let p = 2.0 * STD_POSITION * h;
        let v = 10.0 * STD_VELOCITY * h;
        Self {
            mean: [z[0], z[1], z[2], z[3], 0.0, 0.0, 0.0, 0.0],
            cov: diag([p, p, 1e-2, p, v, v, 1e-5, v]),
        }
    }

    /// The box the state describes.
    pub fn bbox(&self) -> [f32; 4] {
        to_xyxy(&self.mean[..4])
    }

    /// Moves the state one frame ahead.
    pub fn predict(&mut self) {
        let h = self.mean[3].max(1e-3);
        let p = STD_POSITION * h;
        let v = STD_VELOCITY * h;
        for i in 0..4 {
            self.mean[i] += self.mean[i + 4];
        }
        // P = F P F' + Q with F = [[I, I], [0, I]].
        let c = self.cov;
        let mut n = [[0.0; 8]; 8];
        for i in 0..8 {
            for j in 0..8 {
                let mut s = c[i][j];
                if i < 4 {
                    s += c[i + 4][j];
                }
                if j < 4 {
                    s += c[i][j + 4];
                }
                if i < 4 && j < 4 {
                    s += c[i + 4][j + 4];
                }
                n[i][j] = s;
            }
        }
        let q = [p, p, 1e-2, p, v, v, 1e-5, v];
        for i in 0..8 {
            n[i][i] += q[i] * q[i];
        }
        self.cov = n;
    }

    /// Corrects the state with a measured box.
    pub fn update(&mut self, b: [f32; 4]) {
        let z = to_xyah(b);
        let h = self.mean[3].max(1e-3);
        let r = [STD_POSITION * h, STD_POSITION * h, 1e-1, STD_POSITION * h];
        // S = H P H' + R (the top-left 4x4 block).
        let mut s = [[0.0; 4]; 4];
        for i in 0..4 {
            for j in 0..4 {
                s[i][j] = self.cov[i][j];
            }
            s[i][i] += r[i] * r[i];
        }
        let Some(s_inv) = invert4(s) else {
            return; // a degenerate covariance: keep the prediction
        };
        // K = P H' S^-1 (8x4).
        let mut k = [[0.0; 4]; 8];
        for i in 0..8 {
            for j in 0..4 {
                k[i][j] = (0..4).map(|l| self.cov[i][l] * s_inv[l][j]).sum();
            }
        }
        let y: Vec<f64> = (0..4).map(|i| z[i] - self.mean[i]).collect();
        for i in 0..8 {
            self.mean[i] += (0..4).map(|j| k[i][j] * y[j]).sum::<f64>();
        }
        // P = P - K H P (K H P's row i = sum_l K[i][l] P[l][..]).
        let c = self.cov;
        for i in 0..8 {
            for j in 0..8 {
                self.cov[i][j] = c[i][j] - (0..4).map(|l| k[i][l] * c[l][j]).sum::<f64>();
            }
        }
    }
}

/// The inverse of a 4x4 matrix (Gauss-Jordan with partial pivoting); `None` when singular.
fn invert4(m: [[f64; 4]; 4]) -> Option<[[f64; 4]; 4]> {
    let mut a = m;
    let mut inv = [[0.0; 4]; 4];
    for (i, row) in inv.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for col in 0..4 {
        let pivot = (col..4).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        inv.swap(col, pivot);
        let d = a[col][col];
        for j in 0..4 {
            a[col][j] /= d;
            inv[col][j] /= d;
        }
        for r in 0..4 {
            if r != col {
                let f = a[r][col];
                for j in 0..4 {
                    a[r][j] -= f * a[col][j];
                    inv[r][j] -= f * inv[col][j];
                }
            }
        }
    }
    Some(inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_survive_the_round_trip_through_xyah() {
        let b = [10.0, 20.0, 50.0, 120.0];
        let back = to_xyxy(&to_xyah(b));
        for i in 0..4 {
            assert!((back[i] - b[i]).abs() < 1e-4, "{back:?}");
        }
    }

    #[test]
    fn the_inverse_is_an_inverse() {
        let m = [
            [4.0, 1.0, 0.0, 0.5],
            [1.0, 3.0, 0.2, 0.0],
            [0.0, 0.2, 2.0, 0.1],
            [0.5, 0.0, 0.1, 1.0],
        ];
        let inv = invert4(m).unwrap();
        for i in 0..4 {
            for j in 0..4 {
                let p: f64 = (0..4).map(|l| m[i][l] * inv[l][j]).sum();
                assert!((p - f64::from(u8::from(i == j))).abs() < 1e-9);
            }
        }
        assert!(invert4([[0.0; 4]; 4]).is_none());
    }

    /// A box moving 5 px per frame: after a few updates the filter predicts where it goes.
    #[test]
    fn the_filter_learns_a_constant_velocity() {
        let at = |t: f32| [100.0 + 5.0 * t, 50.0, 140.0 + 5.0 * t, 150.0];
        let mut k = Kalman::new(at(0.0));
        for t in 1..20 {
            k.predict();
            k.update(at(t as f32));
        }
        k.predict();
        let p = k.bbox();
        let want = at(20.0);
        for i in 0..4 {
            assert!(
                (p[i] - want[i]).abs() < 1.0,
                "predicted {p:?}, want {want:?}"
            );
        }
    }
}
