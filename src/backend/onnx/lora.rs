//! LoRA on the onnx backend: graphs exported with `scripts/export_onnx.py --lora-inputs` take
//! each projection's A (`[in, r]`) and B (`[r, out]`, scale folded in) as optional inputs whose
//! defaults are empty (rank 0: the base model).
//!
//! - Graphs with the row mask input `lora_mask` (`x A` is multiplied by it before `B`; every
//!   export since the mask was added; a required input, fed on every run) run rows with
//!   different adapters in one `Run`: the adapters in use are stacked along the rank axis into
//!   a [`Bank`] (A `[in, r1 + r2 + ..]`, B likewise, zeros where an adapter lacks a module), and
//!   each row's mask is 1 on its own adapter's columns and 0 elsewhere. A row's sums then hold
//!   exactly its own adapter's terms plus exact zeros: the same bits as that adapter alone in a
//!   run of the same shape (ONNX Runtime's one-row MatMul kernel differs in the last bits).
//!   The bank is a copy of its members' weights (not counted in `lora_budget_mb`), kept while
//!   they live and rebuilt when a step needs an adapter it lacks.
//! - Older graphs without the mask activate one adapter per `Run` by feeding its tensors
//!   (the parameters `inferd convert-adapter` writes to an `.onnx_adapter` file, widened to one
//!   rank for every module of the graph); a step then runs one `Run` per adapter group.
//!
//! Tensors are prepared once per adapter version (or set of versions, for a bank) and dropped
//! when no request holds a version any more.
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::sync::{Arc, Weak};

use ort::memory::MemoryInfo;
use ort::session::Session;
use ort::value::ValueType;

use super::genai_config::GenaiConfig;
use super::run::{cname, Dtype, View};
use crate::lora::onnx_adapter::{self, param_name};
use crate::lora::{BaseDims, LoraAdapter, Module, QkRows};

struct Prepared {
    adapter: Weak<LoraAdapter>,
    /// Input name, dims and data of every parameter.
    params: Vec<(CString, Vec<i64>, Vec<f32>)>,
}

/// Name of the row mask input (`[batch, 1 | seq, R]`).
const MASK: &str = "lora_mask";

/// Several adapters stacked along the rank axis, for one mixed `Run`.
struct Bank {
    /// Members by ascending id, with their first column and width.
    members: Vec<(Weak<LoraAdapter>, u64, usize, usize)>,
    /// Total width R.
    width: usize,
    /// Input name, dims and data of every LoRA input of the graph.
    params: Vec<(CString, Vec<i64>, Vec<f32>)>,
}

impl Bank {
    fn build(graph: &GraphLora, adapters: &[&Arc<LoraAdapter>]) -> Result<Bank, String> {
        let mut members = Vec::with_capacity(adapters.len());
        let mut width = 0;
        for a in adapters {
            let r = a.modules.values().map(|p| p.rank).max().unwrap_or(0);
            members.push((Arc::downgrade(a), a.id, width, r));
            width += r;
        }
        // Each member's tensors as `inferd convert-adapter` writes them (A [in, r], B [r, out]
        // with the scale folded in), copied into its columns of A and rows of B.
        let own: Vec<HashMap<String, Vec<f32>>> =
            adapters.iter().map(|a| onnx_adapter::params(a).into_iter().map(|p| (p.name, p.data)).collect()).collect();
        let mut params = Vec::with_capacity(2 * graph.modules.len());
        for &(layer, m) in &graph.modules {
            let (fin, fout) = graph.dims.io(m);
            let (a_name, b_name) = (param_name(layer, m, true), param_name(layer, m, false));
            let mut a_bank = vec![0f32; fin * width];
            let mut b_bank = vec![0f32; width * fout];
            for (tensors, &(_, _, off, _)) in own.iter().zip(&members) {
                let (Some(a), Some(b)) = (tensors.get(&a_name), tensors.get(&b_name)) else { continue };
                let r = a.len() / fin;
                debug_assert_eq!((a.len(), b.len()), (fin * r, r * fout), "{a_name}: A and B of rank {r}");
                for (x, row) in a.chunks_exact(r).enumerate() {
                    a_bank[x * width + off..x * width + off + r].copy_from_slice(row);
                }
                b_bank[off * fout..(off + r) * fout].copy_from_slice(b);
            }
            let w = width as i64;
            params.push((cname(&a_name)?, vec![fin as i64, w], a_bank));
            params.push((cname(&b_name)?, vec![w, fout as i64], b_bank));
        }
        Ok(Bank { members, width, params })
    }

    /// Whether every member is still held by someone and `ids` are all members.
    fn serves(&self, ids: &[u64]) -> bool {
        self.members.iter().all(|m| m.0.strong_count() > 0) && ids.iter().all(|id| self.members.iter().any(|m| m.1 == *id))
    }
}

