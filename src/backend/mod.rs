//! Backends run the model's forward pass. The trait is synchronous and owned by one worker thread;
//! the engine's scheduler decides what goes into each step.
//!
//! The engine talks to a backend through [`Backend::step_and_sample`]: each row that finishes
//! its input carries what decides its next token ([`SampleSpec`]) and gets the token back with
//! its logprobs ([`Sampled`]), so a backend can keep logits and sampling on its device. The CPU
//! backends compute logits ([`Backend::step`]) and sample on the host with the engine's sampler.
//! A backend whose KV cache is bounded reports its room ([`Backend::kv_capacity`]); the scheduler
//! admits and preempts sequences by it, and [`BackendError::KvFull`] names the one sequence a
//! step could not fit.
pub mod candle;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gpu_sampling;
pub mod onnx;
pub mod paged;

pub use crate::engine::sampler::{SampleSpec, Sampled, TokenLogprobs};

/// Identifies one sequence (one choice of one request) for its whole life inside a backend.
pub type SeqId = u64;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The model could not be loaded (missing file, unsupported architecture or tensor type, ...).
    #[error("cannot load model: {0}")]
    Load(String),
    /// A forward pass failed.
    #[error("forward pass failed: {0}")]
    Compute(String),
    /// A sequence would grow past the backend's context length.
    #[error("sequence {seq} would exceed the context length of {max} tokens")]
    ContextFull { seq: SeqId, max: usize },
    /// The KV cache has no room for this sequence's new tokens. The step changed no cache; the
    /// engine preempts that sequence (frees its cache and runs it again later) and steps the rest.
    #[error("the KV cache has no room for sequence {seq}")]
    KvFull { seq: SeqId },
}

/// The room in a bounded KV cache, in blocks of `block_size` positions: a sequence holding `n`
/// positions holds `n.div_ceil(block_size)` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCapacity {
    pub block_size: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
}

impl KvCapacity {
    /// Blocks a sequence holds with `positions` cached positions.
    pub fn blocks(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size.max(1))
    }
}

/// One sequence's share of a step: the tokens to append to its KV cache (one token while decoding,
/// a chunk of the prompt while prefilling). A sequence the backend has not seen starts empty.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    /// LoRA adapter to apply to this row (None = base model). Backends without adapters reject Some.
    pub adapter: Option<&'a std::sync::Arc<crate::lora::LoraAdapter>>,
    /// Whether the caller needs the logits of the last token (false for non-final prefill chunks).
    pub want_logits: bool,
}

/// The placeholder token of a row that feeds the token still in flight for its sequence
/// (`Backend::launch`'s `follows`).
pub const FOLLOWS: u32 = u32::MAX;

