//! The KV cache of an ONNX decoder: per layer one key and one value buffer of shape
//! `[slots, kv_heads, max_len, head_size]`, shared by every live sequence (one slot each).
//!
//! The graph's GroupQueryAttention reads the past from these buffers and writes the new positions
//! into the same memory (its shared past/present buffer mode), at each row's own length. So a
//! sequence joining or leaving the batch costs nothing, and a decode step over slots `0..b` hands
//! the graph a contiguous prefix of every buffer.
//!
//! Host buffers are allocated zeroed and untouched, so the OS maps pages only as sequences grow;
//! device buffers (CUDA) come from the session's allocator for that device.
use std::collections::HashMap;
use std::sync::Arc;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;

use crate::backend::SeqId;

/// One buffer's memory: host (Rust-owned, 8-byte aligned) or device (ORT-owned).
enum Memory {
    Host(Vec<u64>),
    Device { ptr: *mut u8, allocator: Arc<Allocator> },
}

// SAFETY: the device pointer is owned by this value alone; the allocator is shared only by the
// buffers of one cache, all used by the worker that owns the backend; ORT allocators are
// thread-safe.
unsafe impl Send for Memory {}

impl Memory {
    fn base(&mut self) -> *mut u8 {
        match self {
            Memory::Host(v) => v.as_mut_ptr().cast(),
            Memory::Device { ptr, .. } => *ptr,
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Memory::Device { ptr, allocator } = self {
            // SAFETY: allocated by this allocator in `KvSlots::new`, freed once.
            unsafe { allocator.free(*ptr) };
        }
    }
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

impl KvShape {
    /// Positions per slot in memory.
    pub fn stride_len(&self) -> usize {
        self.max_len
    }
    fn slot_bytes(&self) -> usize {
        self.kv_heads * self.stride_len() * self.head_size * self.elem_bytes
    }
    /// Bytes of all buffers together.
    pub fn total_bytes(&self) -> usize {
        self.slot_bytes() * self.slots * self.layers * 2
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
}

impl KvSlots {
    /// Allocates the buffers where `session` wants them: device memory for CUDA, host otherwise.
    pub fn new(shape: KvShape, session: &Session, cuda_device: Option<i32>) -> Result<KvSlots, String> {
        let bytes = shape.slots * shape.slot_bytes();
        let memory_info = match cuda_device {
            Some(id) => MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default),
            None => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default),
        }
        .map_err(|e| format!("memory info: {e}"))?;
        // One device allocator serves every buffer; each buffer keeps it alive until it is freed.
        let device_alloc = match cuda_device {
            Some(_) => Some(Arc::new(Allocator::new(session, memory_info.clone()).map_err(|e| format!("CUDA allocator: {e}"))?)),
            None => None,
        };
        let make = || -> Result<Memory, String> {
            match &device_alloc {
                None => Ok(Memory::Host(vec![0u64; bytes.div_ceil(8)])),
                Some(alloc) => {
                    let ptr = alloc
                        .alloc::<u8>(bytes)
                        .map_err(|e| format!("cannot allocate {bytes} bytes of KV cache on the device: {e}"))?
                        .into_raw()
                        .cast::<u8>();
                    Ok(Memory::Device { ptr, allocator: Arc::clone(alloc) })
                }
            }
        };
        let mut buffers = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            buffers.push((make()?, make()?));
        }
        Ok(KvSlots {
            shape,
            buffers,
            memory_info,
            lens: vec![0; shape.slots],
            owner: vec![None; shape.slots],
            slot_of: HashMap::new(),
        })
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
        if !self.buffers.iter().all(|(k, _)| matches!(k, Memory::Host(_))) {
            return false;
        }
        let sh = self.shape;
        let n = self.lens[a].max(self.lens[b]) * sh.head_size * sh.elem_bytes;
        let head_bytes = sh.stride_len() * sh.head_size * sh.elem_bytes;
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

    /// Pointer to slot `first` of layer `layer`'s key (`value = false`) or value buffer; the slots
    /// from `first` on are contiguous, so `[n, kv_heads, stride_len, head_size]` from here is a
    /// valid tensor for any `first + n <= slots`.
    pub fn slot_ptr(&mut self, layer: usize, value: bool, first: usize) -> *mut u8 {
        assert!(first < self.shape.slots);
        let off = first * self.shape.slot_bytes();
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
        assert_eq!(s.stride_len(), 4096);
        assert_eq!(s.slot_bytes(), 2 * 4096 * 64 * 4);
        assert_eq!(s.total_bytes(), 8 * 2 * 4096 * 64 * 4 * 24 * 2);
    }
}
