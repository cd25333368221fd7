//! Backends run the model's forward pass. The trait is synchronous and owned by one worker thread;
//! the engine's scheduler decides what goes into each step.
pub mod candle;
pub mod onnx;

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

/// A loaded model that can run batched steps over many sequences, each with its own KV cache.
pub trait Backend: Send {
    /// Size of the logits vector returned per sequence.
    fn vocab_size(&self) -> usize;
    /// Most tokens one sequence may hold (prompt + generated).
    fn max_context(&self) -> usize;
    /// Runs one forward step over all inputs together: the linear layers see every input's tokens at
    /// once, attention is per sequence. Returns, per input and in order, the logits of its last token
    /// when `want_logits` was set.
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError>;
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
