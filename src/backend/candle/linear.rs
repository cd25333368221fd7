//! Linear layers whose weights are either quantized (GGUF blocks) or dense (f32), with optional
//! bias, and projections that share one input (q/k/v, gate/up) fused into a single matmul.
//!
//! Quantized weights run through `qmatmul::QMatrix`, which reads each weight block once for
//! several activation rows: this is what makes batching many sequences per step pay off. Fusing
//! projections that read the same input saves one activation quantization and one pool job per
//! part. Dense weights run through `dense::DenseMatrix`. Both compute every row the same way
//! whatever the batch (candle's own matmul does not), so no row's result depends on its
//! neighbours.
use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};

use super::dense::DenseMatrix;
use super::qmatmul::QMatrix;

/// `y = x W^T (+ b)` for an activation `x` of shape [rows, in_features].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Weight {
    Quantized(Arc<QMatrix>),
    /// [out, in], f32.
    Dense(Arc<DenseMatrix>),
}

/// A weight as loaded: a GGUF tensor or a dense [out, in] matrix, plus optional bias.
pub enum RawWeight {
    Quantized(QTensor, Option<Tensor>),
    Dense(Tensor, Option<Tensor>),
}

impl RawWeight {
    fn out_features(&self) -> Result<usize> {
        match self {
            Self::Quantized(q, _) => Ok(q.shape().dims2()?.0),
            Self::Dense(t, _) => Ok(t.dims2()?.0),
        }
    }

    /// The weight as a standalone layer.
    pub fn into_linear(self) -> Result<Linear> {
        match self {
            Self::Quantized(q, b) => Linear::from_qtensor(q, b),
            Self::Dense(t, b) => Linear::from_dense(t, b),
        }
    }
}

