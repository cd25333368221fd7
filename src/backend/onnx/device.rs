//! The onnx backend on a GPU (a cuda build, ONNX Runtime's CUDA provider): its sequence slots
//! sized from the device's memory, and its logits kept on the device and sampled there.
//!
//! - The device is opened (through cudarc, in the primary context the provider also uses) before
//!   the session, so that what the session's weights take can be measured; the KV slots then get
//!   `gpu_memory_fraction` of the device less that ([`crate::backend::device_cache_budget`]),
//!   less ONNX Runtime's working memory ([`activation_reserve`]):
//!   `max_batch` slots (256 by default on a GPU), or as many as fit. Each slot holds the full
//!   context (GroupQueryAttention's shared buffer), so `context_length` is what trades against
//!   the number of sequences.
//! - The graph's logits output is bound to device memory ([`Sampler::target`]); after each
//!   `Run` the rows are picked there with the CUDA backend's kernels (greedy, and drawing rows as
//!   `gpu_sampling` routes them), so only token ids cross to the host; rows that need the host's
//!   sampler (logprobs, penalties, bias, a grammar) copy their own row. Needs the logits-index
//!   edit ([`prune`](super::prune)): one row of logits per sequence.
//!   `INFERD_ONNX_DEVICE_LOGITS=0` copies every row's logits to the host (A/B runs).
use crate::backend::BackendError;

/// The device sampler (a build without CUDA never makes one).
#[cfg(feature = "cuda")]
pub type Sampler = crate::backend::cuda::logit_sampler::LogitSampler;

/// The device sampler (a build without CUDA never makes one).
#[cfg(not(feature = "cuda"))]
pub enum Sampler {}

#[cfg(not(feature = "cuda"))]
impl Sampler {
    pub fn target(&self) -> *mut u8 {
        match *self {}
    }
    pub fn rows(&self) -> usize {
        match *self {}
    }
    pub fn pick(&mut self, _b: usize, _params: Option<&[u8]>) -> Result<Vec<i32>, BackendError> {
        match *self {}
    }
    pub fn row(&self, _r: usize) -> Result<Vec<f32>, BackendError> {
        match *self {}
    }
    pub fn widen(&self, _b: usize) -> Result<(), BackendError> {
        match *self {}
    }
}

/// Whether logits stay on the device (`INFERD_ONNX_DEVICE_LOGITS=0` turns it off).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn device_logits_from_env() -> bool {
    std::env::var("INFERD_ONNX_DEVICE_LOGITS").map_or(true, |v| v != "0")
}

/// Slots for a device cache: `max_batch`, or as many as `budget` bytes hold at `per_slot` bytes
/// each (its KV for the full context and its row of the logits buffers). None: not even one.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn slots_within(max_batch: usize, per_slot: usize, budget: usize) -> Option<usize> {
    let n = (budget / per_slot.max(1)).min(max_batch.max(1));
    (n > 0).then_some(n)
}

/// Device memory left for ONNX Runtime's own arena, which grows during runs (activations: a
/// prompt run of up to [`MAX_WARM_TOKENS`](super::shapes::MAX_WARM_TOKENS) tokens, each with
/// the MLP's and attention's intermediates in f16/f32) and is not part of the KV budget:
/// 128 bytes per token per unit of hidden size, at least 1 GiB. On Qwen2.5-0.5B's shape that
/// is 1 GiB; a run on the H200 that left ONNX Runtime 256 MiB failed in warm-up (an 80 MB
/// MatMulNBits output of 8192 tokens could not be allocated).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn activation_reserve(hidden_size: usize) -> usize {
    (super::shapes::MAX_WARM_TOKENS * hidden_size * 128).max(1 << 30)
}

