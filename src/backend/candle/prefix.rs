//! Prefix caching for the candle backend: the KV caches of finished sequences are kept (least
//! recently used first out, within a byte budget), and a new sequence whose prompt starts with
//! tokens a kept or live cache holds, computed with the same adapter, starts from a copy of those
//! positions instead of computing them again (the earlier turns of a chat, a shared system
//! prompt).
//!
//! A position's keys and values depend only on the tokens up to it and the adapter: the forward
//! computes every row the same way whatever the batch or the chunking (`tests/isolation.rs`), so
//! a copied prefix holds exactly the bits a recomputation would, and outputs are the same with
//! and without the cache.
use std::collections::VecDeque;

use super::kv_cache::SeqCache;

/// A finished sequence's cache, kept for reuse.
struct Kept {
    /// The adapter the cache was computed with (its load id; None: the base model).
    adapter: Option<u64>,
    cache: SeqCache,
    bytes: usize,
}

/// The kept caches, oldest first.
#[derive(Default)]
pub struct PrefixStore {
    kept: VecDeque<Kept>,
    bytes: usize,
    budget: usize,
}

/// Where the longest reusable prefix is: a kept entry (its index) or a live sequence (what the
/// backend knows it by: its cache, its slot).
#[derive(Debug, PartialEq)]
pub enum Source<L> {
    Kept(usize),
    Live(L),
}

/// The prefix to reuse, shared by both backends: the longer of the best live sequence's (`live`:
/// shared length, handle) and the best kept entry's (`kept`: index, shared length; from
/// [`PrefixStore::best`]), the live one on a tie (no copy out of the store, which keeps its
/// order), cut to `limit` positions. None when nothing is shared.
pub fn choose<L>(live: Option<(usize, L)>, kept: Option<(usize, usize)>, limit: usize) -> Option<(usize, Source<L>)> {
    let (n, source) = match (live, kept) {
        (Some((ln, l)), Some((_, kn))) if ln >= kn => (ln, Source::Live(l)),
        (_, Some((i, kn))) => (kn, Source::Kept(i)),
        (Some((ln, l)), None) => (ln, Source::Live(l)),
        (None, None) => return None,
    };
    let n = n.min(limit);
    (n > 0).then_some((n, source))
}

