//! LoRA on the onnx backend: graphs exported with `scripts/export_onnx.py --lora-inputs` take
//! each projection's A (`[in, r]`) and B (`[r, out]`, scale folded in) as optional inputs whose
//! defaults are empty (rank 0: the base model). A run activates one adapter by feeding its
//! tensors, exactly the parameters `inferd convert-adapter` writes to an `.onnx_adapter` file;
//! a step runs one `Run` per adapter group. Each adapter version's tensors are prepared once
//! and dropped when no request holds that version any more.
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::sync::{Arc, Weak};

use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::value::ValueType;

use super::genai_config::GenaiConfig;
use super::run::{cname, Dtype, View};
use crate::lora::onnx_adapter::{self, param_name};
use crate::lora::{BaseDims, LoraAdapter, Module};

struct Prepared {
    adapter: Weak<LoraAdapter>,
    /// Input name, dims and data of every parameter.
    params: Vec<(CString, Vec<i64>, Vec<f32>)>,
}

pub struct GraphLora {
    /// (layer, module) pairs the graph has LoRA inputs for.
    pub modules: BTreeSet<(usize, Module)>,
    pub dims: BaseDims,
    prepared: HashMap<u64, Prepared>,
}

impl GraphLora {
    /// Finds the graph's LoRA inputs (ONNX Runtime lists them as overridable initializers).
    pub fn detect(session: &Session, cfg: &GenaiConfig) -> Option<GraphLora> {
        let inits = session.overridable_initializers();
        let shape_of = |name: &str| {
            inits.iter().find(|i| i.name() == name).and_then(|i| match i.dtype() {
                ValueType::Tensor { shape, .. } => Some(shape.to_vec()),
                _ => None,
            })
        };
        let mut modules = BTreeSet::new();
        for layer in 0..cfg.num_layers {
            for m in Module::ALL {
                if shape_of(&param_name(layer, m, true)).is_some() && shape_of(&param_name(layer, m, false)).is_some() {
                    modules.insert((layer, m));
                }
            }
        }
        if modules.is_empty() {
            return None;
        }
        // B is [r, out]: the MLP's width comes from a gate (or up) projection's B.
        let intermediate = modules
            .iter()
            .filter(|(_, m)| matches!(m, Module::Gate | Module::Up))
            .find_map(|&(l, m)| shape_of(&param_name(l, m, false)).and_then(|s| s.get(1).copied()))
            .or_else(|| {
                modules
                    .iter()
                    .find(|(_, m)| *m == Module::Down)
                    .and_then(|&(l, m)| shape_of(&param_name(l, m, true)).and_then(|s| s.first().copied()))
            })
            .filter(|&d| d > 0)
            .unwrap_or(0) as usize;
        let dims = BaseDims {
            layers: cfg.num_layers,
            hidden: cfg.hidden_size,
            q_dim: cfg.num_heads * cfg.head_size,
            kv_dim: cfg.num_kv_heads * cfg.head_size,
            intermediate,
        };
        Some(GraphLora { modules, dims, prepared: HashMap::new() })
    }

    /// Whether the graph has an input for every module `a` targets, with matching sizes.
    pub fn check(&self, a: &LoraAdapter) -> Result<(), String> {
        a.check_fits(&self.dims)?;
        match a.modules.keys().find(|k| !self.modules.contains(k)) {
            Some((l, m)) => Err(format!("the ONNX graph has no LoRA input for layer {l} {} (re-export with --lora-inputs covering it)", m.hf_name())),
            None => Ok(()),
        }
    }

    /// Drops the prepared tensors of adapter versions no request holds any more.
    pub fn forget_unused(&mut self) {
        self.prepared.retain(|_, p| p.adapter.strong_count() > 0);
    }

    /// Views of `a`'s tensors for one run (prepared on first use).
    pub fn inputs(&mut self, a: &Arc<LoraAdapter>, host: &MemoryInfo) -> Result<Vec<(CString, View)>, String> {
        let prepared = match self.prepared.entry(a.id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let params = onnx_adapter::params(a)
                    .into_iter()
                    .map(|p| Ok((cname(&p.name)?, p.dims, p.data)))
                    .collect::<Result<Vec<_>, String>>()?;
                e.insert(Prepared { adapter: Arc::downgrade(a), params })
            }
        };
        prepared
            .params
            .iter_mut()
            .map(|(name, dims, data)| {
                // SAFETY: `data` holds prod(dims) f32 values and is neither moved nor dropped
                // while the views live (the prepared map is untouched during a run).
                let v = unsafe { View::float(host, Dtype::F32, data.as_mut_ptr().cast(), dims) }?;
                Ok((name.clone(), v))
            })
            .collect()
    }
}
