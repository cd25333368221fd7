//! One step on the device: the rows of every sequence through the embedding, each layer and the
//! output matrix, as a fixed sequence of launches on one stream (see `kernels.cu`).
//!
//! Per layer: RMSNorm -> q/k/v product -> bias + RoPE + cache write -> attention -> output
//! product added to the residual stream by cuBLAS (beta = 1) -> RMSNorm -> gate/up product ->
//! SiLU * up -> down product added to the residual. Then the final norm of only the rows that
//! want logits, the output product, and the greedy pick of every such row.
//!
//! Every buffer has a fixed address and the step's row data sits at fixed offsets of one
//! metadata buffer, so the launches of a decode step of R rows are the same whatever the rows
//! hold: they are captured once per R (a power of two) into a CUDA graph and replayed, which
//! removes the per-launch cost that bounds small models (~250 launches a step for Qwen2.5-0.5B).
//! Block tables live on the device ([slots + 1, max blocks]), indexed by each sequence's slot;
//! a step uploads only the entries of blocks taken since the last one.
use super::gpu::{Buf, Dtype, Gpu};
use super::lora::{self, Group};
use super::lora_stack::{StackArg, StackSize};
use super::{fused_row, CudaBackend};
use crate::backend::candle::ModelConfig;
use crate::backend::gpu_sampling::PARAM_BYTES;
use crate::backend::{BackendError, StepInput};

/// How a step applies LoRA adapters (part of a decode graph's key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraMode {
    /// No adapter rows.
    Off,
    /// `lora_update` beside each product, rows gathered into tiles (`lora.rs`).
    Tiles,
    /// The stacked products beside each product, the update added by its reader (`lora_stack.rs`).
    Stacks,
}

/// Threads of one `attend` block: 8 warps, or 32 (ATT_WARPS in kernels.cu) for a fused one-row
/// step, whose few blocks (one a head) then take 1024 positions a pass.
const ATTEND_THREADS: u32 = 8 * 32;
const ATTEND_THREADS_ONE_ROW: u32 = 32 * 32;

/// Blocks of `argmax_part` per logit row (ARGMAX_SLICES in kernels.cu).
pub(super) const ARGMAX_SLICES: usize = 64;

/// Each of `rows` rows of `vocab` f32 logits at `logits` picks its token into `ids`: the greedy
/// pick (through the slices' winners in `part_v` / `part_i`, [rows, ARGMAX_SLICES]), then, with
/// `params` (`gpu_sampling::PARAM_BYTES` a row), `sample_rows` draws the rows whose parameters
/// are on in place of their greedy pick. Launches only.
#[allow(clippy::too_many_arguments)]
pub(super) fn pick_tokens(gpu: &Gpu, logits: u64, vocab: usize, rows: usize, part_v: u64, part_i: u64, params: Option<u64>, ids: u64) -> Result<(), BackendError> {
    let v = vocab as i32;
    gpu.launch(&gpu.k.argmax_part, (rows as u32, ARGMAX_SLICES as u32), 256, &[&logits, &v, &part_v, &part_i])?;
    gpu.launch(&gpu.k.argmax_rows, (rows as u32, 1), 32, &[&part_v, &part_i, &ids])?;
    match params {
        Some(p) => gpu.launch(&gpu.k.sample_rows, (rows as u32, 1), 1024, &[&logits, &v, &p, &ids]),
        None => Ok(()),
    }
}

