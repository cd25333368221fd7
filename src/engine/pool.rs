//! Several workers serving one model: each with its own backend (its own copy of the weights and
//! KV cache, on its own device), the pool sends every sequence to the least loaded one.
//!
//! Load is what a worker has admitted and not finished (running + waiting). A worker whose queue
//! is full is skipped; the request is refused only when every worker's is. A sequence stays on the
//! worker it was sent to for its whole life (its KV cache lives there), adapters included: the
//! adapter rides in the request, and every worker's backend applies it.
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::{EngineHandle, EngineStats, Event, GenRequest, SubmitError};

pub struct EnginePool {
    workers: Vec<EngineHandle>,
    /// Rotates the starting point among equally loaded workers.
    next: AtomicUsize,
}

impl EnginePool {
    /// A pool over `workers` (at least one).
    pub fn new(workers: Vec<EngineHandle>) -> EnginePool {
        assert!(!workers.is_empty(), "a pool needs a worker");
        EnginePool { workers, next: AtomicUsize::new(0) }
    }

    pub fn workers(&self) -> &[EngineHandle] {
        &self.workers
    }

    /// Queues one sequence on the least loaded live worker (ties: round robin).
    pub fn submit(&self, req: GenRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.workers.len();
        let mut order: Vec<(usize, usize)> = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| self.workers[i].is_alive())
            .map(|i| {
                let s = self.workers[i].stats();
                (s.running + s.waiting, i)
            })
            .collect();
        // Stable: equal loads keep the rotated order.
        order.sort_by_key(|&(load, _)| load);
        let mut last = SubmitError::Closed;
        for (_, i) in order {
            match self.workers[i].submit(req.clone()) {
                Ok(rx) => return Ok(rx),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The smallest context any worker accepts.
    pub fn max_context(&self) -> usize {
        self.workers.iter().map(EngineHandle::max_context).min().unwrap_or(0)
    }

    /// Every worker alive (what `/ready` asks).
    pub fn is_alive(&self) -> bool {
        self.workers.iter().all(EngineHandle::is_alive)
    }

    pub fn vocab_size(&self) -> usize {
        self.workers[0].vocab_size()
    }

    /// The workers' counters summed; the KV usage is the average over workers.
    pub fn stats(&self) -> EngineStats {
        let mut t = EngineStats::default();
        for s in self.workers.iter().map(EngineHandle::stats) {
            t.running += s.running;
            t.waiting += s.waiting;
            t.generated_tokens += s.generated_tokens;
            t.prompt_tokens += s.prompt_tokens;
            t.steps += s.steps;
            t.step_seconds += s.step_seconds;
            t.sample_seconds += s.sample_seconds;
            t.idle_seconds += s.idle_seconds;
            t.preemptions += s.preemptions;
            t.overlapped_tokens += s.overlapped_tokens;
            t.dropped_tokens += s.dropped_tokens;
            t.prefix_cache_tokens += s.prefix_cache_tokens;
            t.prefix_cache_bytes += s.prefix_cache_bytes;
            t.kv_cache_usage += s.kv_cache_usage / self.workers.len() as f64;
            t.latency.merge(&s.latency);
        }
        t
    }
}
