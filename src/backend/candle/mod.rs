//! Candle backend: the project's own batched forward for `llama` and `qwen2` (GGUF, safetensors).
//!
//! `CandleBackend` owns the weights and one KV cache per live sequence. Each `step` runs all
//! inputs' tokens through the model together (see `model.rs`); caches are created on a
//! sequence's first step and freed by `release`.
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub(crate) mod attention_avx2;
pub mod config;
pub mod dense;
pub mod kv_cache;
pub mod linear;
pub mod lora;
pub mod model;
pub mod pool;
pub mod prefix;
pub mod profile;
pub mod qmatmul;
pub mod weights;

use std::collections::HashMap;

use candle_core::Device;

use self::kv_cache::SeqCache;
use self::model::{SeqWork, Transformer};
use crate::backend::{Backend, BackendError, KvCapacity, SeqId, StepInput};
use crate::model::WeightsFormat;

pub use self::config::{Arch, ModelConfig};

/// A model loaded with candle, serving many sequences with batched steps.
pub struct CandleBackend {
    model: Transformer,
    caches: HashMap<SeqId, SeqCache>,
    max_context: usize,
    /// Most KV blocks of [`KV_BLOCK`] positions all caches may hold together (None: unbounded).
    kv_blocks: Option<usize>,
    /// The adapter (load id) each live sequence's cache was computed with.
    adapter_of: HashMap<SeqId, Option<u64>>,
    /// Finished sequences' caches kept for prefix reuse.
    kept: prefix::PrefixStore,
}

/// Bytes of finished sequences' KV caches kept for prefix reuse, by default.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 512 << 20;

/// Positions per KV block in the accounting of a bounded cache (`set_kv_cache_bytes`).
pub const KV_BLOCK: usize = 16;

impl CandleBackend {
    /// Loads `weights` on `device`. `max_context` caps the per-sequence context length (None = the
    /// model's own, from GGUF metadata or config.json).
    pub fn load(
        weights: &WeightsFormat,
        device: &Device,
        max_context: Option<usize>,
    ) -> Result<CandleBackend, BackendError> {
        if !device.is_cpu() {
            return Err(BackendError::Load(
                "the candle backend's attention runs on the CPU only for now".into(),
            ));
        }
        let (cfg, w) = match weights {
            WeightsFormat::Gguf(path) => weights::load_gguf(path, device)?,
            WeightsFormat::Safetensors { dir } => weights::load_safetensors(dir, device)?,
            WeightsFormat::Onnx { dir } => {
                return Err(BackendError::Load(format!(
                    "{} is an ONNX model directory (genai_config.json); serve it with backend = \"onnx\"",
                    dir.display()
                )))
            }
        };
        let max_context = match max_context {
            Some(n) => n.min(cfg.context_length),
            None => cfg.context_length,
        };
        if max_context == 0 {
            return Err(BackendError::Load("max_context must be at least 1".into()));
        }
        Ok(Self {
            model: Transformer::new(cfg, w, max_context, device.clone()),
            caches: HashMap::new(),
            max_context,
            kv_blocks: None,
            adapter_of: HashMap::new(),
            kept: prefix::PrefixStore::new(DEFAULT_PREFIX_CACHE_BYTES),
        })
    }

    /// Bounds the finished sequences' caches kept for prefix reuse to `bytes` (0: none kept).
    pub fn set_prefix_cache_bytes(&mut self, bytes: usize) {
        self.kept = prefix::PrefixStore::new(bytes);
    }

    /// Bytes one cached position takes (keys and values of every layer, f32).
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.model.cfg.num_layers * self.model.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Bounds all sequences' KV caches together to `bytes` (None: unbounded). The engine then
    /// admits and preempts by the room left ([`Backend::kv_capacity`]). Refused when the bound
    /// cannot hold one block.
    pub fn set_kv_cache_bytes(&mut self, bytes: Option<usize>) -> Result<(), BackendError> {
        self.kv_blocks = match bytes {
            None => None,
            Some(b) => {
                let block = KV_BLOCK * self.kv_bytes_per_position();
                match b / block {
                    0 => return Err(BackendError::Load(format!("a KV cache of {b} bytes cannot hold one block of {KV_BLOCK} positions ({block} bytes)"))),
                    n => Some(n),
                }
            }
        };
        Ok(())
    }

