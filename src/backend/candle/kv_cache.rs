//! Per-sequence key/value cache.
//!
//! Each layer keeps K and V as one growing f32 buffer laid out [position][kv_head][head_dim], so a
//! step appends its new rows with one copy (amortised growth, never a concatenation of the whole
//! cache) and attention reads each cached key as a contiguous `head_dim` slice.

/// Keys and values of one layer of one sequence.
#[derive(Debug, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// All cached state of one sequence.
#[derive(Debug)]
pub struct SeqCache {
    /// Number of positions held (the same in every layer between steps).
    pub len: usize,
    pub layers: Vec<LayerKv>,
    /// The tokens of those positions (what a prefix cache matches new prompts against).
    pub tokens: Vec<u32>,
}

/// Positions preallocated for a new sequence; buffers grow geometrically past this.
const INITIAL_POSITIONS: usize = 256;

impl SeqCache {
    /// An empty cache with room for `INITIAL_POSITIONS` (capped at `max_context`) positions.
    pub fn new(num_layers: usize, kv_dim: usize, max_context: usize) -> Self {
        let cap = INITIAL_POSITIONS.min(max_context) * kv_dim;
        let layers = (0..num_layers)
            .map(|_| LayerKv { k: Vec::with_capacity(cap), v: Vec::with_capacity(cap) })
            .collect();
        Self { len: 0, layers, tokens: Vec::new() }
    }

    /// A new cache holding a copy of `src`'s first `n` positions, with room for `max_context`.
    pub fn prefix_of(src: &SeqCache, n: usize, kv_dim: usize, max_context: usize) -> Self {
        let mut c = Self::new(src.layers.len(), kv_dim, max_context);
        c.reserve(n, kv_dim, max_context);
        for (dst, s) in c.layers.iter_mut().zip(&src.layers) {
            dst.k.extend_from_slice(&s.k[..n * kv_dim]);
            dst.v.extend_from_slice(&s.v[..n * kv_dim]);
        }
        c.len = n;
        c.tokens = src.tokens[..n].to_vec();
        c
    }

    /// Makes room for `extra` more positions in every layer, growing at least geometrically but
    /// never reserving past `max_context` positions.
    pub fn reserve(&mut self, extra: usize, kv_dim: usize, max_context: usize) {
        let needed = (self.len + extra) * kv_dim;
        for layer in &mut self.layers {
            for buf in [&mut layer.k, &mut layer.v] {
                if buf.capacity() < needed {
                    let target = (buf.capacity() * 2).max(needed).min(max_context * kv_dim);
                    let target = target.max(needed);
                    buf.reserve_exact(target - buf.len());
                }
            }
        }
    }

    /// Frees the room reserved past `len` (a kept cache is charged for `len` positions only, and
    /// a short sequence has `INITIAL_POSITIONS`, a grown one up to twice its length, reserved).
    pub fn shrink_to_fit(&mut self) {
        for layer in &mut self.layers {
            layer.k.shrink_to_fit();
            layer.v.shrink_to_fit();
        }
        self.tokens.shrink_to_fit();
    }

    /// Bytes the key and value buffers hold allocated (capacity, not length).
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.capacity() + l.v.capacity()) * std::mem::size_of::<f32>()).sum()
    }

    /// Drops positions past `len` in every layer (undoes a step that failed half way).
    pub fn truncate(&mut self, len: usize, kv_dim: usize) {
        self.len = len;
        self.tokens.truncate(len);
        for layer in &mut self.layers {
            layer.k.truncate(len * kv_dim);
            layer.v.truncate(len * kv_dim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_grows_without_exceeding_context_and_truncate_restores() {
        let mut c = SeqCache::new(2, 4, 1000);
        assert!(c.layers[0].k.capacity() >= 256 * 4);
        c.reserve(600, 4, 1000);
        assert!(c.layers[1].v.capacity() >= 600 * 4);
        assert!(c.layers[1].v.capacity() <= 1000 * 4 + 64);
        for l in &mut c.layers {
            l.k.extend(std::iter::repeat_n(1.0, 8));
            l.v.extend(std::iter::repeat_n(1.0, 8));
        }
        c.len = 2;
        c.truncate(1, 4);
        assert_eq!(c.layers[0].k.len(), 4);
        assert_eq!(c.len, 1);
    }
}
