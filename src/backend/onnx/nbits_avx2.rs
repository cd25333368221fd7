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

use crate::backend::candle::qmatmul::avx2::hsum;

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

/// Eight blocks (four pairs) of a quantised activation row, in the lane order in which
/// [`tile`] reduces them: blocks 0, 2, 4, 6, 1, 3, 5, 7.
#[repr(C, align(32))]
#[derive(Clone, Copy, Default)]
pub struct GroupAct {
    /// `8 * sum(q)` of each block.
    corr: [i32; 8],
    /// Each block's activation scale.
    scale: [f32; 8],
}

/// The lane order of a [`GroupAct`]: block `GROUP_ORDER[lane]` of the eight.
const GROUP_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// A quantised activation row: its pairs of blocks and, for each full eight blocks, their
/// group terms ([`quantize_row`]).
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub pairs: &'a [PairAct],
    pub groups: &'a [GroupAct],
}

/// Groups of eight blocks per row of `k` elements.
pub fn groups(k: usize) -> usize {
    k / (8 * BLOCK)
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
/// ([`pairs`]`(k)` long) and `group_out` ([`groups`]`(k)` long): per block, scale = max|a| /
/// 127 and q = round(a / scale).
///
/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_row(a: &[f32], out: &mut [PairAct], group_out: &mut [GroupAct]) {
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
    debug_assert_eq!(group_out.len(), groups(a.len()));
    for (g, group) in group_out.iter_mut().enumerate() {
        for (lane, &b) in GROUP_ORDER.iter().enumerate() {
            let pair = &out[4 * g + b / 2];
            group.corr[lane] = pair.corr[4 * (b % 2)];
            group.scale[lane] = pair.scale[4 * (b % 2)];
        }
    }
}

/// The weights of a node: `blocks` blocks per row.
pub struct Rows<'a> {
    pub weights: &'a [u8],
    pub scales: &'a [f32],
    pub blocks: usize,
}

/// How far ahead (bytes) of the block pair in use the weight row is prefetched. One row at a
/// time and this prefetch made the difference between 0.94x and 1.1-1.3x ONNX Runtime's kernel
/// on a chain of Qwen-sized projections streamed from memory (docs/perf-notes.md, session 9).
const PREFETCH: usize = 1024;

/// `out[m] = sum over k of act[m][k] * w[row][k]` for the `M` activation rows `acts`.
///
/// Each group of eight blocks is reduced to one vector of eight block sums (one lane per block,
/// in [`GROUP_ORDER`]) before its scales apply: one conversion, one scale product and one FMA
/// per eight blocks. Blocks after the last full group go pair by pair.
///
/// # Safety
/// AVX2 and FMA must be available; `row` must be a row of `w`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile<const M: usize>(w: &Rows<'_>, row: usize, acts: [ActRow<'_>; M], out: &mut [f32; M]) {
    let nb = w.blocks;
    let full = nb / 2;
    let order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    let halves = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let wrow = w.weights.as_ptr().add(row * nb * 16);
    let srow = w.scales.as_ptr().add(row * nb);
    let pair_acts: [&[PairAct]; M] = std::array::from_fn(|m| acts[m].pairs);
    let mut acc = [_mm256_setzero_ps(); M];
    let groups = nb / 8;
    for g in 0..groups {
        let p = 4 * g;
        _mm_prefetch::<_MM_HINT_T0>(wrow.add(128 * g + PREFETCH) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(wrow.add(128 * g + PREFETCH + 64) as *const i8);
        let d0 = pair_dots(wrow, &pair_acts, p);
        let d1 = pair_dots(wrow, &pair_acts, p + 1);
        let t0: [__m256i; M] = std::array::from_fn(|m| fold32(d0[m], d1[m]));
        let d2 = pair_dots(wrow, &pair_acts, p + 2);
        let d3 = pair_dots(wrow, &pair_acts, p + 3);
        let sw = _mm256_permutevar8x32_ps(_mm256_loadu_ps(srow.add(8 * g)), order);
        for m in 0..M {
            let ga = acts[m].groups.as_ptr().add(g);
            let t1 = fold32(d2[m], d3[m]);
            let u = _mm256_add_epi32(_mm256_unpacklo_epi64(t0[m], t1), _mm256_unpackhi_epi64(t0[m], t1));
            acc[m] = scaled(acc[m], u, (*ga).corr.as_ptr(), sw, (*ga).scale.as_ptr());
        }
    }
    // The remaining pairs; a last single block pairs with zeros (its activation pair's second
    // half is zero, and only 16 bytes of weights are read).
    for p in 4 * groups..nb.div_ceil(2) {
        let (d, sw) = if p < full {
            let s = _mm_castpd_ps(_mm_load_sd(srow.add(2 * p) as *const f64));
            (pair_dots(wrow, &pair_acts, p), _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), halves))
        } else {
            let v = _mm256_zextsi128_si256(_mm_loadu_si128(wrow.add(32 * p) as *const __m128i));
            (nibble_dots(v, &pair_acts, p), _mm256_set1_ps(*srow.add(2 * p)))
        };
        for m in 0..M {
            let a = pair_acts[m].as_ptr().add(p);
            acc[m] = scaled(acc[m], d[m], (*a).corr.as_ptr(), sw, (*a).scale.as_ptr());
        }
    }
    for m in 0..M {
        out[m] = hsum(acc[m]);
    }
}