    /// KV blocks all live sequences hold.
    fn kv_blocks_used(&self) -> usize {
        self.caches.values().map(|c| c.len.div_ceil(KV_BLOCK)).sum()
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    /// Number of positions cached for `seq` (0 for unknown sequences).
    pub fn cached_len(&self, seq: SeqId) -> usize {
        self.caches.get(&seq).map_or(0, |c| c.len)
    }

    fn lora_base(&self) -> crate::lora::BaseDims {
        self.model.cfg.lora_dims(self.model.intermediate_size(), None)
    }

    /// Rejects a step before it touches any cache.
    fn check(&self, inputs: &[StepInput<'_>]) -> Result<(), BackendError> {
        let dims = self.lora_base();
        super::check_rows(inputs, self.model.cfg.vocab_size, self.max_context, |seq| self.cached_len(seq), |a| super::adapter_fits(a, &dims))?;
        if let Some(total) = self.kv_blocks {
            let mut free = total.saturating_sub(self.kv_blocks_used());
            for inp in inputs {
                let len = self.cached_len(inp.seq);
                let need = (len + inp.tokens.len()).div_ceil(KV_BLOCK) - len.div_ceil(KV_BLOCK);
                free = free.checked_sub(need).ok_or(BackendError::KvFull { seq: inp.seq })?;
            }
        }
        Ok(())
    }
}

impl Backend for CandleBackend {
    fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.check(inputs)?;
        let (layers, kv_dim) = (self.model.cfg.num_layers, self.model.kv_dim());
        let mut taken: Vec<SeqCache> = inputs
            .iter()
            .map(|inp| {
                let mut c = self
                    .caches
                    .remove(&inp.seq)
                    .unwrap_or_else(|| SeqCache::new(layers, kv_dim, self.max_context));
                c.reserve(inp.tokens.len(), kv_dim, self.max_context);
                c
            })
            .collect();
        let old_lens: Vec<usize> = taken.iter().map(|c| c.len).collect();
        let result = {
            let mut work: Vec<SeqWork<'_>> = taken
                .iter_mut()
                .zip(inputs)
                .map(|(cache, inp)| SeqWork {
                    cache,
                    tokens: inp.tokens,
                    want_logits: inp.want_logits,
                    adapter: inp.adapter.map(|a| &**a),
                })
                .collect();
            self.model.forward(&mut work)
        };
        let failed = result.is_err();
        for ((mut cache, inp), old) in taken.into_iter().zip(inputs).zip(old_lens) {
            if failed {
                cache.truncate(old, kv_dim);
            } else {
                cache.tokens.extend_from_slice(inp.tokens);
                self.adapter_of.insert(inp.seq, inp.adapter.map(|a| a.id));
            }
            self.caches.insert(inp.seq, cache);
        }
        result.map_err(|e| BackendError::Compute(e.to_string()))
    }

    fn release(&mut self, seq: SeqId) {
        let adapter = self.adapter_of.remove(&seq).flatten();
        if let Some(cache) = self.caches.remove(&seq) {
            let per = self.kv_bytes_per_position();
            self.kept.keep(adapter, cache, per);
        }
    }

    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32], adapter: Option<&std::sync::Arc<crate::lora::LoraAdapter>>) -> usize {
        if !self.kept.enabled() || self.caches.contains_key(&seq) || tokens.len() < 2 {
            return 0;
        }
        let want = adapter.map(|a| a.id);
        let limit = tokens.len() - 1;
        let live = self
            .caches
            .iter()
            .filter(|(s, _)| self.adapter_of.get(s).copied().flatten() == want)
            .map(|(_, c)| (prefix::common_prefix(&c.tokens, tokens).min(c.len), c))
            .max_by_key(|(n, _)| *n);
        let Some((n, source)) = prefix::choose(live, self.kept.best(tokens, want), limit) else { return 0 };
        // A bounded cache must have room for the copied positions.
        if let Some(total) = self.kv_blocks {
            if self.kv_blocks_used() + n.div_ceil(KV_BLOCK) > total {
                return 0;
            }
        }
        let kv_dim = self.model.kv_dim();
        let cache = match source {
            prefix::Source::Live(c) => SeqCache::prefix_of(c, n, kv_dim, self.max_context),
            prefix::Source::Kept(i) => {
                let c = SeqCache::prefix_of(self.kept.get(i), n, kv_dim, self.max_context);
                self.kept.touch(i);
                c
            }
        };
        self.caches.insert(seq, cache);
        self.adapter_of.insert(seq, want);
        n
    }

    fn lora_dims(&self) -> Option<crate::lora::BaseDims> {
        Some(self.lora_base())
    }

    fn prefix_cache_bytes(&self) -> usize {
        self.kept.bytes()
    }

    fn kv_capacity(&self) -> Option<KvCapacity> {
        let total = self.kv_blocks?;
        Some(KvCapacity { block_size: KV_BLOCK, free_blocks: total.saturating_sub(self.kv_blocks_used()), total_blocks: total })
    }
}
