//! inferd's own CPU kernel for ONNX Runtime's `MatMulNBits` (com.microsoft) at 4 bits, blocks
//! of 32, no zero points and `accuracy_level` 4 (int8 activations), registered as a custom op
//! in [`op_edit::DOMAIN`](super::op_edit::DOMAIN); [`super::op_edit`] moves the graph's nodes onto
//! it when the model loads on the CPU provider.
//!
//! Why: the int4 projections are ~85% of a decode step. ONNX Runtime's kernel streams the
//! weights at ~20 GB/s for one row on this machine's two cores, and a run with exactly one row
//! takes another code path than a run with several, so a sequence's logits depend on whether it
//! decoded alone or in a batch. This kernel ([`super::nbits_avx2`]) reads the weights in place,
//! computes every (weight row, activation row) dot product with the same instructions whatever
//! the run's shape, and reuses each unpacked weight register for up to four activation rows.
//!
//! Semantics: `Y[.., n] = sum_k A[.., k] * (q[n, k] - 8) * scale[n, k / 32]`, with `A` quantised
//! per block of 32 to int8 (scale = max|a| / 127), as ONNX Runtime's int8 path does. Results
//! differ from ONNX Runtime's in the last bits (rounding and summation order); `tests/onnx_ops.rs`
//! compares the two.
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use super::nbits_avx2::{self as avx2, ActRow, GroupAct, PairAct, Rows, BLOCK};
pub use super::nbits_avx2::available;
use super::op_edit::{DOMAIN, MATMUL_OP as OP};
use crate::backend::candle::pool::SharedMut;

/// Work (multiply-adds) below which one call runs on the calling thread alone.
const INLINE_WORK: usize = 256 * 1024;
/// Work per parallel item: enough to make the hand-out negligible, small enough to balance.
const ITEM_WORK: usize = 128 * 1024;

pub struct NBitsOp;

impl Operator for NBitsOp {
    type Kernel<'attr> = NBitsKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32), // A
            OperatorInput::required(TensorElementType::Uint8),   // B, [N, K / 32, 16]
            OperatorInput::required(TensorElementType::Float32), // scales, [N, K / 32]
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, k: &KernelContext<'attr>) -> ort::Result<NBitsKernel> {
        let int = |name: &str| k.get::<i64>(name).ok_or_else(|| bad(format!("no attribute {name}")));
        let (n, kk) = (int("N")?, int("K")?);
        // Defaults as in ONNX Runtime's schema: 4 bits, accuracy level 0.
        let (bits, block, level) = (k.get::<i64>("bits").unwrap_or(4), int("block_size")?, k.get::<i64>("accuracy_level").unwrap_or(0));
        if bits != 4 || block != BLOCK as i64 || level != 4 || n <= 0 || kk <= 0 || kk % BLOCK as i64 != 0 {
            return Err(bad(format!("unsupported node: bits {bits}, block_size {block}, accuracy_level {level}, N {n}, K {kk}")));
        }
        if !avx2::available() {
            return Err(bad("needs AVX2 and FMA".into()));
        }
        Ok(NBitsKernel { n: n as usize, k: kk as usize })
    }
}

pub struct NBitsKernel {
    n: usize,
    k: usize,
}

fn bad(msg: String) -> ort::Error {
    ort::Error::new(format!("{DOMAIN}.{OP}: {msg}"))
}