impl Linear {
    /// From a GGUF tensor (block types stay quantized; F32/F16/BF16 are widened to f32).
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        match QMatrix::from_qtensor(&weight)? {
            Some(q) => {
                let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
                Ok(Self { weight: Weight::Quantized(Arc::new(q)), bias })
            }
            None => Self::from_dense(weight.dequantize(&Device::Cpu)?, bias),
        }
    }

    /// From a dense weight of shape [out_features, in_features] (converted to f32).
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let data = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(Self { weight: Weight::Dense(Arc::new(DenseMatrix::new(data, n, k))), bias })
    }

    /// Rows `ids` of the weight matrix (as an embedding table), [ids.len(), in_features].
    pub fn embedding(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.weight {
            Weight::Quantized(q) => {
                Tensor::from_vec(q.dequantize_rows(ids)?, (ids.len(), q.cols()), &Device::Cpu)
            }
            Weight::Dense(w) => {
                let mut rows = Vec::with_capacity(ids.len() * w.cols());
                for &id in ids {
                    if id as usize >= w.rows() {
                        candle_core::bail!("row {id} is outside a matrix of {} rows", w.rows());
                    }
                    rows.extend_from_slice(w.row(id as usize));
                }
                Tensor::from_vec(rows, (ids.len(), w.cols()), &Device::Cpu)
            }
        }
    }

    /// The whole weight as f32 rows, [out_features, in_features] (quantized weights dequantized),
    /// and the bias: what a device backend uploads.
    pub fn to_f32(&self) -> Result<(Vec<f32>, usize, usize, Option<Vec<f32>>)> {
        let (data, n, k) = match &self.weight {
            Weight::Quantized(q) => (q.dequantize_rows(&(0..q.rows() as u32).collect::<Vec<_>>())?, q.rows(), q.cols()),
            Weight::Dense(w) => ((0..w.rows()).flat_map(|i| w.row(i).iter().copied()).collect(), w.rows(), w.cols()),
        };
        let bias = self.bias.as_ref().map(|b| b.flatten_all().and_then(|b| b.to_vec1::<f32>())).transpose()?;
        Ok((data, n, k, bias))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (y, n) = {
            let (guard, layout) = x.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*guard else {
                candle_core::bail!("the candle backend's matmuls run on the CPU only");
            };
            let start = layout.start_offset();
            match &self.weight {
                Weight::Quantized(q) => (q.matmul(&cpu.as_slice::<f32>()?[start..start + rows * q.cols()]), q.rows()),
                Weight::Dense(w) => (w.matmul(&cpu.as_slice::<f32>()?[start..start + rows * w.cols()]), w.rows()),
            }
        };
        let y = Tensor::from_vec(y, (rows, n), &Device::Cpu)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Several projections of the same input. Adjacent projections whose weights can be stacked (same
/// quantization type and input width, or all dense) run as one matmul; e.g. Qwen2.5's Q4_K_M files
/// store q and k as Q4_K but v as Q6_K in some layers, giving one q+k matmul and one v matmul.
#[derive(Debug, Clone)]
pub struct MultiLinear {
    /// Each matmul with the output widths of the logical projections it holds, in order.
    groups: Vec<(Linear, Vec<usize>)>,
}

/// Stacks the bias vectors of `parts` (zeros where a part has none); None when none has one.
fn stack_bias(parts: &[RawWeight], widths: &[usize]) -> Result<Option<Tensor>> {
    let biases: Vec<Option<&Tensor>> = parts
        .iter()
        .map(|p| match p {
            RawWeight::Quantized(_, b) | RawWeight::Dense(_, b) => b.as_ref(),
        })
        .collect();
    if biases.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut all = Vec::new();
    for (b, &w) in biases.iter().zip(widths) {
        match b {
            Some(b) => all.extend(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => all.extend(std::iter::repeat_n(0f32, w)),
        }
    }
    let n = all.len();
    Ok(Some(Tensor::from_vec(all, n, &candle_core::Device::Cpu)?))
}

/// Whether `b` can be stacked under `a` in one matmul.
fn stackable(a: &RawWeight, b: &RawWeight) -> bool {
    let in_features = |q: &QTensor| q.shape().dims2().map(|d| d.1).ok();
    match (a, b) {
        (RawWeight::Quantized(x, _), RawWeight::Quantized(y, _)) => {
            x.dtype() == y.dtype() && in_features(x) == in_features(y)
        }
        (RawWeight::Dense(..), RawWeight::Dense(..)) => true,
        _ => false,
    }
}

/// One matmul for `parts` (all stackable with each other, at least one).
fn fuse(parts: Vec<RawWeight>, widths: &[usize]) -> Result<Linear> {
    if parts.len() == 1 {
        return parts.into_iter().next().map_or_else(|| candle_core::bail!("no parts"), RawWeight::into_linear);
    }
    let total: usize = widths.iter().sum();
    let bias = stack_bias(&parts, widths)?;
    if matches!(parts[0], RawWeight::Quantized(..)) {
        let mut bytes = Vec::new();
        let (mut k, mut dtype, mut device) = (0, None, candle_core::Device::Cpu);
        for p in &parts {
            if let RawWeight::Quantized(q, _) = p {
                bytes.extend_from_slice(&q.data()?);
                k = q.shape().dims2()?.1;
                dtype = Some(q.dtype());
                device = q.device();
            }
        }
        let dtype = dtype.ok_or_else(|| candle_core::Error::Msg("no parts".into()))?;
        let storage = QStorage::from_data(Cow::Owned(bytes), &device, dtype)?;
        return Linear::from_qtensor(QTensor::new(storage, (total, k))?, bias);
    }
    let ws = parts
        .iter()
        .map(|p| match p {
            RawWeight::Dense(t, _) => t.to_dtype(DType::F32),
            RawWeight::Quantized(..) => candle_core::bail!("cannot stack quantized and dense weights"),
        })
        .collect::<Result<Vec<_>>>()?;
    Linear::from_dense(Tensor::cat(&ws, 0)?, bias)
}

impl MultiLinear {
    /// Builds the projections, fusing runs of adjacent stackable weights.
    pub fn new(parts: Vec<RawWeight>) -> Result<Self> {
        let mut runs: Vec<(Vec<RawWeight>, Vec<usize>)> = Vec::new();
        for p in parts {
            let w = p.out_features()?;
            match runs.last_mut() {
                Some((run, widths)) if stackable(&run[0], &p) => {
                    run.push(p);
                    widths.push(w);
                }
                _ => runs.push((vec![p], vec![w])),
            }
        }
        let groups = runs
            .into_iter()
            .map(|(run, widths)| Ok((fuse(run, &widths)?, widths)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { groups })
    }

    /// All projections as one f32 matrix, their rows stacked in order, [sum of widths, in]
    /// (quantized weights dequantized), and the stacked bias (zeros where a part has none;
    /// None when none has one): what a device backend uploads.
    pub fn to_f32(&self) -> Result<(Vec<f32>, usize, usize, Option<Vec<f32>>)> {
        let (mut data, mut n, mut k, mut bias) = (Vec::new(), 0, 0, Vec::new());
        let mut any_bias = false;
        for (linear, _) in &self.groups {
            let (d, rows, cols, b) = linear.to_f32()?;
            data.extend(d);
            n += rows;
            k = cols;
            any_bias |= b.is_some();
            bias.extend(b.unwrap_or_else(|| vec![0.0; rows]));
        }
        Ok((data, n, k, any_bias.then_some(bias)))
    }

    /// Output width of each logical projection, in order.
    pub fn widths(&self) -> Vec<usize> {
        self.groups.iter().flat_map(|(_, w)| w.iter().copied()).collect()
    }

    /// Whether all projections run as one matmul.
    pub fn is_fused(&self) -> bool {
        self.groups.len() == 1 && self.groups[0].1.len() > 1
    }

    /// Runs all projections on `x` [rows, in]; returns each projection's output as a row-major
    /// [rows, width] vector.
    pub fn forward_parts(&self, x: &Tensor) -> Result<Vec<Vec<f32>>> {
        let mut outs = Vec::new();
        for (linear, widths) in &self.groups {
            let y = linear.forward(x)?;
            if widths.len() == 1 {
                outs.push(y.flatten_all()?.to_vec1::<f32>()?);
                continue;
            }
            let (rows, total) = y.dims2()?;
            let (guard, layout) = y.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*guard else {
                candle_core::bail!("fused projections run on the CPU only");
            };
            let start = layout.start_offset();
            let data = &cpu.as_slice::<f32>()?[start..start + rows * total];
            let first = outs.len();
            outs.extend(widths.iter().map(|&w| Vec::with_capacity(rows * w)));
            for row in data.chunks_exact(total) {
                let mut off = 0;
                for (out, &w) in outs[first..].iter_mut().zip(widths) {
                    out.extend_from_slice(&row[off..off + w]);
                    off += w;
                }
            }
        }
        Ok(outs)
    }
}
