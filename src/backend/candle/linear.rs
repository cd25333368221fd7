//! A linear layer whose weight is either quantized (GGUF blocks) or dense (f32), with optional bias.
//!
//! Quantized weights go through candle's `QMatMul`, which reads each weight block once for all
//! rows of the activation: this is what makes batching many sequences per step pay off.
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};

/// `y = x W^T (+ b)` for an activation `x` of shape [rows, in_features].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a GGUF tensor (quantized types stay quantized; F32/F16 are dequantized by candle).
    pub fn from_qtensor(weight: QTensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: QMatMul::from_qtensor(weight)?, bias })
    }

    /// From a dense weight of shape [out_features, in_features] (converted to f32).
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(Self { weight: QMatMul::Tensor(weight), bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
