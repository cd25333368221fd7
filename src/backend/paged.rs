//! The bookkeeping of a paged KV cache (vLLM's PagedAttention idea), independent of where the
//! cache lives: a pool of fixed-size blocks, and per sequence the list of blocks that hold its
//! positions in order (its block table). Position p of a sequence lives in block
//! `table[p / block_size]` at slot `p % block_size`.
//!
//! A sequence grows only by whole blocks taken from the free list and gives them back when it is
//! released, so memory never fragments and a sequence never moves.
//!
//! Prefix caching (vLLM's automatic prefix caching), when on: once a block is full, `record`
//! registers it under its content, the tokens of the block, the block before it in the chain
//! (its registration's node id, unique for ever) and a salt (the adapter's load id: a block
//! computed with one adapter never serves another), compared in full, so a lookup never matches
//! a block of other tokens. A registered block outlives its sequence: when no table holds it,
//! it waits among the idle blocks, still reusable, and is taken back (least recently idle
//! first) only when the free list is empty. `reuse` gives a new sequence the longest chain of
//! registered blocks its prompt starts with, shared (reference counts), never copied; a
//! sequence only writes past its shared blocks, so a shared block never changes.
use std::collections::{BTreeMap, HashMap};

use super::{KvCapacity, SeqId};

/// A registered block's content: (the node of the block before it, 0 at the start; the salt;
/// its tokens).
type Key = (u64, u64, Box<[u32]>);

/// Blocks and block tables of one paged cache.
#[derive(Debug)]
pub struct BlockTables {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
    tables: HashMap<SeqId, Table>,
    /// Per block: how many tables hold it.
    refs: Vec<u32>,
    /// None: prefix caching is off.
    prefix: Option<Prefix>,
}

#[derive(Debug, Default)]
struct Prefix {
    /// Registered full blocks by content: (node, block).
    by_key: HashMap<Key, (u64, u32)>,
    key_of: HashMap<u32, Key>,
    /// Registered blocks no table holds, by when they became idle (oldest first).
    idle: BTreeMap<u64, u32>,
    idle_since: HashMap<u32, u64>,
    tick: u64,
    next_node: u64,
}

#[derive(Debug, Default)]
struct Table {
    blocks: Vec<u32>,
    /// Positions written.
    len: usize,
    /// Prefix caching: the blocks recorded full, the node of the last of them (0: none), and
    /// the recorded tokens past them.
    full: usize,
    last_node: u64,
    pending: Vec<u32>,
}

impl BlockTables {
    pub fn new(block_size: usize, total_blocks: usize) -> BlockTables {
        assert!(block_size > 0, "blocks hold at least one position");
        // Handed out from the end: low block ids first.
        BlockTables {
            block_size,
            total: total_blocks,
            free: (0..total_blocks as u32).rev().collect(),
            tables: HashMap::new(),
            refs: vec![0; total_blocks],
            prefix: None,
        }
    }

    /// The same, with prefix caching on.
    pub fn with_prefix_caching(block_size: usize, total_blocks: usize) -> BlockTables {
        BlockTables { prefix: Some(Prefix { next_node: 1, ..Prefix::default() }), ..BlockTables::new(block_size, total_blocks) }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks a sequence can take: the free ones and the idle cached ones.
    fn available(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, |p| p.idle.len())
    }

    pub fn capacity(&self) -> KvCapacity {
        KvCapacity { block_size: self.block_size, free_blocks: self.available(), total_blocks: self.total }
    }

