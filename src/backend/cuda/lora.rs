//! LoRA rows on the device (Punica / S-LoRA's BGMV): base-model rows and rows of any number of
//! adapters in one step, each row's low-rank update gathered by its adapter's slot.
//!
//! An adapter is uploaded the first time a step uses it: per targeted (layer, module) its `A`
//! ([rank, in]) and `B` transposed ([rank, out]) in f32, and one entry per (layer, module) in a
//! fixed table on the device ([slots, layers, 7], `LoraEntry` in kernels.cu; rank 0 where it
//! targets nothing). Each step uploads one slot index per row (-1: base model). After each
//! product, `lora_shrink` computes `t = scale * A x` for every adapted row (a block per row,
//! module and rank index) and `lora_expand` adds `B t` to the product's output (a thread per
//! output value): a row's update never reads another row, so a row gives what it gives alone (up
//! to the base product's own batch behaviour). Few rows are latency-bound (the adapters' weights
//! come from memory each step), hence a row's work spread over many blocks.
//!
//! The table and the slot indices have fixed addresses, so decode steps with adapter rows replay
//! CUDA graphs like the rest (captured per row count and rank cap: the power of two at or above
//! the largest resident adapter's rank, which sets the shrink's grid). An adapter
//! leaves the device when no request holds it any more (the registry unloaded or reloaded it and
//! its last stream ended), or when its slot is needed for another and it is not in the step.
use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::gpu::{Buf, Gpu};
use crate::backend::{BackendError, StepInput};
use crate::lora::{BaseDims, LoraAdapter, Module};

/// Largest rank applied (`LORA_MAX_RANK` in kernels.cu): the width of a row's `t`.
pub const MAX_RANK: usize = 256;
/// Most modules sharing one product (`LORA_GROUP`: q, k and v).
pub const GROUP: usize = 3;
/// `sizeof(LoraEntry)`: two addresses, then rank, scale, out_dim and col (4 bytes each).
const ENTRY_BYTES: usize = 32;

/// One product's modules: the first module's index in `Module::ALL`, and how many.
#[derive(Clone, Copy)]
pub struct Group {
    pub first: usize,
    pub count: usize,
}

pub const QKV: Group = Group { first: 0, count: 3 };
pub const O: Group = Group { first: 3, count: 1 };
pub const GATE_UP: Group = Group { first: 4, count: 2 };
pub const DOWN: Group = Group { first: 6, count: 1 };

struct Resident {
    slot: u32,
    adapter: Weak<LoraAdapter>,
    /// A and B^T of each targeted module: the table's entries point into them.
    _bufs: Vec<Buf<f32>>,
    /// The step that last used it.
    used: u64,
}

/// The adapters on the device and their table.
pub struct DevLora {
    pub table: Buf<u8>,
    dims: BaseDims,
    resident: HashMap<u64, Resident>,
    free: Vec<u32>,
    clock: u64,
}

impl DevLora {
    /// A table of `slots` adapters (at least the most sequences one step holds, so that a step's
    /// adapters always fit) for a model of `dims`.
    pub fn new(gpu: &Gpu, slots: usize, dims: BaseDims) -> Result<DevLora, BackendError> {
        Ok(DevLora {
            table: gpu.zeros(slots * dims.layers * Module::ALL.len() * ENTRY_BYTES)?,
            dims,
            resident: HashMap::new(),
            free: (0..slots as u32).rev().collect(),
            clock: 0,
        })
    }

