//! ONNX Runtime backend: decoder graphs in onnxruntime-genai's layout (genai_config.json +
//! model.onnx), on the CPU, CUDA or CoreML execution provider.
//!
//! One `OnnxBackend` owns one session (one worker per model, provider and device) and a
//! [`kv::KvSlots`] cache with a slot per live sequence. A step (planned in `step.rs`; this file
//! loads the graph and makes one `Run`) runs:
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
pub mod genai_config;
pub mod gqa;
pub mod kv;
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

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::TensorElementType;

use self::genai_config::GenaiConfig;
use self::kv::{KvShape, KvSlots};
use self::run::{cname, Dtype, View};
pub use self::runtime::SessionSpec;
use crate::backend::{Backend, BackendError, SeqId, StepInput};
use crate::config::Device;

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

/// The load-time edits in use on a session's graph.
#[derive(Debug, Clone, Copy, Default)]
struct Edits {
    /// The vocabulary projection reads one position per row ([`prune`]).
    logits_index: bool,
    /// Nodes on inferd's kernels ([`op_edit`]).
    on_inferd: op_edit::Moved,
}

/// Opens the graph with the load-time edits that apply to it, dropping them one by one when an
/// edited graph does not load:
/// - [`prune`]: the vocabulary projection limited to one position per row (off with
///   `INFERD_ONNX_FULL_LOGITS=1`, for A/B runs);
/// - [`op_edit`]: attention ([`gqa`]), int4 matmuls ([`nbits`]) and the LoRA branches' matmuls
///   ([`lora_matmul`]) on inferd's CPU kernels, on the CPU provider only (off with
///   `INFERD_ONNX_ORT_ATTENTION=1`, `INFERD_ONNX_ORT_MATMUL=1` and `INFERD_ONNX_ORT_LORA=1`).
///
/// A graph file that holds its weights inline (over 256 MiB) is opened as exported: it is not
/// read twice into memory for the edits.
fn open_edited(env: &ort::environment::Environment, cfg: &GenaiConfig, spec: &SessionSpec) -> Result<(Session, Edits), BackendError> {
    const MAX_EDITED_BYTES: u64 = 256 << 20;
    let open = |bytes: Option<&[u8]>, ops: bool| runtime::open_session(env, &cfg.graph, bytes, spec, ops);
    if !std::fs::metadata(&cfg.graph).is_ok_and(|m| m.len() <= MAX_EDITED_BYTES) {
        return Ok((open(None, false).map_err(load_err)?, Edits::default()));
    }
    let bytes = std::fs::read(&cfg.graph).map_err(|e| load_err(format!("cannot read {}: {e}", cfg.graph.display())))?;
    let warn = |what: &str, e: &dyn std::fmt::Display| tracing::warn!(graph = %cfg.graph.display(), "{what} ({e}); running without it");
    let pruned = if std::env::var_os("INFERD_ONNX_FULL_LOGITS").is_some() {
        None
    } else {
        prune::logits_at_index(&bytes, &cfg.names.logits).unwrap_or_else(|e| {
            warn("cannot limit the logits to one position", &e);
            None
        })
    };
    let cpu = spec.device == Device::Cpu;
    let kernels = op_edit::Kernels {
        attention: cpu && std::env::var_os("INFERD_ONNX_ORT_ATTENTION").is_none(),
        matmul: cpu && op_edit::matmul_kernel_available() && std::env::var_os("INFERD_ONNX_ORT_MATMUL").is_none(),
        lora: cpu && std::env::var_os("INFERD_ONNX_ORT_LORA").is_none(),
    };
    let rerouted = if kernels.attention || kernels.matmul || kernels.lora {
        op_edit::reroute(pruned.as_deref().unwrap_or(&bytes), kernels).unwrap_or_else(|e| {
            warn("cannot move nodes to inferd's kernels", &e);
            None
        })
    } else {
        None
    };
    drop(bytes);
    let logits_index = pruned.is_some();
    // Most edited first; each candidate that does not load leaves the next one to try.
    let candidates = [
        rerouted.as_ref().map(|(g, moved)| (g, Edits { logits_index, on_inferd: *moved }, "the graph with inferd's kernels")),
        pruned.as_ref().map(|g| (g, Edits { logits_index, on_inferd: op_edit::Moved::default() }, "the graph with one logits position per row")),
    ];
    for (graph, edits, what) in candidates.into_iter().flatten() {
        match open(Some(graph), edits.on_inferd != op_edit::Moved::default()) {
            Ok(s) => return Ok((s, edits)),
            // Set-up (the provider) fails the same way for the graph as exported.
            Err(e @ runtime::OpenError::Setup(_)) => return Err(load_err(e)),
            Err(e) => warn(&format!("{what} did not load"), &e),
        }
    }
    Ok((open(None, false).map_err(load_err)?, Edits::default()))
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
}