pub struct GraphLora {
    /// (layer, module) pairs the graph has LoRA inputs for.
    pub modules: BTreeSet<(usize, Module)>,
    pub dims: BaseDims,
    prepared: HashMap<u64, Prepared>,
    /// The row mask input, when the graph has one (one `Run` for rows with different adapters).
    mask: Option<CString>,
    bank: Option<Bank>,
    /// The mask of the current run, `[b, 1, R]`.
    mask_buf: Vec<f32>,
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
            // genai's builder exports Hugging Face's layout (rotary on the halves of each head).
            qk_rows: QkRows::Hf,
            max_rank: None,
        };
        // The row mask is a plain (required) input: see scripts/export_onnx.py for why.
        let mask = session.inputs().iter().any(|i| i.name() == MASK).then(|| cname(MASK).ok()).flatten();
        Some(GraphLora { modules, dims, prepared: HashMap::new(), mask, bank: None, mask_buf: Vec::new() })
    }

    /// Whether the graph has an input for every module `a` targets, with matching sizes.
    pub fn check(&self, a: &LoraAdapter) -> Result<(), String> {
        a.check_fits(&self.dims)?;
        match a.modules.keys().find(|k| !self.modules.contains(k)) {
            Some((l, m)) => Err(format!("the ONNX graph has no LoRA input for layer {l} {} (re-export with --lora-inputs covering it)", m.hf_name())),
            None => Ok(()),
        }
    }

    /// Whether one `Run` can serve rows with different adapters (the graph has the row mask).
    pub fn mixes(&self) -> bool {
        self.mask.is_some()
    }

    /// Drops the prepared tensors of adapter versions no request holds any more.
    pub fn forget_unused(&mut self) {
        self.prepared.retain(|_, p| p.adapter.strong_count() > 0);
        if self.bank.as_ref().is_some_and(|b| !b.serves(&[])) {
            self.bank = None;
        }
    }

    /// Inputs for one run whose batch row `i` uses adapter `rows[i]` (None: the base model or
    /// a padding row). Without the row mask every row must use the same adapter.
    pub fn run_inputs(&mut self, rows: &[Option<&Arc<LoraAdapter>>], host: &MemoryInfo) -> Result<Vec<(CString, View)>, String> {
        let mut used: Vec<&Arc<LoraAdapter>> = rows.iter().flatten().copied().collect();
        used.sort_by_key(|a| a.id);
        used.dedup_by_key(|a| a.id);
        let Some(mask_name) = self.mask.clone() else {
            // One adapter per run: the caller groups rows by adapter, so rows without one are
            // padding rows riding along (they compute with the group's adapter, and what they
            // write is overwritten by their own next step).
            return match used.as_slice() {
                [] => Ok(Vec::new()),
                [a] => self.inputs(a, host),
                _ => Err("this ONNX graph has no lora_mask input: one run takes one adapter".into()),
            };
        };
        let mut out = Vec::new();
        if used.is_empty() {
            // The base model: the LoRA inputs keep their empty defaults (rank 0), and a single
            // 1 broadcasts over those zero columns.
            self.mask_buf.clear();
            self.mask_buf.push(1.0);
            // SAFETY: mask_buf holds 1 f32 and is untouched until the next call, after the run.
            out.push((mask_name, unsafe { View::float(host, Dtype::F32, self.mask_buf.as_mut_ptr().cast(), &[1, 1, 1]) }?));
            return Ok(out);
        }
        let ids: Vec<u64> = used.iter().map(|a| a.id).collect();
        if !self.bank.as_ref().is_some_and(|b| b.serves(&ids)) {
            self.bank = None; // free the old one first
            self.bank = Some(Bank::build(self, &used)?);
        }
        let bank = self.bank.as_mut().expect("built above");
        self.mask_buf.clear();
        self.mask_buf.resize(rows.len() * bank.width, 0.0);
        for (i, row) in rows.iter().enumerate() {
            if let Some(a) = row {
                let &(_, _, off, w) = bank.members.iter().find(|m| m.1 == a.id).expect("the bank holds every adapter in use");
                self.mask_buf[i * bank.width + off..i * bank.width + off + w].fill(1.0);
            }
        }
        out.reserve(bank.params.len() + 1);
        let mask_dims = [rows.len() as i64, 1, bank.width as i64];
        // SAFETY: mask_buf holds b*R f32 and is untouched until the next call, after the run.
        out.push((mask_name, unsafe { View::float(host, Dtype::F32, self.mask_buf.as_mut_ptr().cast(), &mask_dims) }?));
        for (name, dims, data) in &mut bank.params {
            // SAFETY: as in `inputs`: the bank outlives the run and is not touched during it.
            out.push((name.clone(), unsafe { View::float(host, Dtype::F32, data.as_mut_ptr().cast(), dims) }?));
        }
        Ok(out)
    }

    /// Views of `a`'s tensors for one run (prepared on first use): every LoRA input of the graph
    /// at `a`'s largest rank, zeros where `a` lacks a module or has a smaller rank (a bank of
    /// one). Zero columns add exact zeros; feeding one rank everywhere keeps graphs exported
    /// before `--lora-inputs` gave each module's A output its own rank dimension working: their
    /// shape information lets ONNX Runtime share one buffer between modules, which fails when a
    /// run feeds modules of different ranks.
    fn inputs(&mut self, a: &Arc<LoraAdapter>, host: &MemoryInfo) -> Result<Vec<(CString, View)>, String> {
        if !self.prepared.contains_key(&a.id) {
            let params = Bank::build(self, &[a])?.params;
            self.prepared.insert(a.id, Prepared { adapter: Arc::downgrade(a), params });
        }
        let prepared = self.prepared.get_mut(&a.id).expect("prepared above");
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
