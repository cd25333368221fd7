//! The GGUF block formats our own kernels read (32 weights per block, ggml's byte layout), and a
//! portable reference kernel for them.
//!
//! | kind | bytes | layout                                   | weight j                      |
//! |------|------:|------------------------------------------|-------------------------------|
//! | Q4_0 | 18 | d:f16, qs[16]                               | d * (nib_j - 8)               |
//! | Q4_1 | 20 | d:f16, m:f16, qs[16]                        | d * nib_j + m                 |
//! | Q5_0 | 22 | d:f16, qh:u32, qs[16]                       | d * ((nib_j \| h_j << 4) - 16) |
//! | Q5_1 | 24 | d:f16, m:f16, qh:u32, qs[16]                | d * (nib_j \| h_j << 4) + m    |
//! | Q8_0 | 34 | d:f16, qs:i8[32]                            | d * qs_j                      |
//!
//! `nib_j` is the low nibble of `qs[j]` for j < 16 and the high nibble of `qs[j - 16]` otherwise;
//! `h_j` is bit j of `qh`.
use half::f16;

use super::quantize::{QActs, QK};

/// A block format with our own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Kind {
    /// The kind whose `as u8` is `v` (kernels take the kind as a const parameter).
    pub const fn from_u8(v: u8) -> Kind {
        match v {
            0 => Kind::Q4_0,
            1 => Kind::Q4_1,
            2 => Kind::Q5_0,
            3 => Kind::Q5_1,
            _ => Kind::Q8_0,
        }
    }

    /// Bytes per block of 32 weights.
    pub const fn bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q5_0 => 22,
            Kind::Q5_1 => 24,
            Kind::Q8_0 => 34,
        }
    }

    /// Whether blocks carry a minimum `m` (dot products then add `m * s` per activation block).
    pub const fn affine(self) -> bool {
        matches!(self, Kind::Q4_1 | Kind::Q5_1)
    }
}

pub fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// One block unpacked: the integer weights (before scale and minimum), `d` and `m`.
pub fn unpack(kind: Kind, b: &[u8]) -> ([i32; QK], f32, f32) {
    let mut q = [0i32; QK];
    let nib = |qs: &[u8], j: usize| i32::from(if j < 16 { qs[j] & 0xf } else { qs[j - 16] >> 4 });
    let bit = |qh: &[u8], j: usize| ((u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]) >> j) & 1) as i32;
    let d = f16_at(b, 0);
    match kind {
        Kind::Q4_0 => (0..QK).for_each(|j| q[j] = nib(&b[2..], j) - 8),
        Kind::Q4_1 => (0..QK).for_each(|j| q[j] = nib(&b[4..], j)),
        Kind::Q5_0 => (0..QK).for_each(|j| q[j] = (nib(&b[6..], j) | bit(&b[2..], j) << 4) - 16),
        Kind::Q5_1 => (0..QK).for_each(|j| q[j] = nib(&b[8..], j) | bit(&b[4..], j) << 4),
        Kind::Q8_0 => (0..QK).for_each(|j| q[j] = i32::from(b[2 + j] as i8)),
    }
    let m = if kind.affine() { f16_at(b, 2) } else { 0.0 };
    (q, d, m)
}

/// Dequantizes one row of blocks into `out` (`out.len()` weights).
pub fn dequantize_row(kind: Kind, row: &[u8], out: &mut [f32]) {
    for (blk, o) in row.chunks_exact(kind.bytes()).zip(out.chunks_exact_mut(QK)) {
        let (q, d, m) = unpack(kind, blk);
        for (o, q) in o.iter_mut().zip(q) {
            *o = d * q as f32 + m;
        }
    }
}

/// Portable kernel: dot products of one weight row (`nb` blocks) with activation rows
/// `row0..row0 + out.len()`. Each output is computed alone, the same way whatever the row count.
pub fn dot_rows_scalar(kind: Kind, w: &[u8], acts: &QActs, row0: usize, out: &mut [f32]) {
    let nb = acts.nb;
    for (r, o) in out.iter_mut().enumerate() {
        let row = row0 + r;
        let (mut acc, mut summs) = (0f32, 0f32);
        for b in 0..nb {
            let (q, d, m) = unpack(kind, &w[b * kind.bytes()..(b + 1) * kind.bytes()]);
            let off = row * acts.k + b * QK;
            let y = &acts.qs[off..off + QK];
            let sumi: i32 = q.iter().zip(y).map(|(&a, &b)| a * i32::from(b)).sum();
            acc += d * acts.d[row * nb + b] * sumi as f32;
            if kind.affine() {
                summs += m * acts.s[row * nb + b];
            }
        }
        *o = acc + summs;
    }
}
