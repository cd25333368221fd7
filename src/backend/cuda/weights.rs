//! The model's weights on the device: every matrix dequantized once at load (GGUF blocks of any
//! type the CPU path reads, or safetensors f32/f16/bf16) to the compute dtype, so each product is
//! one cuBLAS call on tensor cores; norms and biases in f32. Projections that read the same input
//! (q/k/v, gate/up) are one stacked matrix.
use super::gpu::{Buf, Dtype, Gpu};
use crate::backend::candle::linear::{Linear, MultiLinear};
use crate::backend::candle::weights::ModelWeights;
use crate::backend::BackendError;

/// A [n, k] matrix in the compute dtype (k is the input width), and its bias.
pub struct DevLinear {
    pub w: Buf<u8>,
    pub n: usize,
    pub bias: Option<Buf<f32>>,
}

pub struct DevLayer {
    pub attn_norm: Buf<f32>,
    pub qkv: DevLinear,
    pub wo: DevLinear,
    pub ffn_norm: Buf<f32>,
    pub gate_up: DevLinear,
    pub down: DevLinear,
}

pub struct DevWeights {
    pub dtype: Dtype,
    /// The token embeddings [vocab, hidden] (also the output matrix when tied).
    pub embed: DevLinear,
    /// None: tied to `embed`.
    pub lm_head: Option<DevLinear>,
    pub layers: Vec<DevLayer>,
    pub final_norm: Buf<f32>,
}

fn load_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Load(e.to_string())
}

/// f32 values as the bytes of `dtype`.
pub(super) fn to_bytes(data: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
    }
}

fn upload((data, n, _k, bias): (Vec<f32>, usize, usize, Option<Vec<f32>>), dtype: Dtype, gpu: &Gpu) -> Result<DevLinear, BackendError> {
    Ok(DevLinear { w: gpu.upload(&to_bytes(&data, dtype))?, n, bias: bias.map(|b| gpu.upload(&b)).transpose()? })
}

fn linear(l: &Linear, dtype: Dtype, gpu: &Gpu) -> Result<DevLinear, BackendError> {
    upload(l.to_f32().map_err(load_err)?, dtype, gpu)
}

fn multi(l: &MultiLinear, dtype: Dtype, gpu: &Gpu) -> Result<DevLinear, BackendError> {
    upload(l.to_f32().map_err(load_err)?, dtype, gpu)
}

fn vector(t: &candle_core::Tensor, gpu: &Gpu) -> Result<Buf<f32>, BackendError> {
    gpu.upload(&t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(load_err)?)
}

impl DevWeights {
    /// Uploads `w` (read by the CPU loaders) layer by layer; `tied`: the output matrix is the
    /// embedding matrix.
    pub fn upload(w: &ModelWeights, tied: bool, dtype: Dtype, gpu: &Gpu) -> Result<DevWeights, BackendError> {
        let embed = linear(&w.embed, dtype, gpu)?;
        let lm_head = if tied { None } else { Some(linear(&w.lm_head, dtype, gpu)?) };
        let layers = w
            .layers
            .iter()
            .map(|l| {
                Ok(DevLayer {
                    attn_norm: vector(&l.attn_norm, gpu)?,
                    qkv: multi(&l.qkv, dtype, gpu)?,
                    wo: linear(&l.wo, dtype, gpu)?,
                    ffn_norm: vector(&l.ffn_norm, gpu)?,
                    gate_up: multi(&l.gate_up, dtype, gpu)?,
                    down: linear(&l.w_down, dtype, gpu)?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(DevWeights { dtype, embed, lm_head, layers, final_norm: vector(&w.final_norm, gpu)? })
    }

    pub fn lm_head(&self) -> &DevLinear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        let lin = |l: &DevLinear| l.w.len() + l.bias.as_ref().map_or(0, |b| 4 * b.len());
        let layers: usize = self.layers.iter().map(|l| lin(&l.qkv) + lin(&l.wo) + lin(&l.gate_up) + lin(&l.down) + 4 * (l.attn_norm.len() + l.ffn_norm.len())).sum();
        lin(&self.embed) + self.lm_head.as_ref().map_or(0, lin) + layers + 4 * self.final_norm.len()
    }
}
