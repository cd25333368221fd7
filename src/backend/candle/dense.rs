//! Dense f32 matrix times activation rows, computed the same way for every row whatever the
//! batch: a row's outputs never depend on which other rows share the step.
//!
//! candle's matmul (the `gemm` crate) picks its kernel and its blocking of the inner dimension by
//! the matrix shapes, so one row's result changes in the last bits with the number of rows
//! beside it. Here every output is one dot product with a fixed order of operations: 8-lane
//! partial sums over the inner dimension in ascending order (one FMA per 8 values on AVX2), then
//! a fixed reduction of the lanes, then the leftover values. Tiles of up to 4 activation rows by
//! 2 weight rows share the loads; the tile shape changes nothing in any output's arithmetic.
use super::pool::{self, SharedMut};

/// A dense [n, k] weight matrix (n output features, k input features), row-major.
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

/// Pool ranges of weight rows: about 16 per thread, at least 8 rows each.
const RANGES_PER_THREAD: usize = 16;
const MIN_RANGE: usize = 8;

impl DenseMatrix {
    pub fn new(data: Vec<f32>, n: usize, k: usize) -> DenseMatrix {
        assert_eq!(data.len(), n * k, "a dense {n}x{k} matrix needs {} values", n * k);
        DenseMatrix { n, k, data }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `i` of the matrix.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.k..(i + 1) * self.k]
    }

    /// `x W^T` for `x` a row-major [m, k] matrix; returns [m, n] row-major.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len() % k.max(1), 0, "activation width does not match the weight");
        let m = if k == 0 { 0 } else { x.len() / k };
        let mut out = vec![0f32; m * n];
        if m == 0 {
            return out;
        }
        let dst = SharedMut(out.as_mut_ptr());
        let kernel = kernel();
        pool::global().run_ranges(n, RANGES_PER_THREAD, MIN_RANGE, &|js| {
            // Weight rows in sub-blocks of about 32 KiB, which stay in cache while every tile of
            // activation rows passes over them.
            let sub = (32 * 1024 / (4 * k)).clamp(2, 64);
            let mut tile = [[0f32; 2]; 4];
            for s0 in js.clone().step_by(sub) {
                let s1 = (s0 + sub).min(js.end);
                for r0 in (0..m).step_by(4) {
                    let rows = (m - r0).min(4);
                    let xs: [&[f32]; 4] = std::array::from_fn(|t| &x[(r0 + t.min(rows - 1)) * k..][..k]);
                    for j0 in (s0..s1).step_by(2) {
                        let cols = (s1 - j0).min(2);
                        let ws: [&[f32]; 2] = std::array::from_fn(|c| self.row(j0 + c.min(cols - 1)));
                        kernel(&xs[..rows], &ws[..cols], &mut tile);
                        for (t, vals) in tile[..rows].iter().enumerate() {
                            for (c, v) in vals[..cols].iter().enumerate() {
                                // SAFETY: (r0 + t, j0 + c) is inside the [m, n] output, column
                                // j0 + c belongs to this pool range alone, and the output
                                // outlives the pool job.
                                unsafe { *dst.ptr().add((r0 + t) * n + j0 + c) = *v };
                            }
                        }
                    }
                }
            }
        });
        out
    }
}

/// Computes `out[t][c] = dot(xs[t], ws[c])` for up to 4 rows and 2 columns.
type Kernel = fn(&[&[f32]], &[&[f32]], &mut [[f32; 2]; 4]);

fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2::available() {
        return |xs, ws, out| {
            // SAFETY: AVX2 and FMA were detected just above.
            unsafe { avx2::dots(xs, ws, out) }
        };
    }
    portable::dots
}

/// The fixed reduction of 8 lanes and the leftover products, shared by both kernels.
fn finish(lanes: &[f32; 8], x_tail: &[f32], w_tail: &[f32]) -> f32 {
    let tail: f32 = x_tail.iter().zip(w_tail).fold(0f32, |s, (a, b)| a.mul_add(*b, s));
    (((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))) + tail
}

