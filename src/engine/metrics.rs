//! Request latency distributions of one engine, as Prometheus histograms with vLLM's names and
//! buckets (so dashboards made for vLLM work): time to first token, time per output token,
//! end-to-end latency and queue wait, plus finished requests by reason.
//!
//! The worker observes; `/metrics` reads snapshots. Buckets are atomic counters: observing is a
//! few relaxed atomic adds, no lock.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
pub const TTFT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0];
/// vLLM's `vllm:time_per_output_token_seconds` buckets.
pub const TPOT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's request latency buckets (`vllm:e2e_request_latency_seconds`, queue time).
pub const REQUEST_BUCKETS: &[f64] = &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0];

/// One histogram: a counter per bucket (observations <= its bound), the sum and the count.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of the observations in nanoseconds.
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A histogram's values at one moment (cumulative bucket counts, as Prometheus exposes them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Observations <= each bound, cumulative.
    pub cumulative: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_nanos: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.sum_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let cumulative = self.counts.iter().map(|c| {
            acc += c.load(Relaxed);
            acc
        });
        HistogramSnapshot { bounds: self.bounds, cumulative: cumulative.collect(), sum: self.sum_nanos.load(Relaxed) as f64 * 1e-9, count: self.count.load(Relaxed) }
    }
}

impl HistogramSnapshot {
    /// Adds another snapshot of the same buckets (the workers of one model).
    pub fn merge(&mut self, o: &HistogramSnapshot) {
        if self.bounds.is_empty() {
            *self = o.clone();
            return;
        }
        debug_assert_eq!(self.bounds, o.bounds, "merging histograms of different buckets");
        for (a, b) in self.cumulative.iter_mut().zip(&o.cumulative) {
            *a += b;
        }
        self.sum += o.sum;
        self.count += o.count;
    }
}

/// Why a request ended, for `vllm:request_success_total{finished_reason}` (vLLM counts stop,
/// length and abort; errors are counted apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stop,
    Length,
    /// The client went away first.
    Abort,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Outcome::Stop, Outcome::Length, Outcome::Abort, Outcome::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Abort => "abort",
            Outcome::Error => "error",
        }
    }
}

/// The latency histograms and outcome counters of one engine.
#[derive(Debug)]
pub struct LatencyMetrics {
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    outcomes: [AtomicU64; 4],
}

/// A snapshot of [`LatencyMetrics`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencySnapshot {
    pub ttft: HistogramSnapshot,
    pub tpot: HistogramSnapshot,
    pub e2e: HistogramSnapshot,
    pub queue: HistogramSnapshot,
    /// Requests ended, by [`Outcome::ALL`]'s order.
    pub outcomes: [u64; 4],
}

impl Default for LatencyMetrics {
    fn default() -> Self {
        LatencyMetrics {
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            e2e: Histogram::new(REQUEST_BUCKETS),
            queue: Histogram::new(REQUEST_BUCKETS),
            outcomes: Default::default(),
        }
    }
}

impl LatencyMetrics {
    pub fn ended(&self, o: Outcome) {
        self.outcomes[o as usize].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            ttft: self.ttft.snapshot(),
            tpot: self.tpot.snapshot(),
            e2e: self.e2e.snapshot(),
            queue: self.queue.snapshot(),
            outcomes: std::array::from_fn(|i| self.outcomes[i].load(Relaxed)),
        }
    }
}

impl LatencySnapshot {
    pub fn merge(&mut self, o: &LatencySnapshot) {
        self.ttft.merge(&o.ttft);
        self.tpot.merge(&o.tpot);
        self.e2e.merge(&o.e2e);
        self.queue.merge(&o.queue);
        for (a, b) in self.outcomes.iter_mut().zip(o.outcomes) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn observations_land_in_cumulative_buckets_and_snapshots_merge() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for ms in [5, 10, 50, 2000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![2, 3, 3], "10 ms counts in the 0.01 bucket (le); 2 s only in +Inf");
        assert_eq!(s.count, 4);
        assert!((s.sum - 2.065).abs() < 1e-9);
        let mut m = s.clone();
        m.merge(&s);
        assert_eq!((m.cumulative, m.count), (vec![4, 6, 6], 8));
        let mut empty = HistogramSnapshot::default();
        empty.merge(&s);
        assert_eq!(empty, s);
    }
}
