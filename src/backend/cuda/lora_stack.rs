//! LoRA rows through stacked adapter weights (the layout of vLLM's and S-LoRA's LoRA buffers):
//! the other way to apply adapters beside `lora.rs`'s tiled kernel, chosen per step.
//!
//! Per layer and product group (q/k/v, o, gate/up, down) the `A` of every stack slot's adapter
//! is stacked into one matrix ([slots, modules, rank] rows of the product's input width, in the
//! compute dtype), so one cuBLAS product on the side stream, beside the base product, gives every
//! row of the step its `t = A x` for every slot at once (`t` buffers in `forward::Scratch`). The
//! kernel that reads the base product then adds a row's `B t` for its own slot (`lora_stack_at` in
//! kernels.cu) from each slot's `B` transposed and scaled ([slots, rank, product width], f32,
//! each module's columns where its output sits in the product's row). No adapter kernel runs.
//!
//! The sizes are fixed at load (`StackSize`), so a step's launches are the same whatever
//! adapters it holds and decode steps replay graphs. An adapter of a rank above the stacks'
//! rank, or a step with more adapters than slots, takes the tiled kernel for that step
//! (`rows` returns None). A slot is taken by the least recently used adapter that the step does
//! not use; an adapter's rank below the stacks' is padded with zeros, as are the modules it does
//! not target. Rows that use no adapter compute `t` too (their share of a small product) and add
//! nothing.
use std::sync::Arc;

use super::gpu::{Buf, Dtype, Gpu};
use super::lora::{self, Group};
use super::weights::to_bytes;
use crate::backend::{BackendError, StepInput};
use crate::lora::{BaseDims, LoraAdapter};

/// The groups in the order of `LoraStacks`' per-layer arrays.
pub const GROUPS: [Group; 4] = [lora::QKV, lora::O, lora::GATE_UP, lora::DOWN];

/// Group `g`'s place in `GROUPS`.
fn index(g: Group) -> usize {
    GROUPS.iter().position(|x| x.first == g.first).expect("one of GROUPS")
}

/// The stacks' size: adapters held at once, and the largest rank they take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackSize {
    pub slots: usize,
    pub rank: usize,
}

impl StackSize {
    /// "SLOTSxRANK" (e.g. "4x16"); "0", "off" or empty: no stacks.
    pub fn parse(s: &str) -> Result<Option<StackSize>, String> {
        let s = s.trim();
        if s.is_empty() || s == "0" || s.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let bad = || format!("LoRA stacks '{s}': expected SLOTSxRANK, e.g. 4x16 (slots 1-64, rank 1-{})", lora::MAX_RANK);
        let (a, b) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let (slots, rank) = (a.trim().parse::<usize>().map_err(|_| bad())?, b.trim().parse::<usize>().map_err(|_| bad())?);
        if !(1..=64).contains(&slots) || !(1..=lora::MAX_RANK).contains(&rank) {
            return Err(bad());
        }
        Ok(Some(StackSize { slots, rank }))
    }

    /// `INFERD_LORA_STACK` (unset: none); an invalid value is logged and ignored.
    pub fn from_env() -> Option<StackSize> {
        let v = std::env::var("INFERD_LORA_STACK").ok()?;
        StackSize::parse(&v).unwrap_or_else(|e| {
            tracing::warn!("INFERD_LORA_STACK ignored: {e}");
            None
        })
    }

    /// Columns of group `g`'s `t`: slots x modules x rank.
    pub fn t_cols(self, g: Group) -> usize {
        self.slots * g.count * self.rank
    }
}

/// A group's stacked weights in one layer.
struct Stack {
    /// [slots x modules x rank, in] in the compute dtype.
    a: Buf<u8>,
    /// [slots x rank, width] f32.
    bt: Buf<f32>,
}

/// `LoraStack` of kernels.cu: what a product's reader needs to add a row's stacked update.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StackArg {
    pub t: u64,
    pub row_stack: u64,
    pub bt: u64,
    pub t_stride: i32,
    pub width: i32,
    pub rank: i32,
    pub count: i32,
}

// SAFETY: a plain C struct of two-word addresses and 4-byte ints, laid out as kernels.cu's
// `LoraStack` (3 x 8 + 4 x 4 bytes, 8-byte aligned); kernels read it by value.
unsafe impl cudarc::driver::DeviceRepr for StackArg {}

