//! AVX2 kernels of [`super::nbits`]: int4 weights in `MatMulNBits`' layout (blocks of 32,
//! symmetric, f32 scales) times activations quantised to int8 per block, as ONNX Runtime does at
//! `accuracy_level` 4.
//!
//! Weights are read as the graph stores them, nothing is repacked: a row of `N` is `K / 32`
//! blocks of 16 bytes, byte `j` holding element `2j` in its low nibble and `2j + 1` in its high
//! one, value `q - 8` times the block's scale. The activations are rearranged instead, once per
//! call ([`quantize_row`]): for each pair of blocks, the even elements of both blocks and then
//! the odd ones, so that one 32-byte load of weights splits into two registers (low and high
//! nibbles) that line up with two 32-byte activation vectors.
//!
//! Every (weight row, activation row) pair is reduced by the same instructions in the same order
//! whatever the tile it runs in, so a row's output does not depend on the other rows of the
//! call (batch invariance; `tests/onnx_ops.rs`).
use std::arch::x86_64::*;

/// Elements per quantisation block.
pub const BLOCK: usize = 32;

/// One pair of blocks of a quantised activation row.
#[repr(C, align(32))]
#[derive(Clone, Copy, Default)]
pub struct PairAct {
    /// Even elements of the first block, then of the second.
    lo: [i8; 32],
    /// Odd elements, likewise.
    hi: [i8; 32],
    /// `8 * sum(q)` of each block in the first lane of its four (the weights' zero point).
    corr: [i32; 8],
    /// The activation scale of each block, four lanes each.
    scale: [f32; 8],
}

/// Pairs of blocks per row of `k` elements (a trailing single block counts as a pair whose
/// second block is zero).
pub fn pairs(k: usize) -> usize {
    k.div_ceil(2 * BLOCK)
}

pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Quantises one activation row of `k = a.len()` (a multiple of [`BLOCK`]) into `out`
/// ([`pairs`]`(k)` long): per block, scale = max|a| / 127 and q = round(a / scale).
///
/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_row(a: &[f32], out: &mut [PairAct]) {
    let blocks = a.len() / BLOCK;
    debug_assert_eq!(out.len(), pairs(a.len()));
    // packs_epi32/packs_epi16 interleave 128-bit lanes; this restores the element order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // Within each 16-byte lane: its 8 even bytes, then its 8 odd ones.
    let split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    let sign = _mm256_set1_ps(-0.0);
    for (p, pair) in out.iter_mut().enumerate() {
        *pair = PairAct::default();
        for half in 0..2 {
            let b = 2 * p + half;
            if b >= blocks {
                break;
            }
            let src = a.as_ptr().add(b * BLOCK);
            let v = [_mm256_loadu_ps(src), _mm256_loadu_ps(src.add(8)), _mm256_loadu_ps(src.add(16)), _mm256_loadu_ps(src.add(24))];
            let m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])), _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let scale = amax / 127.0;
            let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01)));
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let bytes = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(bytes, order), split);
            // Qwords: [evens 0-14, odds 1-15, evens 16-30, odds 17-31] -> evens, then odds.
            let bytes = _mm256_permute4x64_epi64(bytes, 0b11_01_10_00);
            let mut tmp = [0i8; 32];
            _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, bytes);
            pair.lo[16 * half..16 * half + 16].copy_from_slice(&tmp[..16]);
            pair.hi[16 * half..16 * half + 16].copy_from_slice(&tmp[16..]);
            pair.corr[4 * half] = 8 * sum;
            pair.scale[4 * half..4 * half + 4].fill(scale);
        }
    }
}

/// Weight rows of one tile: `R` rows of `blocks` blocks from `weights` and `scales`.
pub struct Rows<'a> {
    pub weights: &'a [u8],
    pub scales: &'a [f32],
    pub blocks: usize,
}

/// `out[m][r] = sum over k of act[m][k] * w[r][k]` for the `R` weight rows starting at `first`
/// and the `M` activation rows `acts` (each [`pairs`]`(k)` long).
///
/// # Safety
/// AVX2 and FMA must be available; rows `first..first + R` must exist in `w`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile<const R: usize, const M: usize>(w: &Rows<'_>, first: usize, acts: [&[PairAct]; M], out: &mut [[f32; R]; M]) {
    let nb = w.blocks;
    let full = nb / 2;
    let low4 = _mm256_set1_epi8(0x0f);
    let halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let wrow: [*const u8; R] = std::array::from_fn(|r| w.weights.as_ptr().add((first + r) * nb * 16));
    let srow: [*const f32; R] = std::array::from_fn(|r| w.scales.as_ptr().add((first + r) * nb));
    let mut acc = [[_mm256_setzero_ps(); M]; R];
    for p in 0..full {
        let mut lo = [_mm256_setzero_si256(); R];
        let mut hi = [_mm256_setzero_si256(); R];
        let mut sw = [_mm256_setzero_ps(); R];
        for r in 0..R {
            let v = _mm256_loadu_si256(wrow[r].add(32 * p) as *const __m256i);
            lo[r] = _mm256_and_si256(v, low4);
            hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            let s = _mm_castpd_ps(_mm_load_sd(srow[r].add(2 * p) as *const f64));
            sw[r] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), halves);
        }
        accumulate(&mut acc, &acts, p, lo, hi, sw);
    }
    if nb % 2 == 1 {
        // The last block alone: its activation pair's second half is zero.
        let mut lo = [_mm256_setzero_si256(); R];
        let mut hi = [_mm256_setzero_si256(); R];
        let mut sw = [_mm256_setzero_ps(); R];
        for r in 0..R {
            let v = _mm256_zextsi128_si256(_mm_loadu_si128(wrow[r].add(32 * full) as *const __m128i));
            lo[r] = _mm256_and_si256(v, low4);
            hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            sw[r] = _mm256_set1_ps(*srow[r].add(2 * full));
        }
        accumulate(&mut acc, &acts, full, lo, hi, sw);
    }
    for m in 0..M {
        for r in 0..R {
            let v = acc[r][m];
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            out[m][r] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        }
    }
}

/// One pair of blocks of `R` weight rows (split into low and high nibbles, with their scales)
/// into the accumulators of the `M` activation rows.
#[inline(always)]
unsafe fn accumulate<const R: usize, const M: usize>(acc: &mut [[__m256; M]; R], acts: &[&[PairAct]; M], p: usize, lo: [__m256i; R], hi: [__m256i; R], sw: [__m256; R]) {
    let ones = _mm256_set1_epi16(1);
    for m in 0..M {
        let a = acts[m].as_ptr().add(p);
        let alo = _mm256_load_si256((*a).lo.as_ptr() as *const __m256i);
        let ahi = _mm256_load_si256((*a).hi.as_ptr() as *const __m256i);
        let corr = _mm256_load_si256((*a).corr.as_ptr() as *const __m256i);
        let sa = _mm256_load_ps((*a).scale.as_ptr());
        for r in 0..R {
            let prod = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], alo), _mm256_maddubs_epi16(hi[r], ahi));
            let dot = _mm256_sub_epi32(_mm256_madd_epi16(prod, ones), corr);
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sw[r], sa), acc[r][m]);
        }
    }
}
