//! Prefix caching for the ONNX backend on the CPU (host KV buffers): what `backend::candle::prefix`
//! does for candle. A finished sequence's positions are copied out of its slot and kept (least
//! recently used out, within a byte budget); a new sequence whose prompt starts with tokens a kept
//! or live sequence holds, under the same adapter, gets those positions copied into its slot and
//! runs only the rest. Keys and values of a position depend only on the tokens up to it (the
//! kernels compute every row alike whatever the batch or chunking: `tests/isolation.rs`), so
//! answers are the same with and without the cache.
use std::collections::VecDeque;

use super::OnnxBackend;
use crate::backend::candle::prefix::{choose, common_prefix, Source};
use crate::backend::SeqId;

/// A finished sequence's positions.
struct Kept {
    adapter: u64,
    tokens: Vec<u32>,
    /// `KvSlots::copy_out`'s layout.
    data: Vec<u8>,
}

#[derive(Default)]
pub struct PrefixStore {
    kept: VecDeque<Kept>,
    bytes: usize,
    budget: usize,
}

impl PrefixStore {
    pub fn new(budget_bytes: usize) -> Self {
        Self { budget: budget_bytes, ..Default::default() }
    }

    /// A budget of 0 turns prefix caching off (live sequences included).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn set_budget(&mut self, bytes: usize) {
        self.budget = bytes;
        self.evict_to(bytes);
    }

    fn evict_to(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some(k) = self.kept.pop_front() else { break };
            self.bytes -= k.data.len();
        }
    }

    /// Keeps a finished sequence's positions, evicting the oldest kept to make room.
    pub fn keep(&mut self, adapter: u64, tokens: Vec<u32>, data: Vec<u8>) {
        if !self.enabled() || tokens.is_empty() || data.len() > self.budget {
            return;
        }
        self.evict_to(self.budget - data.len());
        self.bytes += data.len();
        self.kept.push_back(Kept { adapter, tokens, data });
    }

    /// The kept entry sharing the longest prefix with `tokens` under `adapter`: (index, length).
    pub fn best(&self, tokens: &[u32], adapter: u64) -> Option<(usize, usize)> {
        self.kept
            .iter()
            .enumerate()
            .filter(|(_, k)| k.adapter == adapter)
            .map(|(i, k)| (i, common_prefix(&k.tokens, tokens)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(i, n)| (n, i))
    }

    /// Entry `i`'s data and how many positions it holds; it becomes the most recently used.
    pub fn take_for_use(&mut self, i: usize) -> (&[u8], usize) {
        let k = self.kept.remove(i).expect("index from best()");
        self.kept.push_back(k);
        let k = self.kept.back().expect("just pushed");
        (&k.data, k.tokens.len())
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl OnnxBackend {
    /// Bytes of finished sequences' caches kept for prefix reuse (0 turns prefix caching off).
    /// Only host KV buffers (the CPU provider) keep anything.
    pub fn set_prefix_cache_bytes(&mut self, bytes: usize) {
        self.kept.set_budget(bytes);
    }

    /// Frees a sequence's slot; `keep`: first copy its positions into the prefix store.
    pub(super) fn drop_seq(&mut self, seq: SeqId, keep: bool) {
        let tokens = self.fed.remove(&seq);
        let adapter = self.adapter_of.remove(&seq).unwrap_or(0);
        if let (true, Some(tokens), Some(slot)) = (keep && self.kept.enabled(), tokens, self.kv.slot(seq)) {
            let n = tokens.len().min(self.kv.lens()[slot]);
            if n > 0 {
                if let Some(data) = self.kv.copy_out(slot, n) {
                    self.kept.keep(adapter, tokens[..n].to_vec(), data);
                }
            }
        }
        self.kv.release(seq);
    }

    /// [`Backend::reuse_prefix`] for this backend (module docs).
    pub(super) fn reuse_kept_prefix(&mut self, seq: SeqId, tokens: &[u32], adapter: Option<&std::sync::Arc<crate::lora::LoraAdapter>>) -> usize {
        if !self.kept.enabled() || !self.kv.is_host() || self.kv.slot(seq).is_some() || tokens.len() < 2 {
            return 0;
        }
        let want = adapter.map_or(0, |a| a.id);
        let limit = tokens.len() - 1;
        // The longest prefix a live sequence (same adapter) holds, then a kept one.
        let live = self
            .fed
            .iter()
            .filter(|(s, _)| self.adapter_of.get(s).copied().unwrap_or(0) == want)
            .filter_map(|(&s, t)| Some((common_prefix(t, tokens).min(self.kv.len_of(s)), self.kv.slot(s)?)))
            .max_by_key(|&(n, _)| n);
        let Some((n, source)) = choose(live, self.kept.best(tokens, want), limit) else { return 0 };
        let Some(slot) = self.kv.slot_for(seq) else { return 0 };
        match source {
            Source::Live(from) => {
                let Some(data) = self.kv.copy_out(from, n) else {
                    self.kv.release(seq);
                    return 0;
                };
                self.kv.copy_in(slot, &data, n, n);
            }
            Source::Kept(i) => {
                let (data, stored) = self.kept.take_for_use(i);
                self.kv.copy_in(slot, data, stored, n);
            }
        }
        self.fed.insert(seq, tokens[..n].to_vec());
        self.adapter_of.insert(seq, want);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_budget_and_finds_the_longest_prefix_of_the_same_adapter() {
        let mut s = PrefixStore::new(100);
        s.keep(0, vec![1, 2, 3], vec![0; 30]);
        s.keep(7, vec![1, 2, 3, 4], vec![0; 40]);
        s.keep(0, vec![1, 2, 9], vec![0; 30]);
        assert_eq!(s.best(&[1, 2, 3, 4, 5], 0), Some((0, 3)));
        assert_eq!(s.best(&[1, 2, 3, 4, 5], 7), Some((1, 4)));
        assert_eq!(s.best(&[5], 0), None);
        let _ = s.take_for_use(0); // [1, 2, 3] is now the newest
        s.keep(0, vec![8], vec![0; 40]); // 140 > 100: the oldest ([1, 2, 3, 4] of adapter 7) goes
        assert_eq!(s.best(&[1, 2, 3, 4], 7), None);
        assert_eq!(s.best(&[1, 2, 3, 4], 0).map(|(_, n)| n), Some(3));
        assert!(s.bytes() <= 100);
        s.keep(0, vec![1], vec![0; 101]); // larger than the budget: not kept
        assert!(s.bytes() <= 100);
        s.set_budget(0);
        assert_eq!((s.bytes(), s.enabled()), (0, false));
    }
}
