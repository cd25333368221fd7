//! ONNX Runtime backend: decoder graphs in onnxruntime-genai's layout (genai_config.json +
//! model.onnx), on the CPU, CUDA or CoreML execution provider.
//!
//! One `OnnxBackend` owns one session (one worker per model, provider and device) and a
//! [`kv::KvSlots`] cache with a slot per live sequence. `load.rs` opens the graph; a step
//! (planned in `step.rs`, each `Run` made in `forward.rs`) runs:
//! - one `Run` for the single-token rows (decode), over the slots from the lowest to the highest;
//!   slots in that range that do not step ride along as padding rows that write only at their
//!   own next position, which their next real token overwrites. Rows with different LoRA
//!   adapters share the run when the graph has the row mask (see [`lora`]); with an older
//!   graph there is one such run per adapter group (the base model is a group);
//! - prompt chunks: the first chunks of new sequences on adjacent slots in one right-padded `Run`
//!   (per adapter group, for graphs without the row mask), any other chunk in a `Run` of its
//!   own, on its own slot.
//!
//! Sequences keep their slot for life, so joining and leaving the batch copies nothing.
//!
//! On CUDA the runs take their shapes from a fixed set warmed up before serving ([`shapes`]):
//! ONNX Runtime's CUDA provider pays 50-190 ms for the first run of every new input shape.
mod device;
pub mod genai_config;
mod forward;
pub mod gqa;
pub mod kv;
mod load;
mod lora;
pub mod lora_matmul;
#[cfg(target_arch = "x86_64")]
pub mod nbits;
#[cfg(target_arch = "x86_64")]
mod nbits_avx2;
pub mod op_edit;
mod prefix;
mod proto;
mod prune;
pub mod run;
pub mod runtime;
mod shapes;
mod step;

use std::ffi::CString;
use std::path::PathBuf;

use ort::memory::MemoryInfo;
use ort::session::Session;

use self::genai_config::GenaiConfig;
use self::kv::KvSlots;
use self::run::Dtype;
pub use self::runtime::SessionSpec;
use crate::backend::gpu_sampling::{self, Route, PARAM_BYTES};
use crate::backend::{Backend, BackendError, SampleSpec, Sampled, SeqId, StepInput};

/// Positions per sequence when the config sets no `context_length` (the model may allow more).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// How to open an ONNX model.
#[derive(Debug, Clone)]
pub struct OnnxOptions {
    /// The ONNX Runtime library (None: `ORT_DYLIB_PATH`, then the project's installed copy).
    pub library: Option<PathBuf>,
    pub session: SessionSpec,
    /// Sequences served at once (KV cache slots).
    pub max_batch: usize,
    /// Cap on positions per sequence (None: [`DEFAULT_MAX_CONTEXT`]); never above the model's.
    pub max_context: Option<usize>,
    /// Run shapes from a fixed set, warmed up before serving ([`shapes`]). None: on for CUDA (where
    /// every new shape costs its first run 50-190 ms), off elsewhere. Needs the logits-index
    /// edit (`prune`); ignored without it.
    pub fixed_shapes: Option<bool>,
    /// On a GPU, the fraction of the device's memory the model may fill (weights, KV slots,
    /// logits buffers): fewer than `max_batch` slots when it holds fewer ([`device`]).
    pub gpu_memory_fraction: f64,
}

struct Names {
    input_ids: CString,
    attention_mask: CString,
    position_ids: Option<CString>,
    logits: CString,
    past: Vec<(CString, CString)>,
    present: Vec<(CString, CString)>,
    /// The input added by [`prune`]: each row's position whose logits the graph returns.
    logits_index: Option<CString>,
}

pub struct OnnxBackend {
    session: Session,
    cfg: GenaiConfig,
    names: Names,
    kv: KvSlots,
    kv_dtype: Dtype,
    logits_dtype: Dtype,
    host: MemoryInfo<'static>,
    /// Reused output buffer for logits (`[b, s, vocab]`, or `[b, 1, vocab]`), 8-byte aligned.
    logits: Vec<u64>,
    /// The graph returns logits for one position per row: the last (exported with
    /// `--prune-lm-head`) or the one `names.logits_index` names (edited at load, `prune`). This
    /// saves the vocabulary projection of every other prompt token.
    last_only: bool,
    provider: String,
    /// The graph's LoRA inputs (exported with `--lora-inputs`), when it has any.
    lora: Option<lora::GraphLora>,
    /// The adapter (its id; 0 = base model) each sequence last stepped with.
    adapter_of: std::collections::HashMap<SeqId, u64>,
    /// Runs take shapes from a fixed set ([`shapes`]).
    fixed_shapes: bool,
    /// The tokens in each sequence's cache, for prefix reuse.
    fed: std::collections::HashMap<SeqId, Vec<u32>>,
    /// Finished sequences' positions kept for prefix reuse (host KV only).
    kept: prefix::PrefixStore,
    /// Nodes the session runs on inferd's own kernels ([`op_edit`]).
    on_inferd: op_edit::Moved,
    /// On a GPU: the logits stay in device memory and rows are sampled there ([`device`]).
    sampler: Option<device::Sampler>,
    /// Per input row of the step being run: where its token is picked and, for
    /// `Route::Device`, its parameters as the kernel reads them (empty: every row's logits to the host).
    routes: Vec<(Route, [u8; PARAM_BYTES])>,
    /// Drawing rows may be sampled on the device (`INFERD_CUDA_DEVICE_SAMPLING`).
    device_sampling: bool,
}

