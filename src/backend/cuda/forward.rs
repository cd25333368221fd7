//! One step on the device: the rows of every sequence through the embedding, each layer and the
//! output matrix, as a fixed sequence of launches on one stream (see `kernels.cu`).
//!
//! Per layer: RMSNorm -> q/k/v product -> bias + RoPE + cache write -> attention -> output
//! product added to the residual stream by cuBLAS (beta = 1) -> RMSNorm -> gate/up product ->
//! SiLU * up -> down product added to the residual. Then the final norm of only the rows that
//! want logits, and the output product.
use super::gpu::{Buf, Dtype, Gpu};
use super::{CudaBackend, BLOCK};
use crate::backend::candle::ModelConfig;
use crate::backend::{BackendError, StepInput};

/// The step's buffers, grown as steps get larger.
pub struct Scratch {
    rows: usize,
    logit_rows: usize,
    meta_len: usize,
    /// Token ids, positions, row sequences, logit rows and block tables of one step.
    meta: Buf<i32>,
    /// The residual stream, f32 [rows, hidden].
    x: Buf<f32>,
    /// Inputs of the products, in the compute dtype, [rows, max(hidden, q_dim, intermediate)].
    h: Buf<u8>,
    /// q/k/v product, f32 [rows, q_dim + 2 kv_dim].
    qkv: Buf<f32>,
    /// Rotated queries, f32 [rows, q_dim].
    q: Buf<f32>,
    /// gate/up product, f32 [rows, 2 intermediate].
    gu: Buf<f32>,
    /// Logits of the rows that want them, f32 [logit rows, vocab].
    pub logits: Buf<f32>,
    /// Greedy picks, [logit rows].
    ids: Buf<i32>,
}

fn widths(cfg: &ModelConfig, inter: usize) -> (usize, usize, usize) {
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    (q, kv, cfg.hidden_size.max(q).max(inter))
}

impl Scratch {
    /// Buffers for steps of up to `rows` rows, `logit_rows` of them wanting logits; `inter` is
    /// the MLP's width.
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, dtype: Dtype, inter: usize, rows: usize, logit_rows: usize) -> Result<Scratch, BackendError> {
        Self::sized(gpu, cfg, dtype, inter, rows, logit_rows, 4 * rows + 1024)
    }

    fn sized(gpu: &Gpu, cfg: &ModelConfig, dtype: Dtype, inter: usize, rows: usize, logit_rows: usize, meta_len: usize) -> Result<Scratch, BackendError> {
        let (q, kv, wide) = widths(cfg, inter);
        Ok(Scratch {
            rows,
            logit_rows,
            meta_len,
            meta: gpu.zeros(meta_len)?,
            x: gpu.zeros(rows * cfg.hidden_size)?,
            h: gpu.zeros(rows * wide * dtype.bytes())?,
            qkv: gpu.zeros(rows * (q + 2 * kv))?,
            q: gpu.zeros(rows * q)?,
            gu: gpu.zeros(rows * 2 * inter)?,
            logits: gpu.zeros(logit_rows * cfg.vocab_size)?,
            ids: gpu.zeros(logit_rows)?,
        })
    }
}

/// Row metadata of one step, laid out in one i32 buffer.
struct Meta {
    data: Vec<i32>,
    rows: usize,
    logit_rows: usize,
    table_stride: usize,
}

