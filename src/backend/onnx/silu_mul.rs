//! `ai.inferd.SiluMul(gate, up) = gate * sigmoid(gate) * up`: the gated MLP activation of
//! Llama/Qwen-style models as one op, registered with [`super::gqa`]'s kernel in the domain
//! [`DOMAIN`](super::gqa::DOMAIN); [`super::silu_edit`] puts it in place of the model builder's
//! `Sigmoid` -> `Mul` -> `Mul` (which ONNX Runtime turns into `QuickGelu` -> `Mul`).
//!
//! Why: on the CPU every node costs ONNX Runtime a dispatch, and an element-wise `Mul` of one
//! decode row (4864 floats on Qwen2.5-0.5B) costs far more than its arithmetic: a Python A/B with
//! the 24 `Mul`s of the MLPs removed ran a 1-row step 0.87 ms (6%) faster (docs/perf-notes.md,
//! session 8). One op does the activation and the product in one pass.
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

#[cfg(target_arch = "x86_64")]
use crate::backend::candle::attention_avx2;

/// The op's name in [`DOMAIN`](super::gqa::DOMAIN).
pub const OP: &str = "SiluMul";

/// Elements below which one call runs on the calling thread alone.
const INLINE: usize = 64 * 1024;
/// Elements per task when the pool shares the work.
const TASK: usize = 16 * 1024;

pub struct SiluMulOp;

impl Operator for SiluMulOp {
    type Kernel<'attr> = SiluMulKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float32), OperatorInput::required(TensorElementType::Float32)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<SiluMulKernel> {
        Ok(SiluMulKernel)
    }
}

pub struct SiluMulKernel;

/// `out[i] = gate[i] * sigmoid(gate[i]) * up[i]`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if attention_avx2::available() {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { attention_avx2::silu_mul(gate, up, out) };
        return;
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * (1.0 / (1.0 + (-g).exp())) * u;
    }
}

/// A pointer the pool's tasks share (each writes its own range).
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint ranges; the output outlives the call.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

impl Kernel for SiluMulKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let bad = |m: String| ort::Error::new(format!("{}.{OP}: {m}", super::gqa::DOMAIN));
        let gate = ctx.input(0)?.ok_or_else(|| bad("no gate".into()))?;
        let up = ctx.input(1)?.ok_or_else(|| bad("no up".into()))?;
        let (gshape, g) = gate.try_extract_tensor::<f32>()?;
        let (ushape, u) = up.try_extract_tensor::<f32>()?;
        if gshape != ushape {
            return Err(bad(format!("gate {:?} and up {:?} differ in shape", gshape.to_vec(), ushape.to_vec())));
        }
        let mut out = ctx.output(0, gshape.to_vec())?.ok_or_else(|| bad("no output".into()))?;
        let (_, o) = out.try_extract_tensor_mut::<f32>()?;
        let n = o.len();
        if n < INLINE {
            silu_mul(g, u, o);
            return Ok(());
        }
        let op = Out(o.as_mut_ptr());
        let task = |t: usize| {
            let r = t * TASK..((t + 1) * TASK).min(n);
            // SAFETY: task t alone writes its range of the output, which holds n floats.
            let o = unsafe { std::slice::from_raw_parts_mut(op.ptr().add(r.start), r.len()) };
            silu_mul(&g[r.clone()], &u[r], o);
        };
        if ctx.par_for(n.div_ceil(TASK), 0, task).is_err() {
            (0..n.div_ceil(TASK)).for_each(task);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_mul_matches_the_formula_in_f64() {
        let gate: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let up: Vec<f32> = (0..1003).map(|i| ((i * 7) % 13) as f32 * 0.25 - 1.5).collect();
        let mut out = vec![0f32; gate.len()];
        silu_mul(&gate, &up, &mut out);
        for ((&g, &u), &o) in gate.iter().zip(&up).zip(&out) {
            let want = f64::from(g) / (1.0 + (-f64::from(g)).exp()) * f64::from(u);
            assert!((f64::from(o) - want).abs() <= 1e-6 * want.abs().max(1.0), "silu({g}) * {u}: {o} vs {want}");
        }
    }
}
