//! The candle backend on CUDA (`backend = "candle"`, `device = "cuda:N"`, built with
//! `--features cuda`): the model's weights, KV cache and step on one GPU.
//!
//! - Weights: read by the CPU loaders (GGUF of any quant type the CPU path serves, safetensors),
//!   dequantized once and uploaded in the compute dtype (`weights.rs`); every projection is one
//!   cuBLAS product with f32 accumulation.
//! - KV cache: f16 (f32 in the exact f32 mode), paged in blocks of [`BLOCK`] positions with a block table per sequence
//!   (`paged::BlockTables`), sized from `gpu_memory_fraction` of the device's memory; the engine
//!   admits and preempts by its free blocks.
//! - Step (`forward.rs`): all rows of all sequences through each layer together; RoPE and the
//!   cache write in one kernel; attention in one launch per layer for every row (decode and
//!   prompt rows alike, each reading its own sequence's blocks up to its position).
//! - Sampling: greedy rows are picked on the device (only their token ids cross to the host);
//!   other rows' logits are copied and sampled by the engine's sampler.
mod forward;
pub mod gpu;
mod weights;

use std::collections::HashSet;
use std::path::Path;

use self::gpu::{Buf, Dtype, Gpu};
use self::weights::DevWeights;
use super::candle::attention::RopeTable;
use super::candle::ModelConfig;
use super::paged::BlockTables;
use super::{Backend, BackendError, KvCapacity, SampleSpec, Sampled, SeqId, StepInput};
use crate::model::WeightsFormat;

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
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self { ordinal: 0, max_context: None, gpu_memory_fraction: 0.9, dtype: Dtype::F16, max_kv_blocks: None }
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
    max_context: usize,
    scratch: forward::Scratch,
}

fn load_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Load(e.to_string())
}

