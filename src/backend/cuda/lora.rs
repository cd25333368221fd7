//! LoRA rows on the device (Punica / S-LoRA): base-model rows and rows of any number of adapters
//! in one step, each row's low-rank update found by its adapter's slot.
//!
//! An adapter is uploaded the first time a step uses it: per targeted (layer, module) its `A`
//! ([rank, in]) and `B` transposed ([rank, out]) in f32, and one entry per (layer, module) in a
//! fixed table on the device ([slots, layers, 7], `LoraEntry` in kernels.cu; rank 0 where it
//! targets nothing). Each step uploads one slot index per row (-1: base model) and the adapted
//! rows gathered by adapter into tiles of up to `TILE` rows (`tiles`; Punica's SGMV).
//!
//! Per product, one `lora_update` launch on a second stream, beside cuBLAS's product on the main
//! one (forward.rs): a block per tile, module and 256 output columns computes the tile's
//! `t = scale * A x` and then `B t` for its columns into an update buffer, reading the adapter's
//! weights once for all the tile's rows; the kernel that reads the product adds an adapter row's
//! update. A row's sums run in the same order whatever tile it is in, so a row gives what it
//! gives alone, bit for bit (up to the base product's own batch behaviour).
//!
//! The table, the slot indices and the tiles have fixed addresses, so decode steps with adapter
//! rows replay CUDA graphs like the rest (the grid's tile blocks are fixed by the row count and
//! take more tiles in turn when a step has more). An adapter leaves the device when no request
//! holds it any more (the registry unloaded or reloaded it and its last stream ended), or when
//! its slot is needed for another and it is not in the step.
use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::gpu::{Buf, Gpu};
use crate::backend::{BackendError, StepInput};
use crate::lora::{BaseDims, LoraAdapter, Module};

/// Largest rank applied (`LORA_MAX_RANK` in kernels.cu): the most values of a row's `t` that a
/// `lora_update` block holds.
pub const MAX_RANK: usize = 256;
/// Most rows of one tile (`LORA_TILE`).
pub const TILE: usize = 4;
/// A tile's record in the step's tiles: its adapter slot, then `TILE` rows (`LORA_TILE_INTS`).
pub const TILE_INTS: usize = 1 + TILE;
/// Threads of a `lora_update` block (`LORA_THREADS`).
pub const THREADS: u32 = 256;
/// `sizeof(LoraEntry)`: two addresses, then rank, scale, out_dim and col (4 bytes each).
const ENTRY_BYTES: usize = 32;

/// The step's tiles from each row's adapter slot (-1: base model): the number of tiles, then per
/// tile its adapter slot and `TILE` row indices (-1 past its last row). The rows of an adapter
/// fill its tiles in step order.
pub fn tiles(row_slot: &[i32]) -> Vec<i32> {
    let mut rows: Vec<usize> = (0..row_slot.len()).filter(|&r| row_slot[r] >= 0).collect();
    rows.sort_by_key(|&r| row_slot[r]);
    let mut out = vec![0];
    for run in rows.chunk_by(|&a, &b| row_slot[a] == row_slot[b]) {
        for tile in run.chunks(TILE) {
            out.push(row_slot[tile[0]]);
            out.extend(tile.iter().map(|&r| r as i32));
            out.extend(std::iter::repeat_n(-1, TILE - tile.len()));
            out[0] += 1;
        }
    }
    out
}

/// Tile blocks of a step of `rows` rows (the grid's x; fixed per graph): enough for every tile
/// when at most 8 adapters share the step; with more, a block takes several tiles in turn.
pub fn tile_blocks(rows: usize) -> usize {
    rows.min(rows.div_ceil(TILE) + 8).max(1)
}

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

/// The first column of module `m`'s output in its product's output row.
pub fn column(d: &BaseDims, m: Module) -> usize {
    match m {
        Module::K => d.q_dim,
        Module::V => d.q_dim + d.kv_dim,
        Module::Up => d.intermediate,
        Module::Q | Module::O | Module::Gate | Module::Down => 0,
    }
}

