//! AVX2 version of one (row, head) of attention: q·K dot products with FMA, softmax with ggml's
//! vectorised `expf` (`ggml_v_expf`, about 1 ulp), and the weighted sum of V kept in registers.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::attention::HeadShape;
use super::qmatmul::avx2::hsum;

/// Whether this CPU can run these kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[inline(always)]
unsafe fn splat(bits: u32) -> __m256 {
    _mm256_set1_ps(f32::from_bits(bits))
}

/// ggml's `ggml_v_expf` (ggml-cpu/vec.h): e^x for 8 lanes.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    let r = splat(0x4b40_0000); // 0x1.8p23
    let z = _mm256_fmadd_ps(x, splat(0x3fb8_aa3b), r); // 0x1.715476p+0
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(
        n,
        splat(0x35bf_be8e), // 0x1.7f7d1cp-20
        _mm256_fnmadd_ps(n, splat(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
    let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1.0))));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let c = _mm256_castps_si256(_mm256_cmp_ps(abs_n, _mm256_set1_ps(126.0), _CMP_GT_OQ));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(splat(0x3c07_2010), b, splat(0x3d2b_9f17)), // 0x1.0e4020p-7, 0x1.573e2ep-5
            u,
            _mm256_fmadd_ps(splat(0x3e2a_af33), b, splat(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        ),
        u,
        _mm256_mul_ps(splat(0x3f7f_fff6), b), // 0x1.ffffecp-1
    );
    if _mm256_movemask_ps(_mm256_castsi256_ps(c)) == 0 {
        return _mm256_fmadd_ps(j, k, k);
    }
    let g = _mm256_and_si256(
        _mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
        _mm256_set1_epi32(0x8200_0000u32 as i32),
    );
    let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
    let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    let d = _mm256_castps_si256(_mm256_cmp_ps(abs_n, _mm256_set1_ps(192.0), _CMP_GT_OQ));
    let cf = _mm256_castsi256_ps(c);
    let df = _mm256_castsi256_ps(d);
    _mm256_or_ps(
        _mm256_and_ps(df, _mm256_mul_ps(s1, s1)),
        _mm256_andnot_ps(
            df,
            _mm256_or_ps(
                _mm256_and_ps(cf, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                _mm256_andnot_ps(cf, _mm256_fmadd_ps(k, j, k)),
            ),
        ),
    )
}

/// Positions per part: a row's attention is split into parts of this many positions, each
/// computed alone and merged, so that long contexts spread over the pool. The split depends only
/// on the row's own position, so results do not depend on the rest of the batch.
pub const PART: usize = 256;

/// One part of attention for the `group` query heads sharing KV head `kv_head`: positions
/// `p0..p1`. Writes, per query head g, the unnormalised sum of e^(s_p - m_g) V[p] to
/// `out[g * d..]`, the maximum score m_g to `maxes[g]` and the sum of e^(s_p - m_g) to `sums[g]`.
///
/// # Safety
/// AVX2 and FMA must be present (`available()`); `head_dim` must be a multiple of 8; `k` and `v`
/// must hold `p1` positions of `num_kv_heads * head_dim` floats; `q` holds `group * head_dim`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn attend_part(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (p0, p1): (usize, usize),
    kv_head: usize,
    s: HeadShape,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    maxes: &mut [f32],
    sums: &mut [f32],
) {
    let d = s.head_dim;
    let group = s.num_heads / s.num_kv_heads;
    let stride = s.num_kv_heads * d;
    debug_assert!(d % 8 == 0 && p0 < p1 && k.len() >= p1 * stride && v.len() >= p1 * stride);
    let scale = 1f32 / (d as f32).sqrt();
    let n = p1 - p0;
    let width = n.next_multiple_of(8);
    scores.clear();
    scores.resize(group * width, f32::NEG_INFINITY);
    let (kp, vp) = (k.as_ptr().add(kv_head * d), v.as_ptr().add(kv_head * d));

    // Scores: each K row is loaded once for all heads of the group.
    for p in 0..n {
        let kr = kp.add((p0 + p) * stride);
        for g in 0..group {
            let qp = q.as_ptr().add(g * d);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= d {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(kr.add(i)), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), _mm256_loadu_ps(kr.add(i + 8)), a1);
                i += 16;
            }
            if i < d {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), _mm256_loadu_ps(kr.add(i)), a0);
            }
            *scores.get_unchecked_mut(g * width + p) = hsum(_mm256_add_ps(a0, a1)) * scale;
        }
    }

    // e^(s - max) per head; padding lanes hold -inf and give 0.
    for g in 0..group {
        let row = &mut scores[g * width..(g + 1) * width];
        let max = row[..n].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let vmax = _mm256_set1_ps(max);
        let mut vsum = _mm256_setzero_ps();
        for c in row.chunks_exact_mut(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), vmax));
            let e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(e, e, _CMP_UNORD_Q));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            vsum = _mm256_add_ps(vsum, e);
        }
        maxes[g] = max;
        sums[g] = hsum(vsum);
    }

    // Weighted V: blocks of 32 positions (in L1) for every head, 64 output floats at a time.
    out[..group * d].fill(0.0);
    let op = out.as_mut_ptr();
    const BLOCK: usize = 32;
    let mut pb = 0;
    while pb < n {
        let pe = (pb + BLOCK).min(n);
        for g in 0..group {
            let mut base = 0;
            while base < d {
                let lanes = (d - base).min(64) / 8;
                let o = op.add(g * d + base);
                let mut acc = [_mm256_setzero_ps(); 8];
                for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_loadu_ps(o.add(l * 8));
                }
                for p in pb..pe {
                    let w = _mm256_set1_ps(*scores.get_unchecked(g * width + p));
                    let vr = vp.add((p0 + p) * stride + base);
                    for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr.add(l * 8)), *a);
                    }
                }
                for (l, a) in acc.iter().enumerate().take(lanes) {
                    _mm256_storeu_ps(o.add(l * 8), *a);
                }
                base += 64;
            }
        }
        pb = pe;
    }
}