/// The start-up error for a device whose memory holds not one sequence.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn too_small(device: &str, per_slot: usize, budget: usize, max_len: usize, fraction: f64) -> BackendError {
    BackendError::Load(format!(
        "{device}: one sequence of {max_len} positions needs {} MiB of KV cache and logits, but {} MiB are left \
         after the model's weights and ONNX Runtime's working memory within gpu_memory_fraction {fraction}; raise gpu_memory_fraction \
         or lower context_length",
        per_slot.div_ceil(1 << 20),
        budget >> 20
    ))
}

#[cfg(feature = "cuda")]
pub use self::gpu::open;

#[cfg(feature = "cuda")]
mod gpu {
    use super::super::kv::{KvShape, KvSlots, Place};
    use super::{activation_reserve, device_logits_from_env, slots_within, too_small, Sampler};
    use crate::backend::cuda::gpu::Gpu;
    use crate::backend::BackendError;

    /// A GPU opened before the session, with its memory at that moment.
    pub struct Opened {
        gpu: Gpu,
        ordinal: usize,
        free_before: usize,
        total: usize,
    }

    /// Opens `cuda:ordinal` (a clear error when the driver, the device or cuBLAS is missing).
    pub fn open(ordinal: usize) -> Result<Opened, BackendError> {
        let gpu = Gpu::open(ordinal)?;
        let (free_before, total) = gpu.memory()?;
        Ok(Opened { gpu, ordinal, free_before, total })
    }

    impl Opened {
        /// After the session loaded: the KV slots (`shape.slots` is the most wanted) in device
        /// memory, and the logits sampler when `sample` (the graph returns one row per sequence).
        pub fn cache(self, mut shape: KvShape, vocab: usize, hidden_size: usize, half_logits: bool, sample: bool, fraction: f64) -> Result<(KvSlots, Option<Sampler>), BackendError> {
            let (free_now, _) = self.gpu.memory()?;
            let budget = crate::backend::device_cache_budget(self.total, self.free_before, free_now, fraction).saturating_sub(activation_reserve(hidden_size));
            let sample = sample && device_logits_from_env();
            let logits = if sample { Sampler::bytes(vocab, 1, half_logits) } else { 0 };
            let per_slot = shape.total_bytes() / shape.slots.max(1) + logits;
            let device = format!("cuda:{}", self.ordinal);
            let wanted = shape.slots;
            shape.slots = slots_within(wanted, per_slot, budget).ok_or_else(|| too_small(&device, per_slot, budget, shape.max_len, fraction))?;
            if shape.slots < wanted {
                tracing::warn!(device = %device, max_batch = wanted, slots = shape.slots, per_slot_mib = per_slot >> 20, budget_mib = budget >> 20,
                    "the device's memory holds fewer sequences than max_batch at this context length; serving that many at once");
            }
            let kv = KvSlots::new(shape, Place::Cuda(&self.gpu, self.ordinal as i32)).map_err(|e| BackendError::Load(format!("{device}: {e}")))?;
            let sampler = if sample { Some(Sampler::new(self.gpu, vocab, shape.slots, half_logits)?) } else { None };
            Ok((kv, sampler))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_max_batch_or_what_the_memory_holds() {
        assert_eq!(slots_within(256, 100, 1_000_000), Some(256));
        assert_eq!(slots_within(256, 10_000, 1_000_000), Some(100));
        assert_eq!(slots_within(256, 10_000, 9_999), None);
        assert_eq!(slots_within(0, 1, 10), Some(1), "at least one slot is asked for");
        let e = too_small("cuda:3", 48 << 20, 10 << 20, 4096, 0.9).to_string();
        assert!(e.contains("cuda:3") && e.contains("48 MiB") && e.contains("10 MiB") && e.contains("gpu_memory_fraction 0.9"), "{e}");
        assert_eq!(activation_reserve(896), 1 << 30, "Qwen2.5-0.5B: the 1 GiB floor");
        assert_eq!(activation_reserve(3584), 8192 * 3584 * 128, "a 7B model: 3.5 GiB");
    }
}