impl Meta {
    /// ids [rows] | pos [rows] | row_seq [rows] | logit_rows [logit rows] | tables [seqs x stride]
    fn build(b: &CudaBackend, inputs: &[StepInput<'_>]) -> Meta {
        let rows: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let stride = inputs.iter().map(|i| b.tables.table(i.seq).len()).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(rows);
        let mut pos = Vec::with_capacity(rows);
        let mut row_seq = Vec::with_capacity(rows);
        let mut logit_rows = Vec::new();
        let mut tables = vec![0i32; inputs.len() * stride];
        for (s, inp) in inputs.iter().enumerate() {
            // The tables already hold this step's positions (grown before the forward).
            let start = b.tables.len(inp.seq) - inp.tokens.len();
            for (i, &t) in inp.tokens.iter().enumerate() {
                ids.push(t as i32);
                pos.push((start + i) as i32);
                row_seq.push(s as i32);
            }
            if inp.want_logits {
                logit_rows.push((ids.len() - 1) as i32);
            }
            for (j, &blk) in b.tables.table(inp.seq).iter().enumerate() {
                tables[s * stride + j] = blk as i32;
            }
        }
        let logit_n = logit_rows.len();
        let mut data = ids;
        data.extend(pos);
        data.extend(row_seq);
        data.extend(logit_rows);
        data.extend(tables);
        Meta { data, rows, logit_rows: logit_n, table_stride: stride }
    }
}

/// Runs the step; the logits of the rows that want them end in `b.scratch.logits`, in order.
pub fn forward(b: &mut CudaBackend, inputs: &[StepInput<'_>]) -> Result<(), BackendError> {
    let meta = Meta::build(b, inputs);
    let cfg = b.cfg.clone();
    let inter = b.w.layers.first().map_or(0, |l| l.gate_up.n / 2);
    let dtype = b.w.dtype;
    let s = &b.scratch;
    if meta.rows > s.rows || meta.logit_rows > s.logit_rows || meta.data.len() > s.meta_len {
        let rows = meta.rows.max(s.rows).next_power_of_two();
        let logit_rows = meta.logit_rows.max(s.logit_rows).next_power_of_two();
        let meta_len = meta.data.len().max(s.meta_len).next_power_of_two();
        b.scratch = Scratch::sized(&b.gpu, &cfg, dtype, inter, rows, logit_rows, meta_len)?;
    }
    let (gpu, w, s) = (&b.gpu, &b.w, &mut b.scratch);
    gpu.write(&mut s.meta, &meta.data)?;
    let (r, l) = (meta.rows, meta.logit_rows);
    let at = |off: usize| s.meta.ptr + 4 * off as u64;
    let (ids, pos, row_seq, logit_rows, tables) = (at(0), at(r), at(2 * r), at(3 * r), at(3 * r + l));
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
    let qd = nh * d;
    let eps = cfg.rms_norm_eps as f32;
    let (r32, h32, stride) = (r as u32, h as i32, meta.table_stride as i32);
    let (h16, h32p) = match dtype {
        Dtype::F16 => (s.h.ptr, 0u64),
        Dtype::F32 => (0u64, s.h.ptr),
    };
    let embed = if dtype == Dtype::F16 { &gpu.k.embed_f16 } else { &gpu.k.embed_f32 };
    // The KV cache takes the compute dtype's width (f32 in the exact mode).
    let kv32 = i32::from(dtype == Dtype::F32);
    gpu.launch(embed, (r32, 1), 256, &[&w.embed.w.ptr, &ids, &s.x.ptr, &h32])?;
    let none = 0u64;
    for (layer, lw) in w.layers.iter().enumerate() {
        gpu.launch(&gpu.k.rms_norm, (r32, 1), 256, &[&s.x.ptr, &lw.attn_norm.ptr, &none, &h16, &h32p, &h32, &eps])?;
        gpu.gemm(dtype, lw.qkv.w.ptr, s.h.ptr, s.qkv.ptr, r, lw.qkv.n, h, false)?;
        let bias = lw.qkv.bias.as_ref().map_or(0, |b| b.ptr);
        let c = &b.cache[layer];
        let interleaved = i32::from(cfg.rope_interleaved);
        gpu.launch(
            &gpu.k.qkv_rope_store,
            (r32, 1),
            128,
            &[&s.qkv.ptr, &bias, &b.cos.ptr, &b.sin.ptr, &pos, &row_seq, &tables, &stride, &s.q.ptr, &c.k.ptr, &c.v.ptr, &(nh as i32), &(nkv as i32), &(d as i32), &(BLOCK as i32), &interleaved, &kv32],
        )?;
        let scale = 1.0f32 / (d as f32).sqrt();
        gpu.launch(
            &gpu.k.attend,
            (nh as u32, r32),
            128,
            &[&s.q.ptr, &c.k.ptr, &c.v.ptr, &pos, &row_seq, &tables, &stride, &h16, &h32p, &(nh as i32), &(nkv as i32), &(d as i32), &(BLOCK as i32), &scale, &kv32],
        )?;
        gpu.gemm(dtype, lw.wo.w.ptr, s.h.ptr, s.x.ptr, r, h, qd, true)?;
        gpu.launch(&gpu.k.rms_norm, (r32, 1), 256, &[&s.x.ptr, &lw.ffn_norm.ptr, &none, &h16, &h32p, &h32, &eps])?;
        gpu.gemm(dtype, lw.gate_up.w.ptr, s.h.ptr, s.gu.ptr, r, lw.gate_up.n, h, false)?;
        let inter = lw.gate_up.n / 2;
        gpu.launch(&gpu.k.silu_mul, (r32, 1), 256, &[&s.gu.ptr, &h16, &h32p, &(inter as i32)])?;
        gpu.gemm(dtype, lw.down.w.ptr, s.h.ptr, s.x.ptr, r, h, inter, true)?;
    }
    if l > 0 {
        gpu.launch(&gpu.k.rms_norm, (l as u32, 1), 256, &[&s.x.ptr, &w.final_norm.ptr, &logit_rows, &h16, &h32p, &h32, &eps])?;
        let head = w.lm_head();
        gpu.gemm(dtype, head.w.ptr, s.h.ptr, s.logits.ptr, l, head.n, h, false)?;
    }
    gpu.sync()
}

/// The greedy pick of each of the first `n` logit rows of the last step, computed on the device.
pub fn argmax(b: &CudaBackend, n: usize) -> Result<Vec<i32>, BackendError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let s = &b.scratch;
    let vocab = b.cfg.vocab_size as i32;
    b.gpu.launch(&b.gpu.k.argmax_rows, (n as u32, 1), 256, &[&s.logits.ptr, &vocab, &s.ids.ptr])?;
    let mut out = vec![0i32; n];
    b.gpu.read(&s.ids, 0, &mut out)?;
    Ok(out)
}