thread_local! {
    static ACTS: std::cell::RefCell<(Vec<PairAct>, Vec<GroupAct>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Kernel for NBitsKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (n, k) = (self.n, self.k);
        let blocks = k / BLOCK;
        let a = ctx.input(0)?.ok_or_else(|| bad("no A".into()))?;
        let (ashape, a) = a.try_extract_tensor::<f32>()?;
        if ashape.last() != Some(&(k as i64)) {
            return Err(bad(format!("A has shape {ashape:?}; its last dimension must be K = {k}")));
        }
        let rows = a.len() / k;
        let wv = ctx.input(1)?.ok_or_else(|| bad("no B".into()))?;
        let (_, weights) = wv.try_extract_tensor::<u8>()?;
        let sv = ctx.input(2)?.ok_or_else(|| bad("no scales".into()))?;
        let (_, scales) = sv.try_extract_tensor::<f32>()?;
        if weights.len() != n * blocks * BLOCK / 2 || scales.len() != n * blocks {
            return Err(bad(format!("B has {} bytes and scales {} values; N {n} x K {k} needs {} and {}", weights.len(), scales.len(), n * blocks * 16, n * blocks)));
        }
        let mut oshape = ashape.to_vec();
        *oshape.last_mut().expect("checked above") = n as i64;
        let mut out = ctx.output(0, oshape)?.ok_or_else(|| bad("no output".into()))?;
        let (_, y) = out.try_extract_tensor_mut::<f32>()?;
        if rows == 0 {
            return Ok(());
        }
        let w = Rows { weights, scales, blocks };
        let (pairs, groups) = (avx2::pairs(k), avx2::groups(k));
        ACTS.with(|cell| {
            // The thread's buffers, or fresh ones should a call ever nest in another on this thread.
            let mut fresh = (Vec::new(), Vec::new());
            let mut held = cell.try_borrow_mut();
            let (pair_acts, group_acts) = match held.as_deref_mut() {
                Ok(buffers) => buffers,
                Err(_) => &mut fresh,
            };
            pair_acts.resize(rows * pairs, PairAct::default());
            group_acts.resize(rows * groups, GroupAct::default());
            for (m, row) in a.chunks_exact(k).enumerate() {
                // SAFETY: `available()` was checked when the kernel was created.
                unsafe { avx2::quantize_row(row, &mut pair_acts[m * pairs..(m + 1) * pairs], &mut group_acts[m * groups..(m + 1) * groups]) };
            }
            let acts: Vec<ActRow> = (0..rows).map(|m| ActRow { pairs: &pair_acts[m * pairs..(m + 1) * pairs], groups: &group_acts[m * groups..(m + 1) * groups] }).collect();
            let per_item = ITEM_WORK.div_ceil(k * rows).max(if rows >= 16 { 32 } else { 8 });
            let items = n.div_ceil(per_item);
            let yp = SharedMut(y.as_mut_ptr());
            let item = |i: usize| {
                let range = i * per_item..((i + 1) * per_item).min(n);
                // SAFETY: item i alone writes columns `range` of every output row; `y` holds
                // rows x n floats and outlives the call.
                unsafe { product(&w, range, &acts, yp.ptr(), n) };
            };
            if items < 2 || rows * n * k < INLINE_WORK || ctx.par_for(items, 0, item).is_err() {
                (0..items).for_each(item);
            }
        });
        Ok(())
    }
}

/// `y[m][cols] = acts[m] . w[cols]` for every activation row m: each weight row once per four
/// activation rows, one weight row at a time (one sequential stream for the prefetchers).
///
/// # Safety
/// AVX2 and FMA available; `y` points to `acts.len()` rows of `stride` floats, columns `cols`
/// writable by this caller alone; `cols` are rows of `w`.
unsafe fn product(w: &Rows<'_>, cols: std::ops::Range<usize>, acts: &[ActRow<'_>], y: *mut f32, stride: usize) {
    let mut m = 0;
    while m < acts.len() {
        let left = acts.len() - m;
        match left {
            1 => columns::<1>(w, cols.clone(), [acts[m]], m, y, stride),
            2 => columns::<2>(w, cols.clone(), [acts[m], acts[m + 1]], m, y, stride),
            3 => columns::<3>(w, cols.clone(), [acts[m], acts[m + 1], acts[m + 2]], m, y, stride),
            _ => columns::<4>(w, cols.clone(), [acts[m], acts[m + 1], acts[m + 2], acts[m + 3]], m, y, stride),
        }
        m += left.min(4);
    }
}

/// `M` activation rows (from row `m0`) over weight rows `cols`.
///
/// # Safety
/// As [`product`].
unsafe fn columns<const M: usize>(w: &Rows<'_>, cols: std::ops::Range<usize>, acts: [ActRow<'_>; M], m0: usize, y: *mut f32, stride: usize) {
    for c in cols {
        let mut out = [0f32; M];
        avx2::tile::<M>(w, c, acts, &mut out);
        for (m, v) in out.into_iter().enumerate() {
            *y.add((m0 + m) * stride + c) = v;
        }
    }
}
