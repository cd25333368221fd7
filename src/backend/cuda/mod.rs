//! The candle backend on CUDA (`backend = "candle"`, `device = "cuda:N"`, built with
//! `--features cuda`): the model's weights, KV cache and step on one GPU.
//!
//! - Weights: read by the CPU loaders (GGUF of any quant type the CPU path serves, safetensors),
//!   dequantized once and uploaded in the compute dtype (`load.rs`, `weights.rs`); every
//!   projection is one cuBLAS product with f32 accumulation.
//! - KV cache: f16 (f32 in the exact f32 mode), paged in blocks of [`BLOCK`] positions with a block table per sequence
//!   (`paged::BlockTables`), sized from `gpu_memory_fraction` of the device's memory; the engine
//!   admits and preempts by its free blocks. Prefix caching shares full blocks between sequences
//!   whose prompts start with the same tokens (same adapter), and keeps them after their
//!   sequences end until the room is needed.
//! - Step (`forward.rs`): all rows of all sequences through each layer together; RoPE and the
//!   cache write in one kernel; attention in one launch per layer for every row (decode and
//!   prompt rows alike, each reading its own sequence's blocks up to its position). A decode
//!   step (one token per row) of R rows, R padded to a power of two, replays a CUDA graph
//!   captured the second time that R is seen (`INFERD_CUDA_GRAPHS=0` turns them off).
//! - LoRA: base-model rows and rows of many adapters in one step, each row's update gathered by
//!   its adapter (`lora.rs`, SGMV); adapters are uploaded when a step first uses them. With
//!   stacks (`CudaOptions::lora_stack`, `lora_stack.rs`), a step whose adapters fit them takes a
//!   cuBLAS product of the stacked A beside each base product instead, its readers adding `B t`.
//! - Sampling: greedy rows are picked on the device, and so are drawing rows (temperature, top-k,
//!   top-p, min-p, the sequence's seed) without logprobs, penalties, bias or a grammar: only their
//!   token ids cross to the host (`gpu_sampling`, `sample_rows` in `kernels.cu`). Other rows'
//!   logits are copied and sampled by the engine's sampler.
mod forward;
mod fused_row;
pub mod gpu;
mod load;
mod pipeline;
pub mod logit_sampler;
mod lora;
pub mod lora_stack;
mod weights;

use std::collections::{HashMap, HashSet};

use self::forward::LoraMode;
use self::gpu::{Buf, Dtype, Gpu, Graph};
use self::lora::DevLora;
use self::lora_stack::{LoraStacks, StackSize};
use self::weights::DevWeights;
use super::candle::ModelConfig;
use super::gpu_sampling::{self, Route};
use super::paged::BlockTables;
use super::{Backend, BackendError, KvCapacity, SampleSpec, Sampled, SeqId, StepInput};

/// Positions per KV block.
pub const BLOCK: usize = 16;

/// How the backend is set up.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    pub ordinal: usize,
    /// Most tokens one sequence may hold (None: the model's own).
    pub max_context: Option<usize>,
    /// The fraction of the device's memory this process may fill (weights, buffers, KV cache).
    pub gpu_memory_fraction: f64,
    pub dtype: Dtype,
    /// At most this many KV blocks (tests of a full cache); the context length shrinks to fit.
    pub max_kv_blocks: Option<usize>,
    /// Most sequences holding a cache at once (the engine's `max_batch`).
    pub max_slots: usize,
    /// Replay decode steps from CUDA graphs.
    pub graphs: bool,
    /// Keep full KV blocks for reuse by later prompts that start with the same tokens
    /// (`paged::BlockTables`; idle cached blocks are taken back when the cache runs short).
    pub prefix_caching: bool,
    /// Async scheduling: the engine launches step N+1 before it collects step N's tokens
    /// (`pipeline.rs`). Off by default here; the server turns it on (`ModelConfig::cuda_pipeline`).
    pub pipeline: bool,
    /// Stacked LoRA weights (`lora_stack.rs`) of this size; None: adapters always take the tiled
    /// kernel (`lora.rs`). Default from `INFERD_LORA_STACK` ("4x16"; unset: none).
    pub lora_stack: Option<StackSize>,
    /// One-row steps without adapter rows through `gemv_row` and `gemv_qkv_rope` (gemv_row.cuh),
    /// which fold RMSNorm, SiLU, RoPE and the cache write into the products: five launches a
    /// layer instead of nine (f16 only). Default from `INFERD_CUDA_FUSED_ROW=1` (unset: off).
    pub fused_row: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self { ordinal: 0, max_context: None, gpu_memory_fraction: 0.9, dtype: Dtype::F16, max_kv_blocks: None, max_slots: 256, graphs: graphs_from_env(), prefix_caching: true, pipeline: false, lora_stack: StackSize::from_env(), fused_row: fused_row_from_env() }
    }
}