mod portable {
    use super::finish;

    /// Lane l of a dot product sums x[8i + l] * w[8i + l] over i in order, each step one fused
    /// multiply-add, exactly what one `_mm256_fmadd_ps` lane does.
    pub fn dots(xs: &[&[f32]], ws: &[&[f32]], out: &mut [[f32; 2]; 4]) {
        for (t, x) in xs.iter().enumerate() {
            for (c, w) in ws.iter().enumerate() {
                let mut lanes = [0f32; 8];
                let body = x.len() / 8 * 8;
                for (xc, wc) in x[..body].chunks_exact(8).zip(w[..body].chunks_exact(8)) {
                    for l in 0..8 {
                        lanes[l] = xc[l].mul_add(wc[l], lanes[l]);
                    }
                }
                out[t][c] = finish(&lanes, &x[body..], &w[body..]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::finish;

    /// One accumulator per (row, column) of the tile, each fed in the same order as alone.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(xs: &[&[f32]], ws: &[&[f32]], out: &mut [[f32; 2]; 4]) {
        let k = xs[0].len();
        let body = k / 8 * 8;
        let (rows, cols) = (xs.len(), ws.len());
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i < body {
            let w = [_mm256_loadu_ps(ws[0].as_ptr().add(i)), _mm256_loadu_ps(ws[cols - 1].as_ptr().add(i))];
            for t in 0..rows {
                let xv = _mm256_loadu_ps(xs[t].as_ptr().add(i));
                for c in 0..cols {
                    acc[t][c] = _mm256_fmadd_ps(xv, w[c], acc[t][c]);
                }
            }
            i += 8;
        }
        for t in 0..rows {
            for c in 0..cols {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t][c]);
                out[t][c] = finish(&lanes, &xs[t][body..], &ws[c][body..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn products_match_f64_and_every_row_is_the_same_alone_and_in_any_batch() {
        let mut seed = 7;
        for (n, k) in [(5, 3), (17, 8), (9, 61), (33, 128), (3, 200)] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let mat = DenseMatrix::new(w.clone(), n, k);
            let m = 11;
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let all = mat.matmul(&x);
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                let alone = mat.matmul(xr);
                assert_eq!(alone, all[r * n..(r + 1) * n], "row {r} alone vs in a batch of {m} ({n}x{k})");
                for j in 0..n {
                    let exact: f64 = xr.iter().zip(&w[j * k..(j + 1) * k]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                    assert!((f64::from(alone[j]) - exact).abs() < 1e-5 * (k as f64).sqrt(), "({r}, {j}): {} vs {exact}", alone[j]);
                }
            }
            // Any sub-batch, in any position.
            for (a, b) in [(0, 2), (3, 8), (5, 11)] {
                assert_eq!(mat.matmul(&x[a * k..b * k]), all[a * n..b * n], "rows {a}..{b}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_kernel_gives_the_portable_kernels_bits() {
        if !crate::backend::candle::qmatmul::avx2::available() {
            return;
        }
        let mut seed = 3;
        for k in [1, 7, 8, 9, 64, 100] {
            let x: Vec<Vec<f32>> = (0..4).map(|_| (0..k).map(|_| lcg(&mut seed)).collect()).collect();
            let w: Vec<Vec<f32>> = (0..2).map(|_| (0..k).map(|_| lcg(&mut seed)).collect()).collect();
            let xs: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
            let ws: Vec<&[f32]> = w.iter().map(Vec::as_slice).collect();
            let (mut a, mut b) = ([[0f32; 2]; 4], [[0f32; 2]; 4]);
            // SAFETY: AVX2 and FMA were checked above.
            unsafe { avx2::dots(&xs, &ws, &mut a) };
            portable::dots(&xs, &ws, &mut b);
            assert_eq!(a, b, "k = {k}");
        }
    }
}