/// What a step gives a row that wanted the logits of its last token.
pub(super) enum RowOut {
    /// The logits, for the host's sampler (or for [`Backend::step`]'s caller).
    Logits(Vec<f32>),
    /// The token the device picked.
    Token(u32),
}

fn load_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Load(e.to_string())
}

impl OnnxBackend {
    /// The execution provider this backend's session was opened on ("cpu", "cuda:0", ...).
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// How many nodes of the graph run on inferd's own CPU kernels (attention, int4 matmuls,
    /// LoRA matmuls); all zero when the edited graph did not load or the provider is not the CPU.
    pub fn kernels_on_inferd(&self) -> op_edit::Moved {
        self.on_inferd
    }

    /// Whether one `Run` serves rows with different LoRA adapters (the graph has the row mask).
    pub fn lora_runs_mixed(&self) -> bool {
        self.lora.as_ref().is_some_and(|g| g.mixes())
    }

    /// One step; each row that wants logits gets them, or its token when [`OnnxBackend::routes`]
    /// sends it to the device sampler. A failed step leaves every cache as it was.
    fn step_rows(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Option<RowOut>>, BackendError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.check(inputs)?;
        let before: Vec<(SeqId, usize, bool)> =
            inputs.iter().map(|i| (i.seq, self.kv.len_of(i.seq), self.kv.slot(i.seq).is_some())).collect();
        let mut out: Vec<Option<RowOut>> = (0..inputs.len()).map(|_| None).collect();
        match self.step_inner(inputs, &mut out) {
            Ok(()) => {
                if self.kept.enabled() {
                    for i in inputs {
                        self.fed.entry(i.seq).or_default().extend_from_slice(i.tokens);
                    }
                }
                Ok(out)
            }
            Err(e) => {
                // Only the lengths are state: restoring them undoes the step (positions written
                // past a length are never read and get overwritten).
                for (seq, len, existed) in before {
                    match (existed, self.kv.slot(seq)) {
                        (true, Some(slot)) => self.kv.set_len(slot, len),
                        (false, Some(_)) => self.drop_seq(seq, false),
                        _ => {}
                    }
                }
                Err(e)
            }
        }
    }

    /// Whether the logits stay on the device and rows are sampled there ([`device`]).
    pub fn logits_on_device(&self) -> bool {
        self.sampler.is_some()
    }

    /// Positions cached for `seq` (0 for unknown sequences).
    pub fn cached_len(&self, seq: SeqId) -> usize {
        self.kv.len_of(seq)
    }

}

/// Bytes of finished sequences' KV kept for prefix reuse unless configured (`prefix_cache_mb`).
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 512 << 20;

impl Backend for OnnxBackend {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_context(&self) -> usize {
        self.kv.shape.max_len
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError> {
        self.routes.clear();
        self.step_rows(inputs)?
            .into_iter()
            .map(|r| match r {
                None => Ok(None),
                Some(RowOut::Logits(l)) => Ok(Some(l)),
                Some(RowOut::Token(_)) => Err(BackendError::Compute("a row was sampled on the device where its logits were asked for".into())),
            })
            .collect()
    }

    fn step_and_sample(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>]) -> Result<Vec<Option<Sampled>>, BackendError> {
        debug_assert_eq!(inputs.len(), samples.len(), "one sampling spec per row");
        if self.sampler.is_none() {
            let vocab = self.cfg.vocab_size;
            return crate::backend::sample_on_host(self.step(inputs)?, samples, vocab);
        }
        self.routes = inputs
            .iter()
            .zip(samples)
            .map(|(inp, spec)| {
                let route = match spec.as_ref().filter(|_| inp.want_logits) {
                    Some(s) => gpu_sampling::route(s, self.device_sampling),
                    None => Route::Host,
                };
                let spec = spec.as_ref().filter(|_| route == Route::Device);
                (route, gpu_sampling::params(spec.map(|s| (s.params, s.uniform.unwrap_or(0.0)))))
            })
            .collect();
        let rows = self.step_rows(inputs);
        self.routes.clear();
        Ok(rows?
            .into_iter()
            .zip(samples)
            .map(|(row, spec)| match (row, spec) {
                (Some(RowOut::Logits(l)), Some(spec)) => Some(crate::engine::sampler::sample(l, spec)),
                (Some(RowOut::Token(token)), Some(_)) => Some(Sampled { token, logprobs: None }),
                _ => None,
            })
            .collect())
    }

    fn max_sequences(&self) -> Option<usize> {
        Some(self.kv.shape.slots)
    }

    fn release(&mut self, seq: SeqId) {
        self.drop_seq(seq, true);
    }

    fn prefix_cache_bytes(&self) -> usize {
        self.kept.bytes()
    }

    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32], adapter: Option<&std::sync::Arc<crate::lora::LoraAdapter>>) -> usize {
        self.reuse_kept_prefix(seq, tokens, adapter)
    }

    fn lora_dims(&self) -> Option<crate::lora::BaseDims> {
        self.lora.as_ref().map(|g| g.dims)
    }

    fn prepare(&mut self) -> Result<(), BackendError> {
        if self.fixed_shapes {
            self.warm_up()?;
        }
        Ok(())
    }
}
