//! Device sampling for logits that another runtime writes into device memory: the onnx backend on
//! ONNX Runtime's CUDA provider binds the graph's logits output to [`LogitSampler::target`], then
//! picks tokens here with the CUDA backend's own kernels (`argmax_part`/`argmax_rows`, and
//! `sample_rows` for drawing rows; `gpu_sampling` decides which rows go where). Only token ids,
//! and the logits of rows the host must sample, cross to the host.
//!
//! ONNX Runtime and this sampler share the device's primary context (cudarc and the CUDA runtime
//! both use it), so the pointer is valid for both. ONNX Runtime's `Run` returns after its stream
//! has finished, and [`LogitSampler::pick`] waits for this sampler's stream before it returns, so
//! the next `Run` never overwrites logits that are still being read.
use super::forward::{pick_tokens, ARGMAX_SLICES};
use super::gpu::{Buf, Gpu};
use crate::backend::gpu_sampling::PARAM_BYTES;
use crate::backend::BackendError;

pub struct LogitSampler {
    gpu: Gpu,
    vocab: usize,
    rows: usize,
    /// The logits as the kernels read them (f32), and the runtime's f16 output when it has one.
    logits: Buf<f32>,
    logits16: Option<Buf<u16>>,
    part_v: Buf<f32>,
    part_i: Buf<i32>,
    ids: Buf<i32>,
    params: Buf<u8>,
}

impl LogitSampler {
    /// Buffers for up to `rows` rows of `vocab` logits on `gpu`, written in f16 when `half`.
    pub fn new(gpu: Gpu, vocab: usize, rows: usize, half: bool) -> Result<LogitSampler, BackendError> {
        let rows = rows.max(1);
        let s = LogitSampler {
            logits: gpu.zeros(rows * vocab)?,
            logits16: if half { Some(gpu.zeros(rows * vocab)?) } else { None },
            part_v: gpu.zeros(rows * ARGMAX_SLICES)?,
            part_i: gpu.zeros(rows * ARGMAX_SLICES)?,
            ids: gpu.zeros(rows)?,
            params: gpu.zeros(rows * PARAM_BYTES)?,
            gpu,
            vocab,
            rows,
        };
        // The buffers are cleared on this sampler's stream; the runtime writes on its own.
        s.gpu.sync()?;
        Ok(s)
    }

    /// Device bytes a sampler for `rows` rows takes.
    pub fn bytes(vocab: usize, rows: usize, half: bool) -> usize {
        rows * (vocab * (4 + if half { 2 } else { 0 }) + ARGMAX_SLICES * 8 + 4 + PARAM_BYTES)
    }

    /// Rows the buffers hold.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Where the runtime writes `[rows, vocab]` logits (f16 when the sampler was made `half`).
    pub fn target(&self) -> *mut u8 {
        self.logits16.as_ref().map_or(self.logits.ptr, |b| b.ptr) as *mut u8
    }

    /// After a run that wrote `b` rows: widens them to f32 when needed, picks every row's greedy
    /// token, and draws the rows whose parameters (`params`, `PARAM_BYTES` a row, all `b` rows)
    /// are on. Returns each row's token; waits for the device.
    pub fn pick(&mut self, b: usize, params: Option<&[u8]>) -> Result<Vec<i32>, BackendError> {
        if b == 0 || b > self.rows {
            return Err(BackendError::Compute(format!("device sampling: {b} rows, the buffers hold {}", self.rows)));
        }
        self.widen(b)?;
        let gpu = &self.gpu;
        if let Some(p) = params {
            if p.len() != b * PARAM_BYTES {
                return Err(BackendError::Compute("device sampling: one parameter block per row".into()));
            }
            gpu.write(&mut self.params, p)?;
        }
        let params = params.map(|_| self.params.ptr);
        pick_tokens(gpu, self.logits.ptr, self.vocab, b, self.part_v.ptr, self.part_i.ptr, params, self.ids.ptr)?;
        let mut out = vec![0i32; b];
        gpu.read(&self.ids, 0, &mut out)?;
        Ok(out)
    }

    /// Row `r`'s logits as f32, for the host's sampler (after [`LogitSampler::pick`] or
    /// [`LogitSampler::widen`] over at least `r + 1` rows; rows that `pick` drew are changed).
    pub fn row(&self, r: usize) -> Result<Vec<f32>, BackendError> {
        let mut out = vec![0f32; self.vocab];
        self.gpu.read(&self.logits, r * self.vocab, &mut out)?;
        Ok(out)
    }

    /// Widens `b` rows of f16 logits to f32 (nothing to do for f32 logits).
    pub fn widen(&self, b: usize) -> Result<(), BackendError> {
        let Some(half) = &self.logits16 else { return Ok(()) };
        let n = (b * self.vocab) as i64;
        let blocks = (n as usize).div_ceil(256).min(4096) as u32;
        self.gpu.launch(&self.gpu.k.f16_to_f32, (blocks, 1), 256, &[&half.ptr, &self.logits.ptr, &n])
    }
}
