//! The KV cache of an ONNX decoder: per layer one key and one value buffer of shape
//! `[slots, kv_heads, cap, head_size]`, shared by every live sequence (one slot each).
//!
//! `cap` (positions per slot in the layout) follows the longest sequence: it starts at
//! [`MIN_CAP`] and grows to the next multiple of [`MIN_CAP`] (or of an eighth of `cap`, once that
//! is larger) when a step needs more, up to `max_len`; it shrinks back to fit when every sequence
//! fits in half. GroupQueryAttention's CPU kernel does work in proportion to the buffer's length
//! for every row, layer and step (it clears the attention scores of the unused positions): a
//! 4096-position layout for 200-token chats cost ~10% of an 8-row decode step on Qwen2.5-0.5B,
//! and the op alone takes 5.2 ms per 8-row step at 64 positions against 8.3 ms at 256
//! (docs/perf-notes.md). A change of `cap` moves each slot's positions in use within the buffer
//! (host memory; device buffers keep `cap = max_len`), so growth comes in steps, not per token.
//!
//! The graph's GroupQueryAttention reads the past from these buffers and writes the new positions
//! into the same memory (its shared past/present buffer mode), at each row's own length. So a
//! sequence joining or leaving the batch costs nothing, and a decode step over slots `0..b` hands
//! the graph a contiguous prefix of every buffer.
//!
//! Host buffers are allocated zeroed and untouched, so the OS maps pages only as sequences grow;
//! device buffers (CUDA, a cuda build) are allocated through cudarc ([`Place::Cuda`]).
use std::collections::HashMap;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};

use crate::backend::SeqId;

/// One buffer's memory: host (Rust-owned, 8-byte aligned) or, in a cuda build on ONNX Runtime's
/// CUDA provider, device memory allocated through cudarc in the device's primary context (the
/// one the provider runs in): exact sizes, outside ONNX Runtime's arena, which is left to the
/// weights and the activations.
enum Memory {
    Host(Vec<u64>),
    #[cfg(feature = "cuda")]
    Device(crate::backend::cuda::gpu::Buf<u8>),
}

impl Memory {
    fn base(&mut self) -> *mut u8 {
        match self {
            Memory::Host(v) => v.as_mut_ptr().cast(),
            #[cfg(feature = "cuda")]
            Memory::Device(b) => b.ptr as *mut u8,
        }
    }
}

/// Where a cache's buffers go.
pub enum Place<'a> {
    Host,
    /// Device memory of this GPU (ordinal given for ONNX Runtime's memory info).
    #[cfg(feature = "cuda")]
    Cuda(&'a crate::backend::cuda::gpu::Gpu, i32),
    /// Never made: holds the lifetime in a build without the cuda feature.
    #[doc(hidden)]
    _Lifetime(std::marker::PhantomData<&'a ()>),
}

/// Geometry of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_size: usize,
    /// Positions a sequence may hold.
    pub max_len: usize,
    pub slots: usize,
    /// Bytes per element (4 for f32, 2 for f16).
    pub elem_bytes: usize,
}

/// Smallest layout length (positions per slot).
pub const MIN_CAP: usize = 64;

impl KvShape {
    fn slot_bytes(&self, cap: usize) -> usize {
        self.kv_heads * cap * self.head_size * self.elem_bytes
    }
    /// Bytes of all buffers together (allocated for `max_len`).
    pub fn total_bytes(&self) -> usize {
        self.slot_bytes(self.max_len) * self.slots * self.layers * 2
    }
}

pub struct KvSlots {
    pub shape: KvShape,
    /// Per layer: (key, value).
    buffers: Vec<(Memory, Memory)>,
    pub memory_info: MemoryInfo<'static>,
    /// Positions held per slot (0 for a free slot).
    lens: Vec<usize>,
    owner: Vec<Option<SeqId>>,
    slot_of: HashMap<SeqId, usize>,
    /// Positions per slot in the current layout.
    cap: usize,
}