/// The step's buffers, allocated once for `rows` rows (`logit_rows` of them wanting logits).
pub struct Scratch {
    pub rows: usize,
    pub logit_rows: usize,
    /// ids [rows] | pos [rows] | slot [rows] | adapter slot [rows] | logit rows [logit_rows] |
    /// LoRA tiles [1 + rows x lora::TILE_INTS] | table updates [2 x updates] | following rows
    /// [2 x logit_rows] (async scheduling: row, and its sequence's pick in the step before)
    meta: Buf<i32>,
    updates: usize,
    /// The residual stream, f32 [rows, hidden].
    pub(super) x: Buf<f32>,
    /// Inputs of the products, in the compute dtype, [rows, max(hidden, q_dim, intermediate)].
    pub(super) h: Buf<u8>,
    /// q/k/v product, f32 [rows, q_dim + 2 kv_dim].
    qkv: Buf<f32>,
    /// Rotated queries, f32 [rows, q_dim].
    pub(super) q: Buf<f32>,
    /// gate/up product, f32 [rows, 2 intermediate].
    pub(super) gu: Buf<f32>,
    /// LoRA rows' updates `B t` of the q/k/v product, the residual stream (o and down) and the
    /// gate/up product: f32 rows of those products' widths.
    z_qkv: Buf<f32>,
    z_x: Buf<f32>,
    z_gu: Buf<f32>,
    /// The stacked products `t = A x` (`lora_stack.rs`) of the q/k/v group, of o and down (one
    /// buffer: each is read before the next is written) and of gate/up: f32 rows of
    /// `StackSize::t_cols` (one element when the backend has no stacks).
    t_qkv: Buf<f32>,
    t_x: Buf<f32>,
    t_gu: Buf<f32>,
    /// Logits of the rows that want them, f32 [logit rows, vocab].
    pub logits: Buf<f32>,
    /// Greedy picks, then the device-sampled rows' draws, [logit rows].
    pub ids: Buf<i32>,
    /// Each logit row's slices' largest values and their indices, [logit rows, ARGMAX_SLICES].
    part_v: Buf<f32>,
    part_i: Buf<i32>,
    /// Sampling parameters of the logit rows (`gpu_sampling::PARAM_BYTES` each; all zero: off).
    params: Buf<u8>,
}

impl Scratch {
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, dtype: Dtype, inter: usize, rows: usize, logit_rows: usize, stacks: Option<StackSize>) -> Result<Scratch, BackendError> {
        let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let t_len = |g: Group| stacks.map_or(1, |st| rows * st.t_cols(g));
        let wide = cfg.hidden_size.max(q).max(inter);
        let updates = logit_rows.max(64) * 4;
        Ok(Scratch {
            rows,
            logit_rows,
            meta: gpu.zeros(4 * rows + logit_rows + 1 + rows * lora::TILE_INTS + 2 * updates + 2 * logit_rows)?,
            updates,
            x: gpu.zeros(rows * cfg.hidden_size)?,
            h: gpu.zeros(rows * wide * dtype.bytes())?,
            qkv: gpu.zeros(rows * (q + 2 * kv))?,
            q: gpu.zeros(rows * q)?,
            gu: gpu.zeros(rows * 2 * inter)?,
            z_qkv: gpu.zeros(rows * (q + 2 * kv))?,
            z_x: gpu.zeros(rows * cfg.hidden_size)?,
            z_gu: gpu.zeros(rows * 2 * inter)?,
            t_qkv: gpu.zeros(t_len(lora::QKV))?,
            t_x: gpu.zeros(t_len(lora::O).max(t_len(lora::DOWN)))?,
            t_gu: gpu.zeros(t_len(lora::GATE_UP))?,
            logits: gpu.zeros(logit_rows * cfg.vocab_size)?,
            ids: gpu.zeros(logit_rows)?,
            part_v: gpu.zeros(logit_rows * ARGMAX_SLICES)?,
            part_i: gpu.zeros(logit_rows * ARGMAX_SLICES)?,
            params: gpu.zeros(logit_rows * PARAM_BYTES)?,
        })
    }

    /// Device addresses of the metadata arrays.
    pub(super) fn at(&self, what: Field) -> u64 {
        let r = self.rows;
        let off = match what {
            Field::Ids => 0,
            Field::Pos => r,
            Field::Slot => 2 * r,
            Field::Adapter => 3 * r,
            Field::LogitRows => 4 * r,
            Field::Tiles => 4 * r + self.logit_rows,
            Field::Updates => 4 * r + self.logit_rows + 1 + r * lora::TILE_INTS,
            Field::Follows => 4 * r + self.logit_rows + 1 + r * lora::TILE_INTS + 2 * self.updates,
        };
        self.meta.ptr + 4 * off as u64
    }
}

