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
///
/// Per output this is exactly `gemm_tile`'s arithmetic (and ggml's `ggml_vec_dot_q*_q8_*`): one
/// 8-lane accumulator, per block `acc = fma(d_x * d_y, float(lanes), acc)` in block order, then
/// `hsum(acc) + summs`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_tile<const KIND: u8, const R: usize>(w: &[u8], acts: &QActs, row0: usize, out: &mut [f32]) {
    let kind = Kind::from_u8(KIND);
    let (nb, k, bytes) = (acts.nb, acts.k, kind.bytes());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut summs = [0f32; R];
    let qs = acts.qs.as_ptr();
    for b in 0..nb {
        let (qx, dx, mx) = load(kind, w.get_unchecked(b * bytes..(b + 1) * bytes));
        let signed = !kind.affine();
        let ax = if signed { _mm256_sign_epi8(qx, qx) } else { qx };
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
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(vdx, vdy), _mm256_cvtepi32_ps(dot), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum(acc[r]) + summs[r];
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

/// One activation row (row 0 of `acts`) against weight rows `js` of `data`: `dst[j]` gets
/// exactly what `dot_rows` gives for row j (the same `dot_tile::<_, 1>`), in one loop without a
/// call per weight row. Decode steps of one sequence spend most of their time here.
///
/// # Safety
/// As `dot_rows`; `data` holds at least `js.end` rows and `dst` at least `js.end` values, of
/// which `js` belong to the caller alone.
pub unsafe fn dot_range(kind: Kind, data: &[u8], js: std::ops::Range<usize>, acts: &QActs, dst: *mut f32) {
    match kind {
        Kind::Q4_0 => range::<{ Kind::Q4_0 as u8 }>(data, js, acts, dst),
        Kind::Q4_1 => range::<{ Kind::Q4_1 as u8 }>(data, js, acts, dst),
        Kind::Q5_0 => range::<{ Kind::Q5_0 as u8 }>(data, js, acts, dst),
        Kind::Q5_1 => range::<{ Kind::Q5_1 as u8 }>(data, js, acts, dst),
        Kind::Q8_0 => range::<{ Kind::Q8_0 as u8 }>(data, js, acts, dst),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn range<const KIND: u8>(data: &[u8], js: std::ops::Range<usize>, acts: &QActs, dst: *mut f32) {
    let row_bytes = acts.nb * Kind::from_u8(KIND).bytes();
    let mut o = [0f32; 1];
    for j in js {
        dot_tile::<KIND, 1>(data.get_unchecked(j * row_bytes..(j + 1) * row_bytes), acts, 0, &mut o);
        *dst.add(j) = o[0];
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

/// Weight rows unpacked once for a GEMM over many activation rows. Per (row, block): the 32
/// weights as bytes (signed for symmetric kinds, followed by their absolute values; 0..31 for
/// affine kinds), and d and m as f32.
struct Packed {
    nb: usize,
    /// Bytes per block in `qs`: 64 (symmetric) or 32 (affine).
    stride: usize,
    qs: Vec<u8>,
    /// d of each (row, block) as 8 copies (a vector operand: no broadcast uop in the kernel).
    d: Vec<__m256>,
    m: Vec<f32>,
}

/// Unpacks `rows` whole weight rows `w` of `KIND` into `p` (rows 0..rows).
#[target_feature(enable = "avx2,fma")]
unsafe fn pack<const KIND: u8>(w: &[u8], rows: usize, p: &mut Packed) {
    let kind = Kind::from_u8(KIND);
    let (nb, bytes, stride) = (p.nb, kind.bytes(), p.stride);
    for i in 0..rows * nb {
        let (qx, d, m) = load(kind, w.get_unchecked(i * bytes..(i + 1) * bytes));
        let dst = p.qs.as_mut_ptr().add(i * stride);
        _mm256_storeu_si256(dst as *mut __m256i, qx);
        if !kind.affine() {
            _mm256_storeu_si256(dst.add(32) as *mut __m256i, _mm256_sign_epi8(qx, qx));
        }
        *p.d.get_unchecked_mut(i) = _mm256_set1_ps(d);
        *p.m.get_unchecked_mut(i) = m;
    }
}

/// Weight rows `i0..i0 + RM` of `p` times activation rows `row0..row0 + RN`: `out[i][j]`.
///
/// Each output sees the same operations as in `dot_tile` (one accumulator, blocks in order);
/// only the loads are shared: an activation block serves RM weight rows and a weight block RN
/// activation rows, with RM * RN accumulators in registers.
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_tile<const KIND: u8, const RM: usize, const RN: usize>(
    p: &Packed,
    i0: usize,
    acts: &QActs,
    row0: usize,
    out: &mut [[f32; 4]; 4],
) {
    let affine = Kind::from_u8(KIND).affine();
    let (nb, k, stride) = (p.nb, acts.k, p.stride);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); RN]; RM];
    let mut summs = [[0f32; RN]; RM];
    let wq = p.qs.as_ptr().add(i0 * nb * stride);
    let wd = p.d.as_ptr().add(i0 * nb);
    let wm = p.m.as_ptr().add(i0 * nb);
    let qs = acts.qs.as_ptr().add(row0 * k);
    let ad = acts.d.as_ptr().add(row0 * nb);
    let asum = acts.s.as_ptr().add(row0 * nb);
    for b in 0..nb {
        let mut y = [_mm256_setzero_si256(); RN];
        let mut dy = [_mm256_setzero_ps(); RN];
        for j in 0..RN {
            y[j] = _mm256_loadu_si256(qs.add(j * k + b * QK) as *const __m256i);
            dy[j] = _mm256_broadcast_ss(&*ad.add(j * nb + b));
        }
        for i in 0..RM {
            let wp = wq.add((i * nb + b) * stride);
            let w = _mm256_loadu_si256(wp as *const __m256i);
            let aw = if affine { w } else { _mm256_loadu_si256(wp.add(32) as *const __m256i) };
            let dx = _mm256_loadu_ps(wd.add(i * nb + b) as *const f32);
            for j in 0..RN {
                let sy = if affine { y[j] } else { _mm256_sign_epi8(y[j], w) };
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sy), ones);
                if affine {
                    summs[i][j] += *wm.add(i * nb + b) * *asum.add(j * nb + b);
                }
                acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(dx, dy[j]), _mm256_cvtepi32_ps(dot), acc[i][j]);
            }
        }
    }
    for i in 0..RM {
        for j in 0..RN {
            out[i][j] = hsum(acc[i][j]) + summs[i][j];
        }
    }
}