fn load_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Load(e.to_string())
}

fn dtype_of(session_dtype: Option<TensorElementType>, what: &str) -> Result<Dtype, BackendError> {
    match session_dtype {
        Some(TensorElementType::Float32) => Ok(Dtype::F32),
        Some(TensorElementType::Float16) => Ok(Dtype::F16),
        other => Err(load_err(format!("{what} has element type {other:?}; expected float32 or float16"))),
    }
}

impl OnnxBackend {
    pub fn load(dir: &Path, opts: &OnnxOptions) -> Result<OnnxBackend, BackendError> {
        let env = runtime::environment(opts.library.as_deref()).map_err(load_err)?;
        let cfg = GenaiConfig::load(dir).map_err(load_err)?;
        if !cfg.graph.is_file() {
            return Err(load_err(format!("{} names {} which does not exist", dir.join("genai_config.json").display(), cfg.graph.display())));
        }
        let (session, edits) = open_edited(env, &cfg, &opts.session)?;
        let logits_index = edits.logits_index;
        let provider = opts.session.provider_name();

        // Check the graph against genai_config.json before the first step, and learn dtypes.
        let input = |name: &str| session.inputs().iter().find(|o| o.name() == name);
        let output = |name: &str| session.outputs().iter().find(|o| o.name() == name);
        let position_ids = cfg.names.position_ids.clone().or_else(|| input("position_ids").map(|_| "position_ids".to_string()));
        let mut known: HashSet<&str> = [cfg.names.input_ids.as_str(), cfg.names.attention_mask.as_str()].into();
        if let Some(p) = &position_ids {
            known.insert(p);
        }
        for (k, v) in &cfg.names.past {
            known.insert(k);
            known.insert(v);
        }
        for name in &known {
            if input(name).is_none() {
                return Err(load_err(format!("the graph has no input '{name}' (named in genai_config.json)")));
            }
        }
        // The LoRA row mask (a `--lora-inputs` export) is fed by the LoRA code; the logits index
        // was added by `prune` and is fed by `forward`.
        known.insert("lora_mask");
        known.insert(prune::INDEX_INPUT);
        if let Some(extra) = session.inputs().iter().find(|o| !known.contains(o.name())) {
            return Err(load_err(format!("the graph needs an input '{}' that this backend does not provide", extra.name())));
        }
        let mut outs: Vec<&str> = vec![&cfg.names.logits];
        outs.extend(cfg.names.present.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]));
        for name in outs {
            if output(name).is_none() {
                return Err(load_err(format!("the graph has no output '{name}' (named in genai_config.json)")));
            }
        }
        let kv_dtype = dtype_of(input(&cfg.names.past[0].0).and_then(|o| o.dtype().tensor_type()), "the KV cache")?;
        let logits_dtype = dtype_of(output(&cfg.names.logits).and_then(|o| o.dtype().tensor_type()), "the logits output")?;
        let last_only = logits_index
            || match output(&cfg.names.logits).map(|o| o.dtype()) {
                Some(ort::value::ValueType::Tensor { shape, .. }) => shape.get(1) == Some(&1),
                _ => false,
            };

        // KV buffers and GQA's scratch (`heads * chunk * max_len` floats per prefill run) grow
        // with max_len, so an unconfigured model gets at most DEFAULT_MAX_CONTEXT.
        let max_len = opts.max_context.unwrap_or(DEFAULT_MAX_CONTEXT).min(cfg.context_length);
        if max_len < 2 {
            return Err(load_err("the context length must be at least 2"));
        }
        let shape = KvShape {
            layers: cfg.num_layers,
            kv_heads: cfg.num_kv_heads,
            head_size: cfg.head_size,
            max_len,
            slots: opts.max_batch.max(1),
            elem_bytes: kv_dtype.bytes(),
        };
        let cuda = match opts.session.device {
            Device::Cuda(id) => Some(id as i32),
            _ => None,
        };
        let kv = KvSlots::new(shape, &session, cuda).map_err(load_err)?;
        let c = |s: &str| cname(s).map_err(load_err);
        let names = Names {
            input_ids: c(&cfg.names.input_ids)?,
            attention_mask: c(&cfg.names.attention_mask)?,
            position_ids: position_ids.as_deref().map(c).transpose()?,
            logits: c(&cfg.names.logits)?,
            past: cfg.names.past.iter().map(|(k, v)| Ok((c(k)?, c(v)?))).collect::<Result<_, BackendError>>()?,
            present: cfg.names.present.iter().map(|(k, v)| Ok((c(k)?, c(v)?))).collect::<Result<_, BackendError>>()?,
            logits_index: if logits_index { Some(c(prune::INDEX_INPUT)?) } else { None },
        };
        let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(load_err)?;
        let lora = lora::GraphLora::detect(&session, &cfg);
        let fixed_shapes = logits_index && opts.fixed_shapes.unwrap_or(cuda.is_some());
        tracing::info!(
            model = %dir.display(), model_type = %cfg.model_type, provider = %provider,
            kv_dtype = ?kv_dtype, slots = shape.slots, max_len, logits_last_only = last_only, logits_index, attention_on_inferd = edits.on_inferd.attention, matmuls_on_inferd = edits.on_inferd.matmul, lora_matmuls_on_inferd = edits.on_inferd.lora, fixed_shapes,
            lora_modules = lora.as_ref().map_or(0, |l| l.modules.len()),
            lora_row_mask = lora.as_ref().is_some_and(|l| l.mixes()),
            kv_cache_mib = shape.total_bytes() >> 20, "ONNX session ready"
        );
        Ok(OnnxBackend {
            session, cfg, names, kv, kv_dtype, logits_dtype, host, logits: Vec::new(), last_only, provider, lora,
            adapter_of: Default::default(), fixed_shapes,
            fed: Default::default(), kept: prefix::PrefixStore::new(DEFAULT_PREFIX_CACHE_BYTES),
            on_inferd: edits.on_inferd,
        })
    }

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

    /// Positions cached for `seq` (0 for unknown sequences).
    pub fn cached_len(&self, seq: SeqId) -> usize {
        self.kv.len_of(seq)
    }

    fn check(&self, inputs: &[StepInput<'_>]) -> Result<(), BackendError> {
        let mut seen = HashSet::with_capacity(inputs.len());
        let vocab = self.cfg.vocab_size;
        let mut new = 0;
        for inp in inputs {
            if let Some(a) = inp.adapter {
                let graph = self.lora.as_ref().ok_or_else(|| {
                    BackendError::Compute("this ONNX graph has no LoRA inputs (export it with --lora-inputs)".into())
                })?;
                graph.check(a).map_err(|e| BackendError::Compute(format!("adapter '{}': {e}", a.name)))?;
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
            if self.kv.len_of(inp.seq) + inp.tokens.len() > self.kv.shape.max_len {
                return Err(BackendError::ContextFull { seq: inp.seq, max: self.kv.shape.max_len });
            }
            new += usize::from(self.kv.slot(inp.seq).is_none());
        }
        let free = self.kv.free_slots();
        if new > free {
            return Err(BackendError::Compute(format!(
                "{new} new sequences but only {free} free KV cache slots (max_batch {})",
                self.kv.shape.slots
            )));
        }
        Ok(())
    }

    /// Runs `tokens` (`[b, s]`, row-major) for slots `first..first + b`, each row `r` holding
    /// `lens[r]` positions before the step. Writes logits `[b, s, vocab]` (`[b, 1, vocab]` for a
    /// pruned graph) into `self.logits`.
    ///
    /// GroupQueryAttention takes each row's length from its mask (`seqlens_k = ones - 1`) and
    /// writes the new K/V at that length; the mask's width must stay within the buffers' layout
    /// (`kv.reserve` grows it) and the rotary cache (`max_len <= context_length`). A padding row
    /// of a full sequence therefore gets `max_len` ones and overwrites its own last position,
    /// which is never read again (a full sequence cannot step).
    fn forward(
        &mut self,
        first: usize,
        b: usize,
        s: usize,
        tokens: &mut [i64],
        lens: &[usize],
        new: &[usize],
        extra: &[(CString, View)],
    ) -> Result<(), BackendError> {
        let max_len = self.kv.shape.max_len;
        // Fixed shapes: the chunk is padded; its padding positions count as tokens in this run
        // (each row's real length is what the caller records afterwards).
        let longest = lens.iter().copied().max().unwrap_or(0);
        let sp = if self.fixed_shapes { shapes::chunk_len(s, max_len - longest.min(max_len)) } else { s };
        let mut padded;
        let (s, tokens, padding) = if sp == s {
            (s, tokens, None)
        } else {
            padded = vec![0i64; b * sp];
            for r in 0..b {
                padded[r * sp..r * sp + s].copy_from_slice(&tokens[r * s..(r + 1) * s]);
            }
            (sp, &mut padded[..], Some(sp))
        };
        let ones: Vec<usize> = lens.iter().zip(new).map(|(&l, &n)| (l + padding.unwrap_or(n)).min(max_len)).collect();
        let total = ones.iter().copied().max().unwrap_or(s);
        self.kv.reserve(total);
        let mut mask = vec![0i64; b * total];
        for (r, &n) in ones.iter().enumerate() {
            mask[r * total..r * total + n].fill(1);
        }
        // Positions only for graphs that take them (the builder's GQA graphs derive their own).
        let mut pos: Vec<i64> = match self.names.position_ids {
            Some(_) => lens.iter().flat_map(|&l| (l..l + s).map(|p| p as i64)).collect(),
            None => Vec::new(),
        };
        let vocab = self.cfg.vocab_size;
        let rows = if self.last_only { 1 } else { s };
        let need = (b * rows * vocab * self.logits_dtype.bytes()).div_ceil(8);
        if self.logits.len() < need {
            self.logits.resize(need, 0);
        }
        let (bi, si, ti) = (b as i64, s as i64, total as i64);
        let e = |m: String| BackendError::Compute(m);
        let ids = View::ids(&self.host, tokens, &[bi, si]).map_err(e)?;
        let mask_v = View::ids(&self.host, &mut mask, &[bi, ti]).map_err(e)?;
        let pos_v = if pos.is_empty() { None } else { Some(View::ids(&self.host, &mut pos, &[bi, si]).map_err(e)?) };
        // SAFETY: the logits buffer holds b*rows*vocab elements of logits_dtype and outlives the run.
        let logits = unsafe { View::float(&self.host, self.logits_dtype, self.logits.as_mut_ptr().cast(), &[bi, rows as i64, vocab as i64]) }
            .map_err(e)?;
        let kv_shape = [bi, self.kv.shape.kv_heads as i64, self.kv.cap() as i64, self.kv.shape.head_size as i64];
        let mut kv_views = Vec::with_capacity(2 * self.cfg.num_layers);
        for layer in 0..self.cfg.num_layers {
            for value in [false, true] {
                let ptr = self.kv.slot_ptr(layer, value, first);
                // SAFETY: slots first..first+b of this buffer are contiguous and allocated on the
                // device of kv.memory_info; the buffers outlive the run.
                kv_views.push(unsafe { View::float(&self.kv.memory_info, self.kv_dtype, ptr, &kv_shape) }.map_err(e)?);
            }
        }
        // Each row's logits come from its last real position (rows are right-padded).
        let mut index: Vec<i64> = new.iter().map(|&n| n.clamp(1, s) as i64 - 1).collect();
        let index_v = match self.names.logits_index {
            Some(_) => Some(View::ids(&self.host, &mut index, &[bi, 1]).map_err(e)?),
            None => None,
        };
        let mut inputs = vec![(self.names.input_ids.as_c_str(), &ids), (self.names.attention_mask.as_c_str(), &mask_v)];
        if let (Some(n), Some(v)) = (&self.names.logits_index, &index_v) {
            inputs.push((n.as_c_str(), v));
        }
        if let (Some(p), Some(v)) = (&self.names.position_ids, &pos_v) {
            inputs.push((p.as_c_str(), v));
        }
        inputs.extend(extra.iter().map(|(n, v)| (n.as_c_str(), v)));
        let mut outputs = vec![(self.names.logits.as_c_str(), &logits)];
        for (layer, ((pk, pv), (ok, ov))) in self.names.past.iter().zip(&self.names.present).enumerate() {
            let (k, v) = (&kv_views[2 * layer], &kv_views[2 * layer + 1]);
            inputs.push((pk.as_c_str(), k));
            inputs.push((pv.as_c_str(), v));
            outputs.push((ok.as_c_str(), k));
            outputs.push((ov.as_c_str(), v));
        }
        run::run(&mut self.session, &inputs, &outputs).map_err(|m| BackendError::Compute(format!("ONNX Runtime: {m}")))
    }

    /// Logits of batch row `row` at position `pos` after a run with `s` tokens per row, as f32
    /// (a pruned graph returns only the last position, whatever `pos`).
    fn logits_at(&self, s: usize, row: usize, pos: usize) -> Vec<f32> {
        let vocab = self.cfg.vocab_size;
        let start = if self.last_only { row * vocab } else { (row * s + pos) * vocab };
        match self.logits_dtype {
            Dtype::F32 => {
                // SAFETY: the buffer holds at least b*s*vocab f32 written by the last run.
                let all: &[f32] = unsafe { std::slice::from_raw_parts(self.logits.as_ptr().cast(), start + vocab) };
                all[start..].to_vec()
            }
            Dtype::F16 => {
                // SAFETY: as above, for f16.
                let all: &[half::f16] = unsafe { std::slice::from_raw_parts(self.logits.as_ptr().cast(), start + vocab) };
                all[start..].iter().map(|x| x.to_f32()).collect()
            }
        }
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
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.check(inputs)?;
        let before: Vec<(SeqId, usize, bool)> =
            inputs.iter().map(|i| (i.seq, self.kv.len_of(i.seq), self.kv.slot(i.seq).is_some())).collect();
        let mut out = vec![None; inputs.len()];
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