pub struct LoraStacks {
    size: StackSize,
    dtype: Dtype,
    dims: BaseDims,
    /// Per layer, per group of `GROUPS`.
    layers: Vec<Vec<Stack>>,
    /// Each slot's adapter (its id) and the step that last used it.
    owner: Vec<Option<(u64, u64)>>,
    clock: u64,
}

impl LoraStacks {
    pub fn new(gpu: &Gpu, size: StackSize, dtype: Dtype, dims: BaseDims) -> Result<LoraStacks, BackendError> {
        let mut layers = Vec::with_capacity(dims.layers);
        for _ in 0..dims.layers {
            let mut groups = Vec::with_capacity(GROUPS.len());
            for g in GROUPS {
                let (input, width) = g.io(&dims);
                groups.push(Stack { a: gpu.zeros(size.t_cols(g) * input * dtype.bytes())?, bt: gpu.zeros(size.slots * size.rank * width)? });
            }
            layers.push(groups);
        }
        Ok(LoraStacks { size, dtype, dims, layers, owner: vec![None; size.slots], clock: 0 })
    }

    pub fn size(&self) -> StackSize {
        self.size
    }

    /// Device bytes of the stacks.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|s| s.a.len() + 4 * s.bt.len()).sum()
    }

    /// Group `g` of `layer`: its stacked A's address.
    pub fn a(&self, layer: usize, g: Group) -> u64 {
        self.layers[layer][index(g)].a.ptr
    }

    /// The reader's argument for group `g` of `layer`, with `t` the group's shrink product and
    /// `row_stack` the step's per-row slots.
    pub fn arg(&self, layer: usize, g: Group, t: u64, row_stack: u64) -> StackArg {
        StackArg {
            t,
            row_stack,
            bt: self.layers[layer][index(g)].bt.ptr,
            t_stride: self.size.t_cols(g) as i32,
            width: g.io(&self.dims).1 as i32,
            rank: self.size.rank as i32,
            count: g.count as i32,
        }
    }

    /// Each input's stack slot (-1: base model), putting the step's adapters that are not in the
    /// stacks yet into slots; None when the step cannot go through the stacks (more adapters than
    /// slots, or a rank above the stacks') and takes the tiled kernel. Call only for steps with
    /// adapter rows.
    pub fn rows(&mut self, gpu: &Gpu, inputs: &[StepInput<'_>]) -> Result<Option<Vec<i32>>, BackendError> {
        self.clock += 1;
        let mut step: Vec<&Arc<LoraAdapter>> = Vec::new();
        for a in inputs.iter().filter_map(|i| i.adapter) {
            if !step.iter().any(|s| s.id == a.id) {
                step.push(a);
            }
        }
        if step.len() > self.size.slots || step.iter().any(|a| a.modules.values().any(|p| p.rank > self.size.rank)) {
            return Ok(None);
        }
        // The step's adapters already in slots are marked first, so that none of them is taken
        // for another below.
        for a in &step {
            if let Some(o) = self.owner.iter_mut().flatten().find(|o| o.0 == a.id) {
                o.1 = self.clock;
            }
        }
        for a in &step {
            if self.slot_of(a.id).is_some() {
                continue;
            }
            let clock = self.clock;
            let free = self.owner.iter().position(Option::is_none);
            let lru = || (0..self.owner.len()).filter(|&s| self.owner[s].is_some_and(|o| o.1 < clock)).min_by_key(|&s| self.owner[s].map_or(0, |o| o.1));
            let slot = free.or_else(lru).expect("a step holds at most `slots` adapters");
            // Unowned while it is written: an upload that fails halfway must not leave the slot
            // named after its old adapter with another's weights in part of it.
            self.owner[slot] = None;
            self.upload(gpu, slot, a)?;
            self.owner[slot] = Some((a.id, clock));
        }
        Ok(Some(inputs.iter().map(|i| i.adapter.map_or(-1, |a| self.slot_of(a.id).expect("put in a slot above") as i32)).collect()))
    }

    fn slot_of(&self, id: u64) -> Option<usize> {
        self.owner.iter().position(|o| o.is_some_and(|o| o.0 == id))
    }

    /// Writes `a`'s weights over slot `slot` of every stack (zeros where it has none).
    fn upload(&mut self, gpu: &Gpu, slot: usize, a: &LoraAdapter) -> Result<(), BackendError> {
        a.check_fits(&self.dims).map_err(|e| BackendError::Compute(format!("adapter '{}': {e}", a.name)))?;
        for layer in 0..self.dims.layers {
            for (gi, g) in GROUPS.into_iter().enumerate() {
                let (av, bt) = slot_weights(a, layer, g, self.size.rank, &self.dims);
                let s = &mut self.layers[layer][gi];
                let bytes = to_bytes(&av, self.dtype);
                gpu.write_at(&mut s.a, slot * bytes.len(), &bytes)?;
                gpu.write_at(&mut s.bt, slot * bt.len(), &bt)?;
            }
        }
        tracing::debug!(adapter = %a.name, slot, "LoRA adapter put in the stacks");
        Ok(())
    }
}