/// Weight rows per register tile and activation rows per register tile of `gemm`.
pub const GEMM_RM: usize = 4;
pub const GEMM_RN: usize = 2;
/// Bytes of unpacked weights per sub-block (kept in L1 while all activation tiles pass).
const PACK_BYTES: usize = 16 * 1024;

type Tile = unsafe fn(&Packed, usize, &QActs, usize, &mut [[f32; 4]; 4]);

fn tile_fn<const KIND: u8>(rm: usize, rn: usize) -> Tile {
    match (rm, rn) {
        (1, 1) => gemm_tile::<KIND, 1, 1>,
        (1, 2) => gemm_tile::<KIND, 1, 2>,
        (1, 3) => gemm_tile::<KIND, 1, 3>,
        (1, _) => gemm_tile::<KIND, 1, 4>,
        (2, 1) => gemm_tile::<KIND, 2, 1>,
        (2, 2) => gemm_tile::<KIND, 2, 2>,
        (2, 3) => gemm_tile::<KIND, 2, 3>,
        (2, _) => gemm_tile::<KIND, 2, 4>,
        (3, 1) => gemm_tile::<KIND, 3, 1>,
        (3, 2) => gemm_tile::<KIND, 3, 2>,
        (3, 3) => gemm_tile::<KIND, 3, 3>,
        (3, _) => gemm_tile::<KIND, 3, 4>,
        (_, 1) => gemm_tile::<KIND, 4, 1>,
        (_, 2) => gemm_tile::<KIND, 4, 2>,
        (_, 3) => gemm_tile::<KIND, 4, 3>,
        (_, _) => gemm_tile::<KIND, 4, 4>,
    }
}

/// `dst[r * n + j]` for every activation row r and weight rows `js` (whole rows of `data`).
///
/// # Safety
/// AVX2 and FMA must be present, `data` must hold the rows `js` of `acts.nb` blocks each, `dst`
/// an [acts.rows(), n] output whose columns `js` nobody else writes meanwhile.
pub unsafe fn gemm(kind: Kind, data: &[u8], js: std::ops::Range<usize>, acts: &QActs, n: usize, dst: *mut f32) {
    match kind {
        Kind::Q4_0 => gemm_kind::<{ Kind::Q4_0 as u8 }>(data, js, acts, n, dst),
        Kind::Q4_1 => gemm_kind::<{ Kind::Q4_1 as u8 }>(data, js, acts, n, dst),
        Kind::Q5_0 => gemm_kind::<{ Kind::Q5_0 as u8 }>(data, js, acts, n, dst),
        Kind::Q5_1 => gemm_kind::<{ Kind::Q5_1 as u8 }>(data, js, acts, n, dst),
        Kind::Q8_0 => gemm_kind::<{ Kind::Q8_0 as u8 }>(data, js, acts, n, dst),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_kind<const KIND: u8>(data: &[u8], js: std::ops::Range<usize>, acts: &QActs, n: usize, dst: *mut f32) {
    let kind = Kind::from_u8(KIND);
    let (nb, m) = (acts.nb, acts.rows());
    let rb = nb * kind.bytes();
    let stride = if kind.affine() { 32 } else { 64 };
    let sub = (PACK_BYTES / (nb * (stride + 36))).clamp(GEMM_RM, 64) / GEMM_RM * GEMM_RM;
    let mut p = Packed {
        nb,
        stride,
        qs: vec![0u8; sub * nb * stride],
        d: vec![_mm256_setzero_ps(); sub * nb],
        m: vec![0f32; sub * nb],
    };
    let (rm_max, rn_max) = (GEMM_RM, GEMM_RN);
    let sub = sub / rm_max * rm_max;
    let full = tile_fn::<KIND>(rm_max, rn_max);
    let mut out = [[0f32; 4]; 4];
    for s0 in js.clone().step_by(sub) {
        let rows = sub.min(js.end - s0);
        pack::<KIND>(&data[s0 * rb..(s0 + rows) * rb], rows, &mut p);
        let mut r0 = 0;
        while r0 < m {
            let rn = rn_max.min(m - r0);
            let mut i = 0;
            while i < rows {
                let rm = rm_max.min(rows - i);
                let f = if rm == rm_max && rn == rn_max { full } else { tile_fn::<KIND>(rm, rn) };
                f(&p, i, acts, r0, &mut out);
                for (ii, o) in out[..rm].iter().enumerate() {
                    for (jj, v) in o[..rn].iter().enumerate() {
                        *dst.add((r0 + jj) * n + s0 + i + ii) = *v;
                    }
                }
                i += rm;
            }
            r0 += rn;
        }
    }
}
