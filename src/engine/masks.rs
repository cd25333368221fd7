//! Structured outputs in a step: the constrained rows' token masks are computed on a helper
//! thread while the backend runs the forward pass; the sampler waits for a row's mask only once
//! that row's logits exist (`structured::MaskSlot`).
use crate::structured::{Constraint, MaskSlot};

/// One empty slot per row that samples under a constraint.
pub fn slots<'a>(constraints: impl Iterator<Item = Option<&'a Constraint>>) -> Vec<Option<MaskSlot>> {
    constraints.map(|c| c.map(|_| MaskSlot::default())).collect()
}

/// Runs `step` while a helper thread fills every slot from its constraint. Each slot is set
/// whatever happens (a failing matcher gives an end-of-sequence-only mask), so a sampler waiting
/// on one never hangs.
pub fn while_computing<R>(jobs: Vec<(&Constraint, &MaskSlot)>, step: impl FnOnce() -> R) -> R {
    if jobs.is_empty() {
        return step();
    }
    std::thread::scope(|sc| {
        sc.spawn(move || {
            for (c, slot) in jobs {
                slot.set(c.mask());
            }
        });
        step()
    })
}