#[derive(Clone, Copy)]
pub(super) enum Field {
    Ids,
    Pos,
    Slot,
    Adapter,
    LogitRows,
    Tiles,
    Updates,
    Follows,
}

impl Scratch {
    /// Bytes of the metadata buffer (what one step uploads at most, beside the parameters).
    pub fn meta_bytes(&self) -> usize {
        4 * self.meta.len()
    }
}

/// Writes the step's row data (padded with rows of the spare slot up to `padded` rows), each
/// input's adapter slot (`adapters`, -1 for the base model; None: no adapter rows; the table's
/// slot in `LoraMode::Tiles`, with the tiles, the stacks' in `LoraMode::Stacks`), and applies
/// the block-table entries taken since the last step. An input with `picks[i]` (async
/// scheduling) takes its one token from the step before's pick of that logit row, still on the
/// device. Returns (rows, logit rows).
pub fn upload(b: &mut CudaBackend, inputs: &[StepInput<'_>], adapters: Option<(&[i32], LoraMode)>, padded: usize, new_blocks: &[(usize, u32)], picks: &[Option<i32>]) -> Result<(usize, usize), BackendError> {
    let s = &b.scratch;
    let (cap, lcap) = (s.rows, s.logit_rows);
    let mut data = vec![0i32; 4 * cap + lcap];
    data[3 * cap..4 * cap].fill(-1);
    let mut r = 0;
    let mut l = 0;
    let mut follows = Vec::new();
    for (k, inp) in inputs.iter().enumerate() {
        if let Some(&Some(pick)) = picks.get(k) {
            follows.extend([r as i32, pick]);
        }
        let slot = b.slots[&inp.seq] as i32;
        let start = b.tables.len(inp.seq) - inp.tokens.len();
        let adapter = adapters.map_or(-1, |(a, _)| a[k]);
        for (i, &t) in inp.tokens.iter().enumerate() {
            data[r] = t as i32;
            data[cap + r] = (start + i) as i32;
            data[2 * cap + r] = slot;
            data[3 * cap + r] = adapter;
            r += 1;
        }
        if inp.want_logits {
            data[4 * cap + l] = (r - 1) as i32;
            l += 1;
        }
    }
    // Padding rows: token 0 at position 0 of the spare slot, whose table points at the spare
    // block; they want logits like the rest of a decode step.
    let spare = b.spare_slot() as i32;
    while r < padded {
        data[2 * cap + r] = spare;
        data[4 * cap + l] = r as i32;
        r += 1;
        l += 1;
    }
    if let Some((_, LoraMode::Tiles)) = adapters {
        data.extend(lora::tiles(&data[3 * cap..3 * cap + r]));
    }
    let gpu = &b.gpu;
    let s = &mut b.scratch;
    gpu.write(&mut s.meta, &data)?;
    // The rows' sampling parameters: written when a row is sampled on the device, and once more
    // after that to switch them off. The whole buffer each time (8 KiB for 256 rows): a row past
    // this step's must not keep an earlier step's parameters for a later, larger step.
    let on = !b.sample_params.is_empty();
    if on || b.params_on {
        let mut bytes = std::mem::take(&mut b.sample_params);
        bytes.resize(s.params.len(), 0);
        gpu.write(&mut s.params, &bytes)?;
        b.params_on = on;
    }
    for chunk in new_blocks.chunks(s.updates) {
        let pairs: Vec<i32> = chunk.iter().flat_map(|&(i, blk)| [i as i32, blk as i32]).collect();
        gpu.write_at(&mut s.meta, 4 * cap + lcap + 1 + cap * lora::TILE_INTS, &pairs)?;
        let n = chunk.len() as i32;
        gpu.launch(&gpu.k.scatter_i32, ((chunk.len() as u32).div_ceil(256), 1), 256, &[&b.dev_tables.ptr, &s.at(Field::Updates), &n])?;
    }
    if !follows.is_empty() {
        // The step before's picks are still in `ids`: this step's own picks overwrite them later.
        let n = (follows.len() / 2) as i32;
        let at = (s.at(Field::Follows) - s.meta.ptr) as usize / 4;
        gpu.write_at(&mut s.meta, at, &follows)?;
        gpu.launch(&gpu.k.gather_ids, ((n as u32).div_ceil(256), 1), 256, &[&s.at(Field::Ids), &s.ids.ptr, &s.at(Field::Follows), &n])?;
    }
    Ok((r, l))
}

/// The stacked products' buffer of group `g` (o and down share one).
fn t_buf(s: &Scratch, g: Group) -> u64 {
    if g.first == lora::QKV.first {
        s.t_qkv.ptr
    } else if g.first == lora::GATE_UP.first {
        s.t_gu.ptr
    } else {
        s.t_x.ptr
    }
}

/// The product `y = W x` (`gemm`) of `r` rows, and with adapter rows the LoRA work of group
/// `g` of `layer` beside it on the side stream, for the product's
/// input (`x16` or `x32`, rows of `in_dim`):
/// - `LoraMode::Tiles`: `z` (rows of `z_stride`, the product's width) gets each adapter row's
///   update, which the product's reader adds; the rows come in the step's tiles (`lora::tiles`).
/// - `LoraMode::Stacks`: the stacked product `t = A x` of every row and stack slot (`t_buf`),
///   from which the product's reader adds each adapter row's `B t`.
///
/// Joins before it returns, so the next launches may overwrite the input.
#[allow(clippy::too_many_arguments)]
fn product(b: &CudaBackend, gemm: impl FnOnce() -> Result<(), BackendError>, g: Group, layer: usize, r: usize, mode: LoraMode, x16: u64, x32: u64, in_dim: usize, z: u64, z_stride: usize) -> Result<(), BackendError> {
    let (gpu, s) = (&b.gpu, &b.scratch);
    match mode {
        LoraMode::Off => return gemm(),
        LoraMode::Stacks => {
            let st = b.stacks.as_ref().expect("a step in LoraMode::Stacks has stacks");
            gpu.fork()?;
            gpu.gemm_side(b.w.dtype, st.a(layer, g), s.h.ptr, t_buf(s, g), r, st.size().t_cols(g), in_dim, false)?;
            gemm()?;
            return gpu.join();
        }
        LoraMode::Tiles => {}
    }
    let (layer, layers, m0) = (layer as i32, b.cfg.num_layers as i32, g.first as i32);
    let (table, tiles) = (b.lora.table.ptr, s.at(Field::Tiles));
    let (in_dim, z_stride) = (in_dim as i32, z_stride as i32);
    let (blocks, count) = (lora::tile_blocks(r) as u32, g.count as u32);
    let col_blocks = b.lora.widest(g).div_ceil(lora::THREADS as usize) as u32;
    let cb = col_blocks as i32;
    gpu.fork()?;
    gpu.launch_side(&gpu.k.lora_update, (blocks, count * col_blocks), lora::THREADS, &[&table, &layer, &layers, &m0, &tiles, &x16, &x32, &in_dim, &z, &z_stride, &cb])?;
    gemm()?;
    gpu.join()
}

/// Attention of the step's `r` rows in `layer` (queries in `q`, the cache written), into the
/// products' input buffer `h`; `wide`: blocks of 32 warps (a fused one-row step).
fn attend(b: &CudaBackend, layer: usize, r: usize, wide: bool) -> Result<(), BackendError> {
    let (gpu, s, cfg, c) = (&b.gpu, &b.scratch, &b.cfg, &b.cache[layer]);
    let (h16, h32p) = match b.w.dtype {
        Dtype::F16 => (s.h.ptr, 0u64),
        Dtype::F32 => (0u64, s.h.ptr),
    };
    let (nh32, nkv32, d32) = (cfg.num_heads as i32, cfg.num_kv_heads as i32, cfg.head_dim as i32);
    let (stride, block, scale) = (b.max_blocks as i32, super::BLOCK as i32, 1.0f32 / (cfg.head_dim as f32).sqrt());
    let kv32 = i32::from(b.w.dtype == Dtype::F32);
    let (pos, slot) = (s.at(Field::Pos), s.at(Field::Slot));
    gpu.launch(
        &gpu.k.attend,
        (cfg.num_heads as u32, r as u32),
        if wide { ATTEND_THREADS_ONE_ROW } else { ATTEND_THREADS },
        &[&s.q.ptr, &c.k.ptr, &c.v.ptr, &pos, &slot, &b.dev_tables.ptr, &stride, &h16, &h32p, &nh32, &nkv32, &d32, &block, &scale, &kv32],
    )
}

/// Launches the forward of `r` rows (data in place from `upload`), the logits of `l` rows and
/// their greedy picks or device draws; `mode`: how the step applies LoRA adapters. Launches only:
/// no copies, no waiting (it may be captured in a graph).
pub fn launches(b: &CudaBackend, r: usize, l: usize, mode: LoraMode) -> Result<(), BackendError> {
    let (gpu, w, s, cfg) = (&b.gpu, &b.w, &b.scratch, &b.cfg);
    let dtype = w.dtype;
    let (ids, pos, slot, logit_rows) = (s.at(Field::Ids), s.at(Field::Pos), s.at(Field::Slot), s.at(Field::LogitRows));
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
    let eps = cfg.rms_norm_eps as f32;
    let (r32, h32, stride) = (r as u32, h as i32, b.max_blocks as i32);
    let (h16, h32p) = match dtype {
        Dtype::F16 => (s.h.ptr, 0u64),
        Dtype::F32 => (0u64, s.h.ptr),
    };
    let embed = if dtype == Dtype::F16 { &gpu.k.embed_f16 } else { &gpu.k.embed_f32 };
    // The KV cache takes the compute dtype's width (f32 in the exact mode).
    let kv32 = i32::from(dtype == Dtype::F32);
    let (block, interleaved) = (super::BLOCK as i32, i32::from(cfg.rope_interleaved));
    let (nh32, nkv32, d32) = (nh as i32, nkv as i32, d as i32);
    let none = 0u64;
    // The LoRA updates' buffers for the products' readers (null: no tiled updates), each row's
    // adapter slot, and the readers' argument for the stacks' updates (null `t`: none).
    let on = |z: &Buf<f32>| if mode == LoraMode::Tiles { z.ptr } else { 0u64 };
    let (z_qkv, z_x, z_gu, row_slot) = (on(&s.z_qkv), on(&s.z_x), on(&s.z_gu), s.at(Field::Adapter));
    let stacked = |layer: usize, g: Group| match (mode, &b.stacks) {
        (LoraMode::Stacks, Some(st)) => st.arg(layer, g, t_buf(s, g), row_slot),
        _ => StackArg::default(),
    };
    // A one-row step without adapters folds the norms, SiLU and RoPE into its products.
    let fused = b.fused_row && r == 1 && mode == LoraMode::Off;
    gpu.launch(embed, (r32, 1), 256, &[&w.embed.w.ptr, &ids, &s.x.ptr, &h32])?;
    for (layer, lw) in w.layers.iter().enumerate() {
        if fused {
            fused_row::qkv(b, layer)?;
            attend(b, layer, r, true)?;
            fused_row::mlp(b, lw)?;
            continue;
        }
        let c = &b.cache[layer];
        let bias = lw.qkv.bias.as_ref().map_or(0, |b| b.ptr);
        // The update of the previous layer's down product joins the residual stream here.
        let (z_down, t_down) = if layer > 0 { (z_x, stacked(layer - 1, lora::DOWN)) } else { (0, StackArg::default()) };
        gpu.launch(&gpu.k.rms_norm, (r32, 1), 256, &[&s.x.ptr, &lw.attn_norm.ptr, &none, &h16, &h32p, &h32, &eps, &z_down, &row_slot, &t_down])?;
        let qkv = || gpu.gemm(dtype, lw.qkv.w.ptr, s.h.ptr, s.qkv.ptr, r, lw.qkv.n, h, false);
        product(b, qkv, lora::QKV, layer, r, mode, h16, h32p, h, z_qkv, lw.qkv.n)?;
        gpu.launch(
            &gpu.k.qkv_rope_store,
            (r32, (nh + cfg.num_kv_heads) as u32),
            ((d / 2).div_ceil(32) * 32) as u32,
            &[&s.qkv.ptr, &bias, &b.cos.ptr, &b.sin.ptr, &pos, &slot, &b.dev_tables.ptr, &stride, &s.q.ptr, &c.k.ptr, &c.v.ptr, &nh32, &nkv32, &d32, &block, &interleaved, &kv32, &z_qkv, &row_slot, &stacked(layer, lora::QKV)],
        )?;
        attend(b, layer, r, false)?;
        let inter = lw.gate_up.n / 2;
        let o = || gpu.gemm(dtype, lw.wo.w.ptr, s.h.ptr, s.x.ptr, r, h, nh * d, true);
        product(b, o, lora::O, layer, r, mode, h16, h32p, nh * d, z_x, h)?;
        gpu.launch(&gpu.k.rms_norm, (r32, 1), 256, &[&s.x.ptr, &lw.ffn_norm.ptr, &none, &h16, &h32p, &h32, &eps, &z_x, &row_slot, &stacked(layer, lora::O)])?;
        let gate_up = || gpu.gemm(dtype, lw.gate_up.w.ptr, s.h.ptr, s.gu.ptr, r, lw.gate_up.n, h, false);
        product(b, gate_up, lora::GATE_UP, layer, r, mode, h16, h32p, h, z_gu, lw.gate_up.n)?;
        gpu.launch(&gpu.k.silu_mul, (r32, inter.div_ceil(256) as u32), 256, &[&s.gu.ptr, &h16, &h32p, &(inter as i32), &z_gu, &row_slot, &stacked(layer, lora::GATE_UP)])?;
        let down = || gpu.gemm(dtype, lw.down.w.ptr, s.h.ptr, s.x.ptr, r, h, inter, true);
        product(b, down, lora::DOWN, layer, r, mode, h16, h32p, inter, z_x, h)?;
    }
    if l > 0 {
        let t_down = w.layers.len().checked_sub(1).map_or(StackArg::default(), |last| stacked(last, lora::DOWN));
        gpu.launch(&gpu.k.rms_norm, (l as u32, 1), 256, &[&s.x.ptr, &w.final_norm.ptr, &logit_rows, &h16, &h32p, &h32, &eps, &z_x, &row_slot, &t_down])?;
        let head = w.lm_head();
        gpu.gemm(dtype, head.w.ptr, s.h.ptr, s.logits.ptr, l, head.n, h, false)?;
        pick_tokens(gpu, s.logits.ptr, cfg.vocab_size, l, s.part_v.ptr, s.part_i.ptr, Some(s.params.ptr), s.ids.ptr)?;
    }
    Ok(())
}

/// The greedy picks of the first `n` logit rows of the last step (waits for the step).
pub fn greedy_ids(b: &CudaBackend, n: usize) -> Result<Vec<i32>, BackendError> {
    let mut out = vec![0i32; n];
    if n > 0 {
        b.gpu.read(&b.scratch.ids, 0, &mut out)?;
    } else {
        b.gpu.sync()?;
    }
    Ok(out)
}

/// Runs only the greedy pick and `sample_rows` on the given logit rows (any width), in buffers
/// of their own (tests of the sampling kernel against the host's distribution). Returns each
/// row's token.
pub fn sample_only(gpu: &Gpu, logits: &[Vec<f32>], params: &[u8]) -> Result<Vec<i32>, BackendError> {
    let n = logits.len();
    let width = logits.first().map_or(0, Vec::len);
    if n == 0 || logits.iter().any(|l| l.len() != width) || params.len() != n * PARAM_BYTES {
        return Err(BackendError::Compute("sample_only: rows of one width, each with its parameters".into()));
    }
    let flat: Vec<f32> = logits.concat();
    let (l, p, ids) = (gpu.upload(&flat)?, gpu.upload(params)?, gpu.zeros::<i32>(n)?);
    let (part_v, part_i) = (gpu.zeros::<f32>(n * ARGMAX_SLICES)?, gpu.zeros::<i32>(n * ARGMAX_SLICES)?);
    pick_tokens(gpu, l.ptr, width, n, part_v.ptr, part_i.ptr, Some(p.ptr), ids.ptr)?;
    let mut out = vec![0i32; n];
    gpu.read(&ids, 0, &mut out)?;
    Ok(out)
}