impl Group {
    /// The group's modules, in their order in the product's output row.
    pub fn modules(self) -> &'static [Module] {
        &Module::ALL[self.first..self.first + self.count]
    }

    /// (in, out) of the group's product: its input's width and its output row's.
    pub fn io(self, d: &BaseDims) -> (usize, usize) {
        let ms = self.modules();
        (d.io(ms[0]).0, ms.iter().map(|&m| d.io(m).1).sum())
    }
}

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
        // Every (layer, module) gets its output's width and column, rank 0 where the adapter has
        // nothing: `lora_update` writes zeros there (the update buffers are not cleared).
        let mut entries = vec![0u8; len];
        for layer in 0..self.dims.layers {
            for (mi, &m) in Module::ALL.iter().enumerate() {
                let e = &mut entries[(layer * Module::ALL.len() + mi) * ENTRY_BYTES..][..ENTRY_BYTES];
                e[24..28].copy_from_slice(&(self.dims.io(m).1 as i32).to_le_bytes());
                e[28..32].copy_from_slice(&(column(&self.dims, m) as i32).to_le_bytes());
            }
        }
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
            // Its width and column are written above: `check_fits` made `p.out_dim` the base's.
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

    /// Adapters on the device now.
    pub fn resident(&self) -> usize {
        self.resident.len()
    }

    /// The widest output of a group's modules.
    pub fn widest(&self, g: Group) -> usize {
        g.modules().iter().map(|&m| self.dims.io(m).1).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_gather_rows_by_adapter() {
        // Base rows are left out; adapter 1's ten rows fill two tiles and part of a third; every
        // adapted row is in exactly one tile, with rows of its own adapter only.
        assert_eq!(TILE, 4, "the layout below is for tiles of 4 rows");
        let slots = [1, -1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, -1];
        let t = tiles(&slots);
        assert_eq!(t[0], 4);
        assert_eq!(t.len(), 1 + 4 * TILE_INTS);
        assert_eq!(&t[1..], &[0, 2, 11, -1, -1, 1, 0, 3, 4, 5, 1, 6, 7, 8, 9, 1, 10, 12, -1, -1]);
        assert_eq!(tiles(&[-1, -1]), vec![0]);
    }

    #[test]
    fn tiles_hold_every_mix() {
        // Random mixes: each adapted row in exactly one tile, tiles of one adapter, packed.
        let mut seed = 7u64;
        for _ in 0..500 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let rows = 1 + (seed >> 33) as usize % 256;
            let adapters = 1 + (seed >> 20) as usize % 12;
            let slots: Vec<i32> = (0..rows)
                .map(|r| {
                    let h = (r as u64 + 1).wrapping_mul(seed | 1) >> 40;
                    (h % (adapters as u64 + 1)) as i32 - 1
                })
                .collect();
            let t = tiles(&slots);
            let n = t[0] as usize;
            assert_eq!(t.len(), 1 + n * TILE_INTS);
            assert!(n <= rows);
            let mut seen = vec![false; rows];
            for record in t[1..].chunks(TILE_INTS) {
                let (slot, tile) = (record[0], &record[1..]);
                let members: Vec<usize> = tile.iter().take_while(|&&r| r >= 0).map(|&r| r as usize).collect();
                assert!(!members.is_empty());
                assert!(tile[members.len()..].iter().all(|&r| r == -1));
                assert!(members.iter().all(|&r| slots[r] == slot));
                for r in members {
                    assert!(!seen[r]);
                    seen[r] = true;
                }
            }
            assert!((0..rows).all(|r| seen[r] == (slots[r] >= 0)));
            // At most one part-filled tile per adapter, so with up to 8 adapters every tile has
            // its own block (`tile_blocks`).
            let mut used: Vec<i32> = slots.iter().copied().filter(|&s| s >= 0).collect();
            used.sort();
            used.dedup();
            assert!(n <= used.len() + slots.iter().filter(|&&s| s >= 0).count() / TILE);
            if used.len() <= 8 {
                assert!(n <= tile_blocks(rows));
            }
        }
    }
}
