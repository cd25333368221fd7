//! inferd's own CPU kernel for ONNX Runtime's `GroupQueryAttention` (com.microsoft), registered
//! as a custom op in the domain [`DOMAIN`]; [`super::op_edit`] moves the graph's nodes onto it
//! when the model loads on the CPU provider.
//!
//! Why: ONNX Runtime's CPU kernel calls its SGEMM twice per (row, head), with the keys and values
//! packed into SGEMM's layout on every call, so each KV head's cache is read and copied once for
//! each of the query heads that share it. This kernel computes the same thing with the candle
//! backend's AVX2 attention (`backend::candle::attention`): a decode row reads each cached key
//! and value once per group of query heads. On Qwen2.5-0.5B (2 CPUs) decode is 1.13x as fast at
//! 500 positions and 1.33x at 2000; at ~100 positions both kernels take ~20 us per layer.
//! Prompt chunks run each query position alone (see below), slower than SGEMM's tiles: the first
//! token after a 2000-token prompt comes 15% later (docs/perf-notes.md, session 8).
//!
//! Semantics follow ONNX Runtime's CPU kernel (`group_query_attention_helper.h`,
//! `gqa_attention_base.h`), for the inputs and attributes [`super::op_edit`] lets through:
//! - query `[B, S, D]`, packed `(num_heads + 2 kv_num_heads) x head` or with key/value apart;
//! - past key/value `[B, kv_heads, L, head]`; present `[B, kv_heads, max(L, total), head]`,
//!   in the same memory as the past when the caller binds it so (the server does);
//! - `seqlens_k[b]` = the row's total length - 1; `total_sequence_length` = the mask's width;
//! - S == total: a first prompt (right-padded rows, positions from 0); S > 1 otherwise: a later
//!   prompt chunk (one row); else S == 1: decode at position `seqlens_k[b]`;
//! - rotary embedding (`do_rotary`) from `cos_cache`/`sin_cache`, halves or interleaved pairs.
//!
//! Results differ from ONNX Runtime's in the last bits (another summation order and `exp`);
//! `tests/onnx_ops.rs` compares the two kernels on the three kinds of step.
use std::ops::Range;

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use super::op_edit::DOMAIN;
use crate::backend::candle::attention::{attend_with, rotate_head, HeadShape, RowRef};
use crate::backend::candle::pool::SharedMut;
#[cfg(target_arch = "x86_64")]
use crate::backend::candle::attention_avx2;

/// The op's name (the same as ONNX Runtime's, so that the edit only changes the node's domain).
pub const OP: &str = "GroupQueryAttention";

/// Work (multiply-adds) below which one call runs on the calling thread alone: handing two parts
/// of ~3 us each to ONNX Runtime's pool costs about what it saves.
const INLINE_WORK: usize = 256 * 1024;

pub struct GqaOp;

impl Operator for GqaOp {
    type Kernel<'attr> = GqaKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let f = TensorElementType::Float32;
        [
            OperatorInput::required(f),                          // query (or packed qkv)
            OperatorInput::optional(f),                          // key
            OperatorInput::optional(f),                          // value
            OperatorInput::optional(f),                          // past_key
            OperatorInput::optional(f),                          // past_value
            OperatorInput::required(TensorElementType::Int32),   // seqlens_k
            OperatorInput::required(TensorElementType::Int32),   // total_sequence_length
            OperatorInput::optional(f),                          // cos_cache
            OperatorInput::optional(f),                          // sin_cache
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        let f = TensorElementType::Float32;
        [OperatorOutput::required(f), OperatorOutput::optional(f), OperatorOutput::optional(f)]
    }

    fn create_kernel<'attr>(&self, k: &KernelContext<'attr>) -> ort::Result<GqaKernel> {
        let int = |name: &str, default: i64| k.get::<i64>(name).unwrap_or(default);
        let heads = usize::try_from(int("num_heads", 0)).unwrap_or(0);
        let kv_heads = usize::try_from(int("kv_num_heads", 0)).unwrap_or(0);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(ort::Error::new(format!("{DOMAIN}.{OP}: num_heads {heads} is not a positive multiple of kv_num_heads {kv_heads}")));
        }
        Ok(GqaKernel {
            heads,
            kv_heads,
            scale: k.get::<f32>("scale").unwrap_or(0.0),
            rotary: int("do_rotary", 0) == 1,
            interleaved: int("rotary_interleaved", 0) == 1,
        })
    }
}