impl KvSlots {
    /// Allocates the buffers in `place`.
    pub fn new(shape: KvShape, place: Place<'_>) -> Result<KvSlots, String> {
        let bytes = shape.slots * shape.slot_bytes(shape.max_len);
        let (device, id) = match &place {
            #[cfg(feature = "cuda")]
            Place::Cuda(_, id) => (AllocationDevice::CUDA, *id),
            _ => (AllocationDevice::CPU, 0),
        };
        let memory_info = MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default).map_err(|e| format!("memory info: {e}"))?;
        let make = || -> Result<Memory, String> {
            match &place {
                #[cfg(feature = "cuda")]
                Place::Cuda(gpu, _) => gpu.zeros::<u8>(bytes).map(Memory::Device).map_err(|e| format!("KV cache: {e}")),
                _ => Ok(Memory::Host(vec![0u64; bytes.div_ceil(8)])),
            }
        };
        let mut buffers = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            buffers.push((make()?, make()?));
        }
        // Cleared on cudarc's stream; ONNX Runtime reads them on its own.
        #[cfg(feature = "cuda")]
        if let Place::Cuda(gpu, _) = &place {
            gpu.sync().map_err(|e| e.to_string())?;
        }
        Ok(KvSlots {
            shape,
            buffers,
            memory_info,
            lens: vec![0; shape.slots],
            owner: vec![None; shape.slots],
            slot_of: HashMap::new(),
            cap: if matches!(place, Place::Host) { MIN_CAP.min(shape.max_len) } else { shape.max_len },
        })
    }

    /// Positions per slot in the current layout (the tensors' third dimension).
    pub fn cap(&self) -> usize {
        self.cap
    }

    fn on_host(&self) -> bool {
        self.buffers.iter().all(|(k, _)| matches!(k, Memory::Host(_)))
    }

    /// Makes the layout hold `need` positions per slot (`need <= max_len`): the next multiple of
    /// the growth step ([`MIN_CAP`], or an eighth of the current `cap` rounded up to it).
    pub fn reserve(&mut self, need: usize) {
        assert!(need <= self.shape.max_len, "{need} positions exceed the cache's {}", self.shape.max_len);
        if need <= self.cap {
            return;
        }
        let step = (self.cap / 8).next_multiple_of(MIN_CAP).max(MIN_CAP);
        self.relayout(need.next_multiple_of(step).min(self.shape.max_len));
    }

    /// Shrinks the layout to fit (a multiple of [`MIN_CAP`]) once every sequence, plus one
    /// position, fits in half of it (each change copies every position in use, so not for less).
    pub fn shrink(&mut self) {
        let need = self.lens.iter().copied().max().unwrap_or(0) + 1;
        if self.cap > MIN_CAP && need * 2 <= self.cap {
            self.relayout(need.next_multiple_of(MIN_CAP).min(self.cap));
        }
    }

    /// Moves every slot's positions in use to the layout of `cap` positions per slot.
    fn relayout(&mut self, cap: usize) {
        if !self.on_host() || cap == self.cap {
            return; // device buffers are laid out for max_len from the start
        }
        let sh = self.shape;
        let row = sh.head_size * sh.elem_bytes;
        let old = self.cap;
        // (slot, head) blocks in the order that never overwrites a block not yet moved.
        let mut blocks: Vec<(usize, usize)> = (0..sh.slots).flat_map(|s| (0..sh.kv_heads).map(move |h| (s, h))).collect();
        if cap > old {
            blocks.reverse();
        }
        for (k, v) in &mut self.buffers {
            for mem in [k, v] {
                let base = mem.base();
                for &(s, h) in &blocks {
                    let n = self.lens[s].min(cap) * row;
                    let (from, to) = ((s * sh.kv_heads + h) * old * row, (s * sh.kv_heads + h) * cap * row);
                    if n > 0 && from != to {
                        // SAFETY: both ranges lie in the buffer (allocated for max_len >= old, cap);
                        // `copy` allows overlap, and the order keeps unmoved blocks intact.
                        unsafe { std::ptr::copy(base.add(from), base.add(to), n) };
                    }
                }
            }
        }
        self.cap = cap;
    }

    /// The slot of `seq`, taking the lowest free one for a new sequence (None when all are taken).
    pub fn slot_for(&mut self, seq: SeqId) -> Option<usize> {
        if let Some(&s) = self.slot_of.get(&seq) {
            return Some(s);
        }
        let s = self.owner.iter().position(Option::is_none)?;
        self.owner[s] = Some(seq);
        self.lens[s] = 0;
        self.slot_of.insert(seq, s);
        Some(s)
    }

    pub fn slot(&self, seq: SeqId) -> Option<usize> {
        self.slot_of.get(&seq).copied()
    }

    pub fn len_of(&self, seq: SeqId) -> usize {
        self.slot(seq).map_or(0, |s| self.lens[s])
    }

    pub fn free_slots(&self) -> usize {
        self.owner.iter().filter(|o| o.is_none()).count()
    }

    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    pub fn set_len(&mut self, slot: usize, len: usize) {
        debug_assert!(len <= self.shape.max_len);
        self.lens[slot] = len;
    }

    /// Exchanges the contents of two slots (host memory only: false for device buffers, which
    /// stay where they are). Copies the positions in use, `max(len a, len b)` per head.
    pub fn swap_slots(&mut self, a: usize, b: usize) -> bool {
        if a == b {
            return true;
        }
        if !self.on_host() {
            return false;
        }
        let sh = self.shape;
        let n = self.lens[a].max(self.lens[b]) * sh.head_size * sh.elem_bytes;
        let head_bytes = self.cap * sh.head_size * sh.elem_bytes;
        for layer in 0..sh.layers {
            for value in [false, true] {
                let (pa, pb) = (self.slot_ptr(layer, value, a), self.slot_ptr(layer, value, b));
                for h in 0..sh.kv_heads {
                    // SAFETY: distinct slots do not overlap; each head's first n bytes are in its slot.
                    unsafe { std::ptr::swap_nonoverlapping(pa.add(h * head_bytes), pb.add(h * head_bytes), n) };
                }
            }
        }
        self.lens.swap(a, b);
        self.owner.swap(a, b);
        for s in [a, b] {
            if let Some(seq) = self.owner[s] {
                self.slot_of.insert(seq, s);
            }
        }
        true
    }

    /// Sequences by slot (None: free).
    pub fn owners(&self) -> &[Option<SeqId>] {
        &self.owner
    }

    pub fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.slot_of.remove(&seq) {
            self.owner[s] = None;
            self.lens[s] = 0;
        }
    }

    /// Whether the buffers are in host memory (where prefix copies are made).
    pub fn is_host(&self) -> bool {
        self.on_host()
    }

    /// Bytes one position takes over all layers, keys and values.
    pub fn position_bytes(&self) -> usize {
        let sh = self.shape;
        sh.layers * 2 * sh.kv_heads * sh.head_size * sh.elem_bytes
    }

    /// The first `n` positions of `slot`, every layer's keys and values, in a buffer of their
    /// own (host memory only: None for device buffers or `n` past the slot's length).
    pub fn copy_out(&mut self, slot: usize, n: usize) -> Option<Vec<u8>> {
        if !self.on_host() || n > self.lens[slot] {
            return None;
        }
        let sh = self.shape;
        let (row, head) = (n * sh.head_size * sh.elem_bytes, self.cap * sh.head_size * sh.elem_bytes);
        let mut out = Vec::with_capacity(self.position_bytes() * n);
        for layer in 0..sh.layers {
            for value in [false, true] {
                let p = self.slot_ptr(layer, value, slot);
                for h in 0..sh.kv_heads {
                    // SAFETY: the head's first n positions lie in the slot (n <= len <= cap).
                    out.extend_from_slice(unsafe { std::slice::from_raw_parts(p.add(h * head), row) });
                }
            }
        }
        Some(out)
    }

    /// Writes the first `n` positions of `data` (`stored` positions laid out by
    /// [`KvSlots::copy_out`]) at the start of `slot`, growing the layout when needed, and sets
    /// the slot's length to `n`.
    pub fn copy_in(&mut self, slot: usize, data: &[u8], stored: usize, n: usize) {
        let sh = self.shape;
        let row = n * sh.head_size * sh.elem_bytes;
        let stride = stored * sh.head_size * sh.elem_bytes;
        assert!(self.on_host() && n <= stored && data.len() == stride * sh.kv_heads * 2 * sh.layers, "copy_in: host memory and a whole prefix");
        self.reserve(n);
        let head = self.cap * sh.head_size * sh.elem_bytes;
        let mut at = 0;
        for layer in 0..sh.layers {
            for value in [false, true] {
                let p = self.slot_ptr(layer, value, slot);
                for h in 0..sh.kv_heads {
                    // SAFETY: the head's first n positions lie in the slot (n <= cap after reserve).
                    unsafe { std::ptr::copy_nonoverlapping(data[at..at + row].as_ptr(), p.add(h * head), row) };
                    at += stride;
                }
            }
        }
        self.lens[slot] = n;
    }

    /// Pointer to slot `first` of layer `layer`'s key (`value = false`) or value buffer; the slots
    /// from `first` on are contiguous, so `[n, kv_heads, cap, head_size]` from here is a valid
    /// tensor for any `first + n <= slots`.
    pub fn slot_ptr(&mut self, layer: usize, value: bool, first: usize) -> *mut u8 {
        assert!(first < self.shape.slots);
        let off = first * self.shape.slot_bytes(self.cap);
        let (k, v) = &mut self.buffers[layer];
        let base = if value { v.base() } else { k.base() };
        // SAFETY: `off` is inside the buffer (first < slots).
        unsafe { base.add(off) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_arithmetic() {
        let s = KvShape { layers: 24, kv_heads: 2, head_size: 64, max_len: 4096, slots: 8, elem_bytes: 4 };
        assert_eq!(s.slot_bytes(4096), 2 * 4096 * 64 * 4);
        assert_eq!(s.total_bytes(), 8 * 2 * 4096 * 64 * 4 * 24 * 2);
    }

    /// A host cache without a session (the layout logic only; the memory info still needs the
    /// ONNX Runtime library, which scripts/fetch_onnxruntime.sh installs).
    fn host(slots: usize, max_len: usize) -> KvSlots {
        super::super::runtime::environment(None).expect("ONNX Runtime library (run scripts/fetch_onnxruntime.sh)");
        let shape = KvShape { layers: 2, kv_heads: 2, head_size: 3, max_len, slots, elem_bytes: 4 };
        let bytes = slots * shape.slot_bytes(max_len);
        let mem = || Memory::Host(vec![0u64; bytes.div_ceil(8)]);
        KvSlots {
            shape,
            buffers: (0..2).map(|_| (mem(), mem())).collect(),
            memory_info: MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).unwrap(),
            lens: vec![0; slots],
            owner: vec![None; slots],
            slot_of: HashMap::new(),
            cap: MIN_CAP.min(max_len),
        }
    }

    /// Calls `f(pointer, value)` for every element of every position in use, in the current
    /// layout, with a value unique to (layer, k/v, slot, head, position, dim).
    fn each(kv: &mut KvSlots, mut f: impl FnMut(*mut f32, f32)) {
        let (cap, sh) = (kv.cap, kv.shape);
        for layer in 0..sh.layers {
            for value in [false, true] {
                let base = kv.slot_ptr(layer, value, 0).cast::<f32>();
                for s in 0..sh.slots {
                    for h in 0..sh.kv_heads {
                        for p in 0..kv.lens[s] {
                            for d in 0..sh.head_size {
                                let x = (((((layer * 2 + value as usize) * 10 + s) * 10 + h) * 1000 + p) * 10 + d) as f32;
                                // SAFETY: slot s, head h, position p < cap: inside the buffer.
                                f(unsafe { base.add(((s * sh.kv_heads + h) * cap + p) * sh.head_size + d) }, x);
                            }
                        }
                    }
                }
            }
        }
    }

    fn fill(kv: &mut KvSlots) {
        // SAFETY: `each` hands out pointers into the buffers, one element each.
        each(kv, |ptr, x| unsafe { *ptr = x });
    }

    /// Checks every position in use still holds what `fill` wrote, in the current layout.
    fn check(kv: &mut KvSlots) {
        let cap = kv.cap;
        // SAFETY: as in fill.
        each(kv, |ptr, want| assert_eq!(unsafe { *ptr }, want, "cap {cap}: value {want} moved"));
    }

    #[test]
    fn growing_and_shrinking_the_layout_keeps_every_position_in_use() {
        let mut kv = host(3, 2048);
        assert_eq!(kv.cap(), MIN_CAP);
        kv.lens = vec![50, 0, 64];
        fill(&mut kv);
        kv.reserve(65);
        assert_eq!(kv.cap(), 128, "one step of MIN_CAP");
        check(&mut kv);
        kv.lens = vec![50, 5, 120];
        fill(&mut kv);
        kv.reserve(1500);
        assert_eq!(kv.cap(), 1536, "the next multiple of MIN_CAP");
        check(&mut kv);
        kv.lens = vec![200, 5, 1400];
        fill(&mut kv);
        kv.reserve(1600);
        assert_eq!(kv.cap(), 1728, "steps of an eighth of 1536 (192)");
        check(&mut kv);
        kv.reserve(2048);
        assert_eq!(kv.cap(), 2048, "never beyond max_len");
        // The longest sequence leaves: 200 + 1 positions fit in half, so the layout fits them.
        kv.lens = vec![200, 5, 0];
        kv.shrink();
        assert_eq!(kv.cap(), 256);
        check(&mut kv);
        kv.lens = vec![150, 5, 0];
        kv.shrink();
        assert_eq!(kv.cap(), 256, "151 positions do not fit in half of 256: no copy");
        kv.lens = vec![40, 5, 0];
        kv.shrink();
        assert_eq!(kv.cap(), MIN_CAP);
        check(&mut kv);
        kv.lens = vec![10, 5, 0];
        kv.shrink();
        assert_eq!(kv.cap(), MIN_CAP, "never below MIN_CAP");
        check(&mut kv);
    }

    #[test]
    fn a_small_max_len_caps_the_layout() {
        let kv = host(2, 40);
        assert_eq!(kv.cap(), 40);
        let mut kv = host(2, 100);
        assert_eq!(kv.cap(), MIN_CAP);
        kv.reserve(100);
        assert_eq!(kv.cap(), 100, "doubling stops at max_len");
    }
}
