//! AVX2 kernels for Q4_K and Q6_K weights against Q8_K activations, following ggml's
//! `ggml_vec_dot_q4_K_q8_K` and `ggml_vec_dot_q6_K_q8_K` (same integer products, same float
//! steps per output), with each 256-weight superblock unpacked once for up to 4 activation rows.
//! Activations are candle's `BlockQ8K` (ggml's `block_q8_K` layout): d: f32 at byte 0, qs: i8[256]
//! at 4, bsums: i16[16] at 260; 292 bytes.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::avx2::hsum;
use super::blocks::f16_at;

/// Bytes of one Q8_K activation block.
pub const Q8K_BYTES: usize = 292;
/// Bytes of one Q4_K / Q6_K weight superblock.
pub const Q4K_BYTES: usize = 144;
pub const Q6K_BYTES: usize = 210;

/// Which k-quant a weight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KKind {
    Q4K,
    Q6K,
}

impl KKind {
    pub const fn bytes(self) -> usize {
        match self {
            KKind::Q4K => Q4K_BYTES,
            KKind::Q6K => Q6K_BYTES,
        }
    }
}

#[inline(always)]
unsafe fn act_d(a: *const u8) -> f32 {
    std::ptr::read_unaligned(a as *const f32)
}

/// Q4_K: 6-bit scales and mins of the 8 sub-blocks, as ggml unpacks them: ([scales; 8], [mins; 8]).
#[inline(always)]
fn q4k_scales_mins(x: &[u8]) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([x[4 + 4 * i], x[5 + 4 * i], x[6 + 4 * i], x[7 + 4 * i]]);
    let mut utmp = [word(0), word(1), word(2), 0];
    utmp[3] = ((utmp[2] >> 4) & KMASK2) | (((utmp[1] >> 6) & KMASK3) << 4);
    let uaux = utmp[1] & KMASK1;
    utmp[1] = (utmp[2] & KMASK2) | (((utmp[0] >> 6) & KMASK3) << 4);
    utmp[2] = uaux;
    utmp[0] &= KMASK1;
    utmp
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q4k_tile<const R: usize>(w: &[u8], nsb: usize, acts: &[*const u8; 4], out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0xf);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for i in 0..nsb {
        let x = w.get_unchecked(i * Q4K_BYTES..(i + 1) * Q4K_BYTES);
        let (xd, xdmin) = (f16_at(x, 0), f16_at(x, 2));
        let utmp = q4k_scales_mins(x);
        let mins_and_scales =
            _mm256_cvtepu8_epi16(_mm_set_epi32(utmp[3] as i32, utmp[2] as i32, utmp[1] as i32, utmp[0] as i32));
        let mins = _mm256_extracti128_si256(mins_and_scales, 1);
        let sc = [utmp[0].to_le_bytes(), utmp[1].to_le_bytes()].concat();
        let mut sumi = [_mm256_setzero_si256(); R];
        for r in 0..R {
            let a = acts[r].add(i * Q8K_BYTES);
            let yd = act_d(a);
            let dmin = -yd * xdmin;
            let q8sums = _mm256_loadu_si256(a.add(260) as *const __m256i);
            let q8s = _mm_hadd_epi16(_mm256_extracti128_si256(q8sums, 0), _mm256_extracti128_si256(q8sums, 1));
            let prod = _mm_madd_epi16(mins, q8s);
            acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r]);
        }
        let q4 = x.as_ptr().add(16);
        for j in 0..4 {
            let scale_l = _mm256_set1_epi16(i16::from(sc[2 * j]));
            let scale_h = _mm256_set1_epi16(i16::from(sc[2 * j + 1]));
            let q4bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
            let q4l = _mm256_and_si256(q4bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            for r in 0..R {
                let q8 = acts[r].add(i * Q8K_BYTES + 4 + 64 * j);
                let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
                let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p16l, p16h));
            }
        }
        for r in 0..R {
            let d = act_d(acts[r].add(i * Q8K_BYTES)) * xd;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for r in 0..R {
        let mut m = acc_m[r];
        m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[r] = hsum(acc[r]) + _mm_cvtss_f32(m);
    }
}