pub struct GqaKernel {
    heads: usize,
    kv_heads: usize,
    /// Scale of q.k (0: 1/sqrt(head)).
    scale: f32,
    rotary: bool,
    interleaved: bool,
}

/// Per thread: a decode item's rotated queries, scores, and per-head maxima and sums.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    maxes: Vec<f32>,
    sums: Vec<f32>,
}

thread_local! {
    static DECODE_SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

fn bad(msg: String) -> ort::Error {
    ort::Error::new(format!("{DOMAIN}.{OP}: {msg}"))
}

/// A float input as (shape, pointer, length); the borrow of the value ends here so that an
/// output in the same memory can be written.
fn float_input(ctx: &ComputeContext, i: usize) -> ort::Result<Option<(Vec<i64>, *const f32, usize)>> {
    let Some(v) = ctx.input(i)? else { return Ok(None) };
    let (shape, data) = v.try_extract_tensor::<f32>()?;
    Ok(Some((shape.to_vec(), data.as_ptr(), data.len())))
}

/// One query head for the attention kernels: `src` rotated by the position's tables, if any,
/// and scaled by `extra` (the kernels themselves scale by 1/sqrt(head)).
fn query_head(dst: &mut [f32], src: &[f32], tables: Option<(&[f32], &[f32])>, interleaved: bool, extra: f32) {
    dst.copy_from_slice(src);
    if let Some((cos, sin)) = tables {
        rotate_head(dst, cos, sin, interleaved);
    }
    if extra != 1.0 {
        dst.iter_mut().for_each(|x| *x *= extra);
    }
}

impl Kernel for GqaKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (n, nkv) = (self.heads, self.kv_heads);
        let group = n / nkv;
        let (qshape, qptr, qlen) = float_input(ctx, 0)?.ok_or_else(|| bad("no query".into()))?;
        let key = float_input(ctx, 1)?;
        let value = float_input(ctx, 2)?;
        let &[b, s, d] = qshape.as_slice() else { return Err(bad(format!("query has shape {qshape:?}; expected 3 dims"))) };
        let (b, s, d) = (b as usize, s as usize, d as usize);
        let packed = key.is_none();
        if packed != value.is_none() {
            return Err(bad("key and value must be both given or both absent".into()));
        }
        let h = if packed { d / (n + 2 * nkv) } else { d / n };
        if h == 0 || (packed && d != (n + 2 * nkv) * h) || (!packed && d != n * h) {
            return Err(bad(format!("query width {d} does not split into heads")));
        }
        // SAFETY: ONNX Runtime keeps the inputs alive and unchanged for the call (the past
        // buffers excepted, which are only read through `present` below when they alias it).
        let q_all = unsafe { std::slice::from_raw_parts(qptr, qlen) };
        let kv_in = match (&key, &value) {
            (Some((ks, kp, kl)), Some((vs, vp, vl))) => {
                if ks.as_slice() != [b as i64, s as i64, (nkv * h) as i64] || vs != ks {
                    return Err(bad(format!("key {ks:?} / value {vs:?} do not match the query {qshape:?}")));
                }
                // SAFETY: as for the query.
                Some(unsafe { (std::slice::from_raw_parts(*kp, *kl), std::slice::from_raw_parts(*vp, *vl)) })
            }
            _ => None,
        };
        let past_k = float_input(ctx, 3)?;
        let past_v = float_input(ctx, 4)?;
        let past_len = match (&past_k, &past_v) {
            (Some((ks, ..)), Some((vs, ..))) => {
                if ks.len() != 4 || ks != vs || ks[0] as usize != b || ks[1] as usize != nkv || ks[3] as usize != h {
                    return Err(bad(format!("past key {ks:?} / value {vs:?} are not [{b}, {nkv}, L, {h}]")));
                }
                ks[2] as usize
            }
            (None, None) => 0,
            _ => return Err(bad("past key and value must be both given or both absent".into())),
        };
        let seqlens: Vec<i32> = {
            let v = ctx.input(5)?.ok_or_else(|| bad("no seqlens_k".into()))?;
            let (_, data) = v.try_extract_tensor::<i32>()?;
            data.to_vec()
        };
        let total = {
            let v = ctx.input(6)?.ok_or_else(|| bad("no total_sequence_length".into()))?;
            let (_, data) = v.try_extract_tensor::<i32>()?;
            let t = *data.first().ok_or_else(|| bad("empty total_sequence_length".into()))?;
            usize::try_from(t).ok().filter(|&t| t > 0).ok_or_else(|| bad(format!("total_sequence_length {t}")))?
        };
        if seqlens.len() != b {
            return Err(bad(format!("seqlens_k has {} rows; the query {b}", seqlens.len())));
        }
        let rope = match (self.rotary, float_input(ctx, 7)?, float_input(ctx, 8)?) {
            (false, ..) => None,
            (true, Some((cs, cp, cl)), Some((ss, sp, sl))) => {
                if cs.len() != 2 || cs != ss || 2 * cs[1] as usize > h {
                    return Err(bad(format!("cos {cs:?} / sin {ss:?} caches do not fit head size {h}")));
                }
                // SAFETY: as for the query.
                Some(unsafe { (cs[0] as usize, cs[1] as usize, std::slice::from_raw_parts(cp, cl), std::slice::from_raw_parts(sp, sl)) })
            }
            _ => return Err(bad("do_rotary needs cos_cache and sin_cache".into())),
        };

        // The kind of step, as ONNX Runtime decides it.
        let later_chunk = s > 1 && s != total;
        if later_chunk && b != 1 {
            return Err(bad("a prompt chunk after the first needs batch size 1".into()));
        }
        let first = !later_chunk && s == total;
        if !first && !later_chunk && s != 1 {
            return Err(bad("sequence length must be 1 when not a prompt".into()));
        }
        let present_len = total.max(past_len);
        let mut pasts = Vec::with_capacity(b);
        for (row, &sl) in seqlens.iter().enumerate() {
            let row_total = usize::try_from(sl).ok().map(|t| t + 1).filter(|&t| t <= present_len && (first || t >= s));
            let Some(row_total) = row_total else {
                return Err(bad(format!("seqlens_k[{row}] = {sl} does not fit {s} new and {present_len} positions")));
            };
            let past = if first { 0 } else { row_total - s };
            if past + s > present_len || past > past_len {
                return Err(bad(format!("row {row}: {past} past + {s} new positions do not fit a past of {past_len} and a present of {present_len}")));
            }
            pasts.push((past, row_total));
        }

        let mut out = ctx.output(0, [b as i64, s as i64, (n * h) as i64])?.ok_or_else(|| bad("no output".into()))?;
        let present_shape = [b as i64, nkv as i64, present_len as i64, h as i64];
        let present_ptr = |i: usize| -> ort::Result<Option<SharedMut<f32>>> {
            Ok(match ctx.output(i, present_shape)? {
                Some(mut v) => Some(SharedMut(v.try_extract_tensor_mut::<f32>()?.1.as_mut_ptr())),
                None => None,
            })
        };
        let (pk, pv) = (present_ptr(1)?, present_ptr(2)?);
        let cache_len = b * nkv * present_len * h;
        // Without present outputs the new keys go to a scratch cache of the same layout.
        let mut scratch = Vec::new();
        let (pk, pv) = match (pk, pv) {
            (Some(k), Some(v)) => (k, v),
            _ => {
                scratch.resize(2 * cache_len, 0f32);
                let base = scratch.as_mut_ptr();
                // SAFETY: the second half of `scratch`.
                (SharedMut(base), SharedMut(unsafe { base.add(cache_len) }))
            }
        };
        // SAFETY: each present buffer holds cache_len floats (the shape asked of ONNX Runtime) and
        // nothing else refers to it during the call except the past input of the same memory,
        // which is read through these slices only.
        let (present_k, present_v) = unsafe { (std::slice::from_raw_parts_mut(pk.ptr(), cache_len), std::slice::from_raw_parts_mut(pv.ptr(), cache_len)) };
        // The past, when it lives in other memory: its positions in use move to the present.
        for (src, dst) in [(&past_k, &mut *present_k), (&past_v, &mut *present_v)] {
            let Some((_, ptr, len)) = src else { continue };
            if std::ptr::eq(*ptr, dst.as_ptr()) {
                continue;
            }
            // SAFETY: distinct memory from the present (checked above); ONNX Runtime keeps it alive.
            let past = unsafe { std::slice::from_raw_parts(*ptr, *len) };
            for (row, &(p, _)) in pasts.iter().enumerate() {
                for g in 0..nkv {
                    let from = (row * nkv + g) * past_len * h;
                    let to = (row * nkv + g) * present_len * h;
                    dst[to..to + p * h].copy_from_slice(&past[from..from + p * h]);
                }
            }
        }

        // Where head `hd` of position `j` of row `row` starts: (slice, offset).
        let width = if packed { d } else { n * h };
        let q_at = |row: usize, j: usize, hd: usize| (row * s + j) * width + hd * h;
        let kv_at = |row: usize, j: usize, g: usize, value: bool| -> (&[f32], usize) {
            match kv_in {
                Some((k, v)) => (if value { v } else { k }, (row * s + j) * nkv * h + g * h),
                None => (q_all, (row * s + j) * d + (n + if value { nkv } else { 0 } + g) * h),
            }
        };
        let position = |row: usize, j: usize| {
            let (past, row_total) = pasts[row];
            // ONNX Runtime gives a first prompt's padding positions position 1.
            if first && j >= row_total { 1 } else { past + j }
        };
        let tables = |pos: usize| -> ort::Result<Option<(&[f32], &[f32])>> {
            match rope {
                None => Ok(None),
                Some((rows, half, cos, sin)) if pos < rows => Ok(Some((&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]))),
                Some((rows, ..)) => Err(bad(format!("position {pos} is past the rotary caches' {rows} rows"))),
            }
        };

        // New keys (rotated) and values into the cache.
        for (row, &(past, _)) in pasts.iter().enumerate() {
            for j in 0..s {
                let t = tables(position(row, j))?;
                let at = past + j;
                for g in 0..nkv {
                    let dst = ((row * nkv + g) * present_len + at) * h;
                    let (src, off) = kv_at(row, j, g, false);
                    present_k[dst..dst + h].copy_from_slice(&src[off..off + h]);
                    if let Some((cos, sin)) = t {
                        rotate_head(&mut present_k[dst..dst + h], cos, sin, self.interleaved);
                    }
                    let (src, off) = kv_at(row, j, g, true);
                    present_v[dst..dst + h].copy_from_slice(&src[off..off + h]);
                }
            }
        }

        // The kernels scale q.k by 1/sqrt(head); another scale is folded into q (`query_head`).
        let extra = if self.scale == 0.0 { 1.0 } else { self.scale * (h as f32).sqrt() };
        #[cfg(target_arch = "x86_64")]
        if s == 1 && h % 8 == 0 && attention_avx2::available() {
            let tables: Vec<_> = (0..b).map(|row| tables(position(row, 0))).collect::<ort::Result<_>>()?;
            let (_, out) = out.try_extract_tensor_mut::<f32>()?;
            let (op, kp, vp) = (SharedMut(out.as_mut_ptr()), SharedMut(present_k.as_mut_ptr()), SharedMut(present_v.as_mut_ptr()));
            let shape = HeadShape { num_heads: group, num_kv_heads: 1, head_dim: h };
            let item = |i: usize| {
                let (row, g) = (i / nkv, i % nkv);
                let seen = pasts[row].1;
                let cache = (row * nkv + g) * present_len * h;
                let first_q = q_at(row, 0, g * group);
                DECODE_SCRATCH.with(|cell| {
                    let Scratch { q, scores, maxes, sums } = &mut *cell.borrow_mut();
                    q.resize(group * h, 0.0);
                    for (head, src) in q.chunks_exact_mut(h).zip(q_all[first_q..first_q + group * h].chunks_exact(h)) {
                        query_head(head, src, tables[row], self.interleaved, extra);
                    }
                    maxes.resize(group, 0.0);
                    sums.resize(group, 0.0);
                    // SAFETY: item (row, g) alone writes the output heads of KV head g in row
                    // `row`; the cache is only read here (its new position was written above);
                    // both outlive the call. AVX2 and FMA were detected, h is a multiple of 8,
                    // and the cache slices hold `seen` positions of h floats.
                    unsafe {
                        let o = std::slice::from_raw_parts_mut(op.ptr().add(row * n * h + g * group * h), group * h);
                        let k = std::slice::from_raw_parts(kp.ptr().add(cache), seen * h);
                        let v = std::slice::from_raw_parts(vp.ptr().add(cache), seen * h);
                        attention_avx2::attend_part(q, k, v, (0, seen), 0, shape, scores, o, maxes, sums);
                        for (head, sum) in o.chunks_exact_mut(h).zip(sums.iter()) {
                            let inv = 1.0 / sum;
                            head.iter_mut().for_each(|x| *x *= inv);
                        }
                    }
                });
            };
            let work = pasts.iter().map(|p| p.1).sum::<usize>() * n * h;
            if b * nkv < 2 || work < INLINE_WORK || ctx.par_for(b * nkv, 0, item).is_err() {
                (0..b * nkv).for_each(item);
            }
            return Ok(());
        }

        // Prompt chunks (and decode without AVX2): every query position alone, over the
        // positions it sees, so that its result does not depend on how the prompt was chunked or
        // batched (tests/onnx_backend.rs asserts this to the bit; SGEMM-style tiles would not).
        // Queries, rotated and grouped by KV head: [(row, kv head, position)][group][head].
        let items = b * nkv * s;
        let mut q = vec![0f32; items * group * h];
        let mut rows = Vec::with_capacity(items);
        for (row, &(past, row_total)) in pasts.iter().enumerate() {
            for g in 0..nkv {
                for j in 0..s {
                    let t = tables(position(row, j))?;
                    let item = (row * nkv + g) * s + j;
                    for i in 0..group {
                        let off = q_at(row, j, g * group + i);
                        query_head(&mut q[(item * group + i) * h..][..h], &q_all[off..off + h], t, self.interleaved, extra);
                    }
                    // Causal: positions up to this one, within the row's length.
                    let seen = if first { j + 1 } else { past + j + 1 }.min(row_total);
                    rows.push(RowRef { seq: row * nkv + g, pos: seen - 1 });
                }
            }
        }
        let caches: Vec<(&[f32], &[f32])> = (0..b * nkv)
            .map(|c| (&present_k[c * present_len * h..(c + 1) * present_len * h], &present_v[c * present_len * h..(c + 1) * present_len * h]))
            .collect();
        let mut o = vec![0f32; items * group * h];
        let spread = |items: usize, work: usize, run: &(dyn Fn(Range<usize>) + Sync)| {
            if items < 2 || work < INLINE_WORK || ctx.par_for(items, 0, |i| run(i..i + 1)).is_err() {
                run(0..items);
            }
        };
        attend_with(&q, &rows, &caches, HeadShape { num_heads: group, num_kv_heads: 1, head_dim: h }, &mut o, &spread);

        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        for row in 0..b {
            for g in 0..nkv {
                for j in 0..s {
                    let item = (row * nkv + g) * s + j;
                    let dst = (row * s + j) * n * h + g * group * h;
                    out[dst..dst + group * h].copy_from_slice(&o[item * group * h..(item + 1) * group * h]);
                }
            }
        }
        Ok(())
    }
}