/// The checks every backend makes of a step's rows before it touches a cache: `adapter` (the
/// backend's own, such as whether it can apply an adapter) once for each adapter the step uses,
/// then each sequence at most once, at least one token, ids below `vocab`, and the new tokens
/// within `max_context` beside the `cached(seq)` positions the sequence already holds.
pub fn check_rows(
    inputs: &[StepInput<'_>],
    vocab: usize,
    max_context: usize,
    cached: impl Fn(SeqId) -> usize,
    adapter: impl Fn(&std::sync::Arc<crate::lora::LoraAdapter>) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let mut seen = std::collections::HashSet::with_capacity(inputs.len());
    // Adapters checked in this step: few, so a list.
    let mut checked: Vec<u64> = Vec::new();
    for inp in inputs {
        if let Some(a) = inp.adapter.filter(|a| !checked.contains(&a.id)) {
            adapter(a)?;
            checked.push(a.id);
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
        if cached(inp.seq) + inp.tokens.len() > max_context {
            return Err(BackendError::ContextFull { seq: inp.seq, max: max_context });
        }
    }
    Ok(())
}

/// Samples each row's logits (from [`Backend::step`]) with its spec on the host: what
/// [`Backend::step_and_sample`] does for a backend that keeps no sampling on a device.
pub fn sample_on_host(logits: Vec<Option<Vec<f32>>>, samples: &[Option<SampleSpec<'_>>], vocab: usize) -> Result<Vec<Option<Sampled>>, BackendError> {
    if let Some(l) = logits.iter().flatten().find(|l| l.len() != vocab) {
        return Err(BackendError::Compute(format!("the step returned {} logits, expected {vocab}", l.len())));
    }
    Ok(logits
        .into_iter()
        .zip(samples)
        .map(|(l, spec)| l.zip(spec.as_ref()).map(|(l, spec)| crate::engine::sampler::sample(l, spec)))
        .collect())
}

/// Bytes of device memory a model's KV cache (and other buffers sized with it) may take on a
/// GPU with `total` bytes: `fraction` of the device, less what the model took since `free_before`
/// was measured (weights, buffers), within what is free now less a 256 MiB margin (other
/// processes on the GPU keep theirs: several servers may share one GPU, each with its own
/// fraction).
pub fn device_cache_budget(total: usize, free_before: usize, free_now: usize, fraction: f64) -> usize {
    let budget = (total as f64 * fraction) as usize;
    let own = free_before.saturating_sub(free_now);
    budget.saturating_sub(own).min(free_now.saturating_sub(256 << 20))
}

/// The adapter check of a backend that applies any adapter whose projections fit `dims` (passed
/// as [`check_rows`]'s `adapter`): an adapter that does not fit is refused by name.
pub fn adapter_fits(a: &std::sync::Arc<crate::lora::LoraAdapter>, dims: &crate::lora::BaseDims) -> Result<(), BackendError> {
    a.check_fits(dims).map_err(|e| BackendError::Compute(format!("adapter '{}': {e}", a.name)))
}

/// A loaded model that can run batched steps over many sequences, each with its own KV cache.
pub trait Backend: Send {
    /// Size of the logits vector returned per sequence.
    fn vocab_size(&self) -> usize;
    /// Most tokens one sequence may hold (prompt + generated).
    fn max_context(&self) -> usize;
    /// Runs one forward step over all inputs together: the linear layers see every input's tokens at
    /// once, attention is per sequence. Returns, per input and in order, the logits of its last token
    /// when `want_logits` was set. (Tests and diagnostics; a GPU backend copies them to the host.)
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError>;
    /// Runs one step and samples the next token of every row with `want_logits`, from
    /// `samples[i]` (Some exactly for those rows). What the engine calls. The default samples
    /// [`Backend::step`]'s logits on the host.
    fn step_and_sample(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>]) -> Result<Vec<Option<Sampled>>, BackendError> {
        debug_assert_eq!(inputs.len(), samples.len(), "one sampling spec per row");
        let vocab = self.vocab_size();
        sample_on_host(self.step(inputs)?, samples, vocab)
    }
    /// Async scheduling (vLLM's): whether this backend takes step N+1 (`launch`) before step N's
    /// tokens are collected (`collect`), so that the engine's work between steps (the tokens'
    /// events, the next plan and its inputs) runs while the device computes. A backend that says
    /// so implements both; the others are stepped with `step_and_sample`.
    fn pipelines(&self) -> bool {
        false
    }
    /// Starts a step whose tokens `collect` returns later; at most two are launched and not
    /// collected at once. A row with `follows[i]` feeds the token that the step launched before
    /// this one samples for the same sequence, which the host does not know yet: its `tokens` is
    /// one placeholder ([`FOLLOWS`]) and its position the next. `samples` are read within the
    /// call. A failed launch started nothing and changed no cache, as a failed `step_and_sample`.
    fn launch(&mut self, _inputs: &[StepInput<'_>], _samples: &[Option<SampleSpec<'_>>], _follows: &[bool]) -> Result<(), BackendError> {
        Err(BackendError::Compute("this backend does not pipeline its steps".into()))
    }
    /// Waits for the oldest launched step not collected yet and returns its rows' tokens, as
    /// `step_and_sample` would have.
    fn collect(&mut self) -> Result<Vec<Option<Sampled>>, BackendError> {
        Err(BackendError::Compute("this backend does not pipeline its steps".into()))
    }
    /// Most sequences the backend holds a cache for at once, when it has a fixed number of
    /// sequence slots (the engine's `max_batch` is lowered to it); None: no such limit.
    fn max_sequences(&self) -> Option<usize> {
        None
    }
    /// The room left in the KV cache, when it is bounded (None: each sequence's cache grows up to
    /// the context length as needed).
    fn kv_capacity(&self) -> Option<KvCapacity> {
        None
    }
    /// Bytes the prefix cache holds for finished sequences (live sequences' caches not counted).
    fn prefix_cache_bytes(&self) -> usize {
        0
    }
    /// Prefix caching: called before a sequence the backend holds no cache for runs its first
    /// step. A backend that holds the keys and values of a prefix of `tokens` (computed for
    /// another sequence with the same adapter, live or recently finished) gives `seq` a cache of
    /// those positions and returns how many; the caller then feeds only the rest. At most
    /// `tokens.len() - 1` are reused, so that the last token still runs and gives logits.
    fn reuse_prefix(&mut self, _seq: SeqId, _tokens: &[u32], _adapter: Option<&std::sync::Arc<crate::lora::LoraAdapter>>) -> usize {
        0
    }
    /// Frees a sequence's KV cache. Unknown ids are ignored.
    fn release(&mut self, seq: SeqId);
    /// The projection sizes LoRA adapters must fit, or None when this backend (or this model)
    /// cannot apply adapters.
    fn lora_dims(&self) -> Option<crate::lora::BaseDims> {
        None
    }
    /// Called once on the thread that runs every step, before the first. A backend whose
    /// runtime keeps state per thread (ONNX Runtime's CUDA provider caches its per-shape set-up
    /// per thread) warms it up here.
    fn prepare(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::device_cache_budget;

    const GIB: usize = 1 << 30;

    #[test]
    fn the_cache_budget_is_the_fraction_less_what_the_model_took_within_what_is_free() {
        // 100 GiB device, 90%: the model took 10 GiB of 95 free -> 80 GiB left for the cache.
        assert_eq!(device_cache_budget(100 * GIB, 95 * GIB, 85 * GIB, 0.9), 80 * GIB);
        // Another process holds 60 GiB: what is free (less the margin) bounds the cache.
        assert_eq!(device_cache_budget(100 * GIB, 40 * GIB, 30 * GIB, 0.9), 30 * GIB - (256 << 20));
        // The model alone is over the fraction: nothing.
        assert_eq!(device_cache_budget(100 * GIB, 100 * GIB, 5 * GIB, 0.9), 0);
        assert_eq!(device_cache_budget(100 * GIB, 100 * GIB, 100 << 20, 1.0), 0);
    }
}