/// One slot's share of group `g`'s stacks in `layer` for adapter `a`: its A rows ([modules x
/// rank, in], each module's `rank` rows from its first, zeros past the adapter's rank and for
/// the modules it does not target) and its scaled B transposed ([rank, width], each module's
/// output at its column of the product's row).
fn slot_weights(a: &LoraAdapter, layer: usize, g: Group, rank: usize, dims: &BaseDims) -> (Vec<f32>, Vec<f32>) {
    let (input, width) = g.io(dims);
    let mut av = vec![0f32; g.count * rank * input];
    let mut bt = vec![0f32; rank * width];
    for (j, &m) in g.modules().iter().enumerate() {
        let Some(p) = a.modules.get(&(layer, m)) else { continue };
        let col = lora::column(dims, m);
        av[j * rank * input..][..p.rank * input].copy_from_slice(&p.a);
        for k in 0..p.rank {
            for o in 0..p.out_dim {
                bt[k * width + col + o] = (p.scale * p.b[o * p.rank + k] as f64) as f32;
            }
        }
    }
    (av, bt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_refuse_what_they_cannot_hold() {
        assert_eq!(StackSize::parse("4x16"), Ok(Some(StackSize { slots: 4, rank: 16 })));
        assert_eq!(StackSize::parse(" 8X64 "), Ok(Some(StackSize { slots: 8, rank: 64 })));
        for off in ["", "0", "off", "OFF"] {
            assert_eq!(StackSize::parse(off), Ok(None), "{off:?}");
        }
        for bad in ["4", "x16", "4x", "0x16", "4x0", "65x16", "4x257", "-1x4", "4x16x2"] {
            let e = StackSize::parse(bad).expect_err(bad);
            assert!(e.contains("SLOTSxRANK"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_kernel_argument_is_laid_out_as_kernels_cu_reads_it() {
        // `LoraStack` in kernels.cu: three 8-byte addresses, then four 4-byte ints, 40 bytes.
        let a = StackArg { t: 1, row_stack: 2, bt: 3, t_stride: 4, width: 5, rank: 6, count: 7 };
        assert_eq!(std::mem::size_of::<StackArg>(), 40);
        assert_eq!(std::mem::align_of::<StackArg>(), 8);
        let base = &a as *const StackArg as usize;
        let offsets = [&a.t as *const u64 as usize, &a.row_stack as *const u64 as usize, &a.bt as *const u64 as usize];
        assert_eq!(offsets.map(|o| o - base), [0, 8, 16]);
        let ints = [&a.t_stride as *const i32 as usize, &a.width as *const i32 as usize, &a.rank as *const i32 as usize, &a.count as *const i32 as usize];
        assert_eq!(ints.map(|o| o - base), [24, 28, 32, 36]);
    }

    #[test]
    fn group_widths_and_t_columns() {
        let d = BaseDims { layers: 2, hidden: 64, q_dim: 64, kv_dim: 16, intermediate: 160, qk_rows: crate::lora::QkRows::Hf, max_rank: None };
        assert_eq!(GROUPS.map(|g| g.io(&d)), [(64, 96), (64, 64), (64, 320), (160, 64)]);
        let s = StackSize { slots: 4, rank: 8 };
        assert_eq!(GROUPS.map(|g| s.t_cols(g)), [96, 32, 64, 32]);
        // Each module's columns of a group follow one another in the product's row.
        for g in GROUPS {
            let mut at = 0;
            for &m in g.modules() {
                assert_eq!(lora::column(&d, m), at);
                at += d.io(m).1;
            }
        }
    }

    /// `lora_stack_at` of kernels.cu, on the host.
    /// (`g`'s module count and width, the column and its module.)
    fn stack_at(t_row: &[f32], bt: &[f32], s: usize, rank: usize, (count, width): (usize, usize), (c, j): (usize, usize)) -> f32 {
        let t = &t_row[(s * count + j) * rank..];
        let b = &bt[s * rank * width + c..];
        (0..rank).map(|k| t[k] * b[k * width]).sum()
    }

    #[test]
    fn stacked_products_and_reader_sums_give_each_rows_own_adapter_update() {
        // Three adapters of different ranks and modules in the slots of 3x8 stacks; rows of each
        // slot and of none. `t = x A_stack^T` (the cuBLAS product) and the readers' sum must give
        // each row, at each column of the product, `scale B_m (A_m x)` of its own adapter's
        // module there, and nothing where it has none.
        use crate::lora::{LoraPair, Module};
        use std::collections::BTreeMap;
        let d = BaseDims { layers: 2, hidden: 24, q_dim: 24, kv_dim: 8, intermediate: 40, qk_rows: crate::lora::QkRows::Hf, max_rank: None };
        let size = StackSize { slots: 3, rank: 8 };
        let mut seed = 11u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let specs: [(usize, &[Module], f64); 3] = [(8, &Module::ALL, 2.0), (4, &[Module::Q, Module::V, Module::Down], 0.5), (3, &[Module::K, Module::Up, Module::O], 1.5)];
        let adapters: Vec<LoraAdapter> = specs
            .iter()
            .enumerate()
            .map(|(n, &(rank, ms, scale))| {
                let mut modules = BTreeMap::new();
                for layer in 0..d.layers {
                    for &m in ms {
                        let (i, o) = d.io(m);
                        let (a, b) = ((0..rank * i).map(|_| rnd()).collect(), (0..o * rank).map(|_| rnd()).collect());
                        modules.insert((layer, m), LoraPair::new(a, b, rank, i, o, scale).expect("a pair"));
                    }
                }
                LoraAdapter::new(&format!("a{n}"), std::path::PathBuf::new(), "test", modules)
            })
            .collect();
        let row_slot = [0i32, -1, 2, 1, 0, 2, -1, 1];
        for layer in 0..d.layers {
            for g in GROUPS {
                let (input, width) = g.io(&d);
                let (mut a_stack, mut bt) = (Vec::new(), Vec::new());
                for a in &adapters {
                    let (av, b) = slot_weights(a, layer, g, size.rank, &d);
                    a_stack.extend(av);
                    bt.extend(b);
                }
                let n = size.t_cols(g);
                assert_eq!(a_stack.len(), n * input);
                for &s in &row_slot {
                    let x: Vec<f32> = (0..input).map(|_| rnd()).collect();
                    let t_row: Vec<f32> = (0..n).map(|c| (0..input).map(|i| x[i] * a_stack[c * input + i]).sum()).collect();
                    for (j, &m) in g.modules().iter().enumerate() {
                        let (col, out) = (lora::column(&d, m), d.io(m).1);
                        let pair = (s >= 0).then(|| adapters[s as usize].modules.get(&(layer, m))).flatten();
                        for o in 0..out {
                            let got = if s >= 0 { stack_at(&t_row, &bt, s as usize, size.rank, (g.count, width), (col + o, j)) } else { 0.0 };
                            let want = pair.map_or(0.0, |p| {
                                let ax: Vec<f64> = (0..p.rank).map(|k| (0..input).map(|i| p.a[k * input + i] as f64 * x[i] as f64).sum()).collect();
                                p.scale * (0..p.rank).map(|k| p.b[o * p.rank + k] as f64 * ax[k]).sum::<f64>()
                            });
                            assert!((got as f64 - want).abs() < 1e-4, "layer {layer} {m:?} slot {s} column {o}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
