//! The bookkeeping of a paged KV cache (vLLM's PagedAttention idea), independent of where the
//! cache lives: a pool of fixed-size blocks, and per sequence the list of blocks that hold its
//! positions in order (its block table). Position p of a sequence lives in block
//! `table[p / block_size]` at slot `p % block_size`.
//!
//! A sequence grows only by whole blocks taken from the free list and gives them all back when
//! it is released, so memory never fragments and a sequence never moves.
use std::collections::HashMap;

use super::{KvCapacity, SeqId};

/// Blocks and block tables of one paged cache.
#[derive(Debug)]
pub struct BlockTables {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
    tables: HashMap<SeqId, Table>,
}

#[derive(Debug, Default)]
struct Table {
    blocks: Vec<u32>,
    /// Positions written.
    len: usize,
}

impl BlockTables {
    pub fn new(block_size: usize, total_blocks: usize) -> BlockTables {
        assert!(block_size > 0, "blocks hold at least one position");
        // Handed out from the end: low block ids first.
        BlockTables { block_size, total: total_blocks, free: (0..total_blocks as u32).rev().collect(), tables: HashMap::new() }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn capacity(&self) -> KvCapacity {
        KvCapacity { block_size: self.block_size, free_blocks: self.free.len(), total_blocks: self.total }
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

    /// Whether all `(seq, extra)` growths fit in the free blocks together; the first that does
    /// not fit otherwise.
    pub fn first_misfit(&self, growths: &[(SeqId, usize)]) -> Option<SeqId> {
        let mut free = self.free.len();
        for &(seq, extra) in growths {
            let need = self.blocks_needed(seq, extra);
            if need > free {
                return Some(seq);
            }
            free -= need;
        }
        None
    }

    /// Grows `seq` by `extra` positions, taking blocks as needed; returns the blocks taken (to
    /// give back with `undo_grow` should the step fail). The caller has checked the room.
    pub fn grow(&mut self, seq: SeqId, extra: usize) -> Vec<u32> {
        let need = self.blocks_needed(seq, extra);
        assert!(need <= self.free.len(), "grow() past the free blocks: check first_misfit() first");
        let t = self.tables.entry(seq).or_default();
        let taken: Vec<u32> = (0..need).map(|_| self.free.pop().expect("counted above")).collect();
        t.blocks.extend_from_slice(&taken);
        t.len += extra;
        taken
    }

    /// Undoes a `grow` of `extra` positions that took `taken`.
    pub fn undo_grow(&mut self, seq: SeqId, extra: usize, taken: &[u32]) {
        if let Some(t) = self.tables.get_mut(&seq) {
            t.len -= extra;
            t.blocks.truncate(t.blocks.len() - taken.len());
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

    /// Gives every block of `seq` back.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            self.free.extend(t.blocks.iter().rev());
        }
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
}