    /// Each input's adapter slot (-1: base model), uploading the adapters not on the device yet.
    /// Returns None when no input uses an adapter.
    pub fn row_slots(&mut self, gpu: &Gpu, inputs: &[StepInput<'_>]) -> Result<Option<Vec<i32>>, BackendError> {
        self.clock += 1;
        let dead: Vec<u64> = self.resident.iter().filter(|(_, r)| r.adapter.strong_count() == 0).map(|(&id, _)| id).collect();
        for id in dead {
            self.evict(gpu, id)?;
        }
        if inputs.iter().all(|i| i.adapter.is_none()) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(inputs.len());
        for inp in inputs {
            let Some(a) = inp.adapter else {
                out.push(-1);
                continue;
            };
            if !self.resident.contains_key(&a.id) {
                if self.free.is_empty() {
                    // The least recently used adapter that this step does not use.
                    let clock = self.clock;
                    let lru = self.resident.iter().filter(|(_, r)| r.used < clock).min_by_key(|(_, r)| r.used).map(|(&id, _)| id);
                    let id = lru.ok_or_else(|| BackendError::Compute(format!("more than {} adapters in one step", self.resident.len())))?;
                    self.evict(gpu, id)?;
                }
                self.upload(gpu, a)?;
            }
            let r = self.resident.get_mut(&a.id).expect("uploaded above");
            r.used = self.clock;
            out.push(r.slot as i32);
        }
        Ok(Some(out))
    }

    fn region(&self, slot: u32) -> (usize, usize) {
        let n = self.dims.layers * Module::ALL.len() * ENTRY_BYTES;
        (slot as usize * n, n)
    }

    fn upload(&mut self, gpu: &Gpu, a: &Arc<LoraAdapter>) -> Result<(), BackendError> {
        // `check()` refused misfits already; checked again here because the kernels index the
        // tables written below by these dims (once per upload).
        a.check_fits(&self.dims).map_err(|e| BackendError::Compute(format!("adapter '{}': {e}", a.name)))?;
        let slot = self.free.pop().expect("a slot was freed above");
        let (start, len) = self.region(slot);
        let mut entries = vec![0u8; len];
        let mut bufs = Vec::with_capacity(2 * a.modules.len());
        for (&(layer, m), p) in &a.modules {
            let mi = Module::ALL.iter().position(|&x| x == m).expect("one of ALL");
            let mut bt = vec![0f32; p.b.len()];
            for o in 0..p.out_dim {
                for k in 0..p.rank {
                    bt[k * p.out_dim + o] = p.b[o * p.rank + k];
                }
            }
            let (abuf, bbuf) = (gpu.upload(&p.a)?, gpu.upload(&bt)?);
            let e = &mut entries[(layer * Module::ALL.len() + mi) * ENTRY_BYTES..][..ENTRY_BYTES];
            e[0..8].copy_from_slice(&abuf.ptr.to_le_bytes());
            e[8..16].copy_from_slice(&bbuf.ptr.to_le_bytes());
            e[16..20].copy_from_slice(&(p.rank as i32).to_le_bytes());
            e[20..24].copy_from_slice(&(p.scale as f32).to_le_bytes());
            e[24..28].copy_from_slice(&(p.out_dim as i32).to_le_bytes());
            e[28..32].copy_from_slice(&(self.column(m) as i32).to_le_bytes());
            bufs.push(abuf);
            bufs.push(bbuf);
        }
        gpu.write_at(&mut self.table, start, &entries)?;
        self.resident.insert(a.id, Resident { slot, adapter: Arc::downgrade(a), _bufs: bufs, used: self.clock });
        tracing::debug!(adapter = %a.name, slot, "LoRA adapter uploaded to the device");
        Ok(())
    }

    /// Clears the adapter's entries, then frees its buffers (after the clear, on the same stream).
    fn evict(&mut self, gpu: &Gpu, id: u64) -> Result<(), BackendError> {
        let Some(r) = self.resident.remove(&id) else { return Ok(()) };
        let (start, len) = self.region(r.slot);
        gpu.write_at(&mut self.table, start, &vec![0u8; len])?;
        self.free.push(r.slot);
        Ok(())
    }

    /// The first column of module `m`'s output in its product's output row.
    fn column(&self, m: Module) -> usize {
        let d = &self.dims;
        match m {
            Module::K => d.q_dim,
            Module::V => d.q_dim + d.kv_dim,
            Module::Up => d.intermediate,
            Module::Q | Module::O | Module::Gate | Module::Down => 0,
        }
    }

    /// Adapters on the device now.
    pub fn resident(&self) -> usize {
        self.resident.len()
    }

    /// The widest output of a group's modules.
    pub fn widest(&self, g: Group) -> usize {
        Module::ALL[g.first..g.first + g.count].iter().map(|&m| self.dims.io(m).1).max().unwrap_or(0)
    }

    /// The power of two at or above every resident adapter's rank (the shrink's grid).
    pub fn rank_cap(&self) -> usize {
        self.resident.values().filter_map(|r| r.adapter.upgrade()).map(|a| a.rank).max().unwrap_or(1).next_power_of_two()
    }
}