    /// Cached blocks that no sequence holds (kept for reuse, taken back when needed).
    pub fn idle_cached_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.idle.len())
    }

    /// Positions cached for `seq` (0 for an unknown sequence).
    pub fn len(&self, seq: SeqId) -> usize {
        self.tables.get(&seq).map_or(0, |t| t.len)
    }

    /// Blocks `seq` needs beyond what it holds to grow by `extra` positions.
    pub fn blocks_needed(&self, seq: SeqId, extra: usize) -> usize {
        let (held, len) = self.tables.get(&seq).map_or((0, 0), |t| (t.blocks.len(), t.len));
        (len + extra).div_ceil(self.block_size).saturating_sub(held)
    }

    /// Whether all `(seq, extra)` growths fit in the available blocks together; the first that
    /// does not fit otherwise.
    pub fn first_misfit(&self, growths: &[(SeqId, usize)]) -> Option<SeqId> {
        let mut free = self.available();
        for &(seq, extra) in growths {
            let need = self.blocks_needed(seq, extra);
            if need > free {
                return Some(seq);
            }
            free -= need;
        }
        None
    }

    /// A free block, else the cached block idle the longest (its registration dropped).
    fn take(&mut self) -> u32 {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let p = self.prefix.as_mut().expect("counted in available()");
                let (_, b) = p.idle.pop_first().expect("counted in available()");
                p.idle_since.remove(&b);
                let key = p.key_of.remove(&b).expect("idle blocks are registered");
                p.by_key.remove(&key);
                b
            }
        };
        debug_assert_eq!(self.refs[b as usize], 0, "block {b} taken while held");
        self.refs[b as usize] = 1;
        b
    }

    /// Grows `seq` by `extra` positions, taking blocks as needed; returns the blocks taken (to
    /// give back with `undo_grow` should the step fail). The caller has checked the room.
    pub fn grow(&mut self, seq: SeqId, extra: usize) -> Vec<u32> {
        let need = self.blocks_needed(seq, extra);
        assert!(need <= self.available(), "grow() past the free blocks: check first_misfit() first");
        let taken: Vec<u32> = (0..need).map(|_| self.take()).collect();
        let t = self.tables.entry(seq).or_default();
        t.blocks.extend_from_slice(&taken);
        t.len += extra;
        taken
    }

    /// Undoes a `grow` of `extra` positions that took `taken`.
    pub fn undo_grow(&mut self, seq: SeqId, extra: usize, taken: &[u32]) {
        if let Some(t) = self.tables.get_mut(&seq) {
            t.len -= extra;
            t.blocks.truncate(t.blocks.len() - taken.len());
            for &b in taken {
                self.refs[b as usize] = 0;
            }
            self.free.extend(taken.iter().rev());
            if t.len == 0 {
                self.tables.remove(&seq);
            }
        }
    }

    /// The blocks of `seq`, in position order.
    pub fn table(&self, seq: SeqId) -> &[u32] {
        self.tables.get(&seq).map_or(&[], |t| &t.blocks)
    }

    /// Gives every block of `seq` back: to the free list, or, registered, to the idle ones.
    pub fn release(&mut self, seq: SeqId) {
        let Some(t) = self.tables.remove(&seq) else { return };
        for &b in t.blocks.iter().rev() {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released more often than held");
            *r -= 1;
            if *r > 0 {
                continue;
            }
            match self.prefix.as_mut().filter(|p| p.key_of.contains_key(&b)) {
                Some(p) => {
                    p.tick += 1;
                    p.idle.insert(p.tick, b);
                    p.idle_since.insert(b, p.tick);
                }
                None => self.free.push(b),
            }
        }
    }

    /// Prefix caching: `tokens` are the last positions of `seq` a step has just written (with
    /// adapter `salt`); every block they fill is registered for reuse (unless a block of the same
    /// content already is). Does nothing when prefix caching is off.
    pub fn record(&mut self, seq: SeqId, tokens: &[u32], salt: u64) {
        let Some(p) = self.prefix.as_mut() else { return };
        let Some(t) = self.tables.get_mut(&seq) else { return };
        debug_assert_eq!(t.full * self.block_size + t.pending.len() + tokens.len(), t.len, "record() of positions not written");
        t.pending.extend_from_slice(tokens);
        while t.pending.len() >= self.block_size {
            let block = t.blocks[t.full];
            let key: Key = (t.last_node, salt, t.pending[..self.block_size].into());
            t.last_node = match p.by_key.get(&key) {
                Some(&(node, _)) => node,
                None => {
                    let node = p.next_node;
                    p.next_node += 1;
                    p.key_of.insert(block, key.clone());
                    p.by_key.insert(key, (node, block));
                    node
                }
            };
            t.pending.drain(..self.block_size);
            t.full += 1;
        }
    }

    /// Prefix caching: gives `seq`, which holds nothing yet, the registered blocks that hold the
    /// longest whole-block prefix of `tokens` (computed with adapter `salt`), at most
    /// `tokens.len() - 1` positions so that the last token still runs. Returns the positions
    /// reused (0: none, or prefix caching is off, or `seq` already holds positions).
    pub fn reuse(&mut self, seq: SeqId, tokens: &[u32], salt: u64) -> usize {
        let Some(p) = self.prefix.as_mut() else { return 0 };
        if self.tables.contains_key(&seq) {
            return 0;
        }
        let bs = self.block_size;
        let mut blocks = Vec::new();
        let mut node = 0;
        for chunk in tokens[..tokens.len().saturating_sub(1)].chunks_exact(bs) {
            let key: Key = (node, salt, chunk.into());
            let Some(&(n, b)) = p.by_key.get(&key) else { break };
            blocks.push(b);
            node = n;
        }
        if blocks.is_empty() {
            return 0;
        }
        for &b in &blocks {
            if self.refs[b as usize] == 0 {
                let since = p.idle_since.remove(&b).expect("a registered block no table holds is idle");
                p.idle.remove(&since);
            }
            self.refs[b as usize] += 1;
        }
        let n = blocks.len();
        self.tables.insert(seq, Table { blocks, len: n * bs, full: n, last_node: node, pending: Vec::new() });
        n * bs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_take_whole_blocks_and_give_them_all_back() {
        let mut t = BlockTables::new(4, 5);
        assert_eq!(t.blocks_needed(1, 5), 2);
        assert_eq!(t.grow(1, 5), vec![0, 1]);
        assert_eq!((t.len(1), t.table(1)), (5, &[0u32, 1][..]));
        assert_eq!(t.blocks_needed(1, 3), 0, "position 5..8 fit in block 1");
        assert_eq!(t.grow(1, 3), Vec::<u32>::new());
        assert_eq!(t.grow(2, 1), vec![2]);
        assert_eq!(t.grow(1, 1), vec![3], "position 8 opens a third block");
        assert_eq!(t.capacity(), KvCapacity { block_size: 4, free_blocks: 1, total_blocks: 5 });
        assert_eq!(t.first_misfit(&[(2, 4), (3, 4)]), Some(3), "seq 2 takes the last block");
        assert_eq!(t.first_misfit(&[(2, 3)]), None);
        t.release(1);
        assert_eq!(t.capacity().free_blocks, 4);
        assert_eq!((t.len(1), t.table(1)), (0, &[][..]));
        let taken = t.grow(3, 9);
        assert_eq!(taken.len(), 3);
        t.undo_grow(3, 9, &taken);
        assert_eq!((t.len(3), t.capacity().free_blocks), (0, 4));
        // Blocks come back in the order they are handed out again.
        assert_eq!(t.grow(4, 4), taken[..1].to_vec());
    }

    /// Every block is free, idle (cached, held by no table) or held, exactly one of them, and
    /// its reference count is the number of tables that hold it.
    fn check_invariants(t: &BlockTables) {
        let mut held = vec![0u32; t.total];
        for tab in t.tables.values() {
            for &b in &tab.blocks {
                held[b as usize] += 1;
            }
            assert_eq!(tab.blocks.len(), tab.len.div_ceil(t.block_size), "a table holds the blocks of its positions");
        }
        assert_eq!(held, t.refs, "reference counts");
        let mut state = vec![0u8; t.total];
        for &b in &t.free {
            state[b as usize] += 1;
            assert_eq!(t.refs[b as usize], 0, "free block {b} is held");
        }
        if let Some(p) = &t.prefix {
            assert_eq!(p.idle.len(), p.idle_since.len());
            for (&since, &b) in &p.idle {
                state[b as usize] += 1;
                assert_eq!(t.refs[b as usize], 0, "idle block {b} is held");
                assert_eq!(p.idle_since[&b], since);
                assert!(p.key_of.contains_key(&b), "idle block {b} is registered");
            }
            assert_eq!(p.by_key.len(), p.key_of.len());
            for (key, &(_, b)) in &p.by_key {
                assert_eq!(&p.key_of[&b], key, "registration of block {b}");
            }
        }
        for b in 0..t.total {
            state[b] += u8::from(t.refs[b] > 0);
        }
        assert!(state.iter().all(|&s| s == 1), "each block free, idle or held exactly once: {state:?}");
        assert_eq!(t.capacity().free_blocks, t.free.len() + t.prefix.as_ref().map_or(0, |p| p.idle.len()));
    }

    #[test]
    fn prefix_caching_under_random_schedules_shares_only_blocks_of_the_same_tokens_and_adapter() {
        // Random sequences from a few shared documents (so prompts share prefixes of every
        // length), two salts, random chunk sizes, releases at random, and a cache small enough
        // that idle blocks are taken back. A shadow records what each block holds: the salt and
        // the tokens of every position up to its end, written only by a sequence that holds it
        // alone. A reused block must hold exactly the new prompt's prefix and salt.
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n.max(1) as u64) as usize
        };
        let docs: Vec<Vec<u32>> = (0..4).map(|d| (0..120).map(|i| (d * 1000 + i) as u32 % 7 + u32::from(i % 13 == 0) * 100).collect()).collect();
        let (bs, total) = (4, 48);
        let mut t = BlockTables::with_prefix_caching(bs, total);
        // shadow[b]: (salt, tokens of positions 0..end of block b) of what was written into it.
        let mut shadow: HashMap<u32, (u64, Vec<u32>)> = HashMap::new();
        let mut live: HashMap<SeqId, (u64, Vec<u32>, usize)> = HashMap::new(); // salt, prompt, written
        let (mut reused, mut evictions_seen) = (0usize, false);
        for step in 0..20_000u64 {
            match next(10) {
                0..=2 if live.len() < 8 => {
                    let d = &docs[next(docs.len())];
                    let cut = next(d.len());
                    let mut prompt = d[..cut].to_vec();
                    prompt.extend((0..1 + next(12)).map(|_| next(7) as u32));
                    let salt = next(2) as u64;
                    let seq = step;
                    let n = t.reuse(seq, &prompt, salt);
                    assert!(n % bs == 0 && n < prompt.len(), "reused {n} of {}", prompt.len());
                    for (i, &b) in t.table(seq).iter().enumerate() {
                        assert_eq!(shadow.get(&b), Some(&(salt, prompt[..(i + 1) * bs].to_vec())), "reused block {b} holds other tokens or another adapter's");
                    }
                    reused += n;
                    live.insert(seq, (salt, prompt, n));
                }
                3..=8 if !live.is_empty() => {
                    let mut ids: Vec<SeqId> = live.keys().copied().collect();
                    ids.sort();
                    let seq = ids[next(ids.len())];
                    let (salt, prompt, written) = live.get(&seq).cloned().expect("live");
                    let want = if written < prompt.len() { (prompt.len() - written).min(1 + next(9)) } else { 1 };
                    let tokens: Vec<u32> = if written < prompt.len() { prompt[written..written + want].to_vec() } else { vec![next(7) as u32] };
                    if t.first_misfit(&[(seq, tokens.len())]).is_some() {
                        t.release(seq);
                        live.remove(&seq);
                        check_invariants(&t);
                        continue;
                    }
                    let idle_before = t.idle_cached_blocks();
                    let free_before = t.free.len();
                    let taken = t.grow(seq, tokens.len());
                    evictions_seen |= taken.len() > free_before && idle_before > 0;
                    let mut all = prompt.clone();
                    all.truncate(written);
                    all.extend(&tokens);
                    for p in written..written + tokens.len() {
                        let b = t.table(seq)[p / bs];
                        assert_eq!(t.refs[b as usize], 1, "position {p} written into shared block {b}");
                    }
                    for i in written / bs..=(all.len() - 1) / bs {
                        let end = ((i + 1) * bs).min(all.len());
                        shadow.insert(t.table(seq)[i], (salt, all[..end].to_vec()));
                    }
                    t.record(seq, &tokens, salt);
                    let e = live.get_mut(&seq).expect("live");
                    if written < prompt.len() {
                        e.2 += tokens.len();
                    } else {
                        e.1.push(tokens[0]);
                        e.2 += 1;
                    }
                }
                _ if !live.is_empty() => {
                    let mut ids: Vec<SeqId> = live.keys().copied().collect();
                    ids.sort();
                    let seq = ids[next(ids.len())];
                    t.release(seq);
                    live.remove(&seq);
                }
                _ => {}
            }
            check_invariants(&t);
        }
        assert!(reused > 1000, "prefixes were reused: {reused} positions");
        assert!(evictions_seen, "idle cached blocks were taken back");
        for seq in live.keys().copied().collect::<Vec<_>>() {
            t.release(seq);
        }
        check_invariants(&t);
        assert_eq!(t.capacity().free_blocks, total, "all blocks back");
    }

    #[test]
    fn without_prefix_caching_nothing_is_reused_and_released_blocks_are_free() {
        let mut t = BlockTables::new(4, 8);
        t.grow(1, 9);
        t.record(1, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 0);
        t.release(1);
        assert_eq!(t.reuse(2, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0), 0);
        assert_eq!((t.free.len(), t.idle_cached_blocks()), (8, 0));
    }

    #[test]
    fn a_prompt_reuses_whole_blocks_of_its_own_adapter_and_keeps_its_last_token() {
        let mut t = BlockTables::with_prefix_caching(4, 8);
        let p: Vec<u32> = (1..=10).collect();
        t.grow(1, 10);
        t.record(1, &p, 7);
        assert_eq!(t.reuse(2, &p, 7), 8, "two full blocks of a live sequence, shared");
        assert_eq!(t.table(2), &t.table(1)[..2]);
        assert_eq!(t.reuse(3, &p, 8), 0, "another adapter's blocks are not shared");
        assert_eq!(t.reuse(4, &p[..8], 7), 4, "at most len - 1 positions: the last token runs");
        t.release(1);
        t.release(2);
        t.release(4);
        assert_eq!(t.idle_cached_blocks(), 2, "registered blocks stay cached, idle");
        assert_eq!(t.capacity().free_blocks, 8);
        assert_eq!(t.reuse(5, &p, 7), 8, "reused after their sequences ended");
        t.release(5);
        // Taking every block takes the idle ones back, oldest first, and unregisters them.
        t.grow(6, 32);
        assert_eq!((t.idle_cached_blocks(), t.capacity().free_blocks), (0, 0));
        t.release(6);
        assert_eq!(t.reuse(7, &p, 7), 0, "taken back: nothing left to reuse");
    }
}