/// The per-layer KV cache: keys and values, [blocks, BLOCK, kv_dim] each, in the compute dtype.
struct LayerCache {
    k: Buf<u8>,
    v: Buf<u8>,
}

pub struct CudaBackend {
    gpu: Gpu,
    cfg: ModelConfig,
    w: DevWeights,
    cos: Buf<f32>,
    sin: Buf<f32>,
    cache: Vec<LayerCache>,
    tables: BlockTables,
    /// Bytes of one KV block over all layers (keys and values).
    block_bytes: usize,
    max_context: usize,
    scratch: forward::Scratch,
    /// Each live sequence's row of `dev_tables`.
    slots: HashMap<SeqId, u32>,
    free_slots: Vec<u32>,
    max_slots: usize,
    /// Block tables on the device, [max_slots + 1, max_blocks]; the last row (the spare slot of
    /// padding rows) points at the spare block, which no sequence owns.
    dev_tables: Buf<i32>,
    max_blocks: usize,
    /// Decode graphs by (row count, how the step applies adapters), and those run once without
    /// a graph.
    graphs: HashMap<(usize, LoraMode), Graph>,
    seen: HashSet<(usize, LoraMode)>,
    /// Sizes whose capture failed: they run as plain launches.
    ungraphed: HashSet<(usize, LoraMode)>,
    /// The LoRA adapters on the device.
    lora: DevLora,
    /// The stacked adapters (`CudaOptions::lora_stack`).
    stacks: Option<LoraStacks>,
    /// Steps with adapter rows that took the stacks, and the tiled kernel (tests).
    lora_steps: (u64, u64),
    /// One-row steps through `gemv_row` (`CudaOptions::fused_row`, when the model's sizes allow).
    fused_row: bool,
    lora_dims: crate::lora::BaseDims,
    use_graphs: bool,
    /// Sample drawing rows on the device (`INFERD_CUDA_DEVICE_SAMPLING`).
    device_sampling: bool,
    /// The next step's sampling parameters per logit row (empty: every row off).
    sample_params: Vec<u8>,
    /// Whether the device's parameter buffer holds a row that is on.
    params_on: bool,
    /// Async scheduling (`CudaOptions::pipeline`): the steps launched and not collected.
    pipeline: Option<pipeline::Pipeline>,
}

/// `INFERD_CUDA_FUSED_ROW=1` sends one-row steps through the fused one-row products (A/B runs).
pub fn fused_row_from_env() -> bool {
    std::env::var("INFERD_CUDA_FUSED_ROW").is_ok_and(|v| v == "1")
}

