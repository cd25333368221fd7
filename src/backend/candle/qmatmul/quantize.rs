//! Activation rows quantized to 8-bit blocks of 32, exactly as ggml's AVX2 `quantize_row_q8_0`
//! and `quantize_row_q8_1` do it (scale `max|x| / 127` stored as f16, values `x * 127 / max|x|`
//! rounded half to even), so that our dot products see the same integers as llama.cpp's.
use half::f16;

/// Values per block.
pub const QK: usize = 32;

/// `rows` activation rows of `k` values each, quantized.
pub struct QActs {
    pub k: usize,
    /// Blocks per row (`k / 32`).
    pub nb: usize,
    /// Quantized values, row-major [rows][k].
    pub qs: Vec<i8>,
    /// Per-block scale (an f16 widened to f32), [rows][nb].
    pub d: Vec<f32>,
    /// Per-block `d * sum(qs)` as f16 (ggml's Q8_1 `s`), [rows][nb]; used by affine weights.
    pub s: Vec<f32>,
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

impl QActs {
    /// Quantizes `x`, a row-major [rows][k] matrix; `k` must be a multiple of 32.
    pub fn new(x: &[f32], k: usize) -> QActs {
        debug_assert!(k % QK == 0 && x.len() % k == 0);
        let nb = k / QK;
        let blocks = x.len() / QK;
        let mut qs = vec![0i8; x.len()];
        let mut d = vec![0f32; blocks];
        let mut s = vec![0f32; blocks];
        for (b, (src, dst)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
            let max = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let id = if max != 0.0 { 127.0 / max } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in dst.iter_mut().zip(src) {
                let r = (v * id).round_ties_even() as i32;
                sum += r;
                *q = r as i8;
            }
            d[b] = round_f16(scale);
            s[b] = round_f16(scale * sum as f32);
        }
        QActs { k, nb, qs, d, s }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.d.len() / self.nb.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_half_to_even_and_keep_f16_scales() {
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = 1.5;
        x[3] = -2.5;
        x[4] = -127.0;
        let a = QActs::new(&x, 32);
        assert_eq!(&a.qs[..5], &[127, 0, 2, -2, -127]);
        assert_eq!(a.d[0], 1.0);
        assert_eq!(a.s[0], 0.0);
    }

    #[test]
    fn zero_block_has_zero_scale_and_values() {
        let a = QActs::new(&[0f32; 64], 32);
        assert_eq!(a.rows(), 2);
        assert!(a.qs.iter().all(|&q| q == 0) && a.d == vec![0.0, 0.0]);
    }

    #[test]
    fn dequantized_values_are_close_to_the_input() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.173).collect();
        let a = QActs::new(&x, 64);
        for (i, v) in x.iter().enumerate() {
            let back = f32::from(a.qs[i]) * a.d[i / 32];
            assert!((back - v).abs() <= a.d[i / 32] * 0.51, "{i}: {back} vs {v}");
        }
    }
}