/// `acc + float(dots - corr) * sw * sa`: eight lanes of integer block sums (the group's or the
/// pair's), their zero-point terms `corr`, weight scales `sw` and activation scales `sa`.
#[inline(always)]
unsafe fn scaled(acc: __m256, dots: __m256i, corr: *const i32, sw: __m256, sa: *const f32) -> __m256 {
    let dot = _mm256_sub_epi32(dots, _mm256_load_si256(corr as *const __m256i));
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sw, _mm256_load_ps(sa)), acc)
}

/// The integer dot products of pair `p` of a weight row with each activation row: eight i32
/// lanes, four partial sums of the pair's first block, then four of its second.
#[inline(always)]
unsafe fn pair_dots<const M: usize>(wrow: *const u8, acts: &[&[PairAct]; M], p: usize) -> [__m256i; M] {
    nibble_dots(_mm256_loadu_si256(wrow.add(32 * p) as *const __m256i), acts, p)
}

/// [`pair_dots`] of the 32 weight bytes `v`.
#[inline(always)]
unsafe fn nibble_dots<const M: usize>(v: __m256i, acts: &[&[PairAct]; M], p: usize) -> [__m256i; M] {
    let low4 = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let lo = _mm256_and_si256(v, low4);
    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    std::array::from_fn(|m| {
        let a = acts[m].as_ptr().add(p);
        let alo = _mm256_load_si256((*a).lo.as_ptr() as *const __m256i);
        let ahi = _mm256_load_si256((*a).hi.as_ptr() as *const __m256i);
        _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, alo), _mm256_maddubs_epi16(hi, ahi)), ones)
    })
}

/// Two pairs' dot products (blocks a0 a1 and b0 b1, four lanes each) folded to two lanes per
/// block: `[a0, b0, a0, b0 | a1, b1, a1, b1]`.
#[inline(always)]
unsafe fn fold32(a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Single-thread speed of the tiles on a matrix larger than the caches (timing only:
    /// `cargo test --release --lib nbits_avx2 -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn tile_speed() {
        if !available() {
            return;
        }
        let (n, k) = (151936 / 4, 896);
        let blocks = k / BLOCK;
        let weights: Vec<u8> = (0..n * blocks * 16).map(|i| (i * 2654435761usize >> 13) as u8).collect();
        let scales: Vec<f32> = (0..n * blocks).map(|i| 0.01 + (i % 7) as f32 * 0.001).collect();
        let w = Rows { weights: &weights, scales: &scales, blocks };
        let a: Vec<f32> = (0..8 * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.02).collect();
        let (np, ng) = (pairs(k), groups(k));
        let mut acts = vec![PairAct::default(); 8 * np];
        let mut gs = vec![GroupAct::default(); 8 * ng];
        for (m, row) in a.chunks_exact(k).enumerate() {
            unsafe { quantize_row(row, &mut acts[m * np..(m + 1) * np], &mut gs[m * ng..(m + 1) * ng]) };
        }
        let r: Vec<ActRow> = (0..8).map(|m| ActRow { pairs: &acts[m * np..(m + 1) * np], groups: &gs[m * ng..(m + 1) * ng] }).collect();
        let bytes = (n * blocks * 20) as f64;
        // Fastest of 15 interleaved rounds (the VM's speed drifts from second to second).
        let (mut one, mut four, mut l2, mut read) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
        let mut sink = 0f32;
        for _ in 0..15 {
            let t = std::time::Instant::now();
            for c in 0..n {
                let mut out = [0f32; 1];
                unsafe { tile::<1>(&w, c, [r[0]], &mut out) };
                sink += out[0];
            }
            one = one.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for c in 0..n {
                let mut out = [0f32; 4];
                unsafe { tile::<4>(&w, c, [r[0], r[1], r[2], r[3]], &mut out) };
                sink += out[0];
            }
            four = four.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for _ in 0..74 {
                for c in 0..512 {
                    let mut out = [0f32; 1];
                    unsafe { tile::<1>(&w, c, [r[0]], &mut out) };
                    sink += out[0];
                }
            }
            l2 = l2.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            let mut acc = unsafe { _mm256_setzero_si256() };
            for c in weights.chunks_exact(32) {
                acc = unsafe { _mm256_add_epi8(acc, _mm256_loadu_si256(c.as_ptr() as *const __m256i)) };
            }
            let mut tmp = [0u8; 32];
            unsafe { _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, acc) };
            sink += tmp[3] as f32;
            read = read.min(t.elapsed().as_secs_f64());
        }
        eprintln!("1 row {:.1} GB/s, in L2 {:.1} GB/s-eq, 4 rows {:.1} GMAC/s; bare read of the weights {:.1} GB/s ({sink})", bytes / one / 1e9, (74 * 512 * blocks * 20) as f64 / l2 / 1e9, (4 * n * k) as f64 / four / 1e9, weights.len() as f64 / read / 1e9);
    }
}