impl CudaBackend {
    pub fn load(weights: &WeightsFormat, opts: &CudaOptions) -> Result<CudaBackend, BackendError> {
        let gpu = Gpu::open(opts.ordinal)?;
        let cpu = candle_core::Device::Cpu;
        let (cfg, w) = match weights {
            WeightsFormat::Gguf(path) => super::candle::weights::load_gguf(path, &cpu)?,
            WeightsFormat::Safetensors { dir } => super::candle::weights::load_safetensors(dir, &cpu)?,
            WeightsFormat::Onnx { dir } => return Err(onnx_dir(dir)),
        };
        let d = cfg.head_dim;
        if d > 128 || d % 2 != 0 {
            return Err(load_err(format!("head size {d}: the CUDA attention kernel takes even head sizes up to 128")));
        }
        let mut max_context = opts.max_context.map_or(cfg.context_length, |n| n.min(cfg.context_length));
        let (free0, total) = gpu.memory()?;
        let dw = DevWeights::upload(&w, cfg.tie_word_embeddings, opts.dtype, &gpu)?;
        drop(w);
        let rope = RopeTable::new(d, cfg.rope_theta, max_context, cfg.rope_interleaved);
        let (cos, sin) = rope.tables();
        let (cos, sin) = (gpu.upload(cos)?, gpu.upload(sin)?);
        let inter = dw.layers.first().map_or(0, |l| l.gate_up.n / 2);
        let scratch = forward::Scratch::new(&gpu, &cfg, opts.dtype, inter, 256, 64)?;
        // The KV cache takes what the fraction leaves after everything else this process holds
        // and what other processes already held when it started.
        let (free, _) = gpu.memory()?;
        let budget = (total as f64 * opts.gpu_memory_fraction) as usize;
        let used_before = total - free0;
        let used_now = total - free;
        let kv_bytes = budget.saturating_sub(used_now.max(used_before));
        let kv_dim = cfg.num_kv_heads * d;
        let block_bytes = 2 * cfg.num_layers * BLOCK * kv_dim * opts.dtype.bytes();
        let mut blocks = kv_bytes / block_bytes;
        if let Some(cap) = opts.max_kv_blocks.filter(|&c| c < blocks) {
            blocks = cap;
            max_context = max_context.min(cap * BLOCK);
        }
        let need = max_context.div_ceil(BLOCK);
        if blocks < need {
            return Err(load_err(format!(
                "cuda:{}: the KV cache gets {} MiB ({blocks} blocks of {BLOCK} positions) after {} MiB of weights, but one sequence of the \
                 context length {max_context} needs {need} blocks ({} MiB); raise gpu_memory_fraction ({}) or lower context_length",
                opts.ordinal,
                kv_bytes >> 20,
                dw.bytes() >> 20,
                (need * block_bytes) >> 20,
                opts.gpu_memory_fraction
            )));
        }
        let cache = (0..cfg.num_layers)
            .map(|_| {
                let bytes = blocks * BLOCK * kv_dim * opts.dtype.bytes();
                Ok(LayerCache { k: gpu.zeros(bytes)?, v: gpu.zeros(bytes)? })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        tracing::info!(
            device = %gpu.name(), ordinal = opts.ordinal, dtype = ?opts.dtype, weights_mib = dw.bytes() >> 20,
            kv_blocks = blocks, kv_cache_mib = (blocks * block_bytes) >> 20, max_context, "CUDA backend ready"
        );
        Ok(CudaBackend { gpu, cfg, w: dw, cos, sin, cache, tables: BlockTables::new(BLOCK, blocks), max_context, scratch })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Rejects a step before it touches any cache.
    fn check(&self, inputs: &[StepInput<'_>]) -> Result<(), BackendError> {
        let mut seen = HashSet::with_capacity(inputs.len());
        let vocab = self.cfg.vocab_size;
        for inp in inputs {
            if inp.adapter.is_some() {
                return Err(BackendError::Compute("LoRA adapters are not applied on CUDA yet".into()));
            }
            if !seen.insert(inp.seq) {
                return Err(BackendError::Compute(format!("sequence {} appears twice in one step", inp.seq)));
            }
            if inp.tokens.is_empty() {
                return Err(BackendError::Compute(format!("sequence {} has no tokens", inp.seq)));
            }
            if let Some(t) = inp.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(BackendError::Compute(format!("token id {t} is outside the vocabulary of {vocab}")));
            }
            if self.tables.len(inp.seq) + inp.tokens.len() > self.max_context {
                return Err(BackendError::ContextFull { seq: inp.seq, max: self.max_context });
            }
        }
        let growths: Vec<(SeqId, usize)> = inputs.iter().map(|i| (i.seq, i.tokens.len())).collect();
        match self.tables.first_misfit(&growths) {
            Some(seq) => Err(BackendError::KvFull { seq }),
            None => Ok(()),
        }
    }

    /// Runs the step on the device; the logits of the rows that want them stay there
    /// (`scratch.logits`, one row per such input, in order).
    fn run(&mut self, inputs: &[StepInput<'_>]) -> Result<(), BackendError> {
        self.check(inputs)?;
        let taken: Vec<Vec<u32>> = inputs.iter().map(|i| self.tables.grow(i.seq, i.tokens.len())).collect();
        let r = forward::forward(self, inputs);
        if r.is_err() {
            for (i, t) in inputs.iter().zip(&taken) {
                self.tables.undo_grow(i.seq, i.tokens.len(), t);
            }
        }
        r
    }
}

fn onnx_dir(dir: &Path) -> BackendError {
    load_err(format!("{} is an ONNX model directory (genai_config.json); serve it with backend = \"onnx\"", dir.display()))
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
        self.run(inputs)?;
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
        self.run(inputs)?;
        let vocab = self.cfg.vocab_size;
        let greedy_ids = forward::argmax(self, inputs.iter().filter(|i| i.want_logits).count())?;
        let mut out = Vec::with_capacity(inputs.len());
        let mut k = 0;
        for (inp, spec) in inputs.iter().zip(samples) {
            let Some(spec) = spec.filter(|_| inp.want_logits) else {
                out.push(None);
                continue;
            };
            let p = spec.params;
            let plain_greedy = p.temperature <= 0.0 && spec.logprobs.is_none() && p.logit_bias.is_empty() && p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0;
            out.push(Some(if plain_greedy {
                Sampled { token: greedy_ids[k] as u32, logprobs: None }
            } else {
                let mut l = vec![0f32; vocab];
                self.gpu.read(&self.scratch.logits, k * vocab, &mut l)?;
                crate::engine::sampler::sample(l, &spec)
            }));
            k += 1;
        }
        Ok(out)
    }

    fn release(&mut self, seq: SeqId) {
        self.tables.release(seq);
    }

    fn kv_capacity(&self) -> Option<KvCapacity> {
        Some(self.tables.capacity())
    }
}
