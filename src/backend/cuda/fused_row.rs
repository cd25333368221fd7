//! Fused one-row products (`CudaOptions::fused_row`, kernels in gemv_row.cuh): a step of one
//! row without adapter rows (one stream's decode) folds the kernels around its products into
//! them, so a layer is five launches (q/k/v with RoPE and the cache write, attention, o, gate/up,
//! down) instead of nine. Each product makes its own f16 input as the unfused kernels would
//! (RMSNorm, SiLU x up), then a warp per output row reads 16 bytes of weights a lane.
use super::forward::Field;
use super::gpu::{Dtype, Gpu};
use super::weights::{DevLayer, DevLinear, DevWeights};
use super::CudaBackend;
use crate::backend::BackendError;

/// The largest input the kernels stage (GEMV_MAX_K in gemv_row.cuh), and their warps a block.
const GEMV_MAX_K: usize = 16384;
const GEMV_WARPS: usize = 8;

/// Whether every product of the model suits the kernels: f16 weights, inputs of at most
/// GEMV_MAX_K values and a multiple of 8 (16-byte rows).
pub fn fits(w: &DevWeights, dtype: Dtype) -> bool {
    let fits = |l: &DevLinear| {
        let k = l.w.len() / (2 * l.n.max(1));
        (8..=GEMV_MAX_K).contains(&k) && k % 8 == 0
    };
    dtype == Dtype::F16 && w.layers.iter().all(|l| [&l.qkv, &l.wo, &l.gate_up, &l.down].into_iter().all(fits))
}

/// `gemv_row`'s input: attention's f16 output, the residual stream through RMSNorm, or SiLU of
/// the gate times the up product.
enum RowInput {
    Plain { h16: u64 },
    Norm { x: u64, weight: u64, eps: f32 },
    Silu { gu: u64 },
}

/// `y (+)= lin x` for the step's one row, its input made in the same launch.
fn gemv_row(gpu: &Gpu, lin: &DevLinear, k: usize, input: RowInput, y: u64, accumulate: bool) -> Result<(), BackendError> {
    let (mode, h16, x, nw, eps, gu) = match input {
        RowInput::Plain { h16 } => (0i32, h16, 0u64, 0u64, 0f32, 0u64),
        RowInput::Norm { x, weight, eps } => (1, 0, x, weight, eps, 0),
        RowInput::Silu { gu } => (2, 0, 0, 0, 0.0, gu),
    };
    let (n, k, acc) = (lin.n as i32, k as i32, i32::from(accumulate));
    let blocks = lin.n.div_ceil(GEMV_WARPS) as u32;
    gpu.launch(&gpu.k.gemv_row, (blocks, 1), (GEMV_WARPS * 32) as u32, &[&lin.w.ptr, &n, &k, &mode, &h16, &x, &nw, &eps, &gu, &y, &acc])
}

/// RMSNorm, the q/k/v product, bias, RoPE and the cache write of `layer` in one launch
/// (`gemv_qkv_rope`): the rotated query to `q`, key and value into the cache.
pub fn qkv(b: &CudaBackend, layer: usize) -> Result<(), BackendError> {
    let (gpu, s, cfg, lw, c) = (&b.gpu, &b.scratch, &b.cfg, &b.w.layers[layer], &b.cache[layer]);
    let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let (h32, eps) = (cfg.hidden_size as i32, cfg.rms_norm_eps as f32);
    let bias = lw.qkv.bias.as_ref().map_or(0, |b| b.ptr);
    let (pos, slot) = (s.at(Field::Pos), s.at(Field::Slot));
    let (stride, block, interleaved) = (b.max_blocks as i32, super::BLOCK as i32, i32::from(cfg.rope_interleaved));
    let (nh32, nkv32, d32) = (nh as i32, nkv as i32, d as i32);
    let jobs = (nh + 2 * nkv) * (d / 2);
    gpu.launch(
        &gpu.k.gemv_qkv_rope,
        (jobs.div_ceil(GEMV_WARPS) as u32, 1),
        (GEMV_WARPS * 32) as u32,
        &[&lw.qkv.w.ptr, &h32, &s.x.ptr, &lw.attn_norm.ptr, &eps, &bias, &b.cos.ptr, &b.sin.ptr, &pos, &slot, &b.dev_tables.ptr, &stride, &s.q.ptr, &c.k.ptr, &c.v.ptr, &nh32, &nkv32, &d32, &block, &interleaved],
    )
}

/// The layer after attention: the output product added to the residual stream, RMSNorm with the
/// gate/up product, SiLU x up with the down product added to the residual stream.
pub fn mlp(b: &CudaBackend, lw: &DevLayer) -> Result<(), BackendError> {
    let (gpu, s, cfg) = (&b.gpu, &b.scratch, &b.cfg);
    let (h, q_dim, inter) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, lw.gate_up.n / 2);
    let eps = cfg.rms_norm_eps as f32;
    gemv_row(gpu, &lw.wo, q_dim, RowInput::Plain { h16: s.h.ptr }, s.x.ptr, true)?;
    gemv_row(gpu, &lw.gate_up, h, RowInput::Norm { x: s.x.ptr, weight: lw.ffn_norm.ptr, eps }, s.gu.ptr, false)?;
    gemv_row(gpu, &lw.down, inter, RowInput::Silu { gu: s.gu.ptr }, s.x.ptr, true)
}
