//! Coarse per-phase timing of the forward pass, switched on with `INFERD_PROFILE=1`.
//!
//! Exists to find where a decode step's time goes (docs/perf-notes.md). When off, a phase mark
//! costs one relaxed atomic load; when on, each mark reads the clock and adds the time since the
//! previous mark to its phase's counter. `report()` prints and resets the counters.
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

/// The phases of one forward pass, in execution order.
pub const PHASES: [&str; 12] = [
    "embed", "attn_norm", "qkv", "rope+cache", "attention", "o_proj+res", "ffn_norm", "gate_up",
    "silu*up", "down+res", "final_norm", "lm_head",
];

static NANOS: [AtomicU64; PHASES.len()] = [const { AtomicU64::new(0) }; PHASES.len()];
static STEPS: AtomicU64 = AtomicU64::new(0);
/// 0 = not read yet, 1 = off, 2 = on.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether `INFERD_PROFILE=1` is set (read once).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("INFERD_PROFILE").is_ok_and(|v| v == "1");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// A running clock for one forward pass.
pub struct Clock(Option<Instant>);

impl Clock {
    /// Starts timing if profiling is on.
    pub fn start() -> Self {
        if enabled() {
            STEPS.fetch_add(1, Ordering::Relaxed);
            Clock(Some(Instant::now()))
        } else {
            Clock(None)
        }
    }

    /// Charges the time since the previous mark to `phase` (an index into `PHASES`).
    #[inline]
    pub fn mark(&mut self, phase: usize) {
        if let Some(t) = &mut self.0 {
            let now = Instant::now();
            NANOS[phase].fetch_add((now - *t).as_nanos() as u64, Ordering::Relaxed);
            *t = now;
        }
    }
}

/// Prints the time per phase (total and per step) to stderr and resets the counters.
pub fn report(label: &str) {
    let steps = STEPS.swap(0, Ordering::Relaxed).max(1);
    let ns: Vec<u64> = NANOS.iter().map(|n| n.swap(0, Ordering::Relaxed)).collect();
    let total: u64 = ns.iter().sum::<u64>().max(1);
    eprintln!("profile {label}: {steps} forward passes, {:.3} ms per pass", total as f64 / steps as f64 / 1e6);
    for (name, n) in PHASES.iter().zip(&ns) {
        eprintln!(
            "  {name:<12} {:>8.3} ms/pass {:>5.1}%",
            *n as f64 / steps as f64 / 1e6,
            100.0 * *n as f64 / total as f64
        );
    }
}

/// Zeroes the counters (e.g. after a prefill that should not count).
pub fn reset() {
    STEPS.store(0, Ordering::Relaxed);
    NANOS.iter().for_each(|n| n.store(0, Ordering::Relaxed));
}
