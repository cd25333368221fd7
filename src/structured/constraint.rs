//! One sequence's grammar state, and the token mask of one step.
//!
//! The engine computes each constrained row's mask on a helper thread while the backend runs the
//! step's forward pass, and the sampler waits for it only once the logits are there
//! ([`MaskSlot`]), so the mask costs the step nothing unless it takes longer than the forward pass.
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::toktrie::SimpleVob;
use llguidance::Matcher;

/// A sequence's matcher: which tokens the grammar allows next, advanced by each sampled token.
#[derive(Clone)]
pub struct Constraint {
    matcher: Arc<Mutex<Matcher>>,
    /// Mask size and the token that ends the answer (what a failed matcher still allows).
    n_vocab: usize,
    eos: u32,
    /// Set when the grammar engine panicked computing a mask.
    failure: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    pub fn new(m: Matcher, n_vocab: usize, eos: u32) -> Self {
        Self { matcher: Arc::new(Mutex::new(m)), n_vocab, eos, failure: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Matcher> {
        self.matcher.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A mask allowing only the end-of-sequence token.
    fn eos_only(&self) -> SimpleVob {
        let mut v = SimpleVob::alloc(self.n_vocab.max(self.eos as usize + 1));
        v.allow_token(self.eos);
        v
    }

    /// The tokens allowed next (only the end-of-sequence token once the grammar is complete).
    /// When the matcher has failed, also only that token, so that the sequence ends; the
    /// failure is then reported by [`Constraint::commit`] or [`Constraint::error`].
    pub fn mask(&self) -> SimpleVob {
        // A panic inside the grammar engine poisons nothing here: it ends this sequence only.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.lock().compute_mask_or_eos()));
        match r {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => self.eos_only(),
            Err(_) => {
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some("the grammar engine failed computing a token mask".into());
                self.eos_only()
            }
        }
    }

    /// Advances the grammar by a sampled token.
    pub fn commit(&self, token: u32) -> Result<(), String> {
        if let Some(e) = self.error() {
            return Err(e);
        }
        let mut m = self.lock();
        if m.is_stopped() {
            return Ok(());
        }
        m.consume_token(token).map_err(|e| e.to_string())
    }

    /// The matcher's error, if it has failed.
    pub fn error(&self) -> Option<String> {
        let failed = self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        failed.or_else(|| self.lock().get_error())
    }
}

/// A mask being computed for one row of a step: set once by the engine's helper thread, read by
/// the sampler.
#[derive(Default)]
pub struct MaskSlot(OnceLock<SimpleVob>);

impl std::fmt::Debug for MaskSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskSlot")
    }
}

impl MaskSlot {
    pub fn set(&self, v: SimpleVob) {
        let _ = self.0.set(v);
    }

    /// Waits for the mask (the engine sets every slot of a step, errors included).
    pub fn wait(&self) -> &SimpleVob {
        self.0.wait()
    }

    /// Sets every token the mask forbids to minus infinity. Ids past the mask are forbidden.
    pub fn apply(&self, logits: &mut [f32]) {
        apply(self.wait(), logits);
    }
}

/// Forbids in `logits` every token `mask` does not allow.
pub fn apply(mask: &SimpleVob, logits: &mut [f32]) {
    let words = mask.as_slice();
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits >> b & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}
