//! Run shapes from a small fixed set, for execution providers that pay for every new one.
//!
//! ONNX Runtime's CUDA provider spends 50-190 ms the first time a session runs a new input
//! shape (mostly in GroupQueryAttention and MatMulNBits; measured on an H100, the same for
//! onnxruntime-genai: docs/cuda.md) and ~4 ms on a shape it has seen. Prompts of any length and
//! batches of any size would pay that on nearly every request, so on CUDA the backend
//! - pads a prompt chunk to the next power of two of at least [`MIN_CHUNK`] tokens (the padding
//!   positions are computed as tokens and discarded: the sequence's length counts only the real
//!   ones, its next token overwrites them, and nothing before them attends to them);
//! - splits first chunks run together into groups of power-of-two sizes;
//! - widens a decode run's slot range to a power of two (the extra slots ride along as the
//!   in-between slots already do);
//! - runs each of those shapes once before serving ([`OnnxBackend::warm_up`], from
//!   `Backend::prepare` on the engine's thread: the provider's per-shape set-up is kept per
//!   thread, so shapes warmed up on the loading thread still cost the engine's first runs).
use super::OnnxBackend;
use crate::backend::BackendError;

/// The shortest padded prompt chunk.
pub const MIN_CHUNK: usize = 16;
/// Prompt chunk lengths warmed up (longer chunks, from a larger `prefill_chunk`, pay their
/// first run once).
pub const MAX_WARM_CHUNK: usize = 2048;
/// Rows x chunk length warmed up (first chunks of many long prompts arriving together are rare;
/// GroupQueryAttention's scratch grows with both).
pub const MAX_WARM_TOKENS: usize = 8192;

/// The padded length of a chunk of `s` tokens when `room` positions are left in the layout
/// (`s` itself when `s` is 1 or the bucket does not fit).
pub fn chunk_len(s: usize, room: usize) -> usize {
    if s <= 1 {
        return s;
    }
    let b = s.next_power_of_two().max(MIN_CHUNK);
    if b <= room {
        b
    } else {
        s
    }
}

/// `n` rows as power-of-two groups, largest first (7 -> 4, 2, 1).
pub fn pow2_parts(n: usize) -> Vec<usize> {
    (0..usize::BITS).rev().map(|bit| 1usize << bit).filter(|p| n & p != 0).collect()
}

/// A decode run over slots `lo..=hi` widened to a power-of-two count of slots, within `slots`
/// slots: (first slot, count).
pub fn decode_range(lo: usize, hi: usize, slots: usize) -> (usize, usize) {
    let b = (hi - lo + 1).next_power_of_two().min(slots);
    let b = b.max(hi - lo + 1);
    (lo.min(slots - b), b)
}

impl OnnxBackend {
    /// Runs every shape the fixed set holds once (decode over 1, 2, 4, .. and all slots; first
    /// chunks of each padded length for 1, 2, 4, .. rows), so that no request pays a first run.
    /// Slot lengths are left as they were (all zero at load).
    pub(super) fn warm_up(&mut self) -> Result<(), BackendError> {
        let t = std::time::Instant::now();
        let slots = self.kv.shape.slots;
        let max_len = self.kv.shape.max_len;
        let mut runs = 0;
        // Decode ranges and first-chunk groups: powers of two, and all slots.
        let mut sizes: Vec<usize> = (0..usize::BITS).map(|i| 1usize << i).take_while(|&b| b < slots).collect();
        sizes.push(slots);
        for b in sizes {
            let extra = self.adapter_inputs(&vec![None; b])?;
            let mut tokens = vec![0i64; b];
            self.forward(0, b, 1, &mut tokens, &vec![0; b], &vec![1; b], &extra)?;
            runs += 1;
            let mut s = MIN_CHUNK;
            while s <= MAX_WARM_CHUNK.min(max_len) && b * s <= MAX_WARM_TOKENS && b.is_power_of_two() {
                let mut tokens = vec![0i64; b * s];
                self.forward(0, b, s, &mut tokens, &vec![0; b], &vec![s; b], &extra)?;
                runs += 1;
                s *= 2;
            }
        }
        tracing::info!(runs, ms = t.elapsed().as_millis() as u64, "ONNX run shapes warmed up");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_lengths_are_powers_of_two_that_fit() {
        assert_eq!(chunk_len(1, 100), 1);
        assert_eq!(chunk_len(2, 100), 16);
        assert_eq!(chunk_len(16, 100), 16);
        assert_eq!(chunk_len(17, 100), 32);
        assert_eq!(chunk_len(41, 100), 64);
        assert_eq!(chunk_len(256, 4096), 256);
        assert_eq!(chunk_len(257, 4096), 512);
        // Not enough room left for the bucket: the chunk runs as it is.
        assert_eq!(chunk_len(41, 63), 41);
        assert_eq!(chunk_len(41, 64), 64);
    }

    #[test]
    fn parts_are_powers_of_two_summing_to_n() {
        assert_eq!(pow2_parts(1), vec![1]);
        assert_eq!(pow2_parts(7), vec![4, 2, 1]);
        assert_eq!(pow2_parts(8), vec![8]);
        assert_eq!(pow2_parts(13), vec![8, 4, 1]);
        assert!(pow2_parts(0).is_empty());
    }

    #[test]
    fn decode_ranges_widen_within_the_slots() {
        assert_eq!(decode_range(0, 0, 16), (0, 1));
        assert_eq!(decode_range(3, 5, 16), (3, 4));
        assert_eq!(decode_range(14, 15, 16), (14, 2));
        assert_eq!(decode_range(13, 15, 16), (12, 4));
        assert_eq!(decode_range(0, 4, 16), (0, 8));
        // 12 slots: 5 rows widen to 8, shifted down to fit.
        assert_eq!(decode_range(6, 10, 12), (4, 8));
        // More rows than the largest power of two within the slots: all slots.
        assert_eq!(decode_range(0, 10, 12), (0, 12));
    }
}
