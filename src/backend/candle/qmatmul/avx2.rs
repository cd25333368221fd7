//! AVX2 kernels for the 32-weight block formats, following ggml's `ggml_vec_dot_q*_q8_*` for
//! AVX2 (same unpacking, same `maddubs` products, same float accumulation order per output).
//!
//! One weight block is unpacked once and multiplied with the same block of up to `R` activation
//! rows, so a batch of rows reads each weight byte once. Every output keeps its own accumulator
//! and sees exactly the operations a single-row call does: results do not depend on how many
//! rows are computed together (batch invariance).
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::blocks::{f16_at, Kind};
use super::quantize::{QActs, QK};

/// Whether this CPU can run these kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let tmp = _mm_loadu_si128(p as *const __m128i);
    let bytes = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    _mm256_and_si256(_mm256_set1_epi8(0x0f), bytes)
}

/// 0xFF in byte j where bit j of the little-endian u32 at `p` is set, else 0.
#[inline(always)]
unsafe fn bits(p: *const u8) -> __m256i {
    let x32 = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32 as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// The block's weights as bytes (signed for symmetric kinds, 0..31 for affine ones), d and m.
#[inline(always)]
unsafe fn load(kind: Kind, b: &[u8]) -> (__m256i, f32, f32) {
    let p = b.as_ptr();
    let d = f16_at(b, 0);
    match kind {
        Kind::Q4_0 => (_mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)), d, 0.0),
        Kind::Q4_1 => (nibbles(p.add(4)), d, f16_at(b, 2)),
        Kind::Q5_0 => {
            let hi = _mm256_andnot_si256(bits(p.add(2)), _mm256_set1_epi8(0xf0u8 as i8));
            (_mm256_or_si256(nibbles(p.add(6)), hi), d, 0.0)
        }
        Kind::Q5_1 => {
            let hi = _mm256_and_si256(bits(p.add(4)), _mm256_set1_epi8(0x10));
            (_mm256_or_si256(nibbles(p.add(8)), hi), d, f16_at(b, 2))
        }
        Kind::Q8_0 => (_mm256_loadu_si256(p.add(2) as *const __m256i), d, 0.0),
    }
}

/// Sum of the 8 lanes, in ggml's order (`hsum_float_8`).
#[inline(always)]
pub(crate) unsafe fn hsum(x: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Dots of one weight row `w` (`acts.nb` blocks of `kind`) with activation rows
/// `row0..row0 + R`, written to `out`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_tile<const KIND: u8, const R: usize>(w: &[u8], acts: &QActs, row0: usize, out: &mut [f32]) {
    let kind = Kind::from_u8(KIND);
    let (nb, k, bytes) = (acts.nb, acts.k, kind.bytes());
    let ones = _mm256_set1_epi16(1);
    // Two accumulators per row (even and odd blocks) break the FMA dependency chain.
    let mut acc = [[_mm256_setzero_ps(); R]; 2];
    let mut summs = [0f32; R];
    let qs = acts.qs.as_ptr();
    for b in 0..nb {
        let (qx, dx, mx) = load(kind, w.get_unchecked(b * bytes..(b + 1) * bytes));
        let signed = !kind.affine();
        let ax = if signed { _mm256_sign_epi8(qx, qx) } else { qx };
        let a = &mut acc[b & 1];
        // dx * dy as a vector product: the same IEEE product as ggml's scalar one, fewer uops.
        let vdx = _mm256_set1_ps(dx);
        for r in 0..R {
            let row = row0 + r;
            let qy = _mm256_loadu_si256(qs.add(row * k + b * QK) as *const __m256i);
            let sy = if signed { _mm256_sign_epi8(qy, qx) } else { qy };
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones);
            let vdy = _mm256_broadcast_ss(acts.d.get_unchecked(row * nb + b));
            if kind.affine() {
                summs[r] += mx * *acts.s.get_unchecked(row * nb + b);
            }
            a[r] = _mm256_fmadd_ps(_mm256_mul_ps(vdx, vdy), _mm256_cvtepi32_ps(dot), a[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + summs[r];
    }
}

/// Dots of weight row `w` with activation rows `row0..row0 + out.len()` (at most 4 at a time).
///
/// # Safety
/// The CPU must support AVX2 and FMA (`available()`), `w` must hold `acts.nb` blocks of `kind`
/// and the rows must exist in `acts`.
pub unsafe fn dot_rows(kind: Kind, w: &[u8], acts: &QActs, row0: usize, out: &mut [f32]) {
    debug_assert!(w.len() >= acts.nb * kind.bytes() && row0 + out.len() <= acts.rows());
    match kind {
        Kind::Q4_0 => tiles::<{ Kind::Q4_0 as u8 }>(w, acts, row0, out),
        Kind::Q4_1 => tiles::<{ Kind::Q4_1 as u8 }>(w, acts, row0, out),
        Kind::Q5_0 => tiles::<{ Kind::Q5_0 as u8 }>(w, acts, row0, out),
        Kind::Q5_1 => tiles::<{ Kind::Q5_1 as u8 }>(w, acts, row0, out),
        Kind::Q8_0 => tiles::<{ Kind::Q8_0 as u8 }>(w, acts, row0, out),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tiles<const KIND: u8>(w: &[u8], acts: &QActs, row0: usize, out: &mut [f32]) {
    let mut r = 0;
    while r < out.len() {
        let left = out.len() - r;
        let o = &mut out[r..];
        match left {
            1 => dot_tile::<KIND, 1>(w, acts, row0 + r, o),
            2 => dot_tile::<KIND, 2>(w, acts, row0 + r, o),
            3 => dot_tile::<KIND, 3>(w, acts, row0 + r, o),
            _ => dot_tile::<KIND, 4>(w, acts, row0 + r, o),
        }
        r += left.min(4);
    }
}
