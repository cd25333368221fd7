//! Opening a model: the graph with its load-time edits ([`prune`], [`op_edit`]), checked
//! against genai_config.json, and the KV slots, names and LoRA inputs a step needs.
use std::collections::HashSet;
use std::path::Path;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::TensorElementType;

use super::genai_config::GenaiConfig;
use super::kv::{KvShape, KvSlots, Place};
use super::run::{cname, Dtype};
use super::{device, lora, load_err, op_edit, prefix, prune, runtime, Names, OnnxBackend, OnnxOptions, SessionSpec, DEFAULT_MAX_CONTEXT, DEFAULT_PREFIX_CACHE_BYTES};
use crate::backend::BackendError;
use crate::config::Device;

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
/// - [`op_edit`]: attention ([`gqa`](super::gqa)), int4 matmuls (`nbits`) and the LoRA branches' matmuls
///   ([`lora_matmul`](super::lora_matmul)) on inferd's CPU kernels, on the CPU provider only (off with
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
        // On a GPU the device is opened first, so that what the session's weights take is known
        // when the KV slots are sized (`device`).
        #[cfg(feature = "cuda")]
        let opened = match opts.session.device {
            Device::Cuda(id) => Some(device::open(id as usize)?),
            _ => None,
        };
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
        #[cfg(feature = "cuda")]
        let (kv, sampler) = match opened {
            Some(o) => o.cache(shape, cfg.vocab_size, cfg.hidden_size, logits_dtype == Dtype::F16, last_only, opts.gpu_memory_fraction)?,
            None => (KvSlots::new(shape, Place::Host).map_err(load_err)?, None),
        };
        #[cfg(not(feature = "cuda"))]
        let (kv, sampler): (KvSlots, Option<device::Sampler>) = (KvSlots::new(shape, Place::Host).map_err(load_err)?, None);
        let shape = kv.shape;
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
            kv_cache_mib = shape.total_bytes() >> 20, logits_on_device = sampler.is_some(), "ONNX session ready"
        );
        Ok(OnnxBackend {
            session, cfg, names, kv, kv_dtype, logits_dtype, host, logits: Vec::new(), last_only, provider, lora,
            adapter_of: Default::default(), fixed_shapes,
            fed: Default::default(), kept: prefix::PrefixStore::new(DEFAULT_PREFIX_CACHE_BYTES),
            on_inferd: edits.on_inferd,
            sampler,
            routes: Vec::new(),
            device_sampling: crate::backend::gpu_sampling::enabled_from_env(),
        })
    }
}