/// Tokens `a` and `b` share from the start.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixStore {
    pub fn new(budget_bytes: usize) -> PrefixStore {
        PrefixStore { budget: budget_bytes, ..Default::default() }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether prefix caching is on (a budget of 0 turns it off, live sequences included).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Keeps a finished sequence's cache (when the budget allows), evicting the oldest kept.
    /// The cache's spare capacity is freed first: it is charged for its `len` positions, which
    /// must be all it holds, or the budget bounds only a fraction of the memory kept.
    pub fn keep(&mut self, adapter: Option<u64>, mut cache: SeqCache, bytes_per_position: usize) {
        let bytes = cache.len * bytes_per_position;
        if self.budget == 0 || cache.len == 0 || bytes > self.budget {
            return;
        }
        cache.shrink_to_fit();
        self.kept.push_back(Kept { adapter, cache, bytes });
        self.bytes += bytes;
        while self.bytes > self.budget {
            let old = self.kept.pop_front().expect("over budget means something is kept");
            self.bytes -= old.bytes;
        }
    }

    /// The kept cache sharing the longest prefix with `prompt` under `adapter`, and that length.
    pub fn best(&self, prompt: &[u32], adapter: Option<u64>) -> Option<(usize, usize)> {
        self.kept
            .iter()
            .enumerate()
            .filter(|(_, k)| k.adapter == adapter)
            .map(|(i, k)| (i, common_prefix(&k.cache.tokens, prompt)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(i, n)| (n, i))
    }

    pub fn get(&self, i: usize) -> &SeqCache {
        &self.kept[i].cache
    }

    /// Marks kept entry `i` as just used (it leaves last).
    pub fn touch(&mut self, i: usize) {
        if let Some(k) = self.kept.remove(i) {
            self.kept.push_back(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_takes_the_longer_prefix_the_live_one_on_ties_within_the_limit() {
        assert_eq!(choose(Some((5, 'l')), Some((2, 4)), 10), Some((5, Source::Live('l'))));
        assert_eq!(choose(Some((4, 'l')), Some((2, 4)), 10), Some((4, Source::Live('l'))));
        assert_eq!(choose(Some((3, 'l')), Some((2, 4)), 10), Some((4, Source::Kept(2))));
        assert_eq!(choose::<char>(None, Some((0, 7)), 5), Some((5, Source::Kept(0))));
        assert_eq!(choose(Some((0, 'l')), None, 5), None);
        assert_eq!(choose(Some((3, 'l')), None, 0), None);
        assert_eq!(choose::<char>(None, None, 5), None);
    }

    fn cache(tokens: &[u32]) -> SeqCache {
        let mut c = SeqCache::new(1, 2, 64);
        for &t in tokens {
            c.layers[0].k.extend([t as f32, 0.0]);
            c.layers[0].v.extend([0.0, t as f32]);
        }
        c.len = tokens.len();
        c.tokens = tokens.to_vec();
        c
    }

    /// Regression (found by bench/soak.py): a finished sequence's buffers have room for at least
    /// 256 positions, but it was charged for its length only, so the budget bounded only a
    /// fraction of the memory kept (VmRSS grew from 1.1 to 1.5 GiB in 100 s of load on SmolLM2
    /// with the 512 MiB default, still climbing).
    #[test]
    fn a_kept_cache_holds_no_more_memory_than_it_is_charged_for() {
        let (layers, kv_dim) = (3, 8);
        let per = 2 * layers * kv_dim * std::mem::size_of::<f32>();
        let mut s = PrefixStore::new(1 << 20);
        for len in [5usize, 300] {
            let mut c = SeqCache::new(layers, kv_dim, 4096);
            c.reserve(len, kv_dim, 4096);
            for l in &mut c.layers {
                l.k.extend(std::iter::repeat_n(1.0, len * kv_dim));
                l.v.extend(std::iter::repeat_n(2.0, len * kv_dim));
            }
            c.len = len;
            c.tokens = (0..len as u32).collect();
            assert!(c.allocated_bytes() > len * per, "the test starts with spare room");
            s.keep(None, c, per);
        }
        let held: usize = s.kept.iter().map(|k| k.cache.allocated_bytes()).sum();
        assert_eq!(s.bytes(), 305 * per);
        assert!(held <= s.bytes(), "kept caches hold {held} bytes, charged {}", s.bytes());
        // What is kept still serves a prefix, bit for bit.
        let (i, n) = s.best(&(0..10).collect::<Vec<u32>>(), None).unwrap();
        assert_eq!(n, 10);
        let c = SeqCache::prefix_of(s.get(i), n, kv_dim, 4096);
        assert!(c.layers.iter().all(|l| l.k[..n * kv_dim].iter().all(|&x| x == 1.0) && l.v.iter().all(|&x| x == 2.0)));
    }

    #[test]
    fn the_longest_prefix_under_the_same_adapter_wins_and_the_oldest_leaves_first() {
        let mut s = PrefixStore::new(10 * 16);
        s.keep(None, cache(&[1, 2, 3, 4]), 16);
        s.keep(Some(7), cache(&[1, 2, 3, 4, 5]), 16);
        assert_eq!(s.best(&[1, 2, 3, 4, 5, 6], None), Some((0, 4)), "the adapter's cache does not serve the base model");
        assert_eq!(s.best(&[1, 2, 3, 4, 5, 6], Some(7)), Some((1, 5)));
        assert_eq!(s.best(&[8, 8], None), None);
        // Over budget (12 positions of 10): the oldest goes.
        s.keep(None, cache(&[1, 2, 9]), 16);
        assert_eq!(s.bytes(), 8 * 16);
        assert_eq!(s.best(&[1, 2, 3, 4], None), Some((1, 2)), "[1, 2, 3, 4] was evicted; [1, 2, 9] is now at 1");
        s.touch(0);
        s.keep(None, cache(&[5, 5, 5]), 16);
        assert_eq!(s.best(&[1, 2, 3, 4, 5], Some(7)), Some((0, 5)), "touched entries outlive newer ones");
        assert_eq!(s.best(&[1, 2, 9], None), None, "the untouched entry left first");
    }
}
