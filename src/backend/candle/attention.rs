//! Rotary position embeddings and causal attention over one sequence's cached keys and values.
//!
//! Both run on plain f32 slices: every token carries its own position, and every query row reads
//! exactly the cached positions it may see, so no mask is ever built and a row's result does not
//! depend on which other sequences share the step.

/// Precomputed cos/sin for every position up to the context length ([pos][head_dim / 2]),
/// computed like candle-transformers' quantized models (f32 powf, f32 position * theta).
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    interleaved: bool,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f32, max_positions: usize, interleaved: bool) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in &inv_freq {
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { cos, sin, half, interleaved }
    }

    /// The cos and sin tables, [positions][head_dim / 2] (a device backend uploads them).
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Rotates every head of one token (`x` = [n_heads][head_dim]) in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.half;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(2 * half) {
            rotate_head(head, cos, sin, self.interleaved);
        }
    }
}

/// Rotates the first `2 * cos.len()` dims of one head by one position's tables: pairs
/// `(2i, 2i + 1)` when `interleaved`, else `(i, i + half)` (the onnx backend's attention op
/// uses it too, with ONNX Runtime's cos/sin caches).
pub fn rotate_head(head: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    if interleaved {
        for i in 0..half {
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * cos[i] - b * sin[i];
            head[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    } else {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = a * sin[i] + b * cos[i];
        }
    }
}

/// Shape of the attention heads.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One query row: which sequence's cache it reads and its position in that sequence.
#[derive(Debug, Clone, Copy)]
pub struct RowRef {
    pub seq: usize,
    pub pos: usize,
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One (row, head) of attention: softmax(q . K[0..=pos] / sqrt(d)) V, written to `out`.
fn attend_one(q: &[f32], k: &[f32], v: &[f32], pos: usize, kv_head: usize, s: HeadShape, out: &mut [f32]) {
    let d = s.head_dim;
    let stride = s.num_kv_heads * d;
    let scale = 1f32 / (d as f32).sqrt();
    SCORES.with(|cell| {
        let mut scores = cell.borrow_mut();
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for p in 0..=pos {
            let off = p * stride + kv_head * d;
            let sc = dot(q, &k[off..off + d]) * scale;
            max = max.max(sc);
            scores.push(sc);
        }
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        let inv = 1f32 / sum;
        out.fill(0.0);
        for (p, w) in scores.iter().enumerate() {
            let off = p * stride + kv_head * d;
            let w = w * inv;
            for (o, x) in out.iter_mut().zip(&v[off..off + d]) {
                *o += w * x;
            }
        }
    });
}

/// How `attend_with` spreads its work: `spread(items, work, run)` runs `run` over `0..items`
/// (in ranges, on any threads), where `work` is the multiply-adds of all items together.
pub type Spread<'a> = &'a dyn Fn(usize, usize, &(dyn Fn(std::ops::Range<usize>) + Sync));

/// Attention for all rows of a step. `q` is [rows][num_heads][head_dim] (already rotated),
/// `caches[seq]` holds that sequence's K and V including this step's rows, `out` receives
/// [rows][num_heads][head_dim]. Work is split over the CPU pool by (row, head).
pub fn attend(q: &[f32], rows: &[RowRef], caches: &[(&[f32], &[f32])], s: HeadShape, out: &mut [f32]) {
    attend_with(q, rows, caches, s, out, &spread)
}

/// `attend` with the work spread by `spread` instead of the candle backend's pool (the onnx
/// backend's attention op runs it on ONNX Runtime's threads, `backend::onnx::gqa`).
pub fn attend_with(q: &[f32], rows: &[RowRef], caches: &[(&[f32], &[f32])], s: HeadShape, out: &mut [f32], spread: Spread<'_>) {
    let d = s.head_dim;
    let group = s.num_heads / s.num_kv_heads;
    let items = rows.len() * s.num_heads;
    let out_ptr = super::pool::SharedMut(out.as_mut_ptr());
    assert_eq!(out.len(), items * d, "attention output has the wrong size");
    assert_eq!(q.len(), items * d, "attention query has the wrong size");
    let stride = s.num_kv_heads * d;
    for row in rows {
        let (k, v) = caches[row.seq];
        assert!(k.len().min(v.len()) >= (row.pos + 1) * stride, "attention cache is shorter than the row's position");
    }
    #[cfg(target_arch = "x86_64")]
    if super::attention_avx2::available() && d % 8 == 0 {
        attend_parts(q, rows, caches, s, out, spread);
        return;
    }
    let run = |range: std::ops::Range<usize>| {
        for item in range {
            let (r, h) = (item / s.num_heads, item % s.num_heads);
            let row = rows[r];
            let (k, v) = caches[row.seq];
            // SAFETY: each item writes only its own disjoint [item * d, (item + 1) * d) slice of
            // `out`, which outlives the pool call.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.ptr().add(item * d), d) };
            let qi = &q[item * d..(item + 1) * d];
            attend_one(qi, k, v, row.pos, h / group, s, o);
        }
    };
    let work: usize = rows.iter().map(|r| r.pos + 1).sum::<usize>() * s.num_heads * d;
    spread(items, work, &run);
}

/// Runs `run` over `0..items`: inline below 64 Ki multiply-adds of `work`, else about 8 ranges
/// per pool thread.
fn spread(items: usize, work: usize, run: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    if work < 64 * 1024 {
        run(0..items);
    } else {
        super::pool::global().run_ranges(items, 8, 1, run);
    }
}

/// One part of one row's attention for one KV head's group of query heads.
#[cfg(target_arch = "x86_64")]
struct Part {
    row: usize,
    kv_head: usize,
    p0: usize,
    p1: usize,
}

/// The AVX2 path of `attend`: every (row, KV head) is split into parts of `PART` positions,
/// computed over the pool, then merged with the usual max/sum rescaling.
#[cfg(target_arch = "x86_64")]
fn attend_parts(q: &[f32], rows: &[RowRef], caches: &[(&[f32], &[f32])], s: HeadShape, out: &mut [f32], spread: Spread<'_>) {
    use super::attention_avx2::{attend_part, PART};
    use super::pool::SharedMut;
    let (d, nh, nkv) = (s.head_dim, s.num_heads, s.num_kv_heads);
    let group = nh / nkv;
    let gd = group * d;
    let mut parts = Vec::new();
    // first[i]..first[i + 1]: the parts of (row, kv head) number i.
    let mut first = Vec::with_capacity(rows.len() * nkv + 1);
    for (r, row) in rows.iter().enumerate() {
        for kv_head in 0..nkv {
            first.push(parts.len());
            let mut p0 = 0;
            while p0 <= row.pos {
                let p1 = (p0 + PART).min(row.pos + 1);
                parts.push(Part { row: r, kv_head, p0, p1 });
                p0 = p1;
            }
        }
    }
    first.push(parts.len());
    let mut pout = vec![0f32; parts.len() * gd];
    let mut pmax = vec![0f32; parts.len() * group];
    let mut psum = vec![0f32; parts.len() * group];
    let (po, pm, ps) = (SharedMut(pout.as_mut_ptr()), SharedMut(pmax.as_mut_ptr()), SharedMut(psum.as_mut_ptr()));
    let run = |range: std::ops::Range<usize>| {
        for (i, pt) in parts.iter().enumerate().take(range.end).skip(range.start) {
            let (k, v) = caches[rows[pt.row].seq];
            let qoff = (pt.row * nh + pt.kv_head * group) * d;
            // SAFETY: part i writes only its own slots of the three buffers, which outlive the
            // pool job; AVX2/FMA were detected, d is a multiple of 8 and the caches hold every
            // position below p1 (asserted in `attend`).
            unsafe {
                let o = std::slice::from_raw_parts_mut(po.ptr().add(i * gd), gd);
                let m = std::slice::from_raw_parts_mut(pm.ptr().add(i * group), group);
                let su = std::slice::from_raw_parts_mut(ps.ptr().add(i * group), group);
                SCORES.with(|c| {
                    attend_part(&q[qoff..qoff + gd], k, v, (pt.p0, pt.p1), pt.kv_head, s, &mut c.borrow_mut(), o, m, su)
                });
            }
        }
    };
    let work: usize = parts.iter().map(|p| p.p1 - p.p0).sum::<usize>() * nh * d;
    spread(parts.len(), work, &run);
    // Merge the parts of each (row, KV head).
    for (i, w) in first.windows(2).enumerate() {
        let (r, kv_head) = (i / nkv, i % nkv);
        for g in 0..group {
            let dst = &mut out[(r * nh + kv_head * group + g) * d..][..d];
            let m = (w[0]..w[1]).map(|p| pmax[p * group + g]).fold(f32::NEG_INFINITY, f32::max);
            let scales: Vec<f32> = (w[0]..w[1]).map(|p| (pmax[p * group + g] - m).exp()).collect();
            let total: f32 = (w[0]..w[1]).zip(&scales).map(|(p, c)| psum[p * group + g] * c).sum();
            let inv = 1.0 / total;
            dst.fill(0.0);
            for (p, c) in (w[0]..w[1]).zip(&scales) {
                let src = &pout[p * gd + g * d..][..d];
                let f = c * inv;
                for (o, x) in dst.iter_mut().zip(src) {
                    *o += x * f;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_position_attention_returns_its_value() {
        let s = HeadShape { num_heads: 2, num_kv_heads: 1, head_dim: 4 };
        let k = vec![0.5f32; 4];
        let v = vec![1.0f32, 2.0, 3.0, 4.0];
        let q = vec![1.0f32; 8];
        let mut out = vec![0f32; 8];
        attend(&q, &[RowRef { seq: 0, pos: 0 }], &[(&k, &v)], s, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn attention_weights_follow_softmax() {
        let s = HeadShape { num_heads: 1, num_kv_heads: 1, head_dim: 2 };
        // keys give scores 0 and ln(3) * sqrt(2) / sqrt(2) = ln 3 -> weights 1/4 and 3/4.
        let l3 = 3f32.ln() * 2f32.sqrt();
        let k = vec![0.0f32, 0.0, l3, 0.0];
        let v = vec![4.0f32, 0.0, 0.0, 8.0];
        let q = vec![1.0f32, 0.0];
        let mut out = vec![0f32; 2];
        attend(&q, &[RowRef { seq: 0, pos: 1 }], &[(&k, &v)], s, &mut out);
        assert!((out[0] - 1.0).abs() < 1e-5 && (out[1] - 6.0).abs() < 1e-5, "{out:?}");
    }

    #[test]
    fn rope_neox_and_interleaved_rotate_the_right_pairs() {
        let neox = RopeTable::new(4, 10000.0, 4, false);
        let mut x = vec![1.0f32, 0.0, 0.0, 0.0];
        neox.apply(&mut x, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        let inter = RopeTable::new(4, 10000.0, 4, true);
        let mut x = vec![1.0f32, 0.0, 0.0, 0.0];
        inter.apply(&mut x, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn simd_and_portable_attention_agree() {
        let s = HeadShape { num_heads: 6, num_kv_heads: 2, head_dim: 64 };
        let stride = s.num_kv_heads * s.head_dim;
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0;
        let len = 300;
        let k: Vec<f32> = (0..len * stride).map(val).collect();
        let v: Vec<f32> = (0..len * stride).map(|i| val(i + 17)).collect();
        let rows = [RowRef { seq: 0, pos: 0 }, RowRef { seq: 0, pos: 5 }, RowRef { seq: 0, pos: 299 }];
        let q: Vec<f32> = (0..rows.len() * s.num_heads * s.head_dim).map(|i| val(i + 3)).collect();
        let mut fast = vec![0f32; q.len()];
        attend(&q, &rows, &[(&k, &v)], s, &mut fast);
        let mut slow = vec![0f32; q.len()];
        let d = s.head_dim;
        for (item, o) in slow.chunks_exact_mut(d).enumerate() {
            let (r, h) = (item / s.num_heads, item % s.num_heads);
            attend_one(&q[item * d..(item + 1) * d], &k, &v, rows[r].pos, h / 3, s, o);
        }
        let worst = fast.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "fast and portable attention differ by {worst}");
    }
}
