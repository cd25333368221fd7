//! inferd's own CPU kernel for the f32 `MatMul`s of the LoRA branches (`x A`, then the masked
//! product times `B`), registered as the custom op `LoraMatMul` in
//! [`op_edit::DOMAIN`](super::op_edit::DOMAIN); [`super::op_edit`] moves a graph's LoRA `MatMul`
//! nodes onto it when the model loads on the CPU provider.
//!
//! Why: ONNX Runtime's f32 MatMul takes another code path for a run of one row than for several,
//! so a row's LoRA update (and so its logits) changed in the last bits with the number of rows in
//! its run: a sequence decoded beside others parted from its answer alone after a few dozen
//! tokens. Here every output is one chain of fused multiply-adds over the inner dimension in
//! ascending order, whatever the run's shape, so a row gives the same bits in any batch.
//!
//! Semantics: `Y[.., m, n] = sum_k A[.., m, k] * B[k, n]` for `A` of any rank >= 1 and a 2-D `B`
//! (both LoRA weights are 2-D graph inputs), inner dimension 0 included (the empty defaults of a
//! run without adapters give zeros).
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use super::op_edit::DOMAIN;
use crate::backend::candle::pool::SharedMut;

/// The custom op's name in [`DOMAIN`].
pub const OP: &str = "LoraMatMul";

/// Work (multiply-adds) below which one call runs on the calling thread alone.
const INLINE_WORK: usize = 256 * 1024;
/// Output columns per parallel item.
const COLUMNS_PER_ITEM: usize = 512;

pub struct LoraMatMulOp;

impl Operator for LoraMatMulOp {
    type Kernel<'attr> = LoraMatMulKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float32), OperatorInput::required(TensorElementType::Float32)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<LoraMatMulKernel> {
        Ok(LoraMatMulKernel)
    }
}

pub struct LoraMatMulKernel;

fn bad(msg: String) -> ort::Error {
    ort::Error::new(format!("{DOMAIN}.{OP}: {msg}"))
}

impl Kernel for LoraMatMulKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let a = ctx.input(0)?.ok_or_else(|| bad("no A".into()))?;
        let (ashape, a) = a.try_extract_tensor::<f32>()?;
        let b = ctx.input(1)?.ok_or_else(|| bad("no B".into()))?;
        let (bshape, b) = b.try_extract_tensor::<f32>()?;
        let (&[k, n], Some(&ak)) = (&bshape[..], ashape.last()) else {
            return Err(bad(format!("A {ashape:?} times B {bshape:?}: B must be 2-D and A at least 1-D")));
        };
        if ak != k || k < 0 || n < 0 {
            return Err(bad(format!("A {ashape:?} times B {bshape:?}: inner dimensions differ")));
        }
        let (k, n) = (k as usize, n as usize);
        let mut oshape = ashape.to_vec();
        *oshape.last_mut().expect("checked above") = n as i64;
        let mut out = ctx.output(0, oshape)?.ok_or_else(|| bad("no output".into()))?;
        let (_, y) = out.try_extract_tensor_mut::<f32>()?;
        y.fill(0.0);
        if k == 0 || n == 0 {
            return Ok(());
        }
        let rows = a.len() / k;
        debug_assert_eq!((a.len(), y.len()), (rows * k, rows * n), "A and Y are not {rows} rows");
        let chunks = n.div_ceil(COLUMNS_PER_ITEM);
        let yp = SharedMut(y.as_mut_ptr());
        let item = |i: usize| {
            let (row, c) = (i / chunks, i % chunks);
            let cols = c * COLUMNS_PER_ITEM..((c + 1) * COLUMNS_PER_ITEM).min(n);
            // SAFETY: item i alone writes columns `cols` of output row `row`; `y` holds rows x n
            // floats and outlives the call.
            let out = unsafe { std::slice::from_raw_parts_mut(yp.ptr().add(row * n + cols.start), cols.len()) };
            row_times(&a[row * k..(row + 1) * k], b, n, cols.start, out);
        };
        let items = rows * chunks;
        if items < 2 || rows * n * k < INLINE_WORK || ctx.par_for(items, 0, item).is_err() {
            (0..items).for_each(item);
        }
        Ok(())
    }
}

/// `out[j] += sum_k x[k] * b[k, col0 + j]` (`b` row-major with `n` columns), one fused
/// multiply-add per term in ascending k, whatever path runs.
pub fn row_times(x: &[f32], b: &[f32], n: usize, col0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::op_edit::matmul_kernel_available() {
        // SAFETY: AVX2 and FMA were detected just above.
        return unsafe { avx2_row_times(x, b, n, col0, out) };
    }
    for (kk, &xv) in x.iter().enumerate() {
        let brow = &b[kk * n + col0..kk * n + col0 + out.len()];
        for (o, &bv) in out.iter_mut().zip(brow) {
            *o = xv.mul_add(bv, *o);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_row_times(x: &[f32], b: &[f32], n: usize, col0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let body = out.len() / 8 * 8;
    // Eight columns at a time kept in a register over the whole inner dimension.
    let mut j = 0;
    while j < body {
        let mut acc = _mm256_loadu_ps(out.as_ptr().add(j));
        for (kk, &xv) in x.iter().enumerate() {
            let bv = _mm256_loadu_ps(b.as_ptr().add(kk * n + col0 + j));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(xv), bv, acc);
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(j), acc);
        j += 8;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(body) {
        for (kk, &xv) in x.iter().enumerate() {
            *o = xv.mul_add(*b.get_unchecked(kk * n + col0 + jj), *o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::row_times;

    #[test]
    fn every_column_is_one_fma_chain_in_any_column_window() {
        let (k, n) = (13, 37);
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut whole = vec![0f32; n];
        row_times(&x, &b, n, 0, &mut whole);
        for j in 0..n {
            let want = (0..k).fold(0f32, |acc, kk| x[kk].mul_add(b[kk * n + j], acc));
            assert_eq!(whole[j].to_bits(), want.to_bits(), "column {j}");
        }
        for (c0, c1) in [(0, 8), (3, 20), (29, 37), (36, 37)] {
            let mut part = vec![0f32; c1 - c0];
            row_times(&x, &b, n, c0, &mut part);
            assert_eq!(part, whole[c0..c1], "columns {c0}..{c1}");
        }
    }
}