#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q6k_tile<const R: usize>(w: &[u8], nsb: usize, acts: &[*const u8; 4], out: &mut [f32]) {
    let m3 = _mm256_set1_epi8(3);
    let m15 = _mm256_set1_epi8(15);
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..nsb {
        let x = w.get_unchecked(i * Q6K_BYTES..(i + 1) * Q6K_BYTES);
        let xd = f16_at(x, 208);
        let (ql, qh) = (x.as_ptr(), x.as_ptr().add(128));
        let sc = &x[192..208];
        let scales_16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr() as *const __m128i));
        let mut sumi = [_mm256_setzero_si256(); R];
        let mut sub = [_mm256_setzero_si256(); R];
        for r in 0..R {
            let q8sums = _mm256_loadu_si256(acts[r].add(i * Q8K_BYTES + 260) as *const __m256i);
            sub[r] = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales_16), 5);
        }
        for j in 0..2 {
            let q4bits1 = _mm256_loadu_si256(ql.add(64 * j) as *const __m256i);
            let q4bits2 = _mm256_loadu_si256(ql.add(64 * j + 32) as *const __m256i);
            let q4bits_h = _mm256_loadu_si256(qh.add(32 * j) as *const __m256i);
            let q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, m3), 4);
            let q4h_1 = _mm256_slli_epi16(_mm256_and_si256(q4bits_h, _mm256_set1_epi8(12)), 2);
            let q4h_2 = _mm256_and_si256(q4bits_h, _mm256_set1_epi8(48));
            let q4h_3 = _mm256_srli_epi16(_mm256_and_si256(q4bits_h, _mm256_set1_epi8(-64)), 2);
            let q = [
                _mm256_or_si256(_mm256_and_si256(q4bits1, m15), q4h_0),
                _mm256_or_si256(_mm256_and_si256(q4bits2, m15), q4h_1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m15), q4h_2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m15), q4h_3),
            ];
            // Sub-block scales: 16 weights each, two per 32-weight group.
            let s = |g: usize| {
                let lo = _mm_set1_epi16(i16::from(sc[8 * j + 2 * g] as i8));
                let hi = _mm_set1_epi16(i16::from(sc[8 * j + 2 * g + 1] as i8));
                _mm256_set_m128i(hi, lo)
            };
            let scale = [s(0), s(1), s(2), s(3)];
            for r in 0..R {
                let q8 = acts[r].add(i * Q8K_BYTES + 4 + 128 * j);
                let mut p = [_mm256_setzero_si256(); 4];
                for g in 0..4 {
                    let q8g = _mm256_loadu_si256(q8.add(32 * g) as *const __m256i);
                    p[g] = _mm256_madd_epi16(scale[g], _mm256_maddubs_epi16(q[g], q8g));
                }
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p[0], p[1]));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p[2], p[3]));
            }
        }
        for r in 0..R {
            let d = act_d(acts[r].add(i * Q8K_BYTES)) * xd;
            let s = _mm256_sub_epi32(sumi[r], sub[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
}

/// Dots of one weight row `w` (`nsb` superblocks of `kind`) with the activation rows whose Q8_K
/// blocks start at `acts[..out.len()]` (at most 4).
///
/// # Safety
/// AVX2 and FMA must be present; `w` holds `nsb` superblocks and every `acts[r]` points at `nsb`
/// Q8_K blocks.
pub unsafe fn dot_rows(kind: KKind, w: &[u8], nsb: usize, acts: &[*const u8; 4], out: &mut [f32]) {
    debug_assert!(w.len() >= nsb * kind.bytes() && out.len() <= 4);
    match (kind, out.len()) {
        (KKind::Q4K, 1) => q4k_tile::<1>(w, nsb, acts, out),
        (KKind::Q4K, 2) => q4k_tile::<2>(w, nsb, acts, out),
        (KKind::Q4K, 3) => q4k_tile::<3>(w, nsb, acts, out),
        (KKind::Q4K, _) => q4k_tile::<4>(w, nsb, acts, out),
        (KKind::Q6K, 1) => q6k_tile::<1>(w, nsb, acts, out),
        (KKind::Q6K, 2) => q6k_tile::<2>(w, nsb, acts, out),
        (KKind::Q6K, 3) => q6k_tile::<3>(w, nsb, acts, out),
        (KKind::Q6K, _) => q6k_tile::<4>(w, nsb, acts, out),
    }
}

/// One activation row (`act`, `nsb` Q8_K blocks) against weight rows `js` of `data`: `dst[j]`
/// gets exactly what `dot_rows` gives for row j, in one loop without a call per weight row.
///
/// # Safety
/// As `dot_rows`; `data` holds at least `js.end` rows and `dst` at least `js.end` values, of
/// which `js` belong to the caller alone.
pub unsafe fn dot_range(kind: KKind, data: &[u8], js: std::ops::Range<usize>, nsb: usize, act: *const u8, dst: *mut f32) {
    match kind {
        KKind::Q4K => q4k_range(data, js, nsb, act, dst),
        KKind::Q6K => q6k_range(data, js, nsb, act, dst),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q4k_range(data: &[u8], js: std::ops::Range<usize>, nsb: usize, act: *const u8, dst: *mut f32) {
    let (row_bytes, acts, mut o) = (nsb * KKind::Q4K.bytes(), [act; 4], [0f32; 1]);
    for j in js {
        q4k_tile::<1>(data.get_unchecked(j * row_bytes..(j + 1) * row_bytes), nsb, &acts, &mut o);
        *dst.add(j) = o[0];
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn q6k_range(data: &[u8], js: std::ops::Range<usize>, nsb: usize, act: *const u8, dst: *mut f32) {
    let (row_bytes, acts, mut o) = (nsb * KKind::Q6K.bytes(), [act; 4], [0f32; 1]);
    for j in js {
        q6k_tile::<1>(data.get_unchecked(j * row_bytes..(j + 1) * row_bytes), nsb, &acts, &mut o);
        *dst.add(j) = o[0];
    }
}

/// Q4_K weight rows `ws` (RM of them, `nsb` superblocks each) times the activation rows whose
/// Q8_K blocks start at `acts[..RN]`: `out[i][j]`.
///
/// Per output the same operations as `q4k_tile` (integer sums are exact in any order; the float
/// steps per superblock and the final sums are the same), so results do not depend on the tile.
/// An activation group serves RM weight rows and an unpacked weight group RN activation rows.
#[target_feature(enable = "avx2,fma")]
unsafe fn q4k_gemm_tile<const RM: usize, const RN: usize>(
    ws: [*const u8; 4],
    nsb: usize,
    acts: &[*const u8; 4],
    out: &mut [[f32; 4]; 4],
) {
    let m4 = _mm256_set1_epi8(0xf);
    let mut acc = [[_mm256_setzero_ps(); RN]; RM];
    let mut acc_m = [[_mm_setzero_ps(); RN]; RM];
    for sb in 0..nsb {
        let mut q8s = [_mm_setzero_si128(); RN];
        for j in 0..RN {
            let q8sums = _mm256_loadu_si256(acts[j].add(sb * Q8K_BYTES + 260) as *const __m256i);
            q8s[j] = _mm_hadd_epi16(_mm256_extracti128_si256(q8sums, 0), _mm256_extracti128_si256(q8sums, 1));
        }
        let mut sc = [[0u8; 8]; RM];
        for i in 0..RM {
            let x = std::slice::from_raw_parts(ws[i].add(sb * Q4K_BYTES), Q4K_BYTES);
            let xdmin = f16_at(x, 2);
            let utmp = q4k_scales_mins(x);
            let mins_and_scales =
                _mm256_cvtepu8_epi16(_mm_set_epi32(utmp[3] as i32, utmp[2] as i32, utmp[1] as i32, utmp[0] as i32));
            let mins = _mm256_extracti128_si256(mins_and_scales, 1);
            let lo = utmp[0].to_le_bytes();
            let hi = utmp[1].to_le_bytes();
            sc[i] = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
            for j in 0..RN {
                let yd = act_d(acts[j].add(sb * Q8K_BYTES));
                let dmin = -yd * xdmin;
                let prod = _mm_madd_epi16(mins, q8s[j]);
                acc_m[i][j] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[i][j]);
            }
        }
        let mut sumi = [[_mm256_setzero_si256(); RN]; RM];
        for g in 0..8 {
            let mut q4 = [_mm256_setzero_si256(); RM];
            let mut scale = [_mm256_setzero_si256(); RM];
            for i in 0..RM {
                let bits = _mm256_loadu_si256(ws[i].add(sb * Q4K_BYTES + 16 + 32 * (g / 2)) as *const __m256i);
                q4[i] = if g % 2 == 0 { _mm256_and_si256(bits, m4) } else { _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4) };
                scale[i] = _mm256_set1_epi16(i16::from(sc[i][g]));
            }
            for j in 0..RN {
                let q8 = _mm256_loadu_si256(acts[j].add(sb * Q8K_BYTES + 4 + 32 * g) as *const __m256i);
                for i in 0..RM {
                    let p16 = _mm256_madd_epi16(scale[i], _mm256_maddubs_epi16(q4[i], q8));
                    sumi[i][j] = _mm256_add_epi32(sumi[i][j], p16);
                }
            }
        }
        for i in 0..RM {
            let xd = f16_at(std::slice::from_raw_parts(ws[i].add(sb * Q4K_BYTES), 2), 0);
            for j in 0..RN {
                let d = act_d(acts[j].add(sb * Q8K_BYTES)) * xd;
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[i][j]), acc[i][j]);
            }
        }
    }
    for i in 0..RM {
        for j in 0..RN {
            let mut m = acc_m[i][j];
            m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            m = _mm_add_ss(m, _mm_movehdup_ps(m));
            out[i][j] = hsum(acc[i][j]) + _mm_cvtss_f32(m);
        }
    }
}

/// Weight rows and activation rows per register tile of `gemm`.
const GEMM_RM: usize = 2;
const GEMM_RN: usize = 4;

type GemmTile = unsafe fn([*const u8; 4], usize, &[*const u8; 4], &mut [[f32; 4]; 4]);

fn q4k_tile_fn(rm: usize, rn: usize) -> GemmTile {
    match (rm, rn) {
        (1, 1) => q4k_gemm_tile::<1, 1>,
        (1, 2) => q4k_gemm_tile::<1, 2>,
        (1, 3) => q4k_gemm_tile::<1, 3>,
        (1, _) => q4k_gemm_tile::<1, 4>,
        (_, 1) => q4k_gemm_tile::<2, 1>,
        (_, 2) => q4k_gemm_tile::<2, 2>,
        (_, 3) => q4k_gemm_tile::<2, 3>,
        (_, _) => q4k_gemm_tile::<2, 4>,
    }
}

/// Whether `gemm` handles `kind` (others go through `dot_rows`). A Q6_K version of the tile
/// (same structure) measured 0.81-0.87x of `q6k_tile` with 2 weight rows per tile and 0.93-1.08x
/// with one, so Q6_K stays on the per-row kernel.
pub fn has_gemm(kind: KKind) -> bool {
    kind == KKind::Q4K
}

/// `dst[r * n + j]` for activation rows r in 0..m (Q8_K rows of `nsb` blocks from `acts`) and
/// weight rows `js` of `data`, in register tiles of GEMM_RM x GEMM_RN over sub-blocks of weight
/// rows of about 16 KiB. Same bits per output as `dot_rows`.
///
/// # Safety
/// AVX2 and FMA must be present, `has_gemm(kind)`, `data` holds the rows `js`, `acts` m rows of
/// nsb Q8_K blocks, and `dst` an [m, n] output whose columns `js` nobody else writes meanwhile.
pub unsafe fn gemm(kind: KKind, data: &[u8], js: std::ops::Range<usize>, nsb: usize, acts: *const u8, m: usize, n: usize, dst: *mut f32) {
    debug_assert!(has_gemm(kind));
    let rb = nsb * kind.bytes();
    let sub = (16 * 1024 / rb).clamp(GEMM_RM, 64) / GEMM_RM * GEMM_RM;
    let tile_fn = q4k_tile_fn;
    let rm_max = GEMM_RM;
    let full = tile_fn(rm_max, GEMM_RN);
    let mut out = [[0f32; 4]; 4];
    for s0 in js.clone().step_by(sub) {
        let rows = sub.min(js.end - s0);
        let mut r0 = 0;
        while r0 < m {
            let rn = GEMM_RN.min(m - r0);
            let ap: [*const u8; 4] = std::array::from_fn(|t| acts.add((r0 + t.min(rn - 1)) * nsb * Q8K_BYTES));
            let mut i = 0;
            while i < rows {
                let rm = rm_max.min(rows - i);
                let wp: [*const u8; 4] = std::array::from_fn(|t| data.as_ptr().add((s0 + i + t.min(rm - 1)) * rb));
                let f = if rm == rm_max && rn == GEMM_RN { full } else { tile_fn(rm, rn) };
                f(wp, nsb, &ap, &mut out);
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