/// `INFERD_CUDA_GRAPHS=0` turns the decode graphs off (A/B runs).
pub fn graphs_from_env() -> bool {
    std::env::var("INFERD_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

impl CudaBackend {
    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Rejects a step before it touches any cache.
    fn check(&self, inputs: &[StepInput<'_>]) -> Result<(), BackendError> {
        super::check_rows(inputs, self.cfg.vocab_size, self.max_context, |seq| self.tables.len(seq), |a| super::adapter_fits(a, &self.lora_dims))?;
        let growths: Vec<(SeqId, usize)> = inputs.iter().map(|i| (i.seq, i.tokens.len())).collect();
        if let Some(seq) = self.tables.first_misfit(&growths) {
            return Err(BackendError::KvFull { seq });
        }
        let new: Vec<SeqId> = inputs.iter().filter(|i| !self.slots.contains_key(&i.seq)).map(|i| i.seq).collect();
        if new.len() > self.free_slots.len() {
            return Err(BackendError::Compute(format!(
                "more than {} sequences hold a KV cache at once (max_batch)",
                self.max_slots
            )));
        }
        Ok(())
    }

    fn spare_slot(&self) -> usize {
        self.max_slots
    }

    /// Runs the step on the device: the logits of the rows that want them end in
    /// `scratch.logits` (one row per such input, in order) and their greedy picks beside them.
    /// `graph`: a decode step may replay a captured graph. An input with `picks[i]` (async
    /// scheduling) feeds the step before's pick of that logit row, read on the device; its
    /// token goes into the block tables once the host knows it (`pipeline::collect`). Returns the
    /// logit rows written.
    fn run(&mut self, inputs: &[StepInput<'_>], graph: bool, picks: &[Option<i32>]) -> Result<usize, BackendError> {
        self.check(inputs)?;
        // A step whose adapters fit the stacks takes them; the others (and steps without adapter
        // rows, where the tiled kernel's table lets go of adapters no request holds) go through
        // the tiled kernel's table, so an adapter is on the device once per way it is used.
        let stacked = match &mut self.stacks {
            Some(st) if inputs.iter().any(|i| i.adapter.is_some()) => st.rows(&self.gpu, inputs)?,
            _ => None,
        };
        let adapters = match stacked {
            Some(rows) => Some((rows, LoraMode::Stacks)),
            None => self.lora.row_slots(&self.gpu, inputs)?.map(|rows| (rows, LoraMode::Tiles)),
        };
        let mut assigned = HashSet::new();
        for i in inputs {
            if !self.slots.contains_key(&i.seq) {
                let slot = self.free_slots.pop().expect("counted in check()");
                self.slots.insert(i.seq, slot);
                assigned.insert(i.seq);
            }
        }
        let mut taken = Vec::with_capacity(inputs.len());
        let mut new_blocks = Vec::new();
        for i in inputs {
            let held = self.tables.table(i.seq).len();
            let row = self.slots[&i.seq] as usize * self.max_blocks;
            if assigned.contains(&i.seq) {
                // A new slot's row: the blocks it starts with (a reused prefix's) first.
                new_blocks.extend(self.tables.table(i.seq).iter().enumerate().map(|(k, &blk)| (row + k, blk)));
            }
            let t = self.tables.grow(i.seq, i.tokens.len());
            new_blocks.extend(t.iter().enumerate().map(|(k, &blk)| (row + held + k, blk)));
            taken.push(t);
        }
        let r = self.forward(inputs, adapters.as_ref().map(|(rows, mode)| (rows.as_slice(), *mode)), graph, &new_blocks, picks);
        if r.is_ok() {
            match adapters {
                Some((_, LoraMode::Stacks)) => self.lora_steps.0 += 1,
                Some(_) => self.lora_steps.1 += 1,
                None => {}
            }
            for (k, i) in inputs.iter().enumerate() {
                if picks.get(k).is_none_or(Option::is_none) {
                    self.tables.record(i.seq, i.tokens, i.adapter.map_or(0, |a| a.id));
                }
            }
        } else {
            for (i, t) in inputs.iter().zip(&taken) {
                self.tables.undo_grow(i.seq, i.tokens.len(), t);
            }
            for seq in assigned {
                self.release_slot(seq);
            }
        }
        r
    }

    fn forward(&mut self, inputs: &[StepInput<'_>], adapters: Option<(&[i32], LoraMode)>, graph: bool, new_blocks: &[(usize, u32)], picks: &[Option<i32>]) -> Result<usize, BackendError> {
        let rows: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let logit_rows = inputs.iter().filter(|i| i.want_logits).count();
        if rows > self.scratch.rows || logit_rows > self.scratch.logit_rows {
            let inter = self.w.layers.first().map_or(0, |l| l.gate_up.n / 2);
            // A step in flight (async scheduling) may still read the buffers dropped here.
            self.gpu.sync()?;
            self.graphs.clear();
            self.seen.clear();
            self.ungraphed.clear();
            self.params_on = false;
            let stacks = self.stacks.as_ref().map(LoraStacks::size);
            self.scratch = forward::Scratch::new(&self.gpu, &self.cfg, self.w.dtype, inter, rows.next_power_of_two(), self.scratch.logit_rows.max(logit_rows), stacks)?;
        }
        let decode = graph && self.use_graphs && inputs.iter().all(|i| i.tokens.len() == 1 && i.want_logits);
        let padded = rows.next_power_of_two();
        let lora = adapters.map_or(LoraMode::Off, |(_, mode)| mode);
        if !decode || padded > self.scratch.logit_rows {
            let (r, l) = forward::upload(self, inputs, adapters, rows, new_blocks, picks)?;
            forward::launches(self, r, l, lora)?;
            return Ok(l);
        }
        let (r, l) = forward::upload(self, inputs, adapters, padded, new_blocks, picks)?;
        if let Some(g) = self.graphs.get(&(r, lora)) {
            self.gpu.replay(g)?;
        } else if self.seen.insert((r, lora)) {
            // The first step of this size runs as launches (cuBLAS settles its kernels), the
            // second captures them.
            forward::launches(self, r, l, lora)?;
        } else if self.ungraphed.contains(&(r, lora)) {
            forward::launches(self, r, l, lora)?;
        } else {
            match self.gpu.capture(|| forward::launches(self, r, l, lora)) {
                Ok(g) => {
                    self.gpu.replay(&g)?;
                    tracing::debug!(rows = r, lora = ?lora, "captured a decode graph");
                    self.graphs.insert((r, lora), g);
                }
                // A graph that cannot be made (its instantiation needs device memory, which
                // another process on the GPU may have taken) costs speed, not the step: the
                // captured launches did not run, so they run now, and this size stays ungraphed.
                Err(e) => {
                    tracing::warn!(rows = r, lora = ?lora, error = %e, "cannot capture a decode graph; this batch size runs as plain launches");
                    self.ungraphed.insert((r, lora));
                    forward::launches(self, r, l, lora)?;
                }
            }
        }
        Ok(l)
    }

    /// The device sampler alone on given logit rows, each with its parameters and uniform
    /// (tests compare it with the host's distribution; see `gpu_sampling::reference_draw`).
    #[doc(hidden)]
    pub fn sample_on_device(&self, logits: &[Vec<f32>], rows: &[(crate::engine::request::SamplingParams, f64)]) -> Result<Vec<u32>, BackendError> {
        let mut params = Vec::new();
        for (p, u) in rows {
            gpu_sampling::push_params(&mut params, Some((p, *u)));
        }
        Ok(forward::sample_only(&self.gpu, logits, &params)?.into_iter().map(|t| t as u32).collect())
    }

    /// LoRA adapters in the tiled kernel's table now (tests of their eviction; the stacks hold
    /// their own, at most `StackSize::slots`).
    #[doc(hidden)]
    pub fn resident_adapters(&self) -> usize {
        self.lora.resident()
    }

    /// Whether one-row steps take the fused products (`CudaOptions::fused_row`, when the
    /// model suits them).
    pub fn fused_row(&self) -> bool {
        self.fused_row
    }

    /// Steps with adapter rows so far: (through the stacks, through the tiled kernel) (tests).
    #[doc(hidden)]
    pub fn lora_steps(&self) -> (u64, u64) {
        self.lora_steps
    }

    /// Where each row is sampled (None: it wants no token), with the device rows' parameters
    /// set for the next step.
    fn sampling_routes(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>]) -> Vec<Option<Route>> {
        let routes: Vec<Option<Route>> = inputs.iter().zip(samples).map(|(inp, spec)| spec.as_ref().filter(|_| inp.want_logits).map(|s| gpu_sampling::route(s, self.device_sampling))).collect();
        self.sample_params.clear();
        if routes.contains(&Some(Route::Device)) {
            for ((inp, spec), route) in inputs.iter().zip(samples).zip(&routes) {
                if inp.want_logits {
                    let row = spec.as_ref().filter(|_| *route == Some(Route::Device)).map(|s| (s.params, s.uniform.unwrap_or(0.0)));
                    gpu_sampling::push_params(&mut self.sample_params, row);
                }
            }
        }
        routes
    }

    fn release_slot(&mut self, seq: SeqId) {
        if let Some(slot) = self.slots.remove(&seq) {
            self.free_slots.push(slot);
        }
    }
}

impl Drop for CudaBackend {
    /// Waits for the stream, then destroys the captured graphs while the kernels' module and
    /// cuBLAS (fields of `gpu`, dropped first by declaration order) are still loaded: a graph
    /// destroyed after the module that holds its kernels is unloaded is undefined behaviour. (A
    /// test executable once died with SIGSEGV at exit after all its tests passed; not shown to
    /// be this.)
    fn drop(&mut self) {
        let _ = self.gpu.sync();
        self.graphs.clear();
    }
}

impl Backend for CudaBackend {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.sample_params.clear();
        self.run(inputs, false, &[])?;
        self.gpu.sync()?;
        let vocab = self.cfg.vocab_size;
        let mut k = 0;
        let mut out = Vec::with_capacity(inputs.len());
        for inp in inputs {
            if inp.want_logits {
                let mut l = vec![0f32; vocab];
                self.gpu.read(&self.scratch.logits, k * vocab, &mut l)?;
                out.push(Some(l));
                k += 1;
            } else {
                out.push(None);
            }
        }
        Ok(out)
    }

    fn step_and_sample(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>]) -> Result<Vec<Option<Sampled>>, BackendError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let routes = self.sampling_routes(inputs, samples);
        self.run(inputs, true, &[])?;
        let vocab = self.cfg.vocab_size;
        let ids = forward::greedy_ids(self, inputs.iter().filter(|i| i.want_logits).count())?;
        let mut out = Vec::with_capacity(inputs.len());
        let mut k = 0;
        for ((inp, spec), route) in inputs.iter().zip(samples).zip(routes) {
            if !inp.want_logits {
                out.push(None);
                continue;
            }
            out.push(match (spec, route) {
                (Some(spec), Some(Route::Host)) => {
                    let mut l = vec![0f32; vocab];
                    self.gpu.read(&self.scratch.logits, k * vocab, &mut l)?;
                    Some(crate::engine::sampler::sample(l, spec))
                }
                (Some(_), Some(_)) => Some(Sampled { token: ids[k] as u32, logprobs: None }),
                _ => None,
            });
            k += 1;
        }
        Ok(out)
    }

    fn pipelines(&self) -> bool {
        self.pipeline.is_some()
    }

    fn launch(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>], follows: &[bool]) -> Result<(), BackendError> {
        self.launch_step(inputs, samples, follows)
    }

    fn collect(&mut self) -> Result<Vec<Option<Sampled>>, BackendError> {
        self.collect_step()
    }

    fn release(&mut self, seq: SeqId) {
        self.tables.release(seq);
        self.release_slot(seq);
    }

    fn kv_capacity(&self) -> Option<KvCapacity> {
        Some(self.tables.capacity())
    }

    fn lora_dims(&self) -> Option<crate::lora::BaseDims> {
        Some(self.lora_dims)
    }

    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32], adapter: Option<&std::sync::Arc<crate::lora::LoraAdapter>>) -> usize {
        if self.slots.contains_key(&seq) {
            return 0;
        }
        self.tables.reuse(seq, tokens, adapter.map_or(0, |a| a.id))
    }

    fn prefix_cache_bytes(&self) -> usize {
        self.tables.idle_cached_blocks() * self.block_bytes
    }
}
